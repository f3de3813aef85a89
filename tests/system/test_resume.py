"""Kill a training run with SIGKILL once it has written a checkpoint, resume it, and compare with an
uninterrupted run: same final step count, same weights, optimizer state, EMA and exported model.

For every bundle's train.json (demo overlay plus smaller sizes), through ``python -m monai.bundle
run`` as a user would. The reference run and the run to be killed start together (two processes
on two cores); the killed run resumes with ``--resume true`` (newest checkpoint of ``ckpt_dir``).

Tolerance: rtol 1e-5, atol 1e-6 on float tensors, integers exact. A resumed run restores every
state tensor exactly and reseeds its random streams from (seed, epoch), so on one machine with the
same thread count the results are in practice bit-identical; the tolerance only leaves room for
float32 summation order (e.g. a different memory alignment picking another vectorised kernel).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from custom_nets.utils.proc import bundle_run_command
from tests.support.bundle_runner import ROOT, run_bundle
from tests.support.world import BUNDLES, config_files, train_overrides

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-6
EPOCHS = 2


@pytest.fixture(scope="module")
def upstream(world: dict[str, Path]) -> dict[str, Path]:
    return world


def start(bundle: str, overrides: Mapping[str, Any], log: Path) -> subprocess.Popen:
    """``python -m monai.bundle run`` in the background (output to ``log``), as bundle_runner runs it."""
    cmd = bundle_run_command(config_files(bundle), **dict(overrides))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("MEDUET_TEST_THREADS", "2"))
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def interval_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Completed interval checkpoints (not the hidden temporary file of a save in progress)."""
    return sorted(ckpt_dir.glob("[!.]*epoch=*.pt"))


def final_checkpoint(ckpt_dir: Path) -> Path:
    files = sorted(ckpt_dir.glob("[!.]*final*.pt"))
    assert len(files) == 1, files
    return files[0]


def assert_close_tree(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers: same structure, floats close, the rest equal."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_close_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=RTOL, abs=ATOL), where
    else:
        assert a == b, (where, a, b)


def counters(state: Mapping[str, Any]) -> dict[str, int]:
    """Step counters of a saved training state: the trainer's, and the stage's own where it has one."""
    trainer = state["trainer"]  # ignite saves the iteration and the epoch length
    out = {"iteration": int(trainer["iteration"]), "epoch": int(trainer["iteration"]) // int(trainer["epoch_length"])}
    if "step" in state and isinstance(state["step"], Mapping) and "step" in state["step"]:
        out["ssl_step"] = int(state["step"]["step"])
    if "ema" in state:
        out["ema_updates"] = int(state["ema"]["num_updates"])
    return out


@pytest.mark.parametrize("bundle", BUNDLES)
def test_sigkill_then_resume_matches_an_uninterrupted_run(bundle: str, upstream: dict[str, Path], tmp_path: Path) -> None:
    ref_out, out = tmp_path / "reference", tmp_path / "killed"
    ref_args, args = train_overrides(bundle, upstream, ref_out, EPOCHS), train_overrides(bundle, upstream, out, EPOCHS)
    ref = start(bundle, ref_args, tmp_path / "reference.log")
    run = start(bundle, args, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not interval_checkpoints(out / "ckpt"):
            assert run.poll() is None, f"ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
        assert not list((out / "ckpt").glob("[!.]*final*.pt")), "the run finished before it was killed"
        assert ref.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-4000:]
    finally:
        for p in (ref, run):
            if p.poll() is None:
                p.kill()
                p.wait()

    proc = run_bundle(config_files(bundle), {**args, "resume": True}, timeout=300)
    log = proc.stdout + proc.stderr
    loaded = [line for line in log.splitlines() if "resume: loading" in line]
    assert loaded and "epoch=" in loaded[0], log[-3000:]  # it continued from an interval checkpoint

    want = torch.load(final_checkpoint(ref_out / "ckpt"), weights_only=True)
    got = torch.load(final_checkpoint(out / "ckpt"), weights_only=True)
    assert counters(got) == counters(want)
    assert counters(want)["epoch"] == EPOCHS and counters(want)["iteration"] > EPOCHS
    assert_close_tree(got, want)

    # the exported model is the same one, from the same epoch (its "best" bookkeeping was resumed too)
    ref_meta = json.loads((ref_out / "models" / "model.json").read_text())
    meta = json.loads((out / "models" / "model.json").read_text())
    assert meta.get("epoch") == ref_meta.get("epoch") and meta.get("export") == ref_meta.get("export")
    assert_close_tree(torch.load(out / "models" / "model.pt", weights_only=True),
                      torch.load(ref_out / "models" / "model.pt", weights_only=True), "model.pt")


def test_resume_from_a_missing_file_is_refused_before_training(upstream: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "checkpoint_final.pt"
    args = {**train_overrides("meduet_vae", upstream, tmp_path / "out", 1), "resume_from": missing}
    proc = run_bundle(config_files("meduet_vae"), args, check=False, timeout=300)
    assert proc.returncode != 0
    assert f"{missing}: resume_from checkpoint not found" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "ckpt").exists() and not (tmp_path / "out" / "models").exists()


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path: Path) -> None:
    from custom_nets.engines.common.resume import ResumableCheckpoint

    handler = ResumableCheckpoint(tmp_path / "empty", {}, resume="true")
    assert handler.resume_path() is None
    (tmp_path / "empty").mkdir()
    old, new = tmp_path / "empty" / "checkpoint_epoch=1.pt", tmp_path / "empty" / "checkpoint_epoch=2.pt"
    old.write_bytes(b"1")
    new.write_bytes(b"2")
    os.utime(old, ns=(1, 1))
    assert handler.resume_path() == new  # the newest by modification time
    (tmp_path / "empty" / "tmpab12cd").write_bytes(b"")  # ignite's temporary file of an interrupted save
    assert handler.resume_path() == new
