"""Exporting a stage's trained network (``models/model.pt`` + ``model.json``) during training."""

from __future__ import annotations

__all__ = ["lower_is_better"]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a validation loss (MONAI's default keeps the highest value).

    MONAI's workflow takes the first validation as the best without comparing (its
    ``best_metric_epoch`` is -1 until then), so no special case for its initial ``best_metric``
    of -1 is needed here.
    """
    return current < best
