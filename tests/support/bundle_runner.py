"""Run a bundle through ``python -m monai.bundle run`` in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from custom_nets.utils.proc import bundle_run_command

ROOT = Path(__file__).resolve().parents[2]


def run_bundle(
    config_files: Sequence[str | Path],
    overrides: Mapping[str, object] | None = None,
    cwd: str | Path = ROOT,
    timeout: float = 600,
    check: bool = True,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file [...] --key value ...``.

    Args:
        config_files: config paths (later ones override earlier ones).
        overrides: config ids and values passed as ``--id value``.
        cwd: working directory of the process.
        timeout: seconds before the process is killed.
        check: raise with the process output if the exit status is non-zero.
        extra_args: more command-line words appended as they are.

    Returns:
        The completed process (stdout and stderr captured as text).
    """
    cmd = bundle_run_command(config_files, **dict(overrides or {})) + list(extra_args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("MEDUET_TEST_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
