#!/usr/bin/env python
"""Low-memory exact VAE decode against today's exact decode, back to back in one process (CPU).

    OMP_NUM_THREADS=1 python benchmarks/vae_decode_compare.py [--latent 30,23,28] [--roi 32]

Decodes one random latent (standard normal, as the LDM samples them; paper-size MAISI VAE with
random weights, which time and memory do not depend on) three times, in this order:

1. ``low_memory=True``, stored volumes in bfloat16 (the configuration that fits the paper-size CT in 4 GB);
2. ``low_memory=True``, float32 stored volumes;
3. ``low_memory=False``, float32 (the exact decode before the low-memory path: split "block").

Peak RSS is a high-water mark, so the figure after (1) is (1)'s own peak and later figures are
maxima so far. Printed: CPU and wall time of each decode, peak RSS after each, (2) vs (3) (float32
exactness) and (1) vs (2) (bfloat16 storage error: largest and root-mean-square absolute difference,
also over the float32 image's standard deviation and range). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from custom_nets.nets.vae import decode_latent, maisi_vae  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def differences(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Largest and rms absolute difference of ``a`` from ``ref``, absolute and over ref's std and range."""
    d = (a - ref).abs()
    std, span = float(ref.std()), float(ref.max() - ref.min())
    mx, rms = float(d.max()), float(d.pow(2).mean().sqrt())
    return {"max_abs": mx, "rms_abs": rms, "max_over_std": mx / std, "rms_over_std": rms / std,
            "max_over_range": mx / span}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", default="30,23,28", help="latent X,Y,Z (default: half the chest CT's per axis)")
    p.add_argument("--roi", type=int, default=32, help="decode tile edge in latent voxels (decode_latent's default)")
    args = p.parse_args(argv)
    shape = [int(v) for v in args.latent.split(",")]
    torch.manual_seed(0)
    vae = maisi_vae("paper").eval().requires_grad_(False)
    z = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    runs = {
        "low memory, bf16 stored": dict(low_memory=True, store_dtype=torch.bfloat16),
        "low memory, fp32 stored": dict(low_memory=True),
        "today (block split, fp32 stored)": dict(low_memory=False),
    }
    result: dict = {"latent": [4, *shape], "roi": args.roi, "threads": torch.get_num_threads(),
                    "peak_rss_gb_before": round(peak_rss_gb(), 3), "runs": {}}
    images = {}
    for name, kw in runs.items():
        t0, c0 = time.perf_counter(), cpu_seconds()
        images[name] = decode_latent(vae, z, roi=args.roi, **kw)
        row = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1),
               "peak_rss_gb_so_far": round(peak_rss_gb(), 3), "load_average": round(os.getloadavg()[0], 2)}
        result["runs"][name] = row
        print(f"{name}: {row}", flush=True)
    names = list(runs)
    result["cpu_time_ratio_low_memory_fp32_vs_today"] = round(
        result["runs"][names[1]]["cpu_s"] / result["runs"][names[2]]["cpu_s"], 3)
    result["fp32_low_memory_vs_today"] = differences(images[names[1]], images[names[2]])
    result["bf16_vs_fp32_low_memory"] = differences(images[names[0]], images[names[1]])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
