"""Where the segmenter's label names live.

One place per state: a bundle's ``configs/metadata.json`` (``network_data_format.outputs.pred.channel_def``,
what MONAI Label and Model Zoo read) holds the labels the bundle ships with, and a trained
``models/model.json`` (``labels``) holds the labels that model was trained on. The configs' ``labels``
id is :func:`bundle_labels`: the trained model's when there is one (inference; training that
fine-tunes), else the metadata's (training from scratch; ``--labels`` overrides). Training records
them in model.json and, when they differ from the metadata's, writes them into the bundle's
``configs/metadata.json`` (:func:`record_bundle_labels`, called by the seg exporter each time it writes
``model.pt``); the export writes model.json's into the zipped metadata, so the zip says what its model
predicts. :func:`with_labels` is the one writer of labels into metadata.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_nets.utils.checkpoint import meta_path
from custom_nets.utils.errors import InputError
from custom_nets.utils.io import atomic_write, read_json
from custom_nets.utils.values import as_path

logger = logging.getLogger(__name__)


def as_channel_def(labels: Mapping[Any, str], source: str | Path = "labels") -> dict[str, str]:
    """``{"0": "background", ...}``: label values as strings, in value order, from 0 without holes.

    Raises:
        InputError: values that are not 0..N-1 (naming ``source``).
    """
    try:
        pairs = sorted(((int(k), str(v)) for k, v in labels.items()), key=lambda kv: kv[0])
    except (TypeError, ValueError) as e:
        raise InputError(source, f"label values must be whole numbers, got {list(labels)}") from e
    if [k for k, _ in pairs] != list(range(len(pairs))) or len(pairs) < 2:
        raise InputError(source, f"labels must be 0..N-1 with N >= 2 (0 the background), got {[k for k, _ in pairs]}")
    return {str(k): v for k, v in pairs}


def metadata_labels(metadata: Mapping[str, Any], source: str | Path = "metadata.json") -> dict[str, str] | None:
    """The prediction ``channel_def`` of a bundle's metadata, or None when it has none."""
    pred = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    labels = pred.get("channel_def") if isinstance(pred, Mapping) else None
    return as_channel_def(labels, source) if isinstance(labels, Mapping) and labels else None


def bundle_labels(model_path: str | Path | None, shipped: Mapping[str, Any] | str | Path) -> dict[str, str]:
    """The labels of a config: those ``model_path``'s model.json records, else the bundle's shipped ones.

    Args:
        model_path: a trained meduet_seg model.pt (None or missing: none).
        shipped: the bundle's metadata (train.json passes ``@_meta_``, which ``monai.bundle run`` and
            MONAI Label load from configs/metadata.json) or the bundle folder whose
            ``configs/metadata.json`` to read (inference.json passes ``@bundle_root``).

    Raises:
        InputError: neither holds labels (names the config id to set).
    """
    if as_path(model_path) is not None:
        mp = meta_path(model_path)
        if Path(model_path).is_file() and mp.is_file():
            labels = read_json(mp).get("labels")
            if isinstance(labels, Mapping) and labels:
                return as_channel_def(labels, mp)
    if isinstance(shipped, Mapping):
        source: str | Path = "metadata.json"
        labels = metadata_labels(shipped, source)
    else:
        source = Path(shipped) / "configs" / "metadata.json"
        labels = metadata_labels(read_json(source), source) if source.is_file() else None
    if labels is None:
        raise InputError("labels", f"no trained model.json and no channel_def in {source} to take the label names "
                                   "from; set --labels \"{'0': 'background', '1': ...}\"")
    return labels


def with_labels(metadata: Mapping[str, Any], labels: Mapping[Any, str]) -> dict[str, Any]:
    """A copy of a bundle's metadata whose prediction ``channel_def`` (and channel count) are ``labels``;
    its ``label_classes`` / ``pred_classes`` texts, where present, are rewritten to match."""
    meta = copy.deepcopy(dict(metadata))
    labels = as_channel_def(labels)
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred")
    if isinstance(pred, dict):
        pred["channel_def"] = labels
        pred["num_channels"] = len(labels)
    if "label_classes" in meta:
        meta["label_classes"] = ", ".join(f"{k} {v}" for k, v in labels.items())
    if "pred_classes" in meta:
        meta["pred_classes"] = f"{len(labels)} channels of logits, one per label value"
    return meta


def record_bundle_labels(metadata_file: str | Path, labels: Mapping[Any, str]) -> bool:
    """Write ``labels`` into a bundle's metadata file when its prediction ``channel_def`` differs.

    The file is replaced atomically (a reader never sees half a file); nothing is written when the
    labels already match, or when there is no such file (a ``bundle_root`` that holds only the
    trained model, its configs elsewhere: no metadata to keep in step). Returns whether the file was
    rewritten.

    Raises:
        InputError: the file is not a bundle metadata with a prediction output.
    """
    path = Path(metadata_file)
    if not path.is_file():
        logger.info("%s: no bundle metadata there; the trained labels stay in model.json only", path)
        return False
    metadata = read_json(path)
    if not isinstance(metadata.get("network_data_format", {}).get("outputs", {}).get("pred"), dict):
        raise InputError(path, "no network_data_format.outputs.pred to record the trained labels in")
    labels = as_channel_def(labels)
    if metadata_labels(metadata, path) == labels:
        return False
    text = json.dumps(with_labels(metadata, labels), indent=4) + "\n"  # the bundles' metadata layout
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return True


__all__ = ["as_channel_def", "bundle_labels", "metadata_labels", "record_bundle_labels", "with_labels"]
