"""Random-intensity copies of a volume: a paired partner for collections without paired subjects.

meduet_ssl's paired content criterion (``paired_content_weight``) asks the same subject to give the
same content tokens in two styles. Most collections scan each subject in one style only. For those,
a copy of each volume with a random intensity remapping, blur and noise (the same anatomy in a new
"style") can stand in as the partner. The remapping is a random piecewise-linear curve on [0, 1]
that need not be monotone, so tissue order can change as it does between CT and MR (the random
intensity transforms of domain-generalisation work, e.g. Ouyang et al., "Causality-inspired
single-source domain generalization", 2022).

Each copy is a function of its seed, so the cache written by meduet_vae's encoding is reproducible
and re-running it skips copies already written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

COPY_DOMAIN = "intensity_copy"
"""Domain label of the copies in the latent datalist (one extra domain for meduet_ssl)."""


def intensity_copy(image: torch.Tensor | np.ndarray, seed: int, knots: Sequence[int] = (3, 8),
                   smooth_prob: float = 0.5, smooth_sigma: Sequence[float] = (0.5, 1.5),
                   noise_prob: float = 0.5, noise_std: Sequence[float] = (0.01, 0.1)) -> torch.Tensor:
    """A random restyling of an image normalised to [0, 1] (values outside are clipped first).

    Args:
        image: (..., X, Y, Z) intensities in [0, 1] (after the preprocessing's normalisation).
        seed: the copy's seed; the same seed gives the same copy.
        knots: inclusive range of the number of knots of the remapping curve (equally spaced inputs,
            outputs drawn uniformly in [0, 1], then stretched to span [0, 1]).
        smooth_prob: probability of a Gaussian blur after the remapping.
        smooth_sigma: range of the blur's sigma, in voxels.
        noise_prob: probability of additive Gaussian noise after the blur.
        noise_std: range of the noise's standard deviation.

    Returns:
        float32 tensor of the image's shape, clipped to [0, 1].
    """
    lo, hi = int(knots[0]), int(knots[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"knots must be a range (lo, hi) with 2 <= lo <= hi, got {tuple(knots)}")
    rng = np.random.default_rng(int(seed))
    x = torch.as_tensor(image, dtype=torch.float32).clamp(0.0, 1.0)
    n = int(rng.integers(lo, hi + 1))
    ys = rng.uniform(0.0, 1.0, n)
    ys = (ys - ys.min()) / max(float(ys.max() - ys.min()), 1e-6)  # use the whole range: contrast survives
    out = _piecewise_linear(x, torch.linspace(0.0, 1.0, n), torch.as_tensor(ys, dtype=torch.float32))
    if rng.uniform() < smooth_prob:
        sigma = float(rng.uniform(*smooth_sigma))
        out = _gaussian_blur3d(out, sigma)
    if rng.uniform() < noise_prob:
        std = float(rng.uniform(*noise_std))
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        out = out + std * torch.randn(out.shape, generator=gen)
    return out.clamp(0.0, 1.0)


def _piecewise_linear(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``np.interp`` on a tensor: the curve through (xs, ys), xs increasing, evaluated at x in [xs[0], xs[-1]]."""
    i = torch.bucketize(x, xs[1:-1])  # segment index 0 .. n-2
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _gaussian_blur3d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last three axes (edges replicated), radius 3 sigma."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-3:])  # every channel on its own
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        y = torch.nn.functional.conv3d(torch.nn.functional.pad(y, pad, mode="replicate"), k.reshape(view))
    return y.reshape(shape)


class IntensityCopyd(MapTransform):
    """Replace ``keys`` by their :func:`intensity_copy` where the item carries a seed.

    Items without ``seed_key`` (or with ``None``) pass unchanged, so one pipeline serves the original
    volumes and their copies. Metadata of a MetaTensor is kept.

    Args:
        keys: image keys (never a label).
        seed_key: item key of the copy's seed (set by :func:`with_intensity_copies`).
        kwargs: :func:`intensity_copy`'s ranges.
    """

    def __init__(self, keys: KeysCollection = "image", seed_key: str = "copy_seed", **kwargs: Any) -> None:
        super().__init__(keys)
        self.seed_key, self.kwargs = seed_key, kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        seed = d.get(self.seed_key)
        if seed is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            copy = intensity_copy(img, int(seed), **self.kwargs)
            if hasattr(img, "meta"):  # MetaTensor: same geometry, new values
                copy = img.clone().copy_(copy.to(img.dtype))
            d[key] = copy
        return d


def copy_seed(image: str, index: int) -> int:
    """The seed of copy ``index`` of an image: a hash of its absolute path and the index."""
    digest = hashlib.sha1(f"{os.path.abspath(str(image))}#{int(index)}".encode()).hexdigest()
    return int(digest[:8], 16)


def with_intensity_copies(items: Sequence[Mapping[str, Any]], copies: int, domain: str = COPY_DOMAIN,
                          splits: Sequence[str] = ("training",)) -> list[dict[str, Any]]:
    """The items followed by ``copies`` random-intensity copies of each item of ``splits``.

    Each original keeps its ``subject`` or, without one, gets its image path as subject; its copies
    share it (meduet_ssl's ``pair_key``), carry ``copy_index`` and ``copy_seed``, and belong to
    ``domain``, appended to every item's ``domains``. ``copies`` 0 returns the items unchanged.

    Args:
        items: :func:`custom_nets.engines.vae.encode.datalist_items` output.
        copies: copies per volume.
        domain: the copies' domain label (must not already name a domain of the datalist).
        splits: splits whose volumes get copies (validation volumes are only reconstructed).

    Returns:
        new list of items.

    Raises:
        ValueError: ``copies`` < 0, or ``domain`` already a domain of the datalist.
    """
    copies = int(copies)
    if copies < 0:
        raise ValueError(f"intensity_copies must be >= 0, got {copies}")
    if copies == 0 or not items:
        return [dict(it) for it in items]
    domains = list(items[0].get("domains") or [])
    if domain in domains:
        raise ValueError(f"the copies' domain {domain!r} is already a domain of the datalist {domains}; "
                         "choose another intensity_copy_domain")
    domains = [*domains, domain]
    out: list[dict[str, Any]] = []
    added: list[dict[str, Any]] = []
    for it in items:
        orig = dict(it, domains=domains)
        if orig.get("subject") is None:
            orig["subject"] = str(it["image"])
        out.append(orig)
        if it.get("split", "training") in splits:
            added += [dict(orig, domain=domain, domain_index=len(domains) - 1, copy_index=k,
                           copy_seed=copy_seed(it["image"], k)) for k in range(copies)]
    return out + added


__all__ = ["COPY_DOMAIN", "IntensityCopyd", "copy_seed", "intensity_copy", "with_intensity_copies"]
