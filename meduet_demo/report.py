"""The demo's Markdown report: wall time per stage, montages, loss curves, and Dice of meduet_seg beside a
same-wall-time MONAI UNet on held-out phantoms and on the held-out part of a real CT."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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


def truth_by_stem(datalist: dict, keys: Sequence[str] = ("testing",), domains: Sequence[str] | None = None) -> dict[str, str]:
    """{image file stem: label path} of the labelled items of ``keys`` (only ``domains`` when given)."""
    return {Path(i["image"]).name.split(".")[0]: i["label"] for k in keys for i in datalist.get(k, [])
            if i.get("label") and (domains is None or i.get("domain") in domains)}


def score_masks(mask_dir: Path, truth: dict[str, str], labels: Sequence[int]) -> dict[str, dict[int, float] | str]:
    """Dice per label of each mask in ``mask_dir`` whose name starts with a stem of ``truth``.

    Returns:
        {stem: {label: Dice} or a one-line reason it could not be scored}, in stem order.
    """
    import nibabel as nib

    scores: dict[str, dict[int, float] | str] = {}
    for mask_path in sorted(Path(mask_dir).rglob("*.nii.gz")):
        stem = mask_path.name.split(".")[0]
        # the longest matching stem: "sub-1_seg" belongs to "sub-1", not to a shorter "sub"
        key = max((k for k in truth if stem.startswith(k)), key=len, default=None)
        if key is None:
            continue
        pred = np.asarray(nib.load(mask_path).dataobj).squeeze()
        ref = np.asarray(nib.load(truth[key]).dataobj).squeeze()
        if pred.shape != ref.shape:
            scores[key] = f"mask grid {pred.shape} differs from label grid {ref.shape}"
            continue
        scores[key] = dice_per_label(pred.astype(int), ref.astype(int), labels)
    return dict(sorted(scores.items()))


def _fmt(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.2f}"


def per_volume_table(scores: dict[str, dict[int, float] | str], names: dict[int, str]) -> list[str]:
    """Markdown rows: one volume a row, Dice per label and their mean ("-": label in neither)."""
    if not scores:
        return []
    rows = ["| volume | " + " | ".join(names.values()) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for key, d in scores.items():
        if isinstance(d, str):
            rows.append(f"| {key} | {d} |")
            continue
        vals = [d[v] for v in names]
        rows.append(f"| {key} | " + " | ".join(_fmt(x) for x in vals) + f" | {_fmt(_nanmean(vals))} |")
    return rows


def _nanmean(vals: Sequence[float]) -> float:
    finite = [v for v in vals if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class ModelRun:
    """One trained model's line of a comparison: what it is, its training budget, its Dice."""

    name: str
    seconds: float | None
    steps: int | None
    scores: dict[str, dict[int, float] | str]


def comparison_table(runs: Sequence[ModelRun], names: dict[int, str]) -> list[str]:
    """Markdown rows: one model a row; Dice per label averaged over the scored volumes, then their mean.

    A label absent from a volume's truth and mask does not count for that volume; a model with no
    scored volume shows "no masks".
    """
    head = "| model | training wall time (s) | steps | volumes | " + " | ".join(names.values()) + " | mean |"
    rows = [head, "|---" * (len(names) + 5) + "|"]
    for r in runs:
        sec = "-" if r.seconds is None else f"{r.seconds:.0f}"
        steps = "-" if r.steps is None else str(r.steps)
        scored = [d for d in r.scores.values() if isinstance(d, dict)]
        if not scored:
            rows.append(f"| {r.name} | {sec} | {steps} | 0 | no masks |")
            continue
        per_label = [_nanmean([d[v] for d in scored]) for v in names]
        rows.append(f"| {r.name} | {sec} | {steps} | {len(scored)} | " + " | ".join(_fmt(x) for x in per_label)
                    + f" | {_fmt(_nanmean(per_label))} |")
    return rows


def trained_steps(logdir: Path) -> int | None:
    """Steps a bundle's training took: the last step of its TensorBoard ``train_loss`` series."""
    from custom_nets.utils.report import read_scalars

    series = read_scalars(logdir).get("train_loss", []) if Path(logdir).exists() else []
    return int(series[-1][0]) if series else None


def save_comparison_figure(image_path: str, truth_path: str, masks: dict[str, Path], labels: dict[int, str],
                           out_png: Path) -> Path:
    """One PNG: rows ground truth then each model's mask, columns an axial and a coronal slice
    through the truth's centre of mass, on the volume's own grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = np.asarray(nib.load(image_path).dataobj).astype(np.float32)
    rows = {"ground truth": np.asarray(nib.load(truth_path).dataobj).astype(int)}
    rows.update({name: np.asarray(nib.load(p).dataobj).astype(int) for name, p in masks.items()})
    spacing = nib.load(image_path).header.get_zooms()[:3]
    fg = np.argwhere(rows["ground truth"] > 0)
    cx, cy, cz = (fg.mean(axis=0).round().astype(int) if len(fg) else np.array(image.shape) // 2)
    palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    n = max(labels) + 1
    cmap = ListedColormap([(0, 0, 0, 0)] + [palette[(v - 1) % 10] for v in range(1, n)])
    lo, hi = np.percentile(image, [0.5, 99.5])
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.6 * len(rows)), squeeze=False)
    for ax_row, (name, lab) in zip(axes, rows.items()):
        # voxel arrays as stored (the sample CT is LAS); transposed so z runs up in the coronal view
        views = [(image[:, :, cz].T, lab[:, :, cz].T, spacing[1] / spacing[0], f"{name}: axial z={cz}"),
                 (image[:, cy, :].T, lab[:, cy, :].T, spacing[2] / spacing[0], f"{name}: coronal y={cy}")]
        for ax, (im, lb, aspect, title) in zip(ax_row, views):
            ax.imshow(im, cmap="gray", vmin=lo, vmax=max(hi, lo + 1), origin="lower", aspect=aspect)
            ax.imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=n - 1, alpha=0.45, origin="lower",
                      aspect=aspect, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=cmap(v), label=labels[v]) for v in sorted(labels) if v > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(out_png)


def segmentation_section(out: Path, stages: dict, prefix: str, title: str, datalist: dict, labels: dict[int, str],
                         domains: Sequence[str] | None, figure: bool) -> list[str]:
    """The Markdown of one meduet_seg vs UNet comparison on held-out volumes.

    Args:
        out: the demo folder.
        stages: demo stages by name; reads ``{prefix}seg train``, ``{prefix}seg inference`` and
            ``{prefix}unet baseline`` (its output folder holds summary.json and masks/).
        prefix: "" for the phantoms, "real " for the real CT.
        title: section heading.
        datalist: whose "testing" items are scored.
        labels: label value -> name, background excluded.
        domains: score only items of these domains (None: all).
        figure: add a ground truth / meduet_seg / UNet figure of the first scored volume.
    """
    from custom_nets.utils.io import read_json

    seg_train, seg_inf, unet = (stages.get(prefix + n) for n in ("seg train", "seg inference", "unet baseline"))
    if seg_inf is None or seg_inf.output_dir is None:
        return []
    truth = truth_by_stem(datalist, domains=domains)
    values = sorted(labels)
    runs = [ModelRun("meduet_seg (demo recipe)", seg_train.seconds if seg_train else None,
                     trained_steps(seg_train.output_dir) if seg_train and seg_train.output_dir else None,
                     score_masks(Path(seg_inf.output_dir), truth, values))]
    unet_summary = Path(unet.output_dir) / "summary.json" if unet and unet.output_dir else None
    if unet_summary is not None and unet_summary.is_file():
        summ = read_json(unet_summary)
        runs.append(ModelRun(f"MONAI UNet ({summ['params'] / 1e6:.1f} M parameters)", summ["seconds"], summ["steps"],
                             score_masks(Path(unet.output_dir) / "masks", truth, values)))
    lines = [f"## {title}", "", "Dice per label on held-out volumes (not seen in training), each model trained on "
             "the same training volumes; the UNet's wall-time budget is the meduet_seg training stage's.", ""]
    lines += comparison_table(runs, labels)
    for r in runs:
        if len(r.scores) > 1:
            lines += ["", f"{r.name}, per volume:", ""] + per_volume_table(r.scores, labels)
    if figure and len(runs) > 1 and runs[0].scores:
        stem = next(iter(runs[0].scores))
        item = next(i for i in datalist["testing"] if Path(i["image"]).name.split(".")[0] == stem)
        masks = {"meduet_seg": next(Path(seg_inf.output_dir).rglob(f"{stem}*.nii.gz")),
                 "MONAI UNet": next((Path(unet.output_dir) / "masks").glob(f"{stem}*.nii.gz"))}
        png = save_comparison_figure(item["image"], item["label"], masks, {0: "background", **labels},
                                     out / "plots" / f"{prefix.strip() or 'phantom'}_heldout_comparison.png")
        lines += ["", f"![held-out {stem}: truth, meduet_seg, UNet]({os.path.relpath(png, out)})"]
    return lines + [""]


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


def seg_sections(out: Path, stages: Sequence, datalist: dict, real_note: str | None = None) -> list[str]:
    """Both segmentation comparisons: held-out phantoms, then the real CT's held-out slab (or the
    line saying why the real part was skipped)."""
    from custom_nets.utils.io import read_json
    from meduet_demo.phantoms import DOMAIN_STYLES, PHANTOM_LABELS

    by_name = {s.name: s for s in stages}
    lines = segmentation_section(out, by_name, "", "Segmentation of held-out phantoms", datalist,
                                 {v: n for v, n in PHANTOM_LABELS.items() if v > 0}, list(DOMAIN_STYLES), figure=False)
    slabs = by_name.get("real ct slabs")
    if slabs is not None and slabs.output_dir is not None and (Path(slabs.output_dir) / "split.json").is_file():
        split = read_json(Path(slabs.output_dir) / "split.json")
        labels = {int(v): n for v, n in split["labels"].items() if int(v) > 0}
        real = read_json(Path(slabs.output_dir) / "datalist.json")
        lines += segmentation_section(out, by_name, "real ", "Segmentation of a real CT (held-out caudal slab)", real,
                                      labels, None, figure=True)
        lines += [f"The sample chest CT's TotalSegmentator labels, merged into {', '.join(labels.values())}; "
                  f"trained on slices {split['slices']['cranial']} (cranial), scored on slices "
                  f"{split['slices']['caudal']} (caudal). Voxels per structure: {split['voxels']}.", ""]
    elif real_note:
        lines += ["## Segmentation of a real CT", "", real_note, ""]
    return lines


def write_demo_report(out: Path, stages: Sequence, total_s: float, datalist: dict, real_note: str | None = None) -> Path:
    """Write ``out/REPORT.md`` and the loss-curve PNGs it shows. Returns the report path.

    ``real_note``: why the real-CT segmentation part did not run, when it did not.
    """
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
        lines += [""] + section
    lines += [""] + seg_sections(out, stages, datalist, real_note)
    path = out / "REPORT.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
