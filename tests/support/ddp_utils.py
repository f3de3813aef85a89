"""Harness for multi-process (gloo, CPU) tests: spawn ranks, record gradients, compare, torchrun.

A worker is a module-level function ``worker(rank, world, *args) -> dict`` (picklable, so that
``torch.multiprocessing.spawn`` can start it); :func:`run_ranks` initialises the process group
around it and returns what every rank returned (tensors, saved with ``torch.save``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _entry(rank: int, worker: Callable[..., Mapping[str, Any]], tmp: str, world: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        torch.save(dict(worker(rank, world, *args)), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[..., Mapping[str, Any]], tmp: Path, *args: Any, world: int = WORLD) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, *args)`` in ``world`` gloo processes; returns each rank's result.

    Args:
        worker: module-level function; its result must be ``torch.save``-able with plain types.
        tmp: an empty folder (process-group rendezvous file and the results).
        args: more arguments for the worker.
        world: number of processes.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(worker, str(tmp), world, args), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def rank_slice(batch: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    """Rank ``rank``'s equal share of a global batch (what a DistributedSampler hands it)."""
    n = batch.shape[0] // world
    return batch[rank * n:(rank + 1) * n]


class GradientRecorder(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to apply and leaves the weights alone.

    Passed to the real training step, it captures the gradient the step would apply (under DDP:
    after the all-reduce) without changing the network, so several steps compare on one state.

    Args:
        module: the network (unwrapped); gradients are recorded under its parameter names.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], lr=0.0)
        self.names = {id(p): n for n, p in named}
        self.grads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grads[self.names[id(p)]] = p.grad.detach().clone()


def mean_gradients(per_rank: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of each rank's gradients (what DDP's all-reduce computes)."""
    keys = set(per_rank[0])
    for g in per_rank[1:]:
        assert set(g) == keys, sorted(keys ^ set(g))
    return {k: torch.stack([g[k] for g in per_rank]).mean(0) for k in keys}


def assert_same_gradients(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                          rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Same parameter names, every gradient close; at least one gradient is non-zero."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    assert any(bool(v.abs().sum() > 0) for v in want.values()), "all gradients are zero"


def free_port() -> int:
    """A TCP port that is free right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config_files: Sequence[str | Path], overrides: Mapping[str, Any], log_dir: Path,
             nproc: int = WORLD, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m monai.bundle run`` on CPU (gloo), one thread per rank.

    Each rank's stdout/stderr go to ``log_dir/<run id>/attempt_0/<rank>/{stdout,stderr}.log``
    (see :func:`rank_logs`) and also to the returned process's output.
    """
    files = [str(f) for f in config_files]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3", "-m", "monai.bundle", "run",
           "--config_file", str(files)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rank_logs(log_dir: Path, rank: int) -> str:
    """What rank ``rank`` printed (stdout and stderr) in a :func:`torchrun` run."""
    files = sorted(log_dir.glob(f"*/attempt_*/{rank}/std*.log"))
    assert files, f"no logs of rank {rank} under {log_dir}"
    return "".join(f.read_text() for f in files)
