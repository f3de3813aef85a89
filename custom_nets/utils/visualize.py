"""PNG montages of 3-D volumes for a person to look at (reconstructions, swaps, samples).

One row per volume, three columns (the central axial, coronal and sagittal slices), shared grey
scale per row pair so that an input and its reconstruction are directly comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from custom_nets.utils.io import atomic_path

VIEWS = ("axial", "coronal", "sagittal")


def _as_volume(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A 3-D float array from ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` (first channel otherwise)."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    while arr.ndim > 3:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {arr.shape}")
    return arr


def central_slices(vol: np.ndarray) -> list[np.ndarray]:
    """Central axial (XY at mid Z), coronal (XZ at mid Y) and sagittal (YZ at mid X) slices, oriented for display.

    Volumes are RAS-ordered (X: left->right, Y: posterior->anterior, Z: inferior->superior);
    slices are transposed/flipped so that anterior/superior point up.
    """
    x, y, z = (s // 2 for s in vol.shape)
    return [np.flipud(vol[:, :, z].T), np.flipud(vol[:, y, :].T), np.flipud(vol[x, :, :].T)]


def save_slice_montage(
    path: str | Path,
    rows: Sequence[np.ndarray | torch.Tensor],
    titles: Sequence[str] | None = None,
    vrange: tuple[float, float] | None = (0.0, 1.0),
    dpi: int = 100,
) -> Path:
    """Write a PNG with one row per volume: its central axial, coronal and sagittal slices.

    Args:
        path: destination ``.png`` (written atomically; parent folders are created).
        rows: 3-D volumes (a leading channel/batch axis of size 1 is accepted), e.g. [input, reconstruction].
        titles: one label per row (e.g. "input", "reconstruction").
        vrange: grey-scale range for every row; ``None`` uses each row's own 1st-99th percentile.
        dpi: resolution.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("save_slice_montage needs at least one volume")
    titles = list(titles) if titles is not None else [f"volume {i}" for i in range(len(rows))]
    if len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} rows")
    vols = [_as_volume(r) for r in rows]
    fig, axes = plt.subplots(len(vols), 3, figsize=(9, 3 * len(vols)), squeeze=False)
    try:
        for r, (vol, title) in enumerate(zip(vols, titles)):
            lo, hi = vrange if vrange is not None else np.percentile(vol, [1, 99])
            for c, (sl, view) in enumerate(zip(central_slices(vol), VIEWS)):
                ax = axes[r][c]
                ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(title)
                if r == 0:
                    ax.set_title(view)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def principal_components(x: np.ndarray | torch.Tensor, k: int = 2) -> np.ndarray:
    """Project the rows of ``x`` (N, D) onto their first ``k`` principal axes (zeros where rank is short)."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    arr = arr - arr.mean(axis=0, keepdims=True)
    out = np.zeros((arr.shape[0], k))
    if arr.shape[0] > 1:
        u, s, _ = np.linalg.svd(arr, full_matrices=False)
        m = min(k, len(s))
        out[:, :m] = u[:, :m] * s[:m]
    return out


def save_factor_scatter(
    path: str | Path,
    factors: dict[str, np.ndarray | torch.Tensor],
    domain_index: Sequence[int] | np.ndarray | torch.Tensor,
    domains: Sequence[str],
    dpi: int = 100,
) -> Path:
    """Write a PNG with one panel per factor (e.g. content, style): its vectors' first two principal
    components, one colour per domain. Disentangled factors show style clustering by domain and
    content mixing across domains.

    Args:
        path: destination ``.png`` (written atomically).
        factors: name -> (N, D) vectors, all with the same N.
        domain_index: (N,) domain of each vector.
        domains: domain names (index -> name).
        dpi: resolution.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dom = np.asarray(domain_index.cpu() if isinstance(domain_index, torch.Tensor) else domain_index, dtype=int)
    if not factors:
        raise ValueError("save_factor_scatter needs at least one factor")
    fig, axes = plt.subplots(1, len(factors), figsize=(4.5 * len(factors), 4), squeeze=False)
    try:
        for ax, (name, vectors) in zip(axes[0], factors.items()):
            pc = principal_components(vectors)
            if pc.shape[0] != dom.shape[0]:
                raise ValueError(f"{name}: {pc.shape[0]} vectors for {dom.shape[0]} domain labels")
            for d, dname in enumerate(domains):
                sel = dom == d
                if sel.any():
                    # tab20 + alternating markers: more domains than the default 10-colour cycle
                    ax.scatter(pc[sel, 0], pc[sel, 1], s=22, label=dname, color=plt.cm.tab20(d % 20),
                               marker="os^D"[(d // 20) % 4])
            ax.set_title(f"{name} vectors (PCA)")
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
        # legend beside the last panel, in columns of 16, so that it never hides points
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 + (len(domains) - 1) // 16)
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
