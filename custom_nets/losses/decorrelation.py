"""Decorrelation of pooled content and style across a batch.

With Zc (n, Dc) and Zs (n, Ds) the pooled (mean over tokens) content and style of n volumes, each
feature standardised over the batch (zero mean, unit variance), the cross-correlation matrix is
R = Zc^T Zs / n (Dc x Ds) and

    L_decor = mean_{j,k} R_jk^2,

zero when no content feature co-varies linearly with any style feature over the batch. It lets
the two factors share no linearly predictable variation (e.g. the domain) without asking either to
be invariant to anything.
"""

from __future__ import annotations

import torch

__all__ = ["cross_correlation_loss"]


def cross_correlation_loss(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared cross-correlation between pooled content and pooled style features.

    Args:
        content: (n, Dc) pooled content, or (n, N, Dc) tokens (mean-pooled here).
        style: (n, Ds) pooled style, or (n, N, Ds) tokens.
        eps: variance floor of the standardisation.

    Returns:
        scalar loss in [0, 1].
    """
    c = content.float().mean(dim=1) if content.ndim == 3 else content.float()
    s = style.float().mean(dim=1) if style.ndim == 3 else style.float()
    if c.ndim != 2 or s.ndim != 2 or c.shape[0] != s.shape[0]:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} must share the batch dimension")
    if c.shape[0] < 2:
        raise ValueError("decorrelation across a batch needs at least 2 volumes")
    zc = (c - c.mean(0)) / (c.var(0, unbiased=False) + eps).sqrt()
    zs = (s - s.mean(0)) / (s.var(0, unbiased=False) + eps).sqrt()
    r = zc.T @ zs / c.shape[0]
    return r.pow(2).mean()
