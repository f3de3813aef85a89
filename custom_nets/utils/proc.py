"""Run a command with its output streamed into a log file (demo stages, benchmark runs)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


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
