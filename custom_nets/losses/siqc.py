"""Swap-invariance quadruplet contrast (SiQC, METHOD.md section 3, step 7).

Queries (student) and keys (EMA teacher, built with the complementary mask 1 - M, no gradient)
are pooled factors of four groups of B items: [source 1, source 2, x12, x21], where x12 has
content 1 and style 2 and x21 content 2 and style 1. Pooling: LayerNorm without affine per token,
then the mean over tokens. Content positives share the content source (ids [i, B-1-i, i, B-1-i]);
style positives share the style source (ids [i, B-1-i, B-1-i, i]). Supervised contrastive loss on
L2-normalised query-key similarities at temperature 0.07, the self pair (query k with key k)
removed from positives and from the normaliser. L_SiQC = L_content + L_style.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pool_tokens", "pool_groups", "quadruplet_ids", "supcon_row_losses", "supcon_qk_loss", "siqc_loss"]


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(b, n, D) factor tokens -> (b, D): LayerNorm without affine per token, mean over tokens."""
    t = tokens.float()
    return F.layer_norm(t, t.shape[-1:]).mean(dim=1)


def pool_groups(*groups: torch.Tensor) -> torch.Tensor:
    """Pool each (b_k, n_k, D) group with :func:`pool_tokens` and stack the rows: (sum b_k, D)."""
    return torch.cat([pool_tokens(g) for g in groups], dim=0)


def quadruplet_ids(batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Content and style source ids of the 4B items [source 1, source 2, x12, x21].

    Returns:
        content ids [i, B-1-i, i, B-1-i] and style ids [i, B-1-i, B-1-i, i], each (4B,) int64.
    """
    i = torch.arange(batch, device=device)
    r = i.flip(0)
    return torch.cat([i, r, i, r]), torch.cat([i, r, r, i])


def supcon_row_losses(
    queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Per-query supervised contrastive losses against (constant) keys.

    Each query's loss depends only on that query (keys carry no gradient), so the mean over all
    queries can also be accumulated over chunks of queries.

    Args:
        queries: (r, D) queries, with gradient, of the items at positions ``rows``.
        keys: (M, D) keys of all items; no gradient is taken through them.
        ids: (M,) item ids; query a and key b are positives when ids match and a != b.
        rows: (r,) positions of ``queries`` among the M items.
        temperature: similarity temperature.

    Returns:
        (r,) losses -mean_{positives p} log softmax_{b != a}(q_a . k_b / T)[p] (0 without positives).
    """
    q = F.normalize(queries.float(), dim=1, eps=1e-8)
    k = F.normalize(keys.detach().float(), dim=1, eps=1e-8)
    logits = q @ k.t() / temperature
    self_pair = rows.view(-1, 1) == torch.arange(k.shape[0], device=k.device).view(1, -1)
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (ids[rows].view(-1, 1) == ids.view(1, -1)) & ~self_pair
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -pos_log_prob / positives.sum(dim=1).clamp_min(1)


def supcon_qk_loss(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Mean of :func:`supcon_row_losses` over all M queries ((M, D) queries and keys, (M,) ids)."""
    rows = torch.arange(queries.shape[0], device=queries.device)
    return supcon_row_losses(queries, keys, ids, rows, temperature).mean()


def siqc_loss(
    student_content: tuple[torch.Tensor, ...],
    student_style: tuple[torch.Tensor, ...],
    teacher_content: tuple[torch.Tensor, ...],
    teacher_style: tuple[torch.Tensor, ...],
    temperature: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_SiQC from the four groups' factor tokens.

    Args:
        student_content: (content 1 (B, n, Dc), content 2 (B, n, Dc), swap content (2B, N, Dc) for
            [x12; x21]) of the student.
        student_style: the same for style.
        teacher_content: the same from the teacher (complementary mask).
        teacher_style: the same for style.
        temperature: similarity temperature.

    Returns:
        (L_SiQC, L_content, L_style) scalars.
    """
    qc, qs = pool_groups(*student_content), pool_groups(*student_style)
    kc, ks = pool_groups(*teacher_content), pool_groups(*teacher_style)
    if qc.shape[0] % 4 or qc.shape != kc.shape:
        raise ValueError(f"queries {tuple(qc.shape)} and keys {tuple(kc.shape)} must both hold 4B items")
    cid, sid = quadruplet_ids(qc.shape[0] // 4, qc.device)
    l_c = supcon_qk_loss(qc, kc, cid, temperature)
    l_s = supcon_qk_loss(qs, ks, sid, temperature)
    return l_c + l_s, l_c, l_s
