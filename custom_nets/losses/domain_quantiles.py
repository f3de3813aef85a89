"""Sliced quantile distance between the domains' content-token distributions: token-level invariance.

The pooled criteria (:mod:`custom_nets.losses.domain_variance`) make the *mean* content of a volume
the same in every domain. A token can still carry its domain non-linearly (a liver token in CT and
in MR land in different places, offsets that cancel in the mean), and the decoder then takes the
appearance from the content tokens instead of from the style (REPORT.md, issue 15). This criterion
compares whole distributions: with the tokens of the batch's volumes of domain k projected on P
random unit directions w_p, and Q_k(l, p) the l-th of L quantiles of domain k along w_p,

    L = mean_p  sum_k pi_k mean_l (Q_k(l, p) - Qbar(l, p))^2 / (var_p + eps),
    Qbar = sum_k pi_k Q_k,

with pi_k the domain's share of the batch's volumes and var_p the variance of all tokens along w_p.
It is the between-domain share of the variance (eta squared) with each domain's mean replaced by its
quantile function: zero only when every domain has the same one-dimensional marginals along every
direction, so no classifier of single tokens can tell the domains apart along them. Dividing by the
tokens' own variance makes it unchanged under rescaling, so the content cannot meet it by
shrinking. The tokens should come from whole volumes (each volume's fixed window), not from crops at
random positions, whose tissue mix differs by position: matching those would ask content to forget
anatomy.
"""

from __future__ import annotations

import torch

__all__ = ["random_directions", "sliced_domain_quantile_loss"]


def random_directions(dim: int, count: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(dim, count) unit directions drawn from a generator seeded with ``seed`` (reproducible, so a
    resumed run draws the same directions at the same step)."""
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.randn(dim, count, generator=gen)
    return (w / w.norm(dim=0, keepdim=True)).to(device)


def sliced_domain_quantile_loss(
    tokens: torch.Tensor, domain_index: torch.Tensor, directions: torch.Tensor, levels: int = 32, eps: float = 1e-5
) -> torch.Tensor:
    """Between-domain spread of the tokens' quantile functions along ``directions`` (module docstring).

    Args:
        tokens: (n, T, D) the T content tokens of each of n volumes.
        domain_index: (n,) domain of each volume.
        directions: (D, P) unit directions.
        levels: number L of quantile levels, (l + 0.5) / L.
        eps: variance floor.

    Returns:
        scalar >= 0; 0 when the batch holds a single domain.

    Raises:
        ValueError: shapes that disagree.
    """
    d = domain_index.long().view(-1)
    if tokens.ndim != 3 or tokens.shape[0] != d.shape[0]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must be (n, T, D) with n = {d.shape[0]} domain indices")
    if directions.ndim != 2 or directions.shape[0] != tokens.shape[2]:
        raise ValueError(f"directions {tuple(directions.shape)} must be (D, P) with D = {tokens.shape[2]}")
    y = tokens.float() @ directions.float()  # (n, T, P)
    domains = torch.unique(d)
    if domains.numel() < 2:
        return y.sum() * 0.0  # keeps the graph: every process of a DDP run takes part in backward
    q_levels = (torch.arange(levels, device=y.device, dtype=y.dtype) + 0.5) / levels
    quantiles, weights = [], []
    for k in domains:
        yk = y[d == k].reshape(-1, y.shape[-1])
        quantiles.append(torch.quantile(yk, q_levels, dim=0))  # (L, P)
        weights.append((d == k).sum().to(y.dtype) / d.numel())
    q = torch.stack(quantiles)  # (K, L, P)
    pi = torch.stack(weights)
    q_bar = (pi[:, None, None] * q).sum(0)
    spread = (pi[:, None, None] * (q - q_bar).pow(2)).sum(0).mean(0)  # (P,)
    return (spread / (y.reshape(-1, y.shape[-1]).var(0, unbiased=False) + eps)).mean()
