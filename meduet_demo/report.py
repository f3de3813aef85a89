"""The demo's Markdown report: wall time per stage, montages, loss curves, Dice on phantoms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom_nets.utils.io import atomic_path
from custom_nets.utils.report import plot_scalars


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label value (NaN where the label is absent from both)."""
    out = {}
    for lab in labels:
        p, t = pred == lab, truth == lab
        denom = p.sum() + t.sum()
        out[lab] = float(2 * np.logical_and(p, t).sum() / denom) if denom else float("nan")
    return out


def phantom_dice_table(seg_dir: Path, datalist: dict) -> list[str]:
    """Markdown rows of Dice for every segmented phantom (the real sample volumes' labels use other
    label sets, so only phantom domains are scored)."""
    import nibabel as nib

    from meduet_demo.phantoms import DOMAIN_STYLES, PHANTOM_LABELS

    truth_of = {Path(i["image"]).name.split(".")[0]: i.get("label") for k in ("training", "validation", "testing")
                for i in datalist.get(k, []) if i.get("label") and i.get("domain") in DOMAIN_STYLES}
    names = [n for v, n in sorted(PHANTOM_LABELS.items()) if v > 0]
    rows = ["| volume | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for mask_path in sorted(seg_dir.rglob("*.nii.gz")):
        stem = mask_path.name.split(".")[0]
        key = next((k for k in truth_of if stem.startswith(k)), None)
        if key is None:
            continue
        pred = np.asarray(nib.load(mask_path).dataobj).squeeze()
        truth = np.asarray(nib.load(truth_of[key]).dataobj).squeeze()
        if pred.shape != truth.shape:
            rows.append(f"| {key} | mask grid {pred.shape} differs from label grid {truth.shape} |")
            continue
        d = dice_per_label(pred.astype(int), truth.astype(int), [v for v in sorted(PHANTOM_LABELS) if v > 0])
        vals = list(d.values())
        rows.append(f"| {key} | " + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in vals)
                    + f" | {np.nanmean(vals):.2f} |")
    return rows if len(rows) > 2 else []


# How to read a stage's figure where the demo scale limits what it can show
READING = {
    "ldm sample": (
        "Rows: content sources; columns: style sources; the first row and column show the sources "
        "themselves (decoded centre windows). At demo scale the samples do not follow them: the demo "
        "encoder's content vectors also carry the domain and the small generator does not model "
        "anatomy (figures in benchmarks/REPORT.md, LDM (b)). The grid is the check to repeat on "
        "paper-scale models."
    ),
}


def write_demo_report(out: Path, stages: Sequence, total_s: float, datalist: dict) -> Path:
    """Write ``out/REPORT.md`` and the loss-curve PNGs it shows. Returns the report path."""
    lines = ["# MeDUET demo report", "", f"Total wall time: {total_s / 60:.1f} min on {os.cpu_count()} CPU core(s).", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {s.name} | {s.seconds:.0f} |" for s in stages]
    plots = out / "plots"
    for s in stages:
        if s.output_dir is None or not Path(s.output_dir).exists():
            continue
        section = [f"## {s.name}", "", f"Outputs: `{os.path.relpath(s.output_dir, out)}`", ""]
        curve = plot_scalars(s.output_dir, plots / f"{s.name.replace(' ', '_')}_curves.png", title=s.name)
        if curve is not None:
            section.append(f"![{s.name} curves]({os.path.relpath(curve, out)})")
        pngs = sorted(p for p in Path(s.output_dir).rglob("*.png"))[:6]
        section += [f"![{p.stem}]({os.path.relpath(p, out)})" for p in pngs]
        if s.name in READING:
            section += ["", READING[s.name]]
        if s.name == "seg inference":
            table = phantom_dice_table(Path(s.output_dir), datalist)
            if table:
                section += ["", "Dice of the predicted masks against the phantoms' ground truth:", ""] + table
        lines += [""] + section
    path = out / "REPORT.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
