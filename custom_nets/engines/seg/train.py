"""Training pieces of the segmentation bundle: label-fraction subsets, trainable parameters, the
stage-checkpoint exporter and a validation overlay writer (MONAI/ignite handlers).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from torch import nn

from custom_nets.engines.common.export import StageExporter
from custom_nets.engines.seg.labels import as_channel_def, record_bundle_labels
from custom_nets.utils.checkpoint import read_stage_meta
from custom_nets.utils.overlay import save_label_overlay
from custom_nets.utils.values import as_path
from custom_nets.utils.inputs import is_missing

logger = logging.getLogger(__name__)

__all__ = [
    "select_fraction",
    "trainable_parameters",
    "SegModelExporter",
    "ValidationOverlayHandler",
]


def select_fraction(items: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """A deterministic labelled subset for label-efficiency runs, stratified by domain.

    Within each domain items are ordered by image path, shuffled with ``seed`` and the domain name,
    and the first ``round(n * fraction)`` (at least one) are kept, so a smaller fraction is a subset
    of a larger one with the same seed.

    Args:
        items: training items with "image" (and "domain").
        fraction: share of labelled volumes to keep, in (0, 1].
        seed: subset seed.

    Returns:
        The kept items, in their original order.
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return [dict(it) for it in items]
    by_domain: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_domain.setdefault(str(it.get("domain", "")), []).append(i)
    keep: set[int] = set()
    for domain, idx in by_domain.items():
        idx = sorted(idx, key=lambda i: str(items[i]["image"]))
        random.Random(f"{seed}:{domain}").shuffle(idx)
        keep.update(idx[: max(1, round(len(idx) * fraction))])
    kept = [dict(items[i]) for i in sorted(keep)]
    logger.info("label fraction %.3f: %d of %d training volumes", fraction, len(kept), len(items))
    return kept


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (the frozen VAE is left out of the optimizer)."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the network has no trainable parameters")
    return params


def _upstream_sha(path: str | Path | None, stage: str) -> str | None:
    if as_path(path) is None:
        return None
    return read_stage_meta(path, stage).get("sha256")


class SegModelExporter(StageExporter):
    """Write the trained segmenter as a ``meduet_seg`` stage checkpoint (``models/model.pt`` + ``model.json``)
    with its labels and the upstream checkpoints it was built on.

    Args:
        network: the trained network (DDP wrappers are unwrapped).
        path: destination ``model.pt``.
        evaluator: the validation evaluator (None: export at the end only).
        labels: label value -> name.
        vae_ckpt: VAE checkpoint the network was built on (its sha256 is recorded).
        ssl_ckpt: SSL checkpoint the ViT was initialised from, or None/"none".
        policy: "best", "final" or "every N" (:class:`~custom_nets.engines.common.export.StageExporter`).
        finetune_from: the trained model.pt this run fine-tunes (no upstream bundles beside it): its
            upstream provenance is carried over, read when the handler is attached (before the
            first export may overwrite it).
        extra: more JSON facts for model.json (e.g. label_fraction).
        metadata_file: the bundle's ``configs/metadata.json``: after each export whose labels differ
            from its prediction ``channel_def``, it is rewritten (atomically) with the trained labels,
            so that MONAI Label and Model Zoo, which read the metadata, name what ``model.pt``
            predicts. None: leave it alone.
    """

    def __init__(
        self,
        network: nn.Module,
        path: str | Path,
        evaluator: Any = None,
        labels: Mapping[Any, str] | None = None,
        vae_ckpt: str | Path | None = None,
        ssl_ckpt: str | Path | None = None,
        policy: str = "best",
        finetune_from: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
        metadata_file: str | Path | None = None,
    ) -> None:
        super().__init__(network, path, "meduet_seg", policy, evaluator, extra)
        self.finetune_from = None if is_missing(finetune_from) else Path(finetune_from)  # type: ignore[arg-type]
        self.inherited: dict[str, Any] | None = None
        self.labels = as_channel_def(labels) if labels else None
        self.vae_ckpt, self.ssl_ckpt = vae_ckpt, ssl_ckpt
        self.metadata_file = as_path(metadata_file)

    def attach(self, engine: Any) -> None:
        if self.finetune_from is not None:
            src = read_stage_meta(self.finetune_from, "meduet_seg")
            self.inherited = {k: src.get(k) for k in ("vae_ckpt", "vae_sha256", "ssl_ckpt", "ssl_sha256")}
            self.inherited["finetuned_from_sha256"] = src.get("sha256")
        super().attach(engine)

    def metadata(self, network: nn.Module) -> dict[str, Any]:
        """The network's constructor arguments, labels and provenance (a fine-tuned model keeps its source's)."""
        args = getattr(network, "network_args", None)
        if args is None:
            raise ValueError(f"{type(network).__name__} does not record its constructor arguments (network_args)")
        if self.inherited is not None:
            upstream = dict(self.inherited)
        else:
            ssl_sha256 = _upstream_sha(self.ssl_ckpt, "meduet_ssl")
            upstream = dict(
                vae_ckpt=None if self.vae_ckpt is None else str(self.vae_ckpt),
                vae_sha256=_upstream_sha(self.vae_ckpt, "meduet_vae"),
                ssl_ckpt=None if ssl_sha256 is None else str(self.ssl_ckpt), ssl_sha256=ssl_sha256,
            )
        return dict(
            network=args, labels=self.labels, num_classes=args.get("num_classes"), key_metric=self.key_metric(),
            **upstream,
        )

    def export(self, reason: str) -> dict[str, Any] | None:
        """Write model.pt / model.json, then bring the bundle's metadata labels in line with them."""
        info = super().export(reason)
        if info is not None and self.labels and self.metadata_file is not None:
            if record_bundle_labels(self.metadata_file, self.labels):
                logger.info("%s: prediction channel_def set to the trained labels %s", self.metadata_file,
                            self.labels)
        return info


class ValidationOverlayHandler:
    """Write a PNG overlay (image, prediction, reference) of the first validation volume each validation.

    Args:
        output_dir: destination folder (``val_epoch{E:04d}.png``).
        label_names: label value -> name, for the legend.
        image_key / pred_key / label_key: keys of the decollated evaluator output.
    """

    def __init__(
        self,
        output_dir: str | Path,
        label_names: Mapping[Any, str] | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        # first iteration of each validation run only
        if (engine.state.iteration - 1) % max(1, engine.state.epoch_length or 1) != 0:
            return

        out = engine.state.output
        item = out[0] if isinstance(out, list) else out
        if not isinstance(item, Mapping) or self.pred_key not in item or self.image_key not in item:
            return

        def as_labels(x: torch.Tensor) -> torch.Tensor:
            x = torch.as_tensor(x).detach().cpu()
            return x.argmax(0) if x.ndim == 4 and x.shape[0] > 1 else x.reshape(x.shape[-3:])

        epoch = int(engine.state.epoch)
        save_label_overlay(item[self.image_key], as_labels(item[self.pred_key]),
                           self.output_dir / f"val_epoch{epoch:04d}_pred.png", self.label_names,
                           title=f"validation epoch {epoch}: prediction")
        if self.label_key in item and item[self.label_key] is not None:
            save_label_overlay(item[self.image_key], as_labels(item[self.label_key]),
                               self.output_dir / f"val_epoch{epoch:04d}_label.png", self.label_names,
                               title=f"validation epoch {epoch}: reference")
