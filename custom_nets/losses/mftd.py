"""Mixed-factor token distillation (MFTD, METHOD.md section 3, step 6).

The student re-encodes its own dual-stream reconstructions (stream A predicts source 1 = x, stream
B predicts source 2 = x reversed) with the plain encoder and heads. Its content and style tokens are
matched to the EMA teacher's factors of the clean inputs, counting only the tokens where that
source was absent from the mixture (reconstructed, not copied): M = 1 for source 1, M = 0 for
source 2. Each source's term is the per-token mean squared error averaged over its selected tokens
(over the whole batch); L_MFTD = content_weight * (content terms) + (style terms), content_weight 0.5.

The loss is a sum over the 2B re-encoded rows with fixed per-token weights
(:func:`mftd_row_targets`), so it can also be accumulated over chunks of rows (:func:`mftd_terms`).
"""

from __future__ import annotations

import torch

__all__ = ["masked_token_mse", "mftd_row_targets", "mftd_terms", "mftd_loss"]


def masked_token_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-token mean squared error averaged over the selected tokens.

    Args:
        pred: (B, N, D) tokens.
        target: (B, N, D) tokens.
        weight: (B, N) 0/1 selection.

    Returns:
        sum(weight * mean_D (pred - target)^2) / sum(weight); 0 when nothing is selected.
    """
    dist = (pred.float() - target.float()).pow(2).mean(dim=-1)
    w = weight.to(dist.dtype)
    return (dist * w).sum() / w.sum().clamp_min(1.0)


def mftd_row_targets(
    teacher_content: torch.Tensor, teacher_style: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets and token weights of the 2B re-encoded rows [stream A; stream B].

    Args:
        teacher_content: (B, N, Dc) teacher's plain content factors of the clean batch x.
        teacher_style: (B, N, Ds) the same for style.
        mask: (B, N) mixing mask.

    Returns:
        content targets (2B, N, Dc) = [teacher; teacher flipped], style targets (2B, N, Ds), and
        weights (2B, N): the absent-token selection of each source divided by that source's count
        of selected tokens, so that a source's term is sum(weights * per-token MSE) over its rows.
    """
    absent = torch.cat([mask, 1.0 - mask]).float()  # source 1 absent where M = 1, source 2 where M = 0
    b = mask.shape[0]
    counts = torch.stack([absent[:b].sum(), absent[b:].sum()]).clamp_min(1.0)
    weights = absent / counts.repeat_interleave(b).view(-1, 1)
    return torch.cat([teacher_content, teacher_content.flip(0)]), torch.cat([teacher_style, teacher_style.flip(0)]), weights


def mftd_terms(
    rec_content: torch.Tensor, rec_style: torch.Tensor, target_content: torch.Tensor, target_style: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style terms of a set of rows: sum over rows and tokens of weight * per-token MSE.

    Args:
        rec_content, rec_style: (r, N, .) student's plain factors of some re-encoded rows.
        target_content, target_style, weights: the same rows of :func:`mftd_row_targets`.

    Returns:
        (content term, style term) scalars; summed over all 2B rows they are the sums over both
        sources of :func:`masked_token_mse`.
    """
    w = weights.float()
    d_c = (rec_content.float() - target_content.float()).pow(2).mean(dim=-1)
    d_s = (rec_style.float() - target_style.float()).pow(2).mean(dim=-1)
    return (d_c * w).sum(), (d_s * w).sum()


def mftd_loss(
    rec_content: torch.Tensor,
    rec_style: torch.Tensor,
    teacher_content: torch.Tensor,
    teacher_style: torch.Tensor,
    mask: torch.Tensor,
    content_weight: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_MFTD over all rows.

    Args:
        rec_content: (2B, N, Dc) student's plain content factors of [stream A; stream B].
        rec_style: (2B, N, Ds) the same for style.
        teacher_content: (B, N, Dc) teacher's plain content factors of the clean batch x; the
            targets of stream B (source 2 = x reversed) are these flipped over the batch.
        teacher_style: (B, N, Ds) the same for style.
        mask: (B, N) mixing mask.
        content_weight: weight of the content terms.

    Returns:
        (L_MFTD, content terms, style terms) scalars.
    """
    loss_c, loss_s = mftd_terms(rec_content, rec_style, *mftd_row_targets(teacher_content, teacher_style, mask))
    return content_weight * loss_c + loss_s, loss_c, loss_s
