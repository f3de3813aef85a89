"""Two-process gloo DistributedDataParallel run of the MeDUET step on a tiny network.

Each rank pairs i <-> B-1-i within its own half of the batch and draws its own mixing mask, so the
DDP objective is the mean of the per-rank losses. Its averaged gradients must equal the gradients
of that same mean computed in one process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tests.support.ddp_utils import assert_same_gradients, run_ranks

from custom_nets.engines.ssl.step import MeDUETTrainStep
from custom_nets.nets.meduet import MeDUET, meduet_config

CROP, WORLD, PER_RANK = 16, 2, 2
STEP_CFG = dict(total_steps=10, warmup_steps=0, mftd_start_step=0, lr=1e-3, checkpointing=("decoder",), reencode_chunk=1)


def make_net() -> MeDUET:
    torch.manual_seed(0)
    return MeDUET(**{**meduet_config("demo"), "n_domains": 3})


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s half of a fixed batch and its own mixing mask (generator seeded per rank)."""
    x = torch.randn(WORLD * PER_RANK, 4, CROP, CROP, CROP, generator=torch.Generator().manual_seed(0))
    d = torch.tensor([0, 1, 2, 1])
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    g = torch.Generator().manual_seed(100 + rank)
    mask = MeDUET.random_mix_mask(make_net(), PER_RANK, 64, g)
    return x[sl], d[sl], mask


def worker(rank: int, world: int) -> dict:
    net = torch.nn.parallel.DistributedDataParallel(make_net())
    step = MeDUETTrainStep(net, STEP_CFG)
    x, d, mask = rank_batch(rank)
    total, _ = step.compute_losses(x, d, mask)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in step.model.named_parameters()}
    step.optimizer.zero_grad(set_to_none=True)
    out = step(x, d, mask)  # the full step (backward, clipping, update, EMA) under DDP
    return {"grads": grads, "params": step.model.state_dict(), "loss": out["loss"]}


def test_ddp_gradients_match_single_process(tmp_path: Path) -> None:
    ranks = run_ranks(worker, tmp_path, world=WORLD)

    step = MeDUETTrainStep(make_net(), STEP_CFG)
    losses = [step.compute_losses(*rank_batch(r))[0] for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    want = {name: p.grad for name, p in step.model.named_parameters()}
    for r in range(WORLD):
        assert_same_gradients(ranks[r]["grads"], want, rtol=1e-4, atol=1e-6)
    # after the full step both ranks hold the same weights, and they moved
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert not torch.equal(ranks[0]["params"]["encoder.patch_embed.weight"], make_net().encoder.patch_embed.weight)
