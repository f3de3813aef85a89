"""Each bundle's ``multi_gpu_train.json`` under ``torchrun --nproc_per_node=2`` on CPU (gloo).

- The run finishes, and only rank 0 writes: every path a rank writes to is made rank-specific
  (``output_dir``, ``ckpt_dir``, ``model_path`` are expressions of the rank), so anything rank 1
  wrote would appear under its own folder. Rank 1 also prints no per-iteration loss lines.
- A crash of one rank (its training step raises) ends the whole job with a non-zero exit and the
  error in the output within a timeout, instead of the other rank waiting in an all-reduce forever.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from ddp_utils import rank_logs, torchrun
from tiny_upstream import BUNDLES, build_upstream, config_files, train_overrides

pytestmark = pytest.mark.slow

EPOCHS = 2
CRASH_TIMEOUT = 120  # s; a hang would run into gloo's 30-minute collective timeout


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_upstream(tmp_path_factory.mktemp("ddp_upstream"))


def per_rank(path: Path) -> str:
    """A config expression for ``path/rank<R>`` (evaluated after the process group exists)."""
    return f"$'{path}/rank' + str(torch.distributed.get_rank())"


@pytest.mark.parametrize("bundle", BUNDLES)
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
        "$@train#step.iteration_update if torch.distributed.get_rank() == 0 else "
        "(lambda engine, batch: @train#step.iteration_update(engine, batch) if engine.state.iteration < 2 "
        "else 1 / 0)"
    )
    start = time.monotonic()
    proc = torchrun(config_files(bundle, "multi_gpu_train.json"), args, tmp_path / "logs", timeout=CRASH_TIMEOUT)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ZeroDivisionError: division by zero" in output, output[-4000:]
    assert elapsed < CRASH_TIMEOUT
