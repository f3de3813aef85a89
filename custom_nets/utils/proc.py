"""Run a command with its output streamed into a log file (demo stages, benchmark runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def bundle_run_command(config_files: Sequence[str | Path], bundle_root: str | Path | None = None,
                       **overrides: object) -> list[str]:
    """``python -m monai.bundle run --config_file ... [--bundle_root ...] --<id> <value> ...`` as a list.

    One config file is passed as its path, several as a list literal (later files override earlier
    ones), as the bundles' READMEs write them.

    Args:
        config_files: config paths.
        bundle_root: passed as ``--bundle_root`` unless None.
        overrides: config ids and values passed as ``--<id> <value>``.

    Returns:
        The command, starting with this interpreter.
    """
    files = [str(f) for f in config_files]
    if not files:
        raise ValueError("bundle_run_command needs at least one config file")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files[0] if len(files) == 1 else str(files)]
    if bundle_root is not None:
        cmd += ["--bundle_root", str(bundle_root)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


@dataclass
class LoggedRun:
    """Outcome of :func:`run_logged`: exit code, wall seconds and the command's own output."""

    returncode: int
    seconds: float
    output: str

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the output."""
        return "\n".join(self.output.splitlines()[-lines:])


def run_logged(cmd: Sequence[str], log: str | Path, title: str, cwd: str | Path | None = None,
               env: Mapping[str, str] | None = None) -> LoggedRun:
    """Run ``cmd`` with stdout and stderr appended to ``log`` as they come (a killed or hung run
    still leaves its output there), under a ``===== title`` header and the command line.

    Args:
        cmd: the command and its arguments.
        log: log file (appended to; parent folders are created).
        title: header line of this run in the log.
        cwd: working directory.
        env: extra environment variables on top of this process's.

    Returns:
        :class:`LoggedRun` with the command's output read back from the log.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n===== {title}\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env={**os.environ, **(env or {})},
                              stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    with open(log, errors="replace") as f:
        f.seek(start)
        output = f.read()
    return LoggedRun(proc.returncode, seconds, output)
