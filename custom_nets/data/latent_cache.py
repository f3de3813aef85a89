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
meduet_ldm through :func:`load_latent_datalist` and :class:`LatentCropDataset`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


@functools.lru_cache(maxsize=256)
def _cached_open(path: str) -> np.ndarray:
    # per process (each DataLoader worker has its own); bounded so that open mappings stay few
    return open_latent(path)


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
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Read and validate a latent datalist.

    Args:
        path: the latent datalist JSON.
        keys: splits that must be present and non-empty (others present are loaded too).
        vae_sha256: if given, the cache must have been encoded with this VAE checkpoint.
        latent_channels: if given, every latent must have this many channels.
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
    if vae_sha256 is not None and vae.get("sha256") != vae_sha256:
        raise InputError(
            path,
            f"latents were encoded with VAE sha256 {str(vae.get('sha256'))[:12]}... but the configured VAE is "
            f"{vae_sha256[:12]}...; re-run meduet_vae inference with this VAE or point vae_ckpt at "
            f"{vae.get('ckpt', 'the VAE that wrote the cache')}",
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
    from custom_nets.utils.checkpoint import read_stage_meta

    meta = read_stage_meta(vae_ckpt, "meduet_vae")
    return load_latent_datalist(latent_datalist, vae_sha256=meta["sha256"], latent_channels=meta.get("latent_channels"))


def _randint(high: int, rng: np.random.Generator | torch.Generator | None) -> int:
    """A random integer in [0, high) from a numpy or torch generator (torch's global one if None)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high))
    return int(torch.randint(0, high, (1,), generator=rng))


def _crop_view(arr: np.ndarray, crop: int, rng: np.random.Generator | torch.Generator | None) -> np.ndarray:
    """The window of a random crop: a view of ``arr`` (nothing read yet), or an edge-padded copy
    when an axis is shorter than ``crop``."""
    starts = [_randint(max(n - crop, 0) + 1, rng) for n in arr.shape[1:]]
    window = arr[(slice(None), *[slice(s, s + crop) for s in starts])]
    pad = [(0, 0)] + [(0, crop - n) for n in window.shape[1:]]
    if any(p[1] for p in pad):
        # replicate the border (usually background) rather than invent a value the VAE never produced
        window = np.pad(np.array(window), pad, mode="edge")
    return window


def random_crop(arr: np.ndarray, crop: int, generator: np.random.Generator | torch.Generator | None = None
                ) -> np.ndarray:
    """A random ``crop``^3 window of a ``(C, X, Y, Z)`` array as float32; axes shorter than ``crop`` are edge-padded.

    Only the window is read from a memory-mapped array.

    Args:
        arr: e.g. :func:`open_latent`.
        crop: window edge.
        generator: numpy or torch generator for the position (torch's global generator if None).
    """
    window = np.array(_crop_view(arr, crop, generator))  # float16 copy; torch converts faster than numpy
    return torch.from_numpy(window).float().numpy()


def _augmentation(flip_prob: float, rot90_prob: float, rng: np.random.Generator) -> tuple[list[int], tuple | None]:
    """Draw the flips (spatial axes 1-3) and the rotation ``(k, plane)`` of one sample."""
    draws = rng.random(4)
    flips = [ax for ax, u in zip((1, 2, 3), draws[:3]) if u < flip_prob]
    rot = None
    if draws[3] < rot90_prob:
        rot = (int(rng.integers(1, 4)), ((1, 2), (1, 3), (2, 3))[int(rng.integers(0, 3))])
    return flips, rot


def augment_latent(x: torch.Tensor, flip_prob: float, rot90_prob: float, rng: np.random.Generator | None = None
                   ) -> torch.Tensor:
    """Random flips (each spatial axis with ``flip_prob``) and a 90-degree rotation (``rot90_prob``,
    in a random plane, 1-3 quarter turns) of a cubic ``(C, X, Y, Z)`` latent crop."""
    flips, rot = _augmentation(flip_prob, rot90_prob, rng if rng is not None else np.random.default_rng())
    if flips:
        x = torch.flip(x, flips)
    if rot is not None:
        x = torch.rot90(x, rot[0], rot[1])
    return x.contiguous()


def augment_view(a: np.ndarray, flip_prob: float, rot90_prob: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`augment_latent` on a numpy array as views only (no copy; the caller copies once)."""
    flips, rot = _augmentation(flip_prob, rot90_prob, rng)
    if flips:
        a = np.flip(a, flips)
    if rot is not None:
        a = np.rot90(a, rot[0], rot[1])
    return a


class LatentCropDataset(torch.utils.data.Dataset):
    """Random latent crops (24^3 = 96^3 voxels at 1.5 mm) with flips and 90-degree rotations.

    Each ``__getitem__`` memory-maps the item's ``.npy`` (cached per process) and reads one crop.

    Args:
        items: latent datalist items with absolute ``latent`` paths (from :func:`load_latent_datalist`).
        crop: crop edge in latent voxels.
        flip_prob: probability of flipping each spatial axis.
        rot90_prob: probability of a 90-degree rotation in a random plane.
        samples_per_epoch: dataset length (defaults to the number of items; crops are random anyway).

    Returns (per item):
        ``{"latent": float32 tensor (C, crop, crop, crop), "domain_index": int}``.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        crop: int = 24,
        flip_prob: float = 0.2,
        rot90_prob: float = 0.2,
        samples_per_epoch: int | None = None,
    ) -> None:
        # no items only when a config resolves before its cache exists (load_latent_datalist with
        # missing_ok); a cache that exists has a non-empty training split
        if crop < 1:
            raise ValueError(f"crop must be positive, got {crop}")
        self.items = [dict(it) for it in items]
        self.crop, self.flip_prob, self.rot90_prob = int(crop), float(flip_prob), float(rot90_prob)
        self.length = int(samples_per_epoch or len(self.items))
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.length

    def _generator(self) -> np.random.Generator:
        # torch seeds every DataLoader worker differently (and reproducibly, from the main process'
        # seed); a numpy generator derived from that seed is much cheaper per draw than torch's
        key = (os.getpid(), torch.initial_seed())
        if self._rng_key != key:
            self._rng, self._rng_key = np.random.default_rng(key[1]), key
        return self._rng

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index % len(self.items)]
        rng = self._generator()
        # crop and augmentation are views of the memory map: one strided float16 copy reads the
        # crop, torch converts it to float32
        view = augment_view(_crop_view(_cached_open(str(item["latent"])), self.crop, rng), self.flip_prob,
                            self.rot90_prob, rng)
        x = torch.from_numpy(np.ascontiguousarray(view)).float()
        return {"latent": x, "domain_index": int(item["domain_index"])}
