"""Domain supervision of the factors: gradient reversal and the two domain cross-entropies.

Content factors go through a gradient-reversal layer before their domain classifier, so the
classifier learns to recognise the domain while the encoder learns to hide it (domain-invariant
content); style factors are classified without reversal (domain-specific style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GradientReversal", "grad_reverse", "domain_loss"]


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambda`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad_output, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Apply :class:`GradientReversal` with strength ``lambda_``."""
    return GradientReversal.apply(x, lambda_)


def domain_loss(
    content_logits: torch.Tensor, style_logits: torch.Tensor, domain_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_dom = CE_content + CE_style, each averaged over the two sources of the mixture.

    Args:
        content_logits: (2B, n_domains) logits of [source 1; source 2] from the (reversed) content.
        style_logits: (2B, n_domains) logits of [source 1; source 2] from the style.
        domain_index: (B,) domain of each sample; source 2 of sample i is sample B-1-i.

    Returns:
        (L_dom, CE_content, CE_style) scalars.
    """
    labels = domain_index.long().view(-1)
    labels = torch.cat([labels, labels.flip(0)])
    # equal-sized halves: the mean over 2B is the average of the two sources' means
    ce_c = F.cross_entropy(content_logits.float(), labels)
    ce_s = F.cross_entropy(style_logits.float(), labels)
    return ce_c + ce_s, ce_c, ce_s
