"""The meduet_ssl additions (clean-pass adversary, global style, decorrelation, swap cycle, batch
domain share, banked domain means of crops and of fixed windows, token distributions, paired content,
all-visible reconstruction) under
two-process gloo DistributedDataParallel: the step runs, and the network, the adversary and the domain
banks (which live outside the DDP wrapper) stay identical on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tests.support.ddp_utils import run_ranks


def _worker(rank: int, world: int) -> dict[str, Any]:
    from custom_nets.engines.ssl.step import MeDUETTrainStep
    from custom_nets.nets.meduet import MeDUET, meduet_config

    torch.manual_seed(rank)  # a different start per rank: DDP and the step must align them
    net = MeDUET(**{**meduet_config("demo"), "n_domains": 3, "style_mode": "global"})
    step = MeDUETTrainStep(torch.nn.parallel.DistributedDataParallel(net), dict(
        total_steps=10, warmup_steps=1, mftd_start_step=0, checkpointing=[], reencode_chunk=0, seed=rank,
        clean_domain_weight=1.0, decorrelation_weight=1.0, swap_cycle_weight=1.0, domain_share_weight=1.0,
        domain_mean_weight=1.0, domain_window_weight=1.0, domain_token_weight=1.0, paired_content_weight=1.0,
        self_rec_weight=1.0))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for _ in range(2):
        out = step(torch.randn(4, 4, 16, 16, 16, generator=g), torch.tensor([0, 1, 2, 1]),
                   windows=torch.randn(4, 4, 32, 16, 16, generator=g), paired_windows=torch.randn(4, 4, 32, 16, 16, generator=g))
    return {"network": torch.cat([p.detach().flatten() for p in net.parameters()]),
            "adversary": torch.cat([p.detach().flatten() for p in step.adversary.parameters()]),
            "bank": torch.cat([b.detach().float().flatten() for b in step.domain_bank.buffers()]),
            "window_bank": torch.cat([b.detach().float().flatten() for b in step.window_bank.buffers()]),
            "loss": torch.tensor(out["loss"])}


def test_additions_keep_ranks_in_step(tmp_path: Path) -> None:
    ranks = run_ranks(_worker, tmp_path)
    assert torch.isfinite(ranks[0]["loss"]) and torch.isfinite(ranks[1]["loss"])
    torch.testing.assert_close(ranks[0]["network"], ranks[1]["network"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["adversary"], ranks[1]["adversary"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["bank"], ranks[1]["bank"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["window_bank"], ranks[1]["window_bank"], rtol=0, atol=0)
