"""Domain adversary on the clean (unmixed) content, per token and pooled, with a DANN-ramped reversal.

The paper's domain head sees content only as mean-pooled over one source of the token mixture;
the factors used downstream come from the clean pass. This adversary classifies the domain of the
student's clean content tokens, each token on its own and their mean, behind a gradient-reversal
layer whose strength follows the DANN schedule (Ganin & Lempitsky 2015)

    lambda(p) = lambda_max * (2 / (1 + exp(-gamma * p)) - 1),   p = step / total_steps in [0, 1],

so the encoder is pushed weakly while the classifier is still poor and fully later. The
classifier heads are training-only (kept by the training step, with their own optimizer and
learning rate) and are not part of the exported network.

    L_clean = CE(token head(GRL(c_t)), d) averaged over tokens + CE(pooled head(GRL(mean_t c_t)), d)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from custom_nets.losses.domain import grad_reverse

__all__ = ["dann_lambda", "CleanDomainAdversary"]


def dann_lambda(progress: float, gamma: float = 10.0, lambda_max: float = 1.0) -> float:
    """DANN reversal strength ``lambda_max * (2 / (1 + exp(-gamma p)) - 1)`` at training progress ``p``.

    Args:
        progress: fraction of training done (clipped to [0, 1]).
        gamma: steepness (DANN: 10).
        lambda_max: strength reached at the end.

    Returns:
        reversal strength in [0, lambda_max).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return float(lambda_max) * (2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0)


class CleanDomainAdversary(nn.Module):
    """Token-wise and pooled domain classifiers of content tokens, behind gradient reversal.

    Args:
        content_dim: width Dc of the content tokens.
        n_domains: number of domains.
        hidden: hidden width of both classifiers (default 2 * Dc).
    """

    def __init__(self, content_dim: int, n_domains: int, hidden: int | None = None) -> None:
        super().__init__()
        h = int(hidden or 2 * content_dim)
        self.token_head = nn.Sequential(nn.Linear(content_dim, h), nn.ReLU(), nn.Linear(h, n_domains))
        self.pooled_head = nn.Sequential(
            nn.Linear(content_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, n_domains)
        )

    def forward(
        self, content: torch.Tensor, domain_index: torch.Tensor, reversal: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropies of the two classifiers (gradients to ``content`` reversed and scaled).

        Args:
            content: (B, N, Dc) clean content tokens.
            domain_index: (B,) domain of each volume.
            reversal: gradient-reversal strength (:func:`dann_lambda`).

        Returns:
            (CE of the token classifier averaged over B * N tokens, CE of the pooled classifier).
        """
        if content.ndim != 3:
            raise ValueError(f"content must be (B, N, Dc), got shape {tuple(content.shape)}")
        d = domain_index.long().view(-1)
        if d.shape[0] != content.shape[0]:
            raise ValueError(f"{d.shape[0]} domain indices for {content.shape[0]} volumes")
        c = grad_reverse(content.float(), reversal)
        b, n = c.shape[:2]
        token_logits = self.token_head(c).reshape(b * n, -1)
        ce_token = F.cross_entropy(token_logits, d.repeat_interleave(n))
        ce_pooled = F.cross_entropy(self.pooled_head(c.mean(dim=1)), d)
        return ce_token, ce_pooled
