"""Time and memory of one full MeDUET pretraining step at paper scale on random latents.

One step = teacher and student passes with MFTD and SiQC both on, one backward, gradient clipping,
AdamW update, lr schedule and EMA update (custom_nets.engines.ssl.step.MeDUETTrainStep).

    python benchmarks/ssl_step.py --batch 4 --threads 2 [--precision fp32|bf16|fp16|auto] [--device cpu|cuda]

``--passes reference`` computes the same losses with the authors' pass structure (see
:class:`ReferencePassesStep`) so that both can be timed under the same machine load;
``--count-flops`` also counts one step's FLOPs (``step_gflop``), which do not depend on the load.

The last line printed is one JSON object: step_s_median (median over the timed steps, after
``--warmup`` untimed steps), step_s (every timed step), peak_rss_mb (process peak resident memory,
from getrusage), and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from custom_nets.engines.ssl.step import MeDUETTrainStep  # noqa: E402
from custom_nets.utils.memory import set_malloc_mmap_threshold  # noqa: E402
from custom_nets.losses.demix import demix_reconstruction_loss  # noqa: E402
from custom_nets.losses.domain import domain_loss  # noqa: E402
from custom_nets.losses.mftd import mftd_loss  # noqa: E402
from custom_nets.losses.siqc import siqc_loss  # noqa: E402
from custom_nets.nets.meduet import MeDUET, meduet_config  # noqa: E402
from report_tools import peak_rss_mb  # noqa: E402  (same folder)


class ReferencePassesStep(MeDUETTrainStep):
    """The same losses computed with the authors' pass structure, for a same-machine, same-load
    comparison (``--passes reference``): the student decodes its dual streams twice (once for
    L_rec, again for MFTD), re-encodes the MFTD reconstructions and the swaps in two separate
    passes, decodes the swaps separately; the teacher encodes x and x reversed separately, then its
    mixture; nothing is checkpointed. Reuses this project's modules, so only the pass structure
    differs from :class:`MeDUETTrainStep`."""

    def compute_losses(self, latents, domain_index, mask=None, windows=None, paired_windows=None):  # noqa: D102
        cfg, net, teacher = self.config, self.model, self.teacher
        net.set_checkpointing(())
        x = latents.to(self.device).float()
        d = domain_index.to(self.device).long()
        b = x.shape[0]
        grid = net.encoder.grid_of(x.shape[2:])
        if mask is None:
            mask = self.draw_mask(b, math.prod(grid))
        with self.autocast():
            s = net.encode_mixture(x, mask)
            c_logits, s_logits = net.domain_logits(
                torch.cat([s["content1"], s["content2"]]), torch.cat([s["style1"], s["style2"]])
            )

            def streams(model: MeDUET, f: dict, swapped: bool) -> torch.Tensor:  # the two streams, one 2B batch
                sa, sb = (f["style2"], f["style1"]) if swapped else (f["style1"], f["style2"])
                vis = torch.cat([model.fuse(f["content1"], sa), model.fuse(f["content2"], sb)])
                return model.decode(vis, torch.cat([f["ids1"], f["ids2"]]), grid)

            pred = streams(net, s, False)
            pred_again = streams(net, s, False)  # MFTD decodes the reconstruction a second time
            rec_c, rec_s = net.encode_factors(net.unpatchify(pred_again, grid))
            swap_c, swap_s = net.encode_factors(net.unpatchify(streams(net, s, True), grid))
            with torch.no_grad():
                tc, ts = teacher.encode_factors(x)
                teacher.encode_factors(x.flip(0))  # the authors' second clean pass
                t = teacher.encode_mixture(x, 1.0 - mask)
                t_swap_c, t_swap_s = teacher.encode_factors(teacher.unpatchify(streams(teacher, t, True), grid))
        l_rec = demix_reconstruction_loss(pred, net.patchify(x), mask)
        l_dom = domain_loss(c_logits, s_logits, d)[0]
        l_mftd = mftd_loss(rec_c, rec_s, tc, ts, mask, cfg.mftd_content_weight)[0]
        l_siqc = siqc_loss(
            (s["content1"], s["content2"], swap_c), (s["style1"], s["style2"], swap_s),
            (t["content1"], t["content2"], t_swap_c), (t["style1"], t["style2"], t_swap_s), cfg.siqc_temperature,
        )[0]
        total = cfg.weight_rec * l_rec + cfg.weight_domain * l_dom + cfg.weight_mftd * l_mftd + cfg.weight_siqc * l_siqc
        parts = {"loss": total, "rec": l_rec, "domain": l_dom, "mftd": l_mftd, "siqc": l_siqc}
        return total, {k: v.detach() for k, v in parts.items()}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_profile(path: Path, one_step) -> None:
    """Profile one step and write where its CPU time goes: the step's phases (``meduet.*`` scopes of
    MeDUETTrainStep: teacher, student, reencode, backward, optimizer, ema) and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = one_step()
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith("meduet.")), key=lambda e: -e.cpu_time_total)
    lines = [f"profiled step: {wall:.2f} s wall (profiler overhead included)", "",
             "phase | CPU time s (wall of the scope, children included)", "---|---"]
    lines += [f"{e.key} | {e.cpu_time_total / 1e6:.2f}" for e in phases]
    lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"profile written to {path}", flush=True)


def count_step_flops(one_step) -> int:
    """Floating-point operations of one step as torch's FLOP counter sees it: matrix products, attention and
    convolutions (the work that dominates a ViT step), every pass of the step included (forward,
    backward, checkpoint recomputation, the streamed re-encoding's inner backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        one_step()
    return int(counter.get_total_flops())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="latent crops per step (even)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--size", default="B", choices=["B", "demo"], help="network size (B = paper)")
    p.add_argument("--crop", type=int, default=24, help="latent crop side")
    p.add_argument(
        "--checkpointing", default="default",
        help="comma-separated parts recomputed in backward (mixture,decoder,reencode), 'none', or 'default'",
    )
    p.add_argument(
        "--passes", default="project", choices=["project", "reference"],
        help="project: MeDUETTrainStep; reference: the authors' pass structure (ReferencePassesStep)",
    )
    p.add_argument(
        "--malloc-mmap-threshold", type=int, default=0,
        help="bytes; >0 calls set_malloc_mmap_threshold (lower peak RSS, more page faults); 0 = glibc default",
    )
    p.add_argument("--reencode-chunk", type=int, default=None,
                   help="items per chunk of the student's streamed re-encoding (default: the step's own, 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=Path, default=None,
                   help="also profile one extra step (torch.profiler, CPU) and write its op and phase tables here")
    p.add_argument("--count-flops", action="store_true",
                   help="also count the floating-point operations of one extra step (torch.utils.flop_counter: "
                        "matrix products, attention and convolutions, forward, backward and recomputation)")
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even and >= 2")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc_mmap_threshold > 0 and not set_malloc_mmap_threshold(args.malloc_mmap_threshold):
        print("warning: could not set the malloc mmap threshold (not glibc?)", flush=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = meduet_config(args.size)
    model = MeDUET(**cfg).to(device)
    step_cfg = dict(total_steps=200_000, warmup_steps=2_000, mftd_start_step=0, siqc=True, precision=args.precision)
    if args.checkpointing != "default":
        step_cfg["checkpointing"] = () if args.checkpointing == "none" else tuple(args.checkpointing.split(","))
    if args.reencode_chunk is not None:
        step_cfg["reencode_chunk"] = args.reencode_chunk
    step_cls = ReferencePassesStep if args.passes == "reference" else MeDUETTrainStep
    step = step_cls(model, step_cfg, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, model.encoder.in_channels, args.crop, args.crop, args.crop)
    domains = torch.arange(args.batch) % cfg["n_domains"]

    cpu_times: list[tuple[float, float, int]] = []

    def one_step() -> float:
        x = torch.randn(shape, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        step(x, domains)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_times.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
        return dt

    for i in range(args.warmup):
        print(f"warm-up step {i + 1}/{args.warmup}: {one_step():.2f} s", flush=True)
    times = []
    for i in range(args.steps):
        times.append(one_step())
        print(f"timed step {i + 1}/{args.steps}: {times[-1]:.2f} s", flush=True)
    peak_mb = peak_rss_mb()  # before profiling: the profiler's event buffers would count too
    if args.profile is not None:
        write_profile(args.profile, one_step)
    step_flops = count_step_flops(one_step) if args.count_flops else None
    timed_cpu = cpu_times[args.warmup : args.warmup + args.steps]  # not the profiled or counted step
    result = {
        "step_s_median": round(statistics.median(times), 3),
        "step_s": [round(t, 3) for t in times],
        "peak_rss_mb": round(peak_mb, 1),
        # CPU seconds and page faults of the timed steps (system time shows allocator page faults)
        "user_s_median": round(statistics.median(u for u, _, _ in timed_cpu), 2),
        "sys_s_median": round(statistics.median(s for _, s, _ in timed_cpu), 2),
        "minor_faults_median": int(statistics.median(f for _, _, f in timed_cpu)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "batch": args.batch,
        "threads": args.threads,
        "precision": step.precision,
        "device": args.device,
        "size": args.size,
        "crop": args.crop,
        "passes": args.passes,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "checkpointing": sorted(model.checkpointing),
        "reencode_chunk": step.config.reencode_chunk,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        **({"step_gflop": round(step_flops / 1e9, 1), "step_flops": step_flops} if step_flops is not None else {}),
        "torch": torch.__version__,
        "cpu": cpu_model(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
