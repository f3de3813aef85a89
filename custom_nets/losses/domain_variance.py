"""Between-domain variance share of pooled content across a batch: a direct, non-adversarial invariance loss.

With z (n, D) the pooled content of n volumes of domains d_i, per feature j

    share_j = sum_k (n_k / n) (mean_{i in k} z_ij - mean_i z_ij)^2 / (var_i z_ij + eps),

the fraction of the feature's batch variance that lies between domains (eta squared), and
L = mean_j share_j in [0, 1]. It is the quantity the disentanglement benchmark reports for
held-out volumes; unlike a gradient-reversed classifier it has no adversary to fool: it is zero
only when every domain has the same mean content in the batch.
"""

from __future__ import annotations

import torch

__all__ = ["between_domain_share_loss"]


def between_domain_share_loss(content: torch.Tensor, domain_index: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean over features of the between-domain share of the batch variance.

    Args:
        content: (n, D) pooled content, or (n, N, D) tokens (mean-pooled here).
        domain_index: (n,) domain of each volume.
        eps: variance floor.

    Returns:
        scalar in [0, 1]; 0 when the batch holds a single domain.
    """
    z = content.float().mean(dim=1) if content.ndim == 3 else content.float()
    d = domain_index.long().view(-1)
    if z.ndim != 2 or z.shape[0] != d.shape[0]:
        raise ValueError(f"content {tuple(content.shape)} and domain_index {tuple(domain_index.shape)} disagree")
    n = z.shape[0]
    mean = z.mean(0)
    onehot = torch.nn.functional.one_hot(d, int(d.max()) + 1).to(z.dtype)  # (n, K)
    counts = onehot.sum(0)
    present = counts > 0
    group_means = (onehot.T @ z)[present] / counts[present, None]
    between = ((counts[present, None] / n) * (group_means - mean).pow(2)).sum(0)
    return (between / (z.var(0, unbiased=False) + eps)).mean()
