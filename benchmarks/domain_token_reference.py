"""Reference levels of meduet_ssl's token criterion (``domain_token_weight``) on the disentanglement data.

The training curve of ``loss/domain_token`` has no scale of its own. This script gives it two, on
the training latents of a ``benchmarks/disentanglement.py`` run, with batches shaped as in training
(8 volumes, 2 per domain, each volume's 16^3 window as 512 tokens of 2^3 x 4 latent values):

- ``raw``: the raw latent's tokens with their true domains (what content scores if it keeps the
  latent's domain information);
- ``single_style``: 8 volumes of *one* style labelled as 4 domains (what the criterion reads when the
  domains really are the same: the floor set by the batch's finite sample).

Usage::

    python benchmarks/domain_token_reference.py --out outputs/disentanglement_cubes \\
        --results benchmarks/results/domain_token_reference.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from custom_nets.data.latent_cache import open_latent
from custom_nets.losses.domain_quantiles import random_directions, sliced_domain_quantile_loss
from custom_nets.nets.vit import patchify
from custom_nets.utils.io import write_json


def volume_tokens(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(C, D, H, W) latent -> (D*H*W / patch^3, patch^3 * C) tokens, as the network's patch embedding sees them."""
    return patchify(latent[None], patch)[0]


def reference_levels(by_domain: dict[str, list[torch.Tensor]], draws: int, projections: int, seed: int) -> dict[str, float]:
    """Mean criterion over ``draws`` batches: true domains (``raw``) and one style split four ways (``single_style``)."""
    rng = np.random.default_rng(seed)
    domains = sorted(by_domain)
    labels = torch.tensor([k for k in range(len(domains)) for _ in range(2)])
    raw, single = [], []
    for r in range(draws):
        directions = random_directions(volume_tokens(by_domain[domains[0]][0]).shape[1], projections, seed=seed + r)
        batch = [volume_tokens(by_domain[dm][i]) for dm in domains for i in rng.choice(len(by_domain[dm]), 2, replace=False)]
        raw.append(float(sliced_domain_quantile_loss(torch.stack(batch), labels, directions)))
        dm = domains[r % len(domains)]
        batch = [volume_tokens(by_domain[dm][i]) for i in rng.choice(len(by_domain[dm]), len(labels), replace=False)]
        single.append(float(sliced_domain_quantile_loss(torch.stack(batch), labels, directions)))
    return {"raw": float(np.mean(raw)), "single_style": float(np.mean(single))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "disentanglement_cubes",
                   help="a disentanglement run's output folder (its data/datalist.json is read)")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--projections", type=int, default=64, help="as meduet_ssl's domain_token_projections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    root = args.out / "data"
    datalist = root / "datalist.json"
    if not datalist.is_file():
        raise SystemExit(f"{datalist}: not found; run benchmarks/disentanglement.py --out {args.out} first")
    by_domain: dict[str, list[torch.Tensor]] = {}
    for item in json.loads(datalist.read_text())["training"]:
        z = np.array(open_latent(root / item["latent"]), dtype=np.float32)
        by_domain.setdefault(item["domain"], []).append(torch.from_numpy(z))
    result = {**reference_levels(by_domain, args.draws, args.projections, args.seed),
              "draws": args.draws, "projections": args.projections, "domains": sorted(by_domain),
              "command": "python benchmarks/domain_token_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.results:
        write_json(args.results, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
