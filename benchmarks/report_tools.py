"""What every benchmark script shares: the machine line, peak memory, and REPORT.md section updates."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from custom_nets.utils.io import atomic_write  # noqa: E402
from custom_nets.utils.proc import bundle_run_command  # noqa: E402,F401  (the benchmarks import it from here)


def machine() -> str:
    """CPU model, visible cores, current load, Python/torch/numpy versions."""
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores visible, load average {load:.1f} at the start, "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def write_report(report: Path, section: str) -> None:
    """Replace the section of ``report`` whose heading is ``section``'s first line (or append it),
    leaving other sections as they are; written atomically."""
    heading = section.splitlines()[0]
    text = report.read_text() if report.is_file() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start >= 0:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    atomic_write(report, lambda tmp: tmp.write_text(text))


def run_bundle(cmd: list[str], log_file: Path, what: str) -> None:
    """Run one ``python -m monai.bundle`` command from the repository root, appending its output to ``log_file``.

    Raises:
        SystemExit: the command failed; the message names ``what``, the log and its last 30 lines.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write("\n$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see {log_file}:\n{tail}")
