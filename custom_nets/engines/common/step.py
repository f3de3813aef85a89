"""The form of a training step's ``engine.state.output`` that MONAI's handlers expect.

MONAI's trainers decollate the step's output into a list with one dict per batch item (batch-level
scalars such as the loss replicated into every item), and MONAI's ready-made handlers read it that
way: the MLflow tracking that ``--tracking mlflow`` adds reads the loss with
``from_engine(["loss"], first=True)``, which gives the loss for ``[dict, ...]`` but a one-item
tuple for a bare dict. Steps that return batch-level scalars only (no per-item tensors to
decollate) are wrapped with :func:`as_decollated`, and our own output transforms read the first
item with :func:`first_item`, so that both forms work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ignite.handlers import ProgressBar

__all__ = ["as_decollated", "first_item", "scalars", "LossProgressBar"]


def as_decollated(step: Callable[[Any, Any], Mapping[str, Any]]) -> Callable[[Any, Any], list[Mapping[str, Any]]]:
    """Wrap an ``iteration_update`` that returns one dict so that it returns ``[dict]``.

    Args:
        step: ``(engine, batch) -> {"loss": ..., ...}`` (batch-level scalars).

    Returns:
        ``(engine, batch) -> [{"loss": ..., ...}]``, what decollation of a batch of one would give.
    """

    def update(engine: Any, batchdata: Any) -> list[Mapping[str, Any]]:
        return [step(engine, batchdata)]

    update.__wrapped__ = step  # type: ignore[attr-defined]
    return update


def first_item(output: Any) -> Mapping[str, Any]:
    """The dict of a step output: the first item of a decollated list, or the dict itself."""
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and output:
        output = output[0]
    if not isinstance(output, Mapping):
        raise TypeError(f"expected a step output dict or a list of them, got {type(output).__name__}")
    return output


def scalars(output: Any, keys: Sequence[str] | None = None) -> dict[str, float]:
    """Float values of ``keys`` (default: every key) of a step output (:func:`first_item`); keys the
    step did not return are left out."""
    item = first_item(output)
    keys = list(item) if keys is None else [k for k in keys if k in item]
    return {k: float(item[k]) for k in keys}


class LossProgressBar:
    """ignite ``ProgressBar`` over the iterations of each epoch, showing the given loss terms.

    MONAI attaches handlers by calling ``attach(engine)`` without arguments, so the terms are given
    here. ``persist=False`` clears the bar at the end of each epoch (the StatsHandler lines stay).

    Args:
        keys: step-output keys to show (those present).
        persist: keep each epoch's finished bar on screen.
    """

    def __init__(self, keys: Sequence[str] = ("loss",), persist: bool = False) -> None:
        self.keys = list(keys)
        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Any) -> None:
        self.bar.attach(engine, output_transform=lambda out: scalars(out, self.keys))

