"""The bundles' ``multi_gpu_train.json`` under ``torchrun --nproc_per_node=2`` on CPU (gloo).

- One bundle (meduet_vae: two networks under DDP, every kind of rank-0 writer) runs for real: the
  run finishes, and only rank 0 writes: every path a rank writes to is made rank-specific
  (``output_dir``, ``ckpt_dir``, ``model_path`` are expressions of the rank), so anything rank 1
  wrote would appear under its own folder. Rank 1 also prints no per-iteration loss lines. The
  other bundles share the mechanism (``train_distributed.handlers_for_rank`` and the shared
  ``ResumableCheckpoint``); for them a cheap check reads their configs: the overlay routes the
  handlers through ``handlers_for_rank`` and drops validation handlers on ranks > 0, and every
  handler kept on rank 1 is one that writes nothing there. ``MEDUET_DDP_ALL_BUNDLES=1`` runs the
  torchrun test for every bundle (~3 min on 2 cores). The per-stage gradient checks are in
  tests/system/test_stage_ddp.py.
- A crash of one rank (its training step raises) ends the whole job with a non-zero exit and the
  error in the output within a timeout, instead of the other rank waiting in an all-reduce forever.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest
import torch
from tests.support.bundle_runner import ROOT
from tests.support.ddp_utils import rank_logs, torchrun
from tests.support.world import BUNDLES, config_files, train_overrides

pytestmark = pytest.mark.slow

EPOCHS = 2
CRASH_TIMEOUT = 120  # s; a hang would run into gloo's 30-minute collective timeout


@pytest.fixture(scope="module")
def upstream(world: dict[str, Path]) -> dict[str, Path]:
    return world


def per_rank(path: Path) -> str:
    """A config expression for ``path/rank<R>`` (evaluated after the process group exists)."""
    return f"$'{path}/rank' + str(torch.distributed.get_rank())"


TORCHRUN_BUNDLES = BUNDLES if os.environ.get("MEDUET_DDP_ALL_BUNDLES") == "1" else ("meduet_vae",)
# every-rank handlers that write nothing on ranks > 0 (ResumableCheckpoint saves on rank 0 only:
# exercised by the torchrun test)
QUIET_ON_OTHER_RANKS = {"ValidationHandler", "LrScheduleHandler", "ResumableCheckpoint", "SamplerEpoch"}


@pytest.mark.parametrize("bundle", TORCHRUN_BUNDLES)
def test_torchrun_trains_and_only_rank0_writes(bundle: str, upstream: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = train_overrides(bundle, upstream, out, EPOCHS)
    args.update({"output_dir": per_rank(out) + " + '/eval'", "ckpt_dir": per_rank(out) + " + '/ckpt'",
                 "model_path": per_rank(out) + " + '/models/model.pt'"})
    logs = tmp_path / "logs"
    proc = torchrun(config_files(bundle, "multi_gpu_train.json"), args, logs)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    rank0 = out / "rank0"
    assert not (out / "rank1").exists(), sorted(p.relative_to(out) for p in (out / "rank1").rglob("*"))
    final = sorted((rank0 / "ckpt").glob("*final*.pt"))
    assert len(final) == 1, sorted((rank0 / "ckpt").glob("*"))
    state = torch.load(final[0], weights_only=True)
    assert state["trainer"]["iteration"] == EPOCHS * state["trainer"]["epoch_length"]
    assert (rank0 / "models" / "model.pt").is_file() and (rank0 / "models" / "model.json").is_file()
    assert list(rank0.rglob("events.out.tfevents.*"))  # TensorBoard, rank 0 only
    assert "Iter: " in rank_logs(logs, 0) and "Iter: " not in rank_logs(logs, 1)  # StatsHandler lines


def test_a_crashing_rank_ends_the_job_with_its_error(upstream: dict[str, Path], tmp_path: Path) -> None:
    bundle = "meduet_ssl"
    args = train_overrides(bundle, upstream, tmp_path / "out", 3)
    # rank 1's training step fails in its second iteration, while rank 0 waits in the gradient all-reduce
    args["train#trainer#iteration_update"] = (
        "$custom_nets.engines.common.step.as_decollated(@train#step.iteration_update if "
        "torch.distributed.get_rank() == 0 else (lambda engine, batch: @train#step.iteration_update(engine, batch) "
        "if engine.state.iteration < 2 else 1 / 0))"
    )
    start = time.monotonic()
    proc = torchrun(config_files(bundle, "multi_gpu_train.json"), args, tmp_path / "logs", timeout=CRASH_TIMEOUT)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ZeroDivisionError: division by zero" in output, output[-4000:]
    assert elapsed < CRASH_TIMEOUT


def _target_class(target: str) -> type:
    """The class a config ``_target_`` names (MONAI's short names are looked up in monai.handlers / ignite)."""
    if "." in target:
        module, name = target.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)
    import monai.handlers

    return getattr(monai.handlers, target)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_overlay_keeps_imports_and_only_quiet_handlers_on_other_ranks(bundle: str) -> None:
    from monai.bundle import ConfigParser

    from custom_nets.engines.common.distributed import EVERY_RANK

    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in config_files(bundle, "multi_gpu_train.json")])
    # an overlay that replaces "imports" must keep every import train.json's expressions rely on
    base = ConfigParser()
    base.read_config(str(ROOT / config_files(bundle)[0]))
    missing = sorted(set(base["imports"]) - set(parser["imports"]))
    assert not missing, f"multi_gpu_train.json drops imports {missing}"
    assert "handlers_for_rank(@train#handlers)" in str(parser["train#trainer#train_handlers"]).replace("::", "#")
    val = str(parser["validate#evaluator#val_handlers"])
    assert val.startswith("$None if") and "get_rank() > 0" in val, val
    kept = []
    for handler in parser["train#handlers"]:
        cls = _target_class(handler["_target_"])
        if getattr(cls, "every_rank", False) or any(c.__name__ in EVERY_RANK for c in cls.__mro__):
            kept.append(cls.__name__)
    assert kept and set(kept) <= QUIET_ON_OTHER_RANKS, kept
