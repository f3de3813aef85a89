"""Do meduet_seg's fast latent settings give the masks of its default on real volumes?

The default encodes each 96^3 VAE tile on its own and blends them (GroupNorm statistics per tile,
as in training); the fast path (issue 18) encodes the whole volume exactly once (``vae_exact``,
whole-volume GroupNorm statistics, bf16 stored stages) and may run the VAE and the windows under
bf16 autocast. This script runs the bundle's ``inference.json`` once per setting on the same
volumes and scores every setting's masks against the default's (Dice per label: agreement) and,
where the datalist has labels, against the truth.

    python benchmarks/seg_fast_agreement.py --model outputs/demo/real/seg/model.pt \
        --datalist outputs/demo/real/datalist.json --out outputs/bench/seg_fast_agreement

Settings: ``default`` (the bundle's defaults), ``exact_fp32`` (exact tiling only, float32 stores:
what tiling alone changes), ``fast`` (exact tiling, bf16 stores, bf16 VAE and windows). Writes
``<out>/agreement.json`` and prints a Markdown table; each setting's masks stay in ``<out>/<setting>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from meduet_demo.report import dice_per_label, score_masks, truth_by_stem  # noqa: E402
from report_tools import bundle_run_command, run_bundle  # noqa: E402  (same folder)

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "exact_fp32": {"vae_exact": "true", "vae_store_dtype": "float32"},
    "fast": {"vae_exact": "true", "vae_precision": "bf16", "window_precision": "bf16"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained meduet_seg model.pt")
    p.add_argument("--datalist", required=True, help="datalist whose 'testing' items are segmented")
    p.add_argument("--out", default="outputs/bench/seg_fast_agreement")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"among {', '.join(SETTINGS)}; the first is the reference")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra inference.json override for every setting (repeatable)")
    return p.parse_args(argv)


def run_setting(name: str, args: argparse.Namespace, out: Path) -> float:
    """Segment the datalist's volumes with one setting; returns the wall seconds of the bundle run."""
    overrides = {"model_path": Path(args.model).resolve(), "datalist": Path(args.datalist).resolve(),
                 "output_dir": out / name, **SETTINGS[name], **dict(kv.partition("=")[::2] for kv in args.set)}
    cmd = bundle_run_command(["bundles/meduet_seg/configs/inference.json"], "bundles/meduet_seg", **overrides)
    log = out / f"{name}.log"
    log.unlink(missing_ok=True)  # one log per setting (run_bundle appends)
    t0 = time.perf_counter()
    run_bundle(cmd, log, f"setting {name!r}")
    return time.perf_counter() - t0


def masks_by_stem(folder: Path) -> dict[str, Path]:
    return {p.name.split(".")[0].removesuffix("_seg"): p for p in sorted(folder.rglob("*.nii.gz"))}


def agreement(ref_dir: Path, other_dir: Path, labels: list[int]) -> dict[str, dict[int, float]]:
    """Dice per label of ``other_dir``'s masks against ``ref_dir``'s, per volume."""
    import nibabel as nib

    ref, other = masks_by_stem(ref_dir), masks_by_stem(other_dir)
    if set(ref) != set(other):
        raise RuntimeError(f"{other_dir} holds masks of {sorted(other)}, {ref_dir} of {sorted(ref)}")
    return {s: dice_per_label(np.asarray(nib.load(other[s]).dataobj).astype(int).squeeze(),
                              np.asarray(nib.load(ref[s]).dataobj).astype(int).squeeze(), labels) for s in ref}


def mean_over_volumes(scores: dict[str, dict[int, float] | str], labels: list[int]) -> dict[int, float]:
    rows = [s for s in scores.values() if isinstance(s, dict)]
    return {lab: float(np.nanmean([r[lab] for r in rows])) if rows else float("nan") for lab in labels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or len(names) < 2:
        sys.exit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}" if unknown else
                 "--settings needs a reference and at least one setting to compare with it")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from custom_nets.engines.seg.labels import bundle_labels

    # the labels the model was trained on (its model.json), else the bundle's shipped ones
    label_names = {int(k): v for k, v in bundle_labels(args.model, ROOT / "bundles" / "meduet_seg").items() if int(k) > 0}
    labels = sorted(label_names)
    datalist = json.loads(Path(args.datalist).read_text())
    truth = truth_by_stem(datalist)
    seconds = {n: round(run_setting(n, args, out), 1) for n in names}
    doc = {"model": str(args.model), "datalist": str(args.datalist), "settings": {n: SETTINGS[n] for n in names},
           "extra_overrides": args.set, "wall_s": seconds, "labels": {lab: label_names.get(lab, str(lab)) for lab in labels},
           "agreement_with": names[0], "agreement": {}, "vs_truth": {}}
    for n in names[1:]:
        per_volume = agreement(out / names[0], out / n, labels)
        doc["agreement"][n] = {"per_volume": per_volume, "mean": mean_over_volumes(per_volume, labels)}
    if truth:
        for n in names:
            scores = score_masks(out / n, truth, labels)
            doc["vs_truth"][n] = {"per_volume": scores, "mean": mean_over_volumes(scores, labels)}
    (out / "agreement.json").write_text(json.dumps(doc, indent=1) + "\n")
    head = "| | " + " | ".join(doc["labels"][lab] for lab in labels) + " | wall s |"
    lines = [head, "|---|" + "---|" * (len(labels) + 1)]
    for n in names[1:]:
        m = doc["agreement"][n]["mean"]
        lines.append(f"| {n} vs {names[0]} (agreement) | " + " | ".join(f"{m[lab]:.3f}" for lab in labels) + f" | {seconds[n]} |")
    for n, r in doc["vs_truth"].items():
        m = r["mean"]
        lines.append(f"| {n} vs truth | " + " | ".join(f"{m[lab]:.3f}" for lab in labels) + f" | {seconds[n]} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
