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
from torch import nn

from custom_nets.utils.checkpoint import read_stage_meta, save_stage_checkpoint
from custom_nets.utils.inputs import is_missing

logger = logging.getLogger(__name__)

__all__ = [
    "select_fraction",
    "trainable_parameters",
    "channel_def",
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


def channel_def(labels: Mapping[Any, str]) -> dict[str, str]:
    """{"0": "background", ...} from a label-value -> name mapping (metadata.json form)."""
    return {str(int(k)): str(v) for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))}


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(getattr(network, "module", None), nn.Module) else network


def _upstream_sha(path: str | Path | None, stage: str) -> str | None:
    if path is None or str(path).strip().lower() in ("", "none", "null"):
        return None
    return read_stage_meta(path, stage).get("sha256")


class SegModelExporter:
    """Write the trained segmenter as a ``meduet_seg`` stage checkpoint (``models/model.pt`` + ``model.json``).

    Attached to the trainer after the ``ValidationHandler``: at the end of an epoch where the
    evaluator's key metric improved it exports the weights; at the end of training it exports the
    final weights if no best model exists (no validation, or no improvement ever). The evaluator's
    best metric is part of the resumable state, so a resumed run keeps the best model exported
    before the interruption.

    Args:
        network: the trained network (DDP wrappers are unwrapped).
        path: destination ``model.pt``.
        evaluator: the validation evaluator (None: export at the end only).
        labels: label value -> name.
        vae_ckpt: VAE checkpoint the network was built on (its sha256 is recorded).
        ssl_ckpt: SSL checkpoint the ViT was initialised from, or None/"none".
        finetune_from: the trained model.pt this run fine-tunes (no upstream bundles beside it): its
            upstream provenance is carried over, read when the handler is attached (before the
            first export may overwrite it).
        extra: more JSON facts for model.json (e.g. label_fraction).
    """

    def __init__(
        self,
        network: nn.Module,
        path: str | Path,
        evaluator: Any = None,
        labels: Mapping[Any, str] | None = None,
        vae_ckpt: str | Path | None = None,
        ssl_ckpt: str | Path | None = None,
        finetune_from: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.finetune_from = None if is_missing(finetune_from) else Path(finetune_from)  # type: ignore[arg-type]
        self.inherited: dict[str, Any] | None = None
        self.path = Path(path)
        self.evaluator = evaluator
        self.labels = channel_def(labels) if labels else None
        self.vae_ckpt = vae_ckpt
        self.ssl_ckpt = ssl_ckpt
        self.extra = dict(extra or {})
        self.exported_epoch: int | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.finetune_from is not None:
            src = read_stage_meta(self.finetune_from, "meduet_seg")
            self.inherited = {k: src.get(k) for k in ("vae_ckpt", "vae_sha256", "ssl_ckpt", "ssl_sha256")}
            self.inherited["finetuned_from_sha256"] = src.get("sha256")
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def epoch_completed(self, engine: Any) -> None:
        ev = self.evaluator
        if ev is None or getattr(ev.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        self.export(engine, "best", float(ev.state.best_metric))

    def completed(self, engine: Any) -> None:
        best_epoch = int(getattr(getattr(self.evaluator, "state", None), "best_metric_epoch", -1))
        if self.exported_epoch is None and best_epoch <= 0:
            metric = getattr(getattr(self.evaluator, "state", None), "best_metric", None)
            self.export(engine, "final", None if metric in (None, -1) else float(metric))

    def export(self, engine: Any, reason: str, metric: float | None) -> dict[str, Any]:
        """Save the network's state_dict with its constructor arguments and provenance."""
        net = _unwrap(self.network)
        args = getattr(net, "network_args", None)
        if args is None:
            raise ValueError(f"{type(net).__name__} does not record its constructor arguments (network_args)")
        if self.inherited is not None:
            upstream = dict(self.inherited)
        else:
            upstream = dict(
                vae_ckpt=None if self.vae_ckpt is None else str(self.vae_ckpt),
                vae_sha256=_upstream_sha(self.vae_ckpt, "meduet_vae"),
                ssl_ckpt=None if _upstream_sha(self.ssl_ckpt, "meduet_ssl") is None else str(self.ssl_ckpt),
                ssl_sha256=_upstream_sha(self.ssl_ckpt, "meduet_ssl"),
            )
        info = save_stage_checkpoint(
            net.state_dict(), self.path, "meduet_seg",
            network=args, labels=self.labels, num_classes=args.get("num_classes"),
            epoch=int(engine.state.epoch), iteration=int(engine.state.iteration), export=reason,
            key_metric=metric, **upstream, **self.extra,
        )
        self.exported_epoch = int(engine.state.epoch)
        logger.info("exported %s segmenter (epoch %d, key metric %s) to %s", reason, engine.state.epoch, metric, self.path)
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
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        # first iteration of each validation run only
        if (engine.state.iteration - 1) % max(1, engine.state.epoch_length or 1) != 0:
            return
        from custom_nets.utils.overlay import save_label_overlay

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
