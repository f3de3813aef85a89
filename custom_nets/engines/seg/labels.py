"""Where the segmenter's label names live.

One place per state: a bundle's ``configs/metadata.json`` (``network_data_format.outputs.pred.channel_def``,
what MONAI Label and Model Zoo read) holds the labels the bundle ships with, and a trained
``models/model.json`` (``labels``) holds the labels that model was trained on. The configs' ``labels``
id is :func:`bundle_labels`: the trained model's when there is one (inference; training that
fine-tunes), else the metadata's (training from scratch; ``--labels`` overrides). Training records
them in model.json, and the export writes model.json's into the zipped metadata, so the zip says
what its model predicts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from custom_nets.utils.checkpoint import meta_path
from custom_nets.utils.errors import InputError
from custom_nets.utils.io import read_json
from custom_nets.utils.values import as_path


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
    """A copy of a bundle's metadata whose prediction ``channel_def`` (and channel count) are ``labels``."""
    meta = copy.deepcopy(dict(metadata))
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred")
    if isinstance(pred, dict):
        pred["channel_def"] = as_channel_def(labels)
        pred["num_channels"] = len(pred["channel_def"])
    return meta


__all__ = ["as_channel_def", "bundle_labels", "metadata_labels", "with_labels"]
