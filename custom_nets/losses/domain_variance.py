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
from torch import nn

__all__ = ["between_domain_share_loss", "fisher_criterion", "DomainMeanBank"]


def fisher_criterion(
    means: torch.Tensor, weights: torch.Tensor, within: torch.Tensor, shrinkage: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher criterion of group means, ``(1/D) sum_k pi_k (mu_k - mu)^T W_s^{-1} (mu_k - mu)``.

    ``mu = sum_k pi_k mu_k`` and ``W_s = (1 - s) W + s (tr W / D) I``. Groups of weight 0 take no
    part. Shared by the training loss (:class:`DomainMeanBank`) and the benchmark's measure
    (:func:`custom_nets.engines.ssl.disentangle.domain_fisher`), so that both read the same quantity.

    Args:
        means: (K, D) group means ``mu_k``.
        weights: (K,) ``pi_k``, summing to 1 over the groups that take part.
        within: (D, D) pooled within-group covariance ``W``.
        shrinkage: s above, in (0, 1].

    Returns:
        the criterion (scalar, >= 0) and the directions ``W_s^{-1} (mu_k - mu)`` (K, D), zero rows
        for groups of weight 0.
    """
    dim = means.shape[1]
    offsets = (means - weights @ means) * (weights > 0).to(means.dtype)[:, None]
    eye = torch.eye(dim, dtype=within.dtype, device=within.device)
    w = (1 - shrinkage) * within + shrinkage * within.diagonal().mean().clamp_min(1e-12) * eye
    directions = torch.linalg.solve(w, offsets.T).T
    return (weights * (offsets * directions).sum(1)).sum() / dim, directions


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


class DomainMeanBank(nn.Module):
    """Between-domain spread of pooled content measured over running per-domain statistics.

    The batch version above cannot go below its sampling floor: with 8 volumes of 4 domains a batch
    holds two volumes per domain, so even a domain-free feature shows a between-domain share of
    about (4 - 1) / (8 - 1). This loss keeps exponential moving averages (momentum ``momentum``,
    detached) of each domain's mean pooled content ``mu_k`` and of the pooled within-domain
    covariance ``W``, and penalises the Fisher criterion a linear probe exploits,

        F = (1 / D) sum_k pi_k (mu_k - mu)^T W_s^{-1} (mu_k - mu),   mu = sum_k pi_k mu_k,

    with ``pi_k`` uniform over the domains seen and ``W_s`` shrunk towards its mean variance. The
    banked means make ``F`` a full-data estimate; its gradient reaches the batch through the batch's
    own domain means, ``dF/dz_i = 2 pi_k W_s^{-1} (mu_k - mu) / (n_k D)`` for volume i of domain k
    (n_k of them in the batch). The returned value is ``F`` (after this batch's update) and its
    gradient is that one. Content is measured in units of the batch's root mean variance (a scalar
    that keeps its gradient), so ``F`` does not change with the content's scale: measured in
    absolute units, training shrank the content faster than the banked covariance followed (15-fold
    below it), and the stale ``W`` reported a criterion about 10 times below the real one.

    Args:
        dim: content width D.
        n_domains: number of domains K.
        momentum: EMA momentum of the bank (higher: longer memory, staler statistics).
        shrinkage: weight of the mean variance in ``W_s = (1 - s) W + s (tr W / D) I``.

    Buffers (saved with the step): ``means`` (K, D), ``seen`` (K,), ``within`` (D, D).
    """

    def __init__(self, dim: int, n_domains: int, momentum: float = 0.95, shrinkage: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        self.momentum, self.shrinkage = float(momentum), float(shrinkage)
        self.register_buffer("means", torch.zeros(n_domains, dim))
        self.register_buffer("seen", torch.zeros(n_domains, dtype=torch.bool))
        self.register_buffer("within", torch.zeros(dim, dim))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _update(self, z: torch.Tensor, onehot: torch.Tensor) -> None:
        """Fold the batch's (summed over processes) domain means and within-domain scatter into the bank."""
        sums, counts = onehot.T @ z, onehot.sum(0)
        dist = torch.distributed
        scatter_parts = [sums, counts]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in scatter_parts:
                dist.all_reduce(t)
        present = counts > 0
        batch_means = sums[present] / counts[present, None]
        m = self.momentum
        first = present & ~self.seen
        old = present & self.seen
        self.means[first] = batch_means[first[present]]
        self.means[old] = m * self.means[old] + (1 - m) * batch_means[old[present]]
        self.seen |= present
        centred = z - self.means[onehot.argmax(1)]
        scatter = centred.T @ centred
        n = torch.tensor(float(z.shape[0]), device=z.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(scatter)
            dist.all_reduce(n)
        scatter = scatter / n.clamp_min(1.0)
        if bool(self.started):
            self.within.mul_(m).add_(scatter, alpha=1 - m)
        else:
            self.within.copy_(scatter)
            self.started.fill_(True)

    def forward(self, content: torch.Tensor, domain_index: torch.Tensor) -> torch.Tensor:
        """Update the bank with the batch and return the Fisher criterion with the batch's gradient.

        Args:
            content: (n, D) pooled content, or (n, N, D) tokens (mean-pooled here).
            domain_index: (n,) domain of each volume.

        Returns:
            scalar F >= 0 (0 while fewer than two domains have been seen).
        """
        z = content.float().mean(dim=1) if content.ndim == 3 else content.float()
        d = domain_index.long().view(-1)
        if z.ndim != 2 or z.shape[0] != d.shape[0] or z.shape[1] != self.means.shape[1]:
            raise ValueError(f"content {tuple(content.shape)} and domain_index {tuple(domain_index.shape)} do not fit a "
                             f"bank of {tuple(self.means.shape)}")
        if int(d.max()) >= self.means.shape[0] or int(d.min()) < 0:
            raise ValueError(f"domain index out of range [0, {self.means.shape[0]}): {d.tolist()}")
        # in units of the batch's own spread (with gradient): a criterion in absolute units is
        # escaped by shrinking the content faster than the banked covariance follows it
        z = z / z.var(dim=0, unbiased=False).mean().clamp_min(1e-12).sqrt()
        onehot = torch.nn.functional.one_hot(d, self.means.shape[0]).to(z.dtype)
        self._update(z.detach(), onehot)
        seen = self.seen
        if int(seen.sum()) < 2:
            return z.sum() * 0.0
        dim = z.shape[1]
        pi = seen.to(z.dtype) / seen.sum()
        value, directions = fisher_criterion(self.means, pi, self.within, self.shrinkage)
        counts = onehot.sum(0)
        batch_means = (onehot.T @ z) / counts.clamp_min(1.0)[:, None]  # with gradient; zero rows where absent
        weight = 2.0 * pi * (counts > 0).to(z.dtype) / dim
        surrogate = (weight[:, None] * directions * batch_means).sum()
        return value + surrogate - surrogate.detach()
