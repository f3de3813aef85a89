"""Token-demixing dual reconstruction loss (METHOD.md section 3, step 3).

The decoder runs twice per sample as one 2B batch: stream A of sample i sees source 1's fused
tokens (where M_i = 0) and predicts source 1 = x_i everywhere; stream B of sample j sees source 2's
tokens (where M_j = 1) and predicts source 2 = x_{B-1-j} everywhere. The prediction of x_i is
taken token by token from stream A of i where M_i = 1 (x_i's hidden tokens) and from stream B of
the partner B-1-i where M_i = 0 (the partner's stream B predicts x_i there).
"""

from __future__ import annotations

import torch

__all__ = ["demix_prediction", "demix_reconstruction_loss"]


def demix_prediction(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Assemble the prediction of each clean sample from the two streams.

    Args:
        pred: (2B, N, P) decoder output, rows [:B] stream A, rows [B:] stream B.
        mask: (B, N) mixing mask (1 where the sample's token came from the partner).

    Returns:
        (B, N, P): stream A of i where M_i = 1, stream B of B-1-i where M_i = 0.
    """
    b = mask.shape[0]
    if pred.shape[0] != 2 * b:
        raise ValueError(f"expected 2B = {2 * b} decoder rows, got {pred.shape[0]}")
    stream_a, stream_b = pred[:b], pred[b:]
    m = mask.unsqueeze(-1).to(pred.dtype)
    return stream_a * m + stream_b.flip(0) * (1.0 - m)


def demix_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_rec: mean squared error over all tokens and values (no per-patch target normalisation).

    Args:
        pred: (2B, N, P) dual-stream decoder output.
        target: (B, N, P) patchified clean latents x.
        mask: (B, N) mixing mask.

    Returns:
        Scalar loss.
    """
    return (demix_prediction(pred.float(), mask) - target.float()).pow(2).mean()
