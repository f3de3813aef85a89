"""Swap cycle consistency: a style swap re-encodes to the content of one source and the style of the other.

For the student's swaps x12 = decode(content 1, style 2) and x21 = decode(content 2, style 1),
re-encoded by the plain encoder and heads into content tokens c'(N, Dc) and style tokens s'(N, Ds):

    L_cycle_content = mean_rows mean_{t, j} (c'_tj - cT_tj)^2     token by token against the EMA
                      teacher's clean content of the content source (x12: source 1, x21: source 2);
    L_cycle_style   = mean_rows mean_j (mean_t s'_tj - mean_t sT_tj)^2   pooled, against the
                      teacher's clean style of the style source (x12: source 2, x21: source 1).

Style is compared pooled because the style source's tokens sit on another anatomy: only its
volume-level appearance should carry over. The losses are sums of per-row terms with fixed
normalisers, so they can be evaluated in chunks of rows (the training step streams them).
"""

from __future__ import annotations

import torch

__all__ = ["swap_cycle_targets", "swap_cycle_terms"]


def swap_cycle_targets(teacher_content: torch.Tensor, teacher_style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the 2B swap rows [x12; x21] from the teacher's clean factors of the batch.

    Sample i's x12 has the content of x_i and the style of its partner x_{B-1-i}; its x21 the
    content of x_{B-1-i} and the style of x_i.

    Args:
        teacher_content: (B, N, Dc) clean content tokens.
        teacher_style: (B, N, Ds) clean style tokens.

    Returns:
        content targets (2B, N, Dc), pooled style targets (2B, Ds).
    """
    s = teacher_style.float().mean(dim=1)
    return torch.cat([teacher_content, teacher_content.flip(0)]), torch.cat([s.flip(0), s])


def swap_cycle_terms(
    content: torch.Tensor, style: torch.Tensor, target_content: torch.Tensor, target_style: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style cycle losses of some swap rows, each row's share of the mean over ``rows``.

    Args:
        content: (r, N, Dc) re-encoded content tokens of r swap rows.
        style: (r, N, Ds) re-encoded style tokens.
        target_content: (r, N, Dc) teacher targets of these rows.
        target_style: (r, Ds) pooled teacher style targets of these rows.
        rows: total number of swap rows (the normaliser, 2B).

    Returns:
        (content term, style term): sums over these rows of the per-row mean squared errors / ``rows``.
    """
    if content.shape != target_content.shape:
        raise ValueError(f"content {tuple(content.shape)} and its targets {tuple(target_content.shape)} differ")
    per_row_c = (content.float() - target_content.float()).pow(2).mean(dim=(1, 2))
    per_row_s = (style.float().mean(dim=1) - target_style.float()).pow(2).mean(dim=1)
    return per_row_c.sum() / rows, per_row_s.sum() / rows
