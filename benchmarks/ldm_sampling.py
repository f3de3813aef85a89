"""Seconds per sampling step and peak memory of the latent generator at paper scale, beside MONAI's
MAISI diffusion U-Net on the same latent size.

One sampling step = one guided velocity evaluation on a 4 x 64 x 64 x 32 latent:
- MeDUET generator (SiT-B/4: 12 blocks, 768 wide, 12 heads, patch 4 -> 2048 tokens) through
  ``forward_with_guidance``: the three condition variants (null/null, null/style, content/null)
  in one batch of 3, plus the Euler update;
- ``DiffusionModelUNetMaisi`` in MAISI CT's rectified-flow configuration (maisi_ct_generative
  ``config_network_rflow.json``: channels 64/128/256/512, 2 res blocks, attention on the two
  deepest levels with 32-channel heads, ``resblock_updown``, ``include_fc``, spacing input, 128
  modality classes; ``use_flash_attention`` off because the constructor allows it only on CUDA) on a
  batch of 3, the same guidance work.

Each network runs in its own process so that its peak resident memory (``ru_maxrss``) is its own.
Wall time and process CPU time are both reported: on a shared machine the wall time grows with the
other load, the CPU time much less (it is the figure to compare between runs).

    python benchmarks/ldm_sampling.py [--steps 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LATENT = (4, 64, 64, 32)
GUIDANCE_BATCH = 3

MAISI_CT_RFLOW_UNET = dict(
    spatial_dims=3, in_channels=4, out_channels=4, num_channels=[64, 128, 256, 512],
    attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
    include_top_region_index_input=False, include_bottom_region_index_input=False, include_spacing_input=True,
    num_class_embeds=128, resblock_updown=True, include_fc=True,
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(model: str, steps: int, threads: int, device: str) -> dict:
    """Build one network, run ``steps`` timed sampling steps after one warm-up step."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    base = peak_rss_mib()
    torch.manual_seed(0)
    if model == "meduet_dit":
        from custom_nets.nets.latent_dit import LDM_MODELS

        net = LDM_MODELS["SiT-B/4"](input_size=LATENT[1:], content_dim=768, style_dim=192).to(dev).eval()
        # non-zero modulation so that every branch does real work (zero-init is not a shortcut anyway)
        c, s = torch.randn(1, 768, device=dev), torch.randn(1, 192, device=dev)

        def velocity(x, t):
            return net.forward_with_guidance(x, t, c, s, content_scale=3.0, style_scale=3.0)

        x = torch.randn(1, *LATENT, device=dev)
    elif model == "maisi_unet":
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

        net = DiffusionModelUNetMaisi(**MAISI_CT_RFLOW_UNET, use_flash_attention=False).to(dev).eval()
        spacing = torch.tensor([[1.5, 1.5, 1.5]] * GUIDANCE_BATCH, device=dev)
        labels = torch.tensor([1] * GUIDANCE_BATCH, device=dev)

        def velocity(x, t):
            v = net(x.expand(GUIDANCE_BATCH, -1, -1, -1, -1), t.expand(GUIDANCE_BATCH), class_labels=labels,
                    spacing_tensor=spacing)
            v_un, v_c, _ = v.chunk(3)
            return v_un + 3.0 * (v_c - v_un)

        x = torch.randn(1, *LATENT, device=dev)
    else:
        raise ValueError(model)
    params = sum(p.numel() for p in net.parameters())
    built = peak_rss_mib()
    times, cpu_times = [], []
    with torch.no_grad():
        for i in range(steps + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            t = torch.tensor([1000.0 * (1 - i / (steps + 1))], device=dev)
            x = x + velocity(x, t) * (1.0 / (steps + 1))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out = dict(
        model=model, params_m=params / 1e6, threads=threads, device=device, steps=steps,
        load_average_1min=os.getloadavg()[0],
        s_per_step=sum(times[1:]) / steps, cpu_s_per_step=sum(cpu_times[1:]) / steps, warmup_s=times[0],
        peak_rss_mib=peak_rss_mib(),
        rss_after_imports_mib=base, rss_after_build_mib=built,
    )
    if dev.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=["meduet_dit", "maisi_unet"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.threads, args.device)))
        return 0
    results = []
    for model in ("meduet_dit", "maisi_unet"):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", model, "--steps", str(args.steps), "--threads", str(args.threads),
             "--device", args.device],
            capture_output=True, text=True, check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"latent {LATENT}, guidance batch {GUIDANCE_BATCH}, {args.threads} threads, device {args.device}")
    print("| network | parameters (M) | wall s / sampling step | CPU s / sampling step | peak RSS (MiB) | "
          "load avg (1 min) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params_m']:.1f} | {r['s_per_step']:.1f} | {r['cpu_s_per_step']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['load_average_1min']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
