"""Exporting a stage's trained network (``models/model.pt`` + ``model.json``) during training.

:class:`StageExporter` is the one exporter of every train config; when it writes is a config value,
its ``policy``:

- ``"best"``: whenever the evaluator's key metric reaches a new best, and at the end of training
  only if no best was ever exported (no validation ran, or none improved). "Best" is the
  evaluator's own bookkeeping, which a resumed run restores
  (:class:`custom_nets.engines.common.resume.EvaluatorBest`): a resumed run neither re-exports a
  worse model nor replaces the best one by the final weights;
- ``"final"``: when training completes;
- ``"every N"``: every N epochs and when training completes (``"every 0"``: at the end only).

Each stage subclasses it to say which network it writes (the EMA teacher, the EMA generator ...)
and what ``model.json`` records besides the facts every export has (``export``, ``epoch``,
``iteration``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from custom_nets.utils.checkpoint import save_stage_checkpoint
from custom_nets.utils.parallel import unwrap

logger = logging.getLogger(__name__)

__all__ = ["lower_is_better", "parse_policy", "StageExporter"]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a validation loss (MONAI's default keeps the highest value).

    MONAI's workflow takes the first validation as the best without comparing (its
    ``best_metric_epoch`` is -1 until then), so no special case for its initial ``best_metric``
    of -1 is needed here.
    """
    return current < best


def parse_policy(policy: str) -> tuple[str, int]:
    """``("best", 0)``, ``("final", 0)`` or ``("every", N)`` from a policy string (see the module doc).

    Raises:
        ValueError: any other string (the message lists the three forms).
    """
    words = str(policy).strip().lower().split()
    if words in (["best"], ["final"]):
        return words[0], 0
    if len(words) == 2 and words[0] == "every" and words[1].isdigit():
        return "every", int(words[1])
    raise ValueError(f"export policy must be 'best', 'final' or 'every N' (N epochs, 0: at the end only), got {policy!r}")


class StageExporter:
    """Trainer handler writing a stage checkpoint according to ``policy`` (see the module doc).

    Args:
        network: the trained network (DDP wrappers are unwrapped); subclasses may export another
            module (:meth:`exported_network`).
        path: destination ``model.pt``.
        stage: the stage name recorded in ``model.json`` (``meduet_vae`` ...).
        policy: ``"best"``, ``"final"`` or ``"every N"``.
        evaluator: the validation evaluator, whose key metric decides "best" (None: "best"
            exports at the end only).
        extra: more JSON facts for model.json (crop size, data ...).
    """

    def __init__(
        self,
        network: nn.Module | None,
        path: str | Path,
        stage: str,
        policy: str = "best",
        evaluator: Any | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind, self.every = parse_policy(policy)
        self.network, self.path, self.stage = network, Path(path), stage
        self.evaluator, self.extra = evaluator, dict(extra or {})
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        if self.kind == "best" and self.evaluator is not None:
            # MONAI's evaluator updates best_metric / best_metric_epoch before handlers added later run
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._on_validation)
        if self.kind == "every" and self.every > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), lambda e: self.export(f"epoch {e.state.epoch}"))
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_validation(self, evaluator: Any) -> None:
        if evaluator.state.key_metric_name and evaluator.state.best_metric_epoch == evaluator.state.epoch:
            self.export("best")

    def best_exported(self) -> bool:
        """Whether a "best" export exists (also after a resume: the evaluator's best is restored)."""
        if self.kind != "best" or self.evaluator is None:
            return False
        return int(getattr(self.evaluator.state, "best_metric_epoch", -1)) > 0

    def _on_completed(self, engine: Engine) -> None:
        if not self.best_exported():
            self.export("final")

    def key_metric(self) -> float | None:
        """The evaluator's best key metric, None before any validation."""
        state = getattr(self.evaluator, "state", None)
        if state is None or int(getattr(state, "best_metric_epoch", -1)) <= 0:
            return None
        return float(state.best_metric)

    def exported_network(self) -> nn.Module:
        """The module whose weights are written (default: the trained network)."""
        if self.network is None:
            raise ValueError(f"{type(self).__name__}: no network to export")
        return unwrap(self.network)

    def metadata(self, network: nn.Module) -> dict[str, Any]:
        """What ``model.json`` records for the next stage besides the export facts (subclasses add theirs)."""
        args = getattr(network, "network_args", None)
        return {} if args is None else {"network": dict(args)}

    def export(self, reason: str) -> dict[str, Any] | None:
        """Write the checkpoint now (nothing before the first iteration). Returns the metadata written."""
        state = self.trainer.state if self.trainer is not None else None
        iteration = int(getattr(state, "iteration", 0) or 0)
        if self.trainer is not None and iteration == 0:
            return None
        net = self.exported_network()
        facts = {**self.metadata(net), "export": reason, "epoch": int(getattr(state, "epoch", 0) or 0),
                 "iteration": iteration, **self.extra}
        info = save_stage_checkpoint(net.state_dict(), self.path, self.stage, **facts)
        logger.info("exported %s (%s, epoch %s) to %s (sha256 %s...)", self.stage, reason, info["epoch"], self.path,
                    info["sha256"][:12])
        return info
