"""Datasets over a latent cache (:mod:`custom_nets.data.latent_cache`) and the one crop function they share.

- :class:`LatentCropDataset`: random cubic crops with flips and 90-degree rotations (meduet_ssl training),
  optionally with each volume's fixed centre window (:func:`centre_window`);
- :class:`FixedCropDataset`: the same crop of each volume at every evaluation (meduet_ssl validation);
- :class:`ConditionedLatentDataset` / :func:`conditioned_dataset`: random windows paired with the
  volume's content and style vectors from a factor bank (meduet_ldm);
- :class:`LatentVolumeDataset`: whole volumes (factor bank, swaps).

Every crop is cut by :func:`random_crop` (or its view form :func:`crop_view`): only the window is
read from a memory-mapped ``.npy``, and axes shorter than the window are edge-padded at the far end.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from custom_nets.data.latent_cache import open_latent
from custom_nets.utils.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "crop_view", "random_crop", "centre_window", "augment_latent", "augment_view", "LatentCropDataset", "FixedCropDataset",
    "ConditionedLatentDataset", "conditioned_dataset", "LatentVolumeDataset", "split_items", "tagged_items",
]

Generator = np.random.Generator | torch.Generator | None


@functools.lru_cache(maxsize=256)
def _cached_open(path: str) -> np.ndarray:
    # per process (each DataLoader worker has its own); bounded so that open mappings stay few
    return open_latent(path)


def _randint(high: int, rng: Generator) -> int:
    """A random integer in [0, high) from a numpy or torch generator (torch's global one if None)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high))
    return int(torch.randint(0, high, (1,), generator=rng))


def _window_size(size: int | Sequence[int]) -> list[int]:
    sizes = [int(size)] * 3 if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"crop must be one or three positive sizes, got {size!r}")
    return sizes


def crop_view(arr: np.ndarray, size: int | Sequence[int], generator: Generator = None) -> np.ndarray:
    """A random window of a ``(C, X, Y, Z)`` array: a view (nothing read yet), or an edge-padded copy
    when an axis is shorter than the window.

    Args:
        arr: e.g. a memory-mapped latent (:func:`~custom_nets.data.latent_cache.open_latent`).
        size: window edge (a cube) or (X, Y, Z) sizes.
        generator: numpy or torch generator for the position (torch's global generator if None).
    """
    sizes = _window_size(size)
    starts = [_randint(max(n - s, 0) + 1, generator) for n, s in zip(arr.shape[1:], sizes)]
    return _window_at(arr, starts, sizes)


def _window_at(arr: np.ndarray, starts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """The window of ``sizes`` at ``starts`` (a view), edge-padded at the far end of each axis shorter
    than ``sizes`` (then a copy)."""
    window = arr[(slice(None), *[slice(a, a + s) for a, s in zip(starts, sizes)])]
    pad = [(0, 0)] + [(0, s - n) for n, s in zip(window.shape[1:], sizes)]
    if any(p[1] for p in pad):
        # replicate the border (usually background) rather than invent a value the VAE never produced
        window = np.pad(np.array(window), pad, mode="edge")
    return window


def random_crop(arr: np.ndarray, size: int | Sequence[int], generator: Generator = None) -> np.ndarray:
    """:func:`crop_view` read into a float32 array (SSL cubes of 24^3, generator windows of 64 x 64 x 32)."""
    window = np.array(crop_view(arr, size, generator))  # float16 copy; torch converts faster than numpy
    return torch.from_numpy(window).float().numpy()


def centre_window(arr: np.ndarray, size: int | Sequence[int], pad: bool = True) -> np.ndarray:
    """The window of ``size`` at the centre of a ``(C, X, Y, Z)`` array (the same for every call), as a
    float32 copy; axes shorter than the window are edge-padded at the far end, as :func:`crop_view` does.

    Args:
        arr: e.g. a memory-mapped latent.
        size: window edge (a cube) or (X, Y, Z) sizes; a window as large as the volume is the volume.
        pad: False keeps axes shorter than the window at their own length instead (a picture of a source).
    """
    sizes = _window_size(size)
    if not pad:
        sizes = [min(s, n) for s, n in zip(sizes, arr.shape[1:])]
    starts = [max(n - s, 0) // 2 for n, s in zip(arr.shape[1:], sizes)]
    return torch.from_numpy(np.array(_window_at(arr, starts, sizes))).float().numpy()


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


class LatentCropDataset(Dataset):
    """Random latent crops (24^3 = 96^3 voxels at 1.5 mm) with flips and 90-degree rotations.

    Each ``__getitem__`` memory-maps the item's ``.npy`` (cached per process) and reads one crop.

    Args:
        data: latent datalist items with absolute ``latent`` paths (from
            :func:`~custom_nets.data.latent_cache.load_latent_datalist`); named ``data`` as bundles'
            datasets are (``train#dataset#data``, which MONAI Label and the bundle checks look for).
        crop: crop edge in latent voxels.
        flip_prob: probability of flipping each spatial axis.
        rot90_prob: probability of a 90-degree rotation in a random plane.
        samples_per_epoch: dataset length (defaults to the number of items; crops are random anyway).
        window: edge (latent voxels) of the volume's fixed centre window, returned unaugmented beside
            the crop as ``"window"`` (meduet_ssl's ``domain_window_weight`` pools content over it, as an
            evaluation of whole volumes does); 0: no window.
        pair_key: datalist key naming each volume's subject (e.g. ``"subject"``): with it, each item
            also returns the same centre window of another volume of the same subject in another
            domain, drawn at random, as ``"paired_window"`` (meduet_ssl's ``paired_content_weight``).
            The volumes of one subject must share one grid; every item needs such a partner.
            Empty: no pairing.

    Returns (per item):
        ``{"latent": float32 tensor (C, crop, crop, crop), "domain_index": int}``, and with ``window``
        ``"window"`` (C, window, window, window), with ``pair_key`` also ``"paired_window"``.

    Raises:
        InputError: with ``pair_key``, an item without that key or without a partner (names its file).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        crop: int = 24,
        flip_prob: float = 0.2,
        rot90_prob: float = 0.2,
        samples_per_epoch: int | None = None,
        window: int = 0,
        pair_key: str = "",
    ) -> None:
        # no items only when a config resolves before its cache exists (load_latent_datalist with
        # missing_ok); a cache that exists has a non-empty training split
        if crop < 1:
            raise ValueError(f"crop must be positive, got {crop}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0: none), got {window}")
        self.window = int(window)
        self.items = [dict(it) for it in data]
        self.pair_key = str(pair_key or "")
        self.partners = self._partners() if self.pair_key else []
        if self.pair_key and not self.window:
            raise ValueError(f"pair_key {self.pair_key!r} needs a window (> 0): the paired renderings are compared "
                             "over each volume's fixed window")
        self.crop, self.flip_prob, self.rot90_prob = int(crop), float(flip_prob), float(rot90_prob)
        self.length = int(samples_per_epoch or len(self.items))
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.length

    def _partners(self) -> list[list[int]]:
        """For each item, the items of the same ``pair_key`` value in another domain."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            if self.pair_key not in it:
                raise InputError(it.get("latent", f"item {i}"), f"no {self.pair_key!r} key, which pair_key names")
            groups.setdefault(str(it[self.pair_key]), []).append(i)
        partners = []
        for i, it in enumerate(self.items):
            found = [j for j in groups[str(it[self.pair_key])] if self.items[j]["domain_index"] != it["domain_index"]]
            if not found:
                raise InputError(it.get("latent", f"item {i}"), f"{self.pair_key} {it[self.pair_key]!r} has no volume in "
                                 "another domain; paired_content_weight needs every training volume paired")
            partners.append(found)
        return partners

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
        view = augment_view(crop_view(_cached_open(str(item["latent"])), self.crop, rng), self.flip_prob,
                            self.rot90_prob, rng)
        x = torch.from_numpy(np.ascontiguousarray(view)).float()
        out = {"latent": x, "domain_index": int(item["domain_index"])}
        if self.window:
            volume = _cached_open(str(item["latent"]))
            out["window"] = torch.from_numpy(centre_window(volume, self.window))
            if self.pair_key:
                partner = self.items[int(rng.choice(self.partners[index % len(self.items)]))]
                other = _cached_open(str(partner["latent"]))
                if other.shape != volume.shape:
                    raise InputError(partner["latent"], f"grid {other.shape} differs from {item['latent']}'s "
                                     f"{volume.shape}, though both are {self.pair_key} {item[self.pair_key]!r}")
                out["paired_window"] = torch.from_numpy(centre_window(other, self.window))
        return out


class FixedCropDataset(Dataset):
    """Validation crops: the same window of each volume at every evaluation (seeded per item), no
    augmentation, so that the validation loss moves only with the weights.

    Args:
        data: latent items (absolute ``latent`` paths).
        crop: crop edge in latent voxels (shorter axes are edge-padded, as in training).
        seed: base seed of the window positions.

    Returns (per item):
        ``{"latent": float32 tensor (C, crop, crop, crop), "domain_index": int}``.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], crop: int = 24, seed: int = 0) -> None:
        self.items, self.crop, self.seed = list(data), int(crop), int(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        gen = torch.Generator().manual_seed(self.seed + index)
        window = random_crop(open_latent(item["latent"]), self.crop, generator=gen)
        return {"latent": torch.from_numpy(window), "domain_index": int(item["domain_index"])}


class ConditionedLatentDataset(Dataset):
    """Random latent windows of each volume paired with the volume's content and style vectors.

    No flips or rotations: a generator should not learn mirrored or rotated anatomy.

    Args:
        items: latent datalist items with absolute ``latent`` paths (``load_latent_datalist``).
        content: (N, Dc) one row per item, in the same order.
        style: (N, Ds).
        crop: window (X, Y, Z) in latent voxels.
        seed: None draws a new random window at every access (training); an integer fixes the
            window of item i (drawn with seed + i), so that successive validations score the same
            crops.
        content_maps: one content token map file per item ((Dc, gx, gy, gz), the factor bank's
            ``token_maps``), or None. With maps, windows start on the map's cells and the map's
            window over the same region is returned as ``"content_map"``.
        map_cell: latent voxels per map cell (the MeDUET token size); ``crop`` must be a multiple.

    Returns (per item):
        {"latent": float32 (C, X, Y, Z), "content": (Dc,), "style": (Ds,), "domain_index": int}, with
        maps also "content_map": float32 (Dc, X / map_cell, Y / map_cell, Z / map_cell).
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], content: torch.Tensor, style: torch.Tensor,
                 crop: Sequence[int], seed: int | None = None, content_maps: Sequence[str | Path] | None = None,
                 map_cell: int = 4) -> None:
        # no items only when the config resolved before its cache exists (load_latent_datalist
        # refuses an empty training split; split_items falls back to it)
        if len(items) != content.shape[0] or len(items) != style.shape[0]:
            raise ValueError(f"{len(items)} volumes but {content.shape[0]} content / {style.shape[0]} style rows")
        if len(crop) != 3 or min(int(c) for c in crop) < 1:
            raise ValueError(f"crop must be 3 positive sizes, got {crop}")
        self.items, self.content, self.style = [dict(it) for it in items], content, style
        self.crop = [int(c) for c in crop]
        self.seed = seed
        self.content_maps = None if content_maps is None else [str(p) for p in content_maps]
        self.map_cell = int(map_cell)
        if self.content_maps is not None:
            if len(self.content_maps) != len(self.items):
                raise ValueError(f"{len(self.items)} volumes but {len(self.content_maps)} content maps")
            if self.map_cell < 1 or any(c % self.map_cell for c in self.crop):
                raise ValueError(f"latent_crop {self.crop} must be a multiple of the content map's cell ({self.map_cell} "
                                 "latent voxels, the MeDUET token size)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        gen = None if self.seed is None else torch.Generator().manual_seed(int(self.seed) + i)
        latent = open_latent(item["latent"])
        out: dict[str, Any] = {"content": self.content[i], "style": self.style[i],
                               "domain_index": int(item.get("domain_index", -1))}
        if self.content_maps is None:
            out["latent"] = torch.from_numpy(random_crop(latent, self.crop, gen))
            return out
        cell = self.map_cell
        cmap = open_latent(self.content_maps[i])
        starts = [cell * _randint(max(n - s, 0) // cell + 1, gen) for n, s in zip(latent.shape[1:], self.crop)]
        out["latent"] = torch.from_numpy(np.array(_window_at(latent, starts, self.crop))).float()
        out["content_map"] = torch.from_numpy(
            np.array(_window_at(cmap, [a // cell for a in starts], [s // cell for s in self.crop]))).float()
        return out


class FactorRows(Protocol):
    """What :func:`conditioned_dataset` needs of a factor bank
    (:class:`custom_nets.engines.ssl.factor_bank.FactorBank`)."""

    content: torch.Tensor
    style: torch.Tensor

    def rows_for(self, latents: Sequence[str | Path]) -> list[int]: ...

    def content_map_paths(self, rows: Sequence[int]) -> list[Path]: ...

    def token_size(self) -> int: ...


def conditioned_dataset(
    items: Sequence[Mapping[str, Any]], bank: FactorRows, crop: Sequence[int], seed: int | None = None,
    content_maps: bool = False,
) -> ConditionedLatentDataset:
    """Latent windows of ``items`` with the factor bank's vectors of each volume (InputErrors names
    every latent without a bank row); ``seed`` fixes the windows (validation); ``content_maps``:
    also the bank's content token map over each window (meduet_ldm ``content_conditioning: "map"``)."""
    rows = bank.rows_for([it["latent"] for it in items])
    if not content_maps or not rows:
        return ConditionedLatentDataset(items, bank.content[rows], bank.style[rows], crop, seed)
    return ConditionedLatentDataset(items, bank.content[rows], bank.style[rows], crop, seed,
                                    bank.content_map_paths(rows), bank.token_size())


class LatentVolumeDataset(Dataset):
    """Whole latent volumes of a latent datalist: ``{"image": float32 (C, X, Y, Z), "index": i}``.

    Args:
        data: latent items (``latent`` absolute path); named ``data`` as bundles' datasets are.

    The key is ``image`` because a bundle's network input is called so (network_data_format).
    """

    def __init__(self, data: Sequence[Mapping[str, Any]]) -> None:
        self.items = list(data)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = open_latent(self.items[i]["latent"])
        # "bank_index": the item's row in the whole bank when only some volumes are computed
        return {"image": torch.from_numpy(np.asarray(arr, dtype=np.float32)), "index": int(self.items[i].get("bank_index", i))}


def split_items(latents: Mapping[str, Any], split: str = "validation", fallback: str = "training") -> list[dict]:
    """Items of one split of a loaded latent datalist; the ``fallback`` split (with a warning) when
    it is empty, so that a cache with a single split still trains (its validation loss is then
    measured on training volumes)."""
    items = list(latents.get(split) or [])
    if items:
        return items
    logger.warning("latent datalist has no %r items; validating on the %r items", split, fallback)
    return list(latents.get(fallback) or [])


def tagged_items(
    datalist: Mapping[str, Any], splits: Sequence[str] = ("training", "validation"), source: str | Path = "latent datalist"
) -> list[dict[str, Any]]:
    """Items of the given splits of a loaded latent datalist, each tagged with its ``split``.

    Args:
        datalist: output of :func:`custom_nets.data.latent_cache.load_latent_datalist`.
        splits: lists to take, in order.
        source: the datalist's path, for the error message.

    Raises:
        InputError: no item in any of the splits (names ``source``).
    """
    items = []
    for split in splits:
        for it in datalist.get(split, []) or []:
            items.append({**it, "split": split})
    if not items and not datalist.get("missing"):  # a missing cache is reported by require_inputs
        raise InputError(source, f"no items in splits {list(splits)}")
    return items
