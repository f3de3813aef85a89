#!/usr/bin/env python
"""How much does a progressive latent segmenter use its latent path? Dice with the latent-grid features zeroed.

    python benchmarks/seg_latent_ablation.py --out outputs/seg_benchmark --runs latent_meduet_L8_seed0_steps1500

Loads a run of ``benchmarks/seg_benchmark.py`` (its final ``model`` state when finished is not kept,
so the last checkpoint ``state.pt`` of a run in progress), and scores the curve subset (one test
anatomy x 5 styles) as is and with ``decode_features`` returning zeros, i.e. with only the
full- and half-resolution image skips left.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import seg_benchmark as sb


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/seg_benchmark")
    p.add_argument("--runs", default="latent_meduet_L8_seed0_steps1500,latent_random_L8_seed0_steps1500")
    p.add_argument("--pool", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = sb.torch_load_data(out, args.pool)
    vae = torch.load(out / "vae" / "vae.pt", weights_only=False)
    ssl = torch.load(out / "ssl" / "ssl.pt", weights_only=False)
    items = [d for d in data["test"] if d["anatomy"] == data["test"][0]["anatomy"]]
    for run in [r for r in args.runs.split(",") if r]:
        st = torch.load(out / "runs" / run / "state.pt", weights_only=False)
        net = sb.build_model(run.split("_L")[0], vae, ssl, 8)
        net.load_state_dict(st["net"])
        full = sb.mean_dice(sb.evaluate(net, "latent", items, 8))
        decode = net.decode_features
        net.decode_features = lambda latent, decode=decode: torch.zeros_like(decode(latent))
        ablated = sb.mean_dice(sb.evaluate(net, "latent", items, 8))
        print(json.dumps({"run": run, "step": st["step"], "dice": round(full, 4),
                          "dice_latent_path_zeroed": round(ablated, 4)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
