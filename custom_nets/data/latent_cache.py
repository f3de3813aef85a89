"""Latent cache: one uncompressed float16 ``.npy`` per volume plus a latent datalist JSON.

Uncompressed ``.npy`` files are read through memory mapping, so a random 24^3 crop touches only
the bytes it needs (a gzipped NIfTI would have to be decompressed whole). The latent datalist::

    {"training": [item, ...], "validation": [...], "domains": [names],
     "vae": {"ckpt": path, "sha256": str, "latent_channels": 4, "network": {...}}}

    item = {"latent": path relative to the datalist folder, "domain": name, "domain_index": int,
            "image": source image, "label": optional source label, "modality": "CT" | "MR",
            "spacing": original voxel spacing [3], "original_affine": 4x4, "original_shape": [3],
            "affine": 4x4 of the preprocessed (1.5 mm) grid, "latent_affine": 4x4, "shape": [C, X, Y, Z]}

Written by meduet_vae inference (:mod:`custom_nets.engines.vae.encode`); read by meduet_ssl and
meduet_ldm through :func:`load_latent_datalist` and the datasets of :mod:`custom_nets.data.latent_datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.utils.checkpoint import check_upstream, read_stage_meta
from custom_nets.utils.errors import InputError, InputErrors
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import atomic_path, read_json

LATENT_DTYPE = np.float16
ITEM_KEYS = ("latent", "domain", "domain_index", "spacing", "affine", "latent_affine", "shape")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def write_latent(path: str | Path, latent: torch.Tensor | np.ndarray) -> Path:
    """Save a ``(C, X, Y, Z)`` latent as an uncompressed float16 ``.npy``, atomically.

    Args:
        path: destination (``.npy``).
        latent: finite values within float16 range.

    Returns:
        ``path``.
    """
    arr = latent.detach().cpu().float().numpy() if isinstance(latent, torch.Tensor) else np.asarray(latent)
    if arr.ndim != 4:
        raise ValueError(f"{path}: latent must be (C, X, Y, Z), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: latent has non-finite values (the VAE diverged or the input is corrupt)")
    if np.abs(arr).max() > FLOAT16_MAX:
        raise ValueError(f"{path}: latent values exceed the float16 range ({np.abs(arr).max():.3g})")
    path = Path(path)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(arr, dtype=LATENT_DTYPE))
    return path


def open_latent(path: str | Path) -> np.ndarray:
    """Memory-map a cached latent (read-only); nothing is read until it is sliced.

    Raises:
        InputError: missing file or not a 4-D float16 ``.npy``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "latent file not found; re-run meduet_vae inference to (re)build the cache")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise InputError(path, f"not a readable .npy latent ({e})") from e
    if arr.ndim != 4 or arr.dtype != LATENT_DTYPE:
        raise InputError(path, f"expected a (C, X, Y, Z) float16 array, got {arr.dtype} {arr.shape}")
    return arr


def _check_item(item: Any, i: int, key: str, root: Path, domains: Sequence[str], src: Path) -> list[InputError]:
    """Problems with one latent datalist item (paths resolved against ``root``)."""
    where = f"{src} [{key}][{i}]"
    if not isinstance(item, Mapping):
        return [InputError(where, "item is not an object")]
    missing = [k for k in ITEM_KEYS if k not in item]
    if missing:
        return [InputError(where, f"missing keys {missing}")]
    errs = []
    if item["domain"] not in domains:
        errs.append(InputError(where, f"domain {item['domain']!r} not in domains {list(domains)}"))
    elif domains.index(item["domain"]) != item["domain_index"]:
        errs.append(InputError(where, f"domain_index {item['domain_index']} does not match domain {item['domain']!r}"))
    path = root / item["latent"]
    try:
        arr = open_latent(path)
        if list(arr.shape) != list(item["shape"]):
            errs.append(InputError(path, f"shape {list(arr.shape)} differs from the datalist's {item['shape']}"))
    except InputError as e:
        errs.append(e)
    return errs


def load_latent_datalist(
    path: str | Path,
    keys: Sequence[str] = ("training",),
    vae_sha256: str | None = None,
    latent_channels: int | None = None,
    vae_source: str = "the configured VAE",
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Read and validate a latent datalist.

    Args:
        path: the latent datalist JSON.
        keys: splits that must be present and non-empty (others present are loaded too).
        vae_sha256: if given, the cache must have been encoded with this VAE checkpoint.
        latent_channels: if given, every latent must have this many channels.
        vae_source: names the configured VAE in the message (e.g. ``"vae_ckpt models/model.pt"``).
        missing_ok: a missing file gives empty splits and no domains (a config resolved before the
            cache exists; its run stops in :func:`custom_nets.utils.inputs.require_inputs`).

    Returns:
        The datalist with ``"latent"`` (and relative ``image``/``label``) paths made absolute.

    Raises:
        InputError: the file or the VAE it was encoded with does not fit (names the datalist).
        InputErrors: one line per bad item.
    """
    if as_bool(missing_ok, "missing_ok") and is_missing(path):
        note_missing(path, "latent datalist")
        return {**{k: [] for k in dict.fromkeys(("training", "validation", *keys))}, "domains": [], "missing": str(path)}
    path = Path(path).resolve()
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("domains"), list):
        raise InputError(path, "not a latent datalist (needs 'domains' and splits such as 'training')")
    vae = data.get("vae") or {}
    if vae_sha256 is not None:
        check_upstream(
            path, "the latent cache", "meduet_vae", vae.get("sha256"), vae_sha256, vae_source,
            f"re-run meduet_vae inference with this VAE or point vae_ckpt at {vae.get('ckpt', 'the VAE that wrote the cache')}",
            recorded_from=vae.get("ckpt"), error=InputError, required=True,
        )
    if latent_channels is not None and vae.get("latent_channels") != latent_channels:
        raise InputError(path, f"latents have {vae.get('latent_channels')} channels; the configured network "
                               f"expects {latent_channels}")
    root = path.parent
    errs: list[InputError] = []
    for key in keys:
        if not data.get(key):
            errs.append(InputError(path, f"split {key!r} is missing or empty"))
    out = dict(data)
    for key in ("training", "validation", "testing"):
        if key not in data:
            continue
        if not isinstance(data[key], list):
            errs.append(InputError(path, f"split {key!r} is not a list"))
            continue
        items = []
        for i, item in enumerate(data[key]):
            item_errs = _check_item(item, i, key, root, data["domains"], path)
            if not item_errs and latent_channels is not None and item["shape"][0] != latent_channels:
                item_errs.append(InputError(root / item["latent"], f"{item['shape'][0]} channels, expected "
                                                                   f"{latent_channels}"))
            errs += item_errs
            if not item_errs:
                resolved = dict(item, latent=str(root / item["latent"]))
                for k in ("image", "label"):
                    if item.get(k) and not Path(item[k]).is_absolute():
                        resolved[k] = str(root / item[k])
                items.append(resolved)
        out[key] = items
    if errs:
        raise InputErrors(errs)
    return out


def check_cache_matches_vae(latent_datalist: str | Path, vae_ckpt: str | Path) -> dict[str, Any]:
    """Refuse a latent cache that was not encoded by the VAE checkpoint ``vae_ckpt``.

    Returns:
        The validated latent datalist (see :func:`load_latent_datalist`).
    """
    meta = read_stage_meta(vae_ckpt, "meduet_vae")
    return load_latent_datalist(latent_datalist, vae_sha256=meta["sha256"], latent_channels=meta.get("latent_channels"),
                                vae_source=f"vae_ckpt {vae_ckpt}")
