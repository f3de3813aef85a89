"""Paired content consistency: the same anatomy in two styles gives the same content, token by token.

The domain criteria (:mod:`custom_nets.losses.domain_variance`, :mod:`custom_nets.losses.domain_quantiles`)
make the domains' content *distributions* alike. A distribution can match while each anatomy's
content still moves with the style it was rendered in, and a style swap then keeps the content
source's appearance (REPORT.md, issue 15: decoding the truth's own content with B's style beats the
trivial answers in 90-96 % of pairs, A's content in 12-23 %). Where a collection holds the same
subject in several styles on one grid (multi-contrast MR, several CT reconstruction kernels, or
travelling subjects), this criterion asks for the per-token match directly:

    L = mean_{tokens, dims} (a - b)^2 / (mean_dims var(a ∪ b) + eps),

with a and b the content tokens of the two renderings at the same positions and var the variance of
each dimension over all tokens of both. Dividing by the tokens' own variance keeps content from
meeting it by shrinking; two independent draws of one distribution score about 2.
"""

from __future__ import annotations

import torch

__all__ = ["paired_content_loss"]


def paired_content_loss(content: torch.Tensor, paired: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Scale-free squared distance between two renderings' content tokens at the same positions.

    Args:
        content: (B, N, D) content tokens of B volumes.
        paired: (B, N, D) content tokens of the same B anatomies rendered in another style, token n
            of each at the same position.
        eps: added to the variance.

    Returns:
        Scalar loss (0 when the two are equal).
    """
    if content.shape != paired.shape or content.dim() != 3:
        raise ValueError(f"content and paired must both be (B, N, D), got {tuple(content.shape)} and {tuple(paired.shape)}")
    a, b = content.float(), paired.float()
    both = torch.cat([a, b]).reshape(-1, a.shape[-1])
    return (a - b).pow(2).mean() / (both.var(dim=0, unbiased=False).mean() + eps)
