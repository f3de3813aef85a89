"""The demo's segmentation baseline: a small MONAI UNet trained for the same wall time as meduet_seg.

It reads the same datalist and takes its preprocessing, crops, augmentation and loss from meduet_seg's
own training config (``train#preprocessing``: RAS, intensity window, ``pixdim`` spacing, foreground
crop, class-balanced ``RandCropByLabelClassesd``, flips, rotations; ``loss``; ``roi_size``;
``num_samples``), read with MONAI's ConfigParser, and trains in image space. Training stops when the wall-time
budget is spent (or after ``--max-steps``); the held-out ("testing") volumes are then segmented with a
sliding window and written as masks on each input's own grid, named like meduet_seg's
(``<stem>_seg.nii.gz``), so both are scored by the same code.

Command line::

    python -m meduet_demo.unet_baseline --datalist DATALIST --seconds 600 --out DIR \
        [--labels '{"0": "background", ...}'] [--config-file train.json demo.json] [--roi 64] [--num-samples 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.data.transforms import preprocess_transforms
from custom_nets.engines.seg.labels import as_channel_def
from custom_nets.utils.io import save_nifti, write_json


def build_unet(num_classes: int) -> torch.nn.Module:
    """A MONAI UNet of about 1.2 M parameters (4 levels, 16..128 channels, 2 residual units a level)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2)


ROOT = Path(__file__).resolve().parents[1]
#: meduet_seg's configs whose crops, augmentation and loss the baseline takes (the demo's overlay)
SEG_CONFIGS = ("bundles/meduet_seg/configs/train.json", "bundles/meduet_seg/configs/demo.json")


@dataclass
class SegRecipe:
    """What the baseline takes from meduet_seg's training config, so the two cannot drift apart."""

    transform: Any
    loss: torch.nn.Module
    roi: int
    pixdim: float
    num_samples: int


def seg_recipe(labels: Mapping[str, str], config_files: Sequence[str | Path] = SEG_CONFIGS, roi: int | None = None,
               num_samples: int | None = None) -> SegRecipe:
    """Read meduet_seg's training preprocessing (``train#preprocessing``: intensity, spacing, foreground
    crop, class-balanced crops, flips, rotations), ``loss``, ``roi_size``, ``pixdim`` and ``num_samples``.

    Args:
        labels: channel_def of the run (sets ``num_classes`` and the crop ratios as in meduet_seg).
        config_files: meduet_seg config files, later ones overriding earlier ones (paths relative to
            the repository root, or absolute).
        roi: crop side overriding the config's ``roi_size`` (None: the config's).
        num_samples: crops per volume overriding the config's (None: the config's).

    Returns:
        :class:`SegRecipe`.
    """
    from monai.bundle import ConfigParser

    files = [str(f if Path(f).is_absolute() else ROOT / f) for f in config_files]
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(Path(files[0]).parents[1])
    parser["labels"] = dict(labels)
    if roi is not None:
        parser["roi_size"] = [int(roi)] * 3
    if num_samples is not None:
        parser["num_samples"] = int(num_samples)
    size = parser.get_parsed_content("roi_size")
    if len(set(size)) != 1:
        raise ValueError(f"{files}: roi_size {size} is not a cube; the baseline's sliding window takes one side")
    return SegRecipe(transform=parser.get_parsed_content("train#preprocessing"), loss=parser.get_parsed_content("loss"),
                     roi=int(size[0]), pixdim=float(parser.get_parsed_content("pixdim")),
                     num_samples=int(parser.get_parsed_content("num_samples")))


@dataclass
class TrainRecord:
    """What a budgeted run did: steps taken, seconds spent (data caching included), the losses."""

    steps: int = 0
    seconds: float = 0.0
    budget_seconds: float | None = None
    max_steps: int | None = None
    params: int = 0
    losses: list[float] = field(default_factory=list)


def train_unet(
    items: Sequence[Mapping[str, Any]], recipe: SegRecipe, num_classes: int, seconds: float | None,
    max_steps: int | None = None, learning_rate: float = 1e-3, seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[torch.nn.Module, TrainRecord]:
    """Train :func:`build_unet` on ``items`` until ``seconds`` of wall time or ``max_steps`` steps.

    The clock starts before the volumes are loaded and cached, as meduet_seg's stage time includes
    its own caching. The budget is checked after each step (so at least one step is taken, and the
    last one may end past the budget); the record holds the time really spent.

    Args:
        items: labelled datalist items ("image", "label", optional "modality").
        recipe: meduet_seg's transforms and loss (:func:`seg_recipe`).
        num_classes: label values 0..num_classes-1.
        seconds: wall-time budget (None: steps only).
        max_steps: step budget (None: time only); at least one of the two must be set.
        learning_rate: Adam's step size (constant: the number of steps is not known in advance).
        seed: weights, data order and crops.
        clock: seconds, monotonic (tests pass a fake one).
    """
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.utils import set_determinism

    if seconds is None and max_steps is None:
        raise ValueError("set seconds or max_steps (or both): an unbounded run never stops")
    if not items:
        raise ValueError("no training items")
    start = clock()
    set_determinism(seed=seed)
    record = TrainRecord(budget_seconds=seconds, max_steps=max_steps)
    dataset = CacheDataset(list(items), transform=recipe.transform,
                           num_workers=0, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0, collate_fn=list_data_collate)
    net = build_unet(num_classes)
    record.params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = recipe.loss

    def spent() -> bool:
        record.seconds = clock() - start
        return ((max_steps is not None and record.steps >= max_steps)
                or (seconds is not None and record.seconds >= seconds))

    net.train()
    done = False
    while not done:  # epochs over the shuffled volumes, until a budget is spent (at least one step)
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            record.steps += 1
            record.losses.append(float(loss.detach()))
            done = spent()
            if done:
                break
    return net.eval(), record


@torch.no_grad()
def segment(
    net: torch.nn.Module, items: Sequence[Mapping[str, Any]], out_dir: str | Path, roi: int = 64, pixdim: float = 1.5,
    overlap: float = 0.5, sw_batch_size: int = 2, postfix: str = "seg",
) -> list[Path]:
    """Segment each item's image with a sliding window; masks (uint8) on the input's own grid.

    Returns:
        the written ``out_dir/<stem>_<postfix>.nii.gz`` paths, in item order.
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Invertd

    pre = preprocess_transforms(keys=["image"], pixdim=pixdim, min_size=[roi] * 3)
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)
    written = []
    for item in items:
        data = pre({"image": item["image"], "modality": item.get("modality", "CT")})
        image = data["image"]
        logits = sliding_window_inference(image[None], [roi] * 3, sw_batch_size, net, overlap=overlap)
        # the mask carries the image's metadata and transform trace, so Invertd takes it back to the input grid
        data["pred"] = MetaTensor(logits[0].argmax(0, keepdim=True).to(torch.uint8), meta=image.meta,
                                  applied_operations=image.applied_operations)
        pred = invert(data)["pred"]
        stem = Path(item["image"]).name.split(".")[0]
        written.append(save_nifti(Path(out_dir) / f"{stem}_{postfix}.nii.gz", np.asarray(pred[0]).round(),
                                  pred.affine, dtype=np.uint8))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from custom_nets.data.datalist import load_datalist

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", required=True, help="labelled datalist: trains on 'training', segments 'testing'")
    ap.add_argument("--out", required=True, help="output folder: masks/, summary.json")
    ap.add_argument("--seconds", type=float, default=None, help="wall-time budget of training")
    ap.add_argument("--max-steps", type=int, default=None, help="step budget of training")
    ap.add_argument("--labels", default=None,
                    help="channel_def JSON {\"0\": \"background\", ...} (default: the label values seen, 0..max)")
    ap.add_argument("--config-file", nargs="+", default=list(SEG_CONFIGS),
                    help="meduet_seg configs whose crops, augmentation, spacing and loss are used (default: train + demo)")
    ap.add_argument("--roi", type=int, default=None, help="crop side (default: the config's roi_size)")
    ap.add_argument("--num-samples", type=int, default=None, help="crops per step (default: the config's num_samples)")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = load_datalist(args.datalist, keys=("training",), require_labels=True)
    if args.labels:
        labels = as_channel_def(json.loads(args.labels), "--labels")
    else:
        import nibabel as nib

        top = max(int(np.asarray(nib.load(it["label"]).dataobj).max()) for it in data["training"])
        labels = {str(v): f"label {v}" if v else "background" for v in range(top + 1)}
    out = Path(args.out)
    recipe = seg_recipe(labels, args.config_file, roi=args.roi, num_samples=args.num_samples)
    net, record = train_unet(data["training"], recipe, len(labels), args.seconds, args.max_steps,
                             learning_rate=args.learning_rate, seed=args.seed)
    print(f"[unet] {record.steps} steps in {record.seconds:.0f} s (budget {args.seconds} s, {record.params} parameters)",
          flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "unet.pt")
    t0 = time.perf_counter()
    masks = segment(net, data.get("testing", []), out / "masks", roi=recipe.roi, pixdim=recipe.pixdim)
    summary = {"model": "monai.networks.nets.UNet", "labels": labels, **asdict(record),
               "inference_seconds": time.perf_counter() - t0, "masks": [str(m) for m in masks]}
    write_json(out / "summary.json", summary)
    print(f"[unet] {len(masks)} held-out volume(s) segmented into {out / 'masks'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
