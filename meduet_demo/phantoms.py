"""Synthetic multi-domain 3D phantoms whose content (anatomy) and style (appearance) are known exactly.

Content is a label map drawn from a seed: a deformed ellipsoidal body holding liver-, kidney-,
spleen-like organs, an aorta with its bifurcation, a spine column and small lesions. Shapes, sizes
and positions change with the seed through per-organ random affine maps, per-organ surface
perturbations and one smooth global displacement field, so two seeds differ by more than a shift.

Style is a :class:`DomainStyle`: per-tissue mean intensities (HU for CT-like styles, arbitrary
units with reordered tissue contrast for MR-like ones), within-tissue texture, resolution loss
(anisotropic blur and thick slices), a smooth multiplicative bias field and Gaussian or Rician
noise. Any anatomy can be rendered in any style; rendering the same anatomy in every style gives
the ground truth for content/style swap evaluation.

Command line (writes NIfTI images, labels and an image datalist)::

    python -m meduet_demo.phantoms --out DIR --subjects 8 --styles ct_sharp,mr_t1like \
        [--shape 64 64 64] [--spacing 1.5] [--seed 0] [--all-styles] [--val-fraction 0.25]

Axes are (x, y, z) in RAS+ order: +x towards the subject's right, +y anterior, +z superior.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from custom_nets.utils.io import save_nifti, write_json

__all__ = [
    "PHANTOM_LABELS",
    "DomainStyle",
    "DOMAIN_STYLES",
    "Phantom",
    "get_style",
    "make_anatomy",
    "render",
    "render_seed",
    "content_seed_for_subject",
    "phantom_affine",
    "make_phantom",
    "write_phantom_collection",
    "main",
]

PHANTOM_LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "liver",
    3: "kidney",
    4: "spleen",
    5: "vessel",
    6: "bone",
    7: "lesion",
}

# --------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------


def _cosine_basis(n: int, n_modes: int) -> np.ndarray:
    """(n, n_modes) cosine basis on [0, 1]; mode 0 is the constant."""
    t = np.linspace(0.0, 1.0, n, dtype=np.float64)
    return np.cos(np.pi * np.outer(t, np.arange(n_modes))).astype(np.float32)


def smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], n_modes: int = 4, include_constant: bool = False
) -> np.ndarray:
    """A smooth zero-ish-mean random field with values roughly in [-1, 1].

    Built as a separable sum of low-frequency cosine modes with random coefficients that decay
    with frequency, so it is smooth at any resolution and costs one tensor contraction.

    Args:
        rng: random generator (consumed deterministically).
        shape: output shape (X, Y, Z).
        n_modes: cosine modes per axis (higher = wigglier).
        include_constant: keep the (0, 0, 0) mode (a global offset).

    Returns:
        float32 array of ``shape`` scaled so that its maximum absolute value is 1.
    """
    k = np.arange(n_modes, dtype=np.float64)
    kk = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    coeff = rng.standard_normal((n_modes,) * 3) / (1.0 + kk)
    if not include_constant:
        coeff[0, 0, 0] = 0.0
    bx, by, bz = (_cosine_basis(int(n), n_modes) for n in shape)
    out = np.einsum("ijk,xi,yj,zk->xyz", coeff.astype(np.float32), bx, by, bz, optimize=True)
    peak = float(np.abs(out).max())
    return (out / peak if peak > 0 else out).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Content: the anatomy label map
# --------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, sd_deg: Sequence[float]) -> np.ndarray:
    """Random rotation matrix from three small Euler angles (degrees, normal with given sd)."""
    angles = [float(rng.normal(0.0, d)) for d in sd_deg]
    return _axis_rotation(2, angles[2]) @ _axis_rotation(1, angles[1]) @ _axis_rotation(0, angles[0])


def _axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about coordinate axis ``axis`` (0 x, 1 y, 2 z)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _ellipsoid_level(
    u: Sequence[np.ndarray], center: Sequence[float], axes: Sequence[float], rot: np.ndarray
) -> np.ndarray:
    """Implicit ellipsoid: < 1 inside. ``u`` holds three coordinate arrays (broadcastable)."""
    d = [u[i] - np.float32(center[i]) for i in range(3)]
    level = None
    for j in range(3):  # q_j = (R^T d)_j
        q = d[0] * np.float32(rot[0, j]) + d[1] * np.float32(rot[1, j]) + d[2] * np.float32(rot[2, j])
        term = (q / np.float32(axes[j])) ** 2
        level = term if level is None else level + term
    return level


def _organ(
    rng: np.random.Generator,
    u: Sequence[np.ndarray],
    shape: Sequence[int],
    center: Sequence[float],
    axes: Sequence[float],
    rot_sd: Sequence[float] = (8.0, 8.0, 12.0),
    base_rot: np.ndarray | None = None,
    surface_noise: float = 0.25,
) -> np.ndarray:
    """Boolean mask of a randomly jittered, rotated, scaled and surface-perturbed ellipsoid."""
    c = np.asarray(center) + rng.normal(0.0, 0.035, 3)
    a = np.asarray(axes) * rng.uniform(0.85, 1.15, 3)
    rot = _rotation(rng, rot_sd)
    if base_rot is not None:
        rot = base_rot @ rot
    level = _ellipsoid_level(u, c, a, rot)
    # Per-organ smooth surface perturbation: the radius changes with position on the surface.
    level *= 1.0 + np.float32(surface_noise) * smooth_random_field(rng, shape, n_modes=4)
    return level < 1.0


def make_anatomy(seed: int, shape: Sequence[int] = (96, 96, 96)) -> np.ndarray:
    """Draw a labelled abdominal phantom (label values in :data:`PHANTOM_LABELS`).

    Args:
        seed: content seed; the same seed and shape always give the same label map.
        shape: output shape (X, Y, Z), RAS+ axes; each side >= 8.

    Returns:
        int16 label map of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sides >= 8, got {shape}")
    rng = np.random.default_rng(int(seed))

    # Normalised coordinates in [-1, 1], warped by one smooth global displacement field.
    grid = np.meshgrid(*(np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape), indexing="ij")
    amplitude = rng.uniform(0.05, 0.10)
    p = [g + np.float32(amplitude) * smooth_random_field(rng, shape, n_modes=4) for g in grid]

    # Body: a deformed ellipsoid, long along z (a trunk scan cut by the field of view).
    body_axes = (rng.uniform(0.80, 0.93), rng.uniform(0.58, 0.72), rng.uniform(1.15, 1.45))
    body_center = (rng.normal(0.0, 0.02), rng.normal(0.0, 0.03), rng.normal(0.0, 0.05))
    body_level = _ellipsoid_level(p, body_center, body_axes, np.eye(3))
    body_level *= 1.0 + np.float32(0.12) * smooth_random_field(rng, shape, n_modes=3)
    body = body_level < 1.0

    # Organ coordinates in body units for x and y (organs scale with the body's cross-section).
    u = [
        (p[0] - np.float32(body_center[0])) / np.float32(body_axes[0]),
        (p[1] - np.float32(body_center[1])) / np.float32(body_axes[1]),
        p[2] - np.float32(body_center[2]),
    ]
    labels = np.zeros(shape, dtype=np.int16)
    labels[body] = 1

    # Liver: a big right lobe plus a smaller left lobe reaching across the midline.
    liver = _organ(rng, u, shape, (0.38, 0.06, 0.32), (0.46, 0.56, 0.46))
    liver |= _organ(rng, u, shape, (0.0, 0.35, 0.45), (0.34, 0.24, 0.22))
    labels[liver & body] = 2

    # Spleen: left, posterior, upper; tilted.
    spleen = _organ(rng, u, shape, (-0.56, -0.25, 0.38), (0.17, 0.30, 0.25), base_rot=_axis_rotation(2, 30.0))
    labels[spleen & body] = 4

    # Kidneys: a posterior pair, upper poles tilted medially, each with a concave hilum.
    for side in (1.0, -1.0):
        base = _axis_rotation(1, 15.0 * side)
        z0 = -0.08 - (0.06 if side > 0 else 0.0)  # the right kidney sits lower (under the liver)
        c = (0.40 * side, -0.42, z0)
        kidney = _organ(rng, u, shape, c, (0.15, 0.13, 0.28), base_rot=base, surface_noise=0.15)
        hilum = _ellipsoid_level(u, (c[0] - 0.15 * side, c[1] + 0.02, c[2]), (0.08, 0.08, 0.12), np.eye(3)) < 1.0
        labels[kidney & ~hilum & body] = 3

    # Aorta: a tube along z, slightly left of the midline, splitting into the iliac arteries.
    z = u[2]
    bend = rng.uniform(-0.04, 0.04)
    ax_c = np.float32(-0.08 + rng.normal(0, 0.02)) + np.float32(bend) * np.sin(np.float32(2.5) * z)
    ay_c = np.float32(-0.36 + rng.normal(0, 0.02))
    radius = np.float32(rng.uniform(0.06, 0.085))
    z_bif = np.float32(rng.uniform(-0.75, -0.5))
    above = z >= z_bif
    vessel = above & (((u[0] - ax_c) ** 2 + (u[1] - ay_c) ** 2) < radius**2)
    spread = np.float32(rng.uniform(0.45, 0.7)) * (z_bif - z)
    for side in (1.0, -1.0):
        branch_x = ax_c + np.float32(side) * spread
        vessel |= (~above) & (((u[0] - branch_x) ** 2 + (u[1] - ay_c) ** 2) < (np.float32(0.8) * radius) ** 2)
    labels[vessel & body] = 5

    # Spine: vertebral bodies (separated by discs that stay soft tissue) and a posterior arch.
    sy = np.float32(-0.64 + rng.normal(0, 0.02)) + np.float32(rng.uniform(0.02, 0.06)) * np.cos(np.float32(1.5) * z)
    sx = np.float32(rng.normal(0, 0.015))
    r_vb = np.float32(rng.uniform(0.13, 0.16))
    vert_body = ((u[0] - sx) ** 2 + ((u[1] - sy) / np.float32(0.85)) ** 2) < r_vb**2
    arch = ((u[0] - sx) / np.float32(0.07)) ** 2 + ((u[1] - sy + np.float32(0.22)) / np.float32(0.1)) ** 2 < 1.0
    period = np.float32(rng.uniform(0.22, 0.30))
    phase = np.float32(rng.uniform(0.0, 1.0))
    disc = np.mod(z / period + phase, np.float32(1.0)) < np.float32(0.18)
    labels[((vert_body & ~disc) | arch) & body] = 6

    # Lesions: 1-3 small perturbed blobs inside the liver.
    liver_idx = np.flatnonzero(labels == 2)
    if liver_idx.size:
        for _ in range(int(rng.integers(1, 4))):
            centre_vox = np.unravel_index(int(rng.choice(liver_idx)), shape)
            centre = [float(u[i][centre_vox]) for i in range(3)]
            r = rng.uniform(0.05, 0.10)
            blob = _organ(rng, u, shape, centre, (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)),
                          surface_noise=0.3)
            labels[blob & (labels == 2)] = 7
    return labels


# --------------------------------------------------------------------------------------------
# Style
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainStyle:
    """How a site's scanner turns a label map into an image.

    Args:
        name: style (domain) name.
        modality: "CT" (means in HU) or "MR" (arbitrary units).
        tissue_means: label -> mean intensity, for every label in :data:`PHANTOM_LABELS`.
        texture_std: label -> standard deviation of the smooth within-tissue texture (missing = 0);
            the texture is standardised per tissue (zero mean, exactly this spread).
        texture_scale: correlation length of the texture, voxels (Gaussian sigma).
        noise_kind: "gaussian" (CT) or "rician" (MR magnitude images).
        noise_std: noise standard deviation (per real/imaginary channel for Rician).
        blur_sigma: Gaussian point-spread sigma per axis in voxels (resolution loss).
        slice_thickness: box average along z over this many voxels (thick slices), 1 = none.
        bias_strength: smooth multiplicative bias field exp(strength * f), f in [-1, 1]; it scales
            the intensity above the background value (attenuation for CT, signal for MR).
        value_range: (low, high) clip of the final image; None for an open side.
        description: one line for people.
    """

    name: str
    modality: str
    tissue_means: Mapping[int, float]
    texture_std: Mapping[int, float] = field(default_factory=dict)
    texture_scale: float = 1.5
    noise_kind: str = "gaussian"
    noise_std: float = 0.0
    blur_sigma: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_thickness: int = 1
    bias_strength: float = 0.0
    value_range: tuple[float | None, float | None] = (None, None)
    description: str = ""

    def __post_init__(self) -> None:
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"style {self.name!r}: modality must be 'CT' or 'MR', got {self.modality!r}")
        if self.noise_kind not in ("gaussian", "rician"):
            raise ValueError(f"style {self.name!r}: noise_kind must be 'gaussian' or 'rician', got {self.noise_kind!r}")
        missing = sorted(set(PHANTOM_LABELS) - set(self.tissue_means))
        if missing:
            raise ValueError(f"style {self.name!r}: tissue_means lacks labels {missing}")
        if len(self.blur_sigma) != 3 or min(self.blur_sigma) < 0:
            raise ValueError(f"style {self.name!r}: blur_sigma must be three values >= 0")
        if int(self.slice_thickness) < 1 or self.noise_std < 0 or self.texture_scale < 0:
            raise ValueError(f"style {self.name!r}: slice_thickness >= 1, noise_std >= 0, texture_scale >= 0")

    @property
    def background(self) -> float:
        """Intensity of label 0 (air for CT, no signal for MR)."""
        return float(self.tissue_means[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly parameters (label keys as strings)."""
        d = dataclasses.asdict(self)
        d["tissue_means"] = {str(k): float(v) for k, v in self.tissue_means.items()}
        d["texture_std"] = {str(k): float(v) for k, v in self.texture_std.items()}
        d["blur_sigma"] = list(self.blur_sigma)
        d["value_range"] = list(self.value_range)
        return d


def _ct_range() -> tuple[float, float]:
    return (-1024.0, 3071.0)


# Tissue contrast: CT styles follow HU of contrast phases; MR styles reorder tissues (flow voids
# dark, T1: liver brighter than spleen, lesions dark; T2: kidneys/spleen/lesions bright, liver dark).
DOMAIN_STYLES: dict[str, DomainStyle] = {
    s.name: s
    for s in (
        DomainStyle(
            name="ct_sharp",
            modality="CT",
            tissue_means={0: -1000, 1: -20, 2: 80, 3: 180, 4: 110, 5: 300, 6: 650, 7: 30},
            texture_std={1: 25, 2: 8, 3: 12, 4: 8, 5: 10, 6: 80, 7: 6},
            texture_scale=1.0,
            noise_kind="gaussian",
            noise_std=12.0,
            blur_sigma=(0.5, 0.5, 0.5),
            slice_thickness=1,
            value_range=_ct_range(),
            description="arterial-phase contrast CT, sharp kernel, thin slices, low noise",
        ),
        DomainStyle(
            name="ct_smooth_noisy",
            modality="CT",
            tissue_means={0: -1000, 1: -10, 2: 115, 3: 160, 4: 120, 5: 170, 6: 550, 7: 55},
            texture_std={1: 20, 2: 10, 3: 10, 4: 10, 5: 8, 6: 60, 7: 8},
            texture_scale=2.0,
            noise_kind="gaussian",
            noise_std=35.0,
            blur_sigma=(1.3, 1.3, 1.0),
            slice_thickness=3,
            bias_strength=0.02,
            value_range=_ct_range(),
            description="portal-venous CT, soft kernel, thick slices, noisy",
        ),
        DomainStyle(
            name="ct_lowdose",
            modality="CT",
            tissue_means={0: -1000, 1: -40, 2: 58, 3: 32, 4: 48, 5: 42, 6: 420, 7: 38},
            texture_std={1: 30, 2: 5, 3: 5, 4: 5, 5: 5, 6: 50, 7: 5},
            texture_scale=1.5,
            noise_kind="gaussian",
            noise_std=70.0,
            blur_sigma=(0.8, 0.8, 1.0),
            slice_thickness=2,
            value_range=_ct_range(),
            description="non-contrast low-dose CT: little soft-tissue contrast, strong noise",
        ),
        DomainStyle(
            name="mr_t1like",
            modality="MR",
            tissue_means={0: 0, 1: 320, 2: 420, 3: 260, 4: 300, 5: 60, 6: 380, 7: 180},
            texture_std={1: 60, 2: 15, 3: 20, 4: 15, 5: 10, 6: 40, 7: 15},
            texture_scale=2.0,
            noise_kind="rician",
            noise_std=18.0,
            blur_sigma=(0.8, 0.8, 1.8),
            slice_thickness=2,
            bias_strength=0.35,
            value_range=(0.0, None),
            description="T1-weighted-like MR: liver > spleen, dark vessels and lesions, bias field, thick slices",
        ),
        DomainStyle(
            name="mr_t2like",
            modality="MR",
            tissue_means={0: 0, 1: 260, 2: 130, 3: 520, 4: 420, 5: 40, 6: 200, 7: 760},
            texture_std={1: 50, 2: 12, 3: 30, 4: 25, 5: 8, 6: 30, 7: 30},
            texture_scale=2.5,
            noise_kind="rician",
            noise_std=22.0,
            blur_sigma=(0.7, 0.7, 2.5),
            slice_thickness=3,
            bias_strength=0.30,
            value_range=(0.0, None),
            description="T2-weighted-like MR: bright kidneys, spleen and lesions, dark liver, bias field",
        ),
    )
}


def get_style(style: str | DomainStyle) -> DomainStyle:
    """Return ``style`` itself or the registered style of that name (ValueError listing the names)."""
    if isinstance(style, DomainStyle):
        return style
    if style not in DOMAIN_STYLES:
        raise ValueError(f"unknown phantom style {style!r}; known: {', '.join(DOMAIN_STYLES)}")
    return DOMAIN_STYLES[style]


def _lookup(values: Mapping[int, float], n_labels: int) -> np.ndarray:
    lut = np.zeros(n_labels, dtype=np.float32)
    for k, v in values.items():
        if 0 <= int(k) < n_labels:
            lut[int(k)] = float(v)
    return lut


def render_seed(content_seed: int, style_name: str, style_seed: int = 0) -> int:
    """Seed of a rendering's random parts (texture, bias field, noise), from both seeds.

    Uses crc32 of the style name, not ``hash()``, which Python salts per process.
    """
    ss = np.random.SeedSequence([int(content_seed) & 0xFFFFFFFF, zlib.crc32(style_name.encode()), int(style_seed)])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def render(label_map: np.ndarray, style: str | DomainStyle, seed: int) -> np.ndarray:
    """Render a label map in a style.

    Steps: tissue means + smooth texture -> anisotropic blur and thick-slice averaging ->
    multiplicative bias field (above the background value) -> Gaussian or Rician noise -> clip.

    Args:
        label_map: integer labels (values in :data:`PHANTOM_LABELS`), 3D.
        style: a :class:`DomainStyle` or a name in :data:`DOMAIN_STYLES`.
        seed: seed of texture, bias field and noise (see :func:`render_seed`).

    Returns:
        float32 image of the label map's shape.
    """
    style = get_style(style)
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ValueError(f"label_map must be 3D, got shape {labels.shape}")
    labels = labels.astype(np.intp, copy=False)
    if labels.min() < 0 or labels.max() >= len(PHANTOM_LABELS):
        raise ValueError(f"label_map values must lie in 0..{len(PHANTOM_LABELS) - 1}")
    rng = np.random.default_rng(int(seed))
    n = len(PHANTOM_LABELS)

    image = _lookup(style.tissue_means, n)[labels]
    tex_lut = _lookup(style.texture_std, n)
    if tex_lut.any():
        tex = ndimage.gaussian_filter(rng.standard_normal(labels.shape, dtype=np.float32), style.texture_scale)
        # Standardise the texture within each tissue, so that every tissue's mean and spread
        # are exactly the configured ones (a smooth field's mean over a small organ is not ~0).
        flat, tflat = labels.ravel(), tex.ravel().astype(np.float64)
        count = np.maximum(np.bincount(flat, minlength=n), 1)
        mean = np.bincount(flat, tflat, minlength=n) / count
        var = np.bincount(flat, tflat * tflat, minlength=n) / count - mean**2
        scale = tex_lut / np.sqrt(np.maximum(var, 1e-12))
        image += (tex - mean[labels].astype(np.float32)) * scale[labels].astype(np.float32)
    if any(s > 0 for s in style.blur_sigma):
        image = ndimage.gaussian_filter(image, sigma=style.blur_sigma, mode="nearest")
    if style.slice_thickness > 1:
        image = ndimage.uniform_filter1d(image, size=int(style.slice_thickness), axis=2, mode="nearest")
    if style.bias_strength > 0:
        bias = np.exp(np.float32(style.bias_strength) * smooth_random_field(rng, labels.shape, n_modes=3))
        bg = np.float32(style.background)
        image = (image - bg) * bias + bg
    if style.noise_std > 0:
        sd = np.float32(style.noise_std)
        if style.noise_kind == "gaussian":
            image += sd * rng.standard_normal(labels.shape, dtype=np.float32)
        else:  # magnitude of a complex signal with independent noise in both channels
            re = image + sd * rng.standard_normal(labels.shape, dtype=np.float32)
            im = sd * rng.standard_normal(labels.shape, dtype=np.float32)
            image = np.sqrt(re * re + im * im)
    lo, hi = style.value_range
    if lo is not None or hi is not None:
        image = np.clip(image, lo, hi)
    return image.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Phantom = anatomy + rendering + geometry
# --------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One rendered phantom.

    Args:
        image: float32 (X, Y, Z) intensities.
        label: int16 (X, Y, Z) label map (:data:`PHANTOM_LABELS`).
        style_params: the style's parameters plus the seeds used.
        affine: 4x4 voxel-to-world (RAS+, mm) matrix.
    """

    image: np.ndarray
    label: np.ndarray
    style_params: dict[str, Any]
    affine: np.ndarray


def phantom_affine(shape: Sequence[int], spacing: float | Sequence[float] = 1.5) -> np.ndarray:
    """Diagonal RAS+ affine with the given spacing and the volume centred on the world origin."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    aff = np.eye(4)
    aff[:3, :3] = np.diag(sp)
    aff[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * sp
    return aff


def make_phantom(
    content_seed: int,
    style_name: str,
    shape: Sequence[int] = (96, 96, 96),
    spacing: float | Sequence[float] = 1.5,
    style_seed: int = 0,
    label_map: np.ndarray | None = None,
) -> Phantom:
    """Anatomy of ``content_seed`` rendered in style ``style_name``.

    Args:
        content_seed: anatomy seed (:func:`make_anatomy`).
        style_name: a name in :data:`DOMAIN_STYLES`.
        shape: volume shape (X, Y, Z).
        spacing: voxel size in mm (scalar or per axis).
        style_seed: extra seed for the rendering noise (the same anatomy and style with another
            style_seed gives another noise draw).
        label_map: precomputed ``make_anatomy(content_seed, shape)`` to avoid recomputing it.

    Returns:
        :class:`Phantom`.
    """
    style = get_style(style_name)
    label = make_anatomy(content_seed, shape) if label_map is None else np.asarray(label_map, dtype=np.int16)
    seed = render_seed(content_seed, style.name, style_seed)
    image = render(label, style, seed)
    params = style.to_dict() | {"content_seed": int(content_seed), "style_seed": int(style_seed), "render_seed": seed}
    return Phantom(image=image, label=label, style_params=params, affine=phantom_affine(label.shape, spacing))


# --------------------------------------------------------------------------------------------
# Writing a collection
# --------------------------------------------------------------------------------------------


def content_seed_for_subject(seed: int, subject: int) -> int:
    """Content seed of subject ``subject`` in a collection drawn with base seed ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(subject)]).generate_state(1)[0])


def _image_for_disk(image: np.ndarray, style: DomainStyle) -> np.ndarray:
    # CT is stored as integer HU like scanners write it; MR stays float.
    if style.modality == "CT":
        return np.round(image).astype(np.int16)
    return image.astype(np.float32)


def write_phantom_collection(
    out_dir: str | Path,
    subjects: int,
    styles: Sequence[str],
    shape: Sequence[int] = (96, 96, 96),
    spacing: float = 1.5,
    seed: int = 0,
    all_styles: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> Path:
    """Write a multi-domain phantom collection and its image datalist.

    Subjects are split by content into training / validation / testing (the last subjects go to
    validation, then testing), so no anatomy appears in two splits. Without ``all_styles`` each
    subject is rendered once, in ``styles[i % len(styles)]`` (a multi-site collection); with it,
    every subject in every style (ground truth for content/style swaps).

    Args:
        out_dir: output folder (images/, labels/, datalist.json, styles.json).
        subjects: number of anatomies.
        styles: style names (each one a domain).
        shape: volume shape.
        spacing: isotropic voxel size, mm.
        seed: base seed of the collection.
        all_styles: render every subject in every style.
        val_fraction: fraction of subjects for validation.
        test_fraction: fraction of subjects for testing.

    Returns:
        path of the datalist JSON.
    """
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    if not styles:
        raise ValueError("at least one style is needed")
    style_objs = [get_style(s) for s in styles]
    if len({s.name for s in style_objs}) != len(style_objs):
        raise ValueError(f"styles repeat: {list(styles)}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to < 1")
    out_dir = Path(out_dir)
    n_val = int(round(subjects * val_fraction))
    n_test = int(round(subjects * test_fraction))
    n_train = subjects - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{subjects} subjects leave none for training with these fractions")

    datalist: dict[str, Any] = {"training": [], "validation": [], "testing": [], "domains": [s.name for s in style_objs]}
    for i in range(subjects):
        content_seed = content_seed_for_subject(seed, i)
        content_id = f"sub-{i:03d}"
        label = make_anatomy(content_seed, shape)
        affine = phantom_affine(shape, spacing)
        label_rel = f"labels/{content_id}.nii.gz"
        save_nifti(out_dir / label_rel, label.astype(np.uint8), affine, dtype=None)
        chosen = style_objs if all_styles else [style_objs[i % len(style_objs)]]
        split = "training" if i < n_train else ("validation" if i < n_train + n_val else "testing")
        for style in chosen:
            ph = make_phantom(content_seed, style.name, shape, spacing, label_map=label)
            image_rel = f"images/{content_id}_{style.name}.nii.gz"
            save_nifti(out_dir / image_rel, _image_for_disk(ph.image, style), affine, dtype=None)
            datalist[split].append(
                {
                    "image": image_rel,
                    "label": label_rel,
                    "domain": style.name,
                    "modality": style.modality,
                    "content_id": content_id,
                    "content_seed": content_seed,
                    "style": style.name,
                }
            )
    write_json(
        out_dir / "styles.json",
        {
            "labels": {str(k): v for k, v in PHANTOM_LABELS.items()},
            "styles": {s.name: s.to_dict() for s in style_objs},
            "shape": list(shape),
            "spacing": spacing,
            "seed": seed,
            "all_styles": all_styles,
        },
    )
    return write_json(out_dir / "datalist.json", datalist)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m meduet_demo.phantoms",
        description="Write synthetic multi-domain phantoms (NIfTI images + labels) and an image datalist.",
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--subjects", type=int, default=8, help="number of anatomies (default 8)")
    ap.add_argument("--styles", default=",".join(DOMAIN_STYLES),
                    help=f"comma-separated style names (default all: {','.join(DOMAIN_STYLES)})")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, default=1.5, help="voxel size in mm (default 1.5)")
    ap.add_argument("--seed", type=int, default=0, help="collection seed (default 0)")
    ap.add_argument("--all-styles", action="store_true",
                    help="render every subject in every style (swap ground truth) instead of round-robin")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="subjects for validation (default 0.2)")
    ap.add_argument("--test-fraction", type=float, default=0.0, help="subjects for testing (default 0)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    try:
        path = write_phantom_collection(
            args.out, args.subjects, styles, shape=args.shape, spacing=args.spacing, seed=args.seed,
            all_styles=args.all_styles, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
