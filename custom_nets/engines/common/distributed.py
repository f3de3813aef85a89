"""Which trainer handlers run on which rank in a distributed (torchrun) run.

Handlers that take part in collectives or keep the ranks in step (validation with its metric
all-gather, learning-rate schedules, the resumable checkpoint whose loader every rank needs and
whose saver writes from rank 0 only, sampler epochs) must be attached on every rank; a handler
missing on one rank makes the others wait forever in a collective. Everything that only writes
(logs, TensorBoard, progress bars, exported models, PNGs) runs on rank 0 only, so that ranks never
race on the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.handlers import TensorBoardStatsHandler

from custom_nets.utils.parallel import rank as process_rank

__all__ = ["EVERY_RANK", "runs_on_every_rank", "handlers_for_rank"]

#: Handler classes attached on every rank (by name, so that optional imports stay optional).
EVERY_RANK = (
    "ValidationHandler",
    "LrScheduleHandler",
    "CheckpointSaver",
    "CheckpointLoader",
    "ResumableCheckpoint",
    "SamplerEpoch",
)


def runs_on_every_rank(handler: Any) -> bool:
    """True for handlers that must be attached on every rank (see :data:`EVERY_RANK`).

    A handler class may also declare ``every_rank = True``.
    """
    if getattr(handler, "every_rank", False):
        return True
    return any(cls.__name__ in EVERY_RANK for cls in type(handler).__mro__)


def handlers_for_rank(handlers: Sequence[Any] | None, rank: int | None = None) -> list[Any]:
    """The trainer handlers of this rank: all of them on rank 0, the every-rank ones elsewhere.

    Args:
        handlers: the config's ``train#handlers``.
        rank: the process rank (default: ``torch.distributed.get_rank()``, 0 when not distributed).

    Returns:
        The handlers to attach on this rank, in their original order.
    """
    if rank is None:
        rank = process_rank()
    handlers = list(handlers or [])
    return handlers if rank == 0 else [h for h in handlers if runs_on_every_rank(h)]


class RankZeroTensorBoardStatsHandler:
    """MONAI's ``TensorBoardStatsHandler`` on rank 0; on other ranks nothing (no event file, no handler).

    MONAI's handler opens its ``SummaryWriter`` (and so creates an event file) when it is built,
    and a config builds every handler of its lists on every rank, including those the rank then
    leaves unattached. Arguments are those of ``monai.handlers.TensorBoardStatsHandler``.
    """

    every_rank = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler = TensorBoardStatsHandler(*args, **kwargs) if process_rank() == 0 else None

    def attach(self, engine: Any) -> None:
        if self.handler is not None:
            self.handler.attach(engine)
