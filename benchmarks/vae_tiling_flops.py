#!/usr/bin/env python
"""Convolution FLOPs of each whole-volume VAE encode tiling, against one untiled pass (counted, not timed).

    python benchmarks/vae_tiling_flops.py [--shape 244,184,224] [--roi 96] [--width-divisor 8] [--decode]

Runs ``custom_nets.nets.vae.encode_volume`` under ``torch.utils.flop_counter.FlopCounterMode`` for:
one untiled pass, blended tiles (overlap 0.25, the segmentation default), and exact tiling with the
stage splits "resolution", "block" and "norm" (and "norm" with bfloat16 stored stage outputs). The
VAE has the paper VAE's structure at 1/``width-divisor`` of its widths, so that a CPU counts a
whole CT in minutes: every 3-D convolution's FLOPs scale by the same factor (divisor squared), and
the ratios carry over to the paper VAE except for the cheap 1-channel input convolution. The
volume is a smooth phantom (FLOPs do not depend on it; the latent differences do, a little).
``--decode`` counts the decoding of the phantom's latent instead (``DECODE_SETTINGS``; ``max_diff_over_std``
then compares decoded images).

The last line printed is one JSON object: ``untiled_flops`` and, per setting, ``flops_ratio`` and
``max_diff_over_std`` (largest latent difference from the untiled pass over the latent's std).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from custom_nets.nets.vae import decode_latent, encode_volume, maisi_vae, vae_config  # noqa: E402

SETTINGS: dict[str, dict] = {
    "blended (overlap 0.25)": dict(exact=False, overlap=0.25),
    "exact resolution": dict(granularity="resolution"),
    "exact block": dict(granularity="block"),
    "exact norm": dict(granularity="norm"),
    "exact norm, bf16 stored": dict(granularity="norm", store_dtype=torch.bfloat16),
}


#: Decode settings (``--decode``): today's exact decode (split "block", both whole volumes of a stage
#: held at once) and the low-memory one (stages replace their input slab by slab, tiles capped).
DECODE_SETTINGS: dict[str, dict] = {
    "exact block": dict(granularity="block", low_memory=False),
    "exact block, low memory (tile cap 64)": dict(granularity="block", low_memory=True, tile_cap=64),
    "exact block, low memory, bf16 stored": dict(granularity="block", low_memory=True, tile_cap=64,
                                                 store_dtype=torch.bfloat16),
}


def phantom(shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, 1, X, Y, Z) in [0, 1]: an elliptic body with an inner blob and a gradient."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij"))
    body = ((g[0] / 0.8) ** 2 + (g[1] / 0.6) ** 2 < 1).float()
    blob = (((g[0] - 0.2) / 0.3) ** 2 + ((g[1] + 0.1) / 0.3) ** 2 + (g[2] / 0.5) ** 2 < 1).float()
    return (0.4 * body + 0.3 * blob + 0.1 * g[2] * body)[None, None]


def main(argv: list[str] | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="244,184,224", help="volume X,Y,Z (multiples of 4)")
    p.add_argument("--roi", type=int, default=96, help="tile edge in voxels (default 96)")
    p.add_argument("--width-divisor", type=int, default=8, help="paper VAE widths divided by this (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode", action="store_true",
                   help="count decode_latent of the phantom's latent instead (--roi then in latent voxels)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3 or any(s % 4 for s in shape):
        p.error(f"--shape {args.shape}: three sizes, multiples of 4")
    torch.set_num_threads(args.threads)
    paper = vae_config("paper")
    widths = [c // args.width_divisor for c in paper["num_channels"]]
    groups = max(1, paper["norm_num_groups"] // args.width_divisor)
    torch.manual_seed(0)
    vae = maisi_vae("paper", num_channels=widths, norm_num_groups=groups).eval()
    x = phantom(shape)

    settings = SETTINGS
    if args.decode:
        x = encode_volume(vae, x, roi=None)  # the latent to decode
        settings = DECODE_SETTINGS

    def counted(**kw) -> tuple[torch.Tensor, int]:
        with FlopCounterMode(display=False) as fc:
            z = (decode_latent if args.decode else encode_volume)(vae, x, **kw)
        return z, fc.get_total_flops()

    ref, base = counted(roi=None)
    result: dict = {"shape": list(shape), "roi": args.roi, "widths": widths, "decode": args.decode,
                    "untiled_flops": base, "settings": {}}
    print(f"untiled: {base:.3e} FLOPs", flush=True)
    for name, kw in settings.items():
        z, flops = counted(roi=args.roi, **kw)
        row = {"flops_ratio": round(flops / base, 3),
               "max_diff_over_std": float((z - ref).abs().max() / ref.std())}
        result["settings"][name] = row
        print(f"{name}: {row}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
