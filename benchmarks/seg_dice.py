#!/usr/bin/env python
"""Dice of MeDUET-initialised vs randomly initialised latent segmenters on synthetic phantoms.

    python benchmarks/seg_dice.py --out outputs/seg_evidence --stage all

Three questions (ISSUE 5 / METHOD.md section 5), at demo scale on CPU:

(a) label efficiency: MeDUET-initialised vs random ViT with 2 and 8 labelled volumes;
(b) domain generalisation: train on three phantom styles, test on two styles no stage has seen,
    with and without style augmentation (the style bank);
(c) the optional full-resolution refinement: per-label Dice of the smallest structures.

Stages (each can run alone, e.g. under a CPU lock in chunks; finished parts are skipped):

- ``prepare``: phantoms (16 anatomies, 64^3 at 1.5 mm, every anatomy in all 5 styles; anatomies
  0-9 training, 10-11 validation, 12-15 testing), then the upstream chain through the bundles as a
  user runs them: ``meduet_vae`` train + encode (demo overlay) and ``meduet_ssl`` train (demo
  overlay, encoder widened to the segmenter's demo ViT: 96 wide, 4 blocks) on the *unlabelled*
  training anatomies in the three training styles only. The two held-out styles are never seen by
  the VAE, the SSL model or the segmenters.
- ``runs``: one ``meduet_seg`` training per run (train.json + demo.json + a per-run overlay: same
  number of optimizer steps for every run, final weights, no model selection), then Dice on the 20
  test volumes (4 unseen anatomies x 5 styles) on the preprocessed 1.5 mm grid with the bundle's
  latent sliding window (64^3 windows, overlap 0.5).
- ``report``: ``<out>/seg_dice.json`` and ``<out>/seg_dice.md`` (tables).

Everything is seeded (``--seed``); ``--seeds`` repeats each segmenter run with other seeds (the
labelled sets and the upstream models stay the same).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from report_tools import ROOT, bundle_run_command, machine, run_bundle  # (same folder; puts the repo root on sys.path)

TRAIN_STYLES = ("ct_sharp", "ct_smooth_noisy", "mr_t1like")
HELD_OUT_STYLES = ("ct_lowdose", "mr_t2like")
SUBJECTS, N_VAL, N_TEST = 16, 2, 4
SHAPE = (64, 64, 64)
ROI = 64
SSL_ENCODER = {"embed_dim": 96, "depth": 4, "num_heads": 4, "grid": [4, 4, 4]}

# run name -> (labelled volumes, ssl init, style augmentation, refinement channels)
RUNS: dict[str, tuple[int, bool, bool, int]] = {
    "random_L2": (2, False, False, 0),
    "meduet_L2": (2, True, False, 0),
    "random_L8": (8, False, False, 0),
    "meduet_L8": (8, True, False, 0),
    "meduet_L8_style": (8, True, True, 0),
    "meduet_L8_refine": (8, True, False, 8),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/seg_evidence", help="output folder (default outputs/seg_evidence)")
    p.add_argument("--stage", choices=("prepare", "runs", "report", "all"), default="all")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated runs (default all: {','.join(RUNS)})")
    p.add_argument("--seed", type=int, default=0, help="phantom / upstream / first segmenter seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="segmenter seeds per run: seed, seed+1, ... (default 1)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per segmenter run (default 120)")
    p.add_argument("--vae-epochs", type=int, default=8, help="VAE epochs (default 8; 30 crops of 32^3 per epoch)")
    p.add_argument("--ssl-epochs", type=int, default=60, help="MeDUET pretraining epochs (default 60)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--budget-min", type=float, default=9.0,
                   help="do not start another segmenter run after this many minutes (default 9)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> Path:
    from custom_nets.utils.io import write_json as _write

    _write(path, obj)
    return path


def bundle(name: str, configs: Sequence[str | Path], log: Path, **overrides: Any) -> list[str]:
    """Run ``python -m monai.bundle run`` from the repo root; stop with the log tail if it fails."""
    files = [c if Path(str(c)).is_absolute() else f"bundles/{name}/configs/{c}" for c in configs]
    cmd = bundle_run_command(files, f"bundles/{name}", **overrides)
    log.unlink(missing_ok=True)  # one log per run (run_bundle appends)
    t0 = time.perf_counter()
    run_bundle(cmd, log, f"{name} {' '.join(str(c) for c in configs)}")
    print(f"[seg_dice] {name} {' '.join(str(c) for c in configs)}: done in {time.perf_counter() - t0:.0f} s "
          f"(log {log})", flush=True)
    return cmd


def item(subject: int, style: str) -> dict[str, Any]:
    from meduet_demo.phantoms import get_style

    return {"image": f"images/sub-{subject:03d}_{style}.nii.gz", "label": f"labels/sub-{subject:03d}.nii.gz",
            "domain": style, "modality": get_style(style).modality, "content_id": f"sub-{subject:03d}"}


def labelled_set(n: int) -> list[dict[str, Any]]:
    """The first ``n`` training anatomies, anatomy i rendered in training style i mod 3 (L2 is part of L8)."""
    return [item(i, TRAIN_STYLES[i % len(TRAIN_STYLES)]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# prepare: phantoms, VAE, latent cache, MeDUET
# --------------------------------------------------------------------------------------------


def prepare(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from meduet_demo.phantoms import DOMAIN_STYLES, write_phantom_collection

    ph = out / "phantoms"
    times: dict[str, float] = {}
    if not (ph / "datalist.json").is_file():
        t0 = time.perf_counter()
        write_phantom_collection(ph, subjects=SUBJECTS, styles=list(DOMAIN_STYLES), shape=SHAPE, spacing=1.5,
                                 seed=args.seed, all_styles=True, val_fraction=N_VAL / SUBJECTS,
                                 test_fraction=N_TEST / SUBJECTS)
        times["phantoms_s"] = round(time.perf_counter() - t0, 1)
    n_train = SUBJECTS - N_VAL - N_TEST
    val_ids = range(n_train, n_train + N_VAL)
    test_ids = range(n_train + N_VAL, SUBJECTS)
    # unlabelled pretraining collection: training anatomies in the training styles only
    pretrain = {"training": [item(i, s) for i in range(n_train) for s in TRAIN_STYLES],
                "validation": [item(i, s) for i in val_ids for s in TRAIN_STYLES],
                "testing": [], "domains": list(TRAIN_STYLES)}
    for split in ("training", "validation"):
        for it in pretrain[split]:
            it.pop("label")
    write_json(ph / "pretrain.json", pretrain)
    test = [item(i, s) for i in test_ids for s in DOMAIN_STYLES]
    for n in sorted({spec[0] for spec in RUNS.values()}):
        write_json(ph / f"labelled_L{n}.json",
                   {"training": labelled_set(n), "validation": [item(i, TRAIN_STYLES[k % 3]) for k, i in enumerate(val_ids)],
                    "testing": test, "domains": list(DOMAIN_STYLES)})  # the validator wants every listed domain

    vae_ckpt, latents, ssl_ckpt = out / "vae" / "model.pt", out / "latents" / "datalist.json", out / "ssl" / "model.pt"
    commands: dict[str, list[str]] = {}

    def stage(key: str, done: Path, *a: Any, **k: Any) -> None:
        if done.is_file():
            return
        t = time.perf_counter()
        commands[key] = bundle(*a, **k)
        times[f"{key}_s"] = round(time.perf_counter() - t, 1)

    stage("vae_train", vae_ckpt, "meduet_vae", ["train.json", "demo.json"], out / "logs" / "vae_train.log",
          datalist=ph / "pretrain.json", output_dir=out / "vae" / "eval", ckpt_dir=out / "vae" / "checkpoints",
          model_path=vae_ckpt, max_epochs=args.vae_epochs, val_interval=max(1, args.vae_epochs // 3), seed=args.seed,
          adversarial=False, min_size=SHAPE[0])  # no GAN at this scale: fewer steps to a usable autoencoder
    stage("vae_encode", latents, "meduet_vae", ["inference.json", "demo.json"], out / "logs" / "vae_encode.log",
          datalist=ph / "pretrain.json", vae_ckpt=vae_ckpt, output_dir=latents.parent, min_size=SHAPE[0],
          exact_tiling=False, encode_roi=SHAPE[0])  # one tile per volume: the same as an untiled pass
    overlay = write_json(out / "ssl_overlay.json", {
        "network_overrides": {"encoder": SSL_ENCODER}, "max_epochs": args.ssl_epochs,
        "val_interval": max(1, args.ssl_epochs // 4), "save_interval": max(1, args.ssl_epochs // 4),
        "mftd_start_epoch": max(1, args.ssl_epochs // 3), "warmup_epochs": max(1, args.ssl_epochs // 20),
        "seed": args.seed})
    stage("ssl_train", ssl_ckpt, "meduet_ssl", ["train.json", "demo.json", overlay], out / "logs" / "ssl_train.log",
          latent_datalist=latents, output_dir=out / "ssl" / "eval", ckpt_dir=out / "ssl" / "checkpoints",
          model_path=ssl_ckpt)
    old = json.loads((out / "prepare.json").read_text()) if (out / "prepare.json").is_file() else {}
    info = {"vae_ckpt": str(vae_ckpt), "ssl_ckpt": str(ssl_ckpt), "latents": str(latents),
            "vae_epochs": args.vae_epochs, "ssl_epochs": args.ssl_epochs, "seed": args.seed,
            # keep the record of stages an earlier call did
            "times": {**old.get("times", {}), **times},
            "commands": {**old.get("commands", {}), **{k: " ".join(v) for k, v in commands.items()}}}
    write_json(out / "prepare.json", info)
    return info


# --------------------------------------------------------------------------------------------
# runs: segmenter training (bundle) + test Dice
# --------------------------------------------------------------------------------------------


def run_overlay(out: Path, name: str, seed: int, steps: int) -> tuple[Path, Path]:
    """Per-run overlay config for ``meduet_seg`` train.json + demo.json. Returns (overlay, run folder)."""
    from custom_nets.engines.ssl.model import meduet_network_args

    n, ssl_init, style, refine = RUNS[name]
    run_dir = out / "runs" / f"{name}_steps{steps}_seed{seed}"
    ssl_ckpt = out / "ssl" / "model.pt"
    # the pretrained ViT's arguments (what prepare's SSL run records; MeDUET runs read them from its model.json)
    ssl_net = meduet_network_args("demo", len(TRAIN_STYLES), {"encoder": SSL_ENCODER})
    enc = {k: v for k, v in ssl_net["encoder"].items() if k != "grid"}
    epochs = max(1, steps // n)  # batch 1 volume per step (2 crops): the same step count for every run
    overlay = {
        "datalist": str((out / "phantoms" / f"labelled_L{n}.json").resolve()),
        "vae_ckpt": str((out / "vae" / "model.pt").resolve()),
        "ssl_ckpt": str(ssl_ckpt.resolve()) if ssl_init else "none",
        "network_args#encoder": enc,  # random runs get the same architecture as the pretrained one
        "style_aug": style, "refine_channels": refine, "seed": seed,
        "max_epochs": epochs, "warmup_epochs": max(1, epochs // 10),
        "val_interval": epochs + 1,  # no validation: final weights, no model selection
        "num_workers": 0, "cache_rate": 1.0,
        "model_path": str((run_dir / "model.pt").resolve()), "ckpt_dir": str((run_dir / "checkpoints").resolve()),
        "output_dir": str((run_dir / "eval").resolve()),
    }
    return write_json(run_dir / "overlay.json", overlay), run_dir


def evaluate(model: Path, datalist: Path, threads: int) -> list[dict[str, Any]]:
    """Per-volume, per-label Dice of a trained segmenter on the datalist's testing volumes.

    Same preprocessing and latent sliding window (64^3, overlap 0.5) as the bundle's validation;
    Dice on the preprocessed 1.5 mm grid; NaN where a label is absent from the reference.
    """
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from custom_nets.data.datalist import load_datalist
    from meduet_demo.phantoms import PHANTOM_LABELS
    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.engines.seg.inference import LatentSlidingWindowInferer
    from custom_nets.engines.seg.model import build_segmenter, load_segmenter_weights

    torch.set_num_threads(threads)
    net = build_segmenter({}, model_ckpt=model)
    load_segmenter_weights(net, model)
    net.eval()
    items = load_datalist(datalist, keys=("testing",), require_labels=True)["testing"]
    pre = preprocess_transforms(keys=["image"], label_key="label", pixdim=1.5)
    inferer = LatentSlidingWindowInferer(roi_size=net.roi_size, sw_batch_size=2, overlap=0.5, space="latent")
    k = len(PHANTOM_LABELS)
    rows = []
    for it in items:
        d = pre(dict(it))
        with torch.no_grad():
            logits = inferer(d["image"][None].as_subclass(torch.Tensor), net)
        pred = one_hot(logits.argmax(1, keepdim=True), k)
        ref = one_hot(d["label"][None].as_subclass(torch.Tensor).long(), k)
        dice = compute_dice(pred, ref, include_background=False, ignore_empty=True)[0]
        rows.append({"image": Path(it["image"]).name, "domain": it["domain"],
                     "dice": {PHANTOM_LABELS[c + 1]: (None if math.isnan(float(v)) else round(float(v), 4))
                              for c, v in enumerate(dice)},
                     "ref_voxels": {PHANTOM_LABELS[c]: int(ref[0, c].sum()) for c in range(1, k)}})
    return rows


def do_run(out: Path, name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    overlay, run_dir = run_overlay(out, name, seed, args.steps)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    t0, c0 = time.perf_counter(), os.times()
    cmd = bundle("meduet_seg", ["train.json", "demo.json", overlay.resolve()], run_dir / "train.log")
    c1 = os.times()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = evaluate(run_dir / "model.pt", Path(json.loads(overlay.read_text())["datalist"]), args.threads)
    n, ssl_init, style, refine = RUNS[name]
    result = {"run": name, "seed": seed, "labelled": n, "ssl_init": ssl_init, "style_aug": style,
              "refine_channels": refine, "steps": args.steps, "train_s": round(train_s, 1),
              "train_cpu_s": round((c1.children_user + c1.children_system) - (c0.children_user + c0.children_system), 1),
              "eval_s": round(time.perf_counter() - t0, 1), "command": " ".join(cmd), "volumes": rows}
    write_json(result_path, result)
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Mean foreground Dice per volume (labels present), averaged over seen / held-out styles; per label."""
    groups = {"seen": TRAIN_STYLES, "held_out": HELD_OUT_STYLES}
    out: dict[str, Any] = {}
    for g, styles in groups.items():
        vols = [r for r in result["volumes"] if r["domain"] in styles]
        out[g] = _mean([_mean(list(r["dice"].values())) for r in vols])
        labels = list(vols[0]["dice"]) if vols else []
        out[f"{g}_per_label"] = {lab: _mean([r["dice"][lab] for r in vols]) for lab in labels}
    out["per_style"] = {s: _mean([_mean(list(r["dice"].values())) for r in result["volumes"] if r["domain"] == s])
                        for s in (*TRAIN_STYLES, *HELD_OUT_STYLES)}
    return out


def fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def report(out: Path, args: argparse.Namespace, names: Sequence[str]) -> str:
    seeds = [args.seed + i for i in range(args.seeds)]
    results = {}
    for name in names:
        for s in seeds:
            p = out / "runs" / f"{name}_steps{args.steps}_seed{s}" / "result.json"
            if p.is_file():
                results[(name, s)] = json.loads(p.read_text())
    if not results:
        return "no finished runs"
    summary = {f"{n}_seed{s}": {**summarise(r), **{k: r[k] for k in ("labelled", "ssl_init", "style_aug",
               "refine_channels", "steps", "train_s", "train_cpu_s")}} for (n, s), r in results.items()}

    def across(name: str, key: str, sub: str | None = None) -> tuple[float | None, int]:
        vals = [summary[f"{name}_seed{s}"][key] if sub is None else summary[f"{name}_seed{s}"][key].get(sub)
                for s in seeds if f"{name}_seed{s}" in summary]
        vals = [v for v in vals if v is not None]
        return _mean(vals), len(vals)

    def cell(name: str, key: str, sub: str | None = None) -> str:
        m, k = across(name, key, sub)
        if k == 0:
            return "not run"
        vals = [summary[f"{name}_seed{s}"][key] if sub is None else summary[f"{name}_seed{s}"][key].get(sub)
                for s in seeds if f"{name}_seed{s}" in summary]
        return fmt(m) if k == 1 else f"{fmt(m)} ({', '.join(fmt(v) for v in vals)})"

    # smallest labels by mean reference volume in the test set
    any_result = next(iter(results.values()))
    sizes: dict[str, list[int]] = {}
    for r in any_result["volumes"]:
        for lab, v in r["ref_voxels"].items():
            sizes.setdefault(lab, []).append(v)
    mean_size = {lab: sum(v) / len(v) for lab, v in sizes.items()}
    by_size = sorted(mean_size, key=mean_size.get)
    prep = json.loads((out / "prepare.json").read_text()) if (out / "prepare.json").is_file() else {}

    seed_note = f"Seed {seeds[0]}" if len(seeds) == 1 else f"Seeds {', '.join(map(str, seeds))} (mean, then each seed)"
    md = [f"{seed_note}; {args.steps} optimizer steps per run "
          f"(batch: 1 volume -> 2 crops of {ROI}^3); test: {N_TEST} unseen anatomies x 5 styles; "
          "mean Dice over the 7 foreground labels present in each volume, averaged over volumes.", "",
          "| run | labelled volumes | ViT init | style aug | refinement | Dice, training styles (12 vols) | "
          "Dice, held-out styles (8 vols) | train wall s |",
          "|---|---|---|---|---|---|---|---|"]
    for name in names:
        n, ssl_init, style, refine = RUNS[name]
        t, k = across(name, "train_s")
        md.append(f"| {name} | {n} | {'MeDUET' if ssl_init else 'random'} | {'yes' if style else 'no'} | "
                  f"{refine or 'off'} | {cell(name, 'seen')} | {cell(name, 'held_out')} | {fmt(t, 0) if k else '-'} |")
    md += ["", "Per style (mean Dice):", "",
           "| run | " + " | ".join(f"{s}{' (held out)' if s in HELD_OUT_STYLES else ''}" for s in (*TRAIN_STYLES, *HELD_OUT_STYLES)) + " |",
           "|---|" + "---|" * 5]
    for name in names:
        md.append(f"| {name} | " + " | ".join(cell(name, "per_style", s) for s in (*TRAIN_STYLES, *HELD_OUT_STYLES)) + " |")
    md += ["", "Per label, training styles (labels ordered by mean reference size in the test volumes, voxels in "
           "parentheses):", "",
           "| run | " + " | ".join(f"{lab} ({mean_size[lab]:.0f})" for lab in by_size) + " |",
           "|---|" + "---|" * len(by_size)]
    for name in names:
        md.append(f"| {name} | " + " | ".join(cell(name, "seen_per_label", lab) for lab in by_size) + " |")
    md += ["", "Per label, held-out styles:", "",
           "| run | " + " | ".join(by_size) + " |", "|---|" + "---|" * len(by_size)]
    for name in names:
        md.append(f"| {name} | " + " | ".join(cell(name, "held_out_per_label", lab) for lab in by_size) + " |")
    table = "\n".join(md)
    write_json(out / "seg_dice.json", {"args": vars(args), "machine": machine(), "prepare": prep, "runs": summary,
                                       "label_sizes": mean_size,
                                       "train_styles": TRAIN_STYLES, "held_out_styles": HELD_OUT_STYLES})
    (out / "seg_dice.md").write_text(table + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    t_start = time.perf_counter()
    if args.stage in ("prepare", "all"):
        prepare(out, args)
    if args.stage in ("runs", "all"):
        if not (out / "vae" / "model.pt").is_file() or (any(RUNS[n][1] for n in names) and not (out / "ssl" / "model.pt").is_file()):
            sys.exit(f"{out}: upstream checkpoints missing; run --stage prepare first")
        for s in range(args.seed, args.seed + args.seeds):
            for name in names:
                if (out / "runs" / f"{name}_steps{args.steps}_seed{s}" / "result.json").is_file():
                    continue
                if (time.perf_counter() - t_start) / 60 > args.budget_min:
                    print(f"[seg_dice] budget of {args.budget_min} min used: {name} seed {s} left for the next call")
                    continue
                r = do_run(out, name, s, args)
                sm = summarise(r)
                print(f"[seg_dice] {name} seed {s}: Dice seen {fmt(sm['seen'])}, held-out {fmt(sm['held_out'])} "
                      f"(train {r['train_s']:.0f} s)", flush=True)
    if args.stage in ("report", "all", "runs"):
        print(report(out, args, names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
