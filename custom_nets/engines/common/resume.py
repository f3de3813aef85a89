"""Resumable training, shared by every bundle's ``train.json``.

:class:`ResumableCheckpoint` is one trainer handler that

- saves the full training state with ignite's ``Checkpoint`` every ``save_interval`` epochs and
  when training completes, through :class:`AtomicDiskSaver` (a temporary file, then a rename: MONAI's
  ``CheckpointSaver`` writes in place, so a run killed while saving leaves a truncated newest
  checkpoint that a resume would pick up and fail on). Saved are the given
  objects (network, optimizer, scheduler, EMA teacher, step objects ...), the trainer's epoch and
  iteration counters and, with an evaluator, its best metric (so that "export on improvement"
  continues to compare against the best seen before the interruption);
  Nothing is saved when training fails: a mid-epoch state cannot be resumed exactly, and the
  failure may be a diverged loss;
- with ``resume`` (the newest checkpoint of ``save_dir``) or ``resume_from`` (one file) restores
  all of it with MONAI's ``CheckpointLoader`` (``torch.load(weights_only=True)``) before the first
  epoch;
- with ``seed``, reseeds torch, numpy, Python's ``random`` and the datasets' MONAI random
  transforms at the start of every epoch from (seed, epoch, rank), and starts a new pass over the
  data loader. Every epoch's data order and augmentation then depend only on the epoch number, so
  a run resumed after epoch k sees exactly the batches the uninterrupted run saw in epoch k + 1.

In a distributed run attach it on every rank: ignite's saver writes from rank 0 only, every rank
restores the same checkpoint, and every rank reseeds (with its own rank in the seed).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader

from custom_nets.utils.checkpoint import save_torch
from custom_nets.utils.errors import CheckpointError
from custom_nets.utils.flags import as_bool
from custom_nets.utils.parallel import rank as _rank
from custom_nets.utils.values import as_path

logger = logging.getLogger(__name__)

__all__ = ["epoch_seed", "reseed", "latest_checkpoint", "AtomicDiskSaver", "EvaluatorBest",
           "ResumableCheckpoint"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A reproducible 32-bit seed for (seed, epoch, rank), different for neighbouring epochs and ranks."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def reseed(seed: int, datasets: Sequence[Any] = ()) -> None:
    """Seed torch (CPU and CUDA), numpy, Python's ``random`` and the MONAI random transforms in ``datasets``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    for ds in datasets:
        set_rnd(ds, seed)


def latest_checkpoint(save_dir: str | Path, patterns: Sequence[str] = ("checkpoint*.pt",)) -> Path | None:
    """Newest file of ``save_dir`` matching one of ``patterns`` (by modification time), or None."""
    save_dir = Path(save_dir)
    files = {p for pattern in patterns for p in save_dir.glob(pattern) if p.is_file()}
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


class AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: ``torch.save`` to a temporary file beside the target, then a rename; rank 0 only.

    Args:
        dirname: folder of the checkpoints.
        filename: fixed file name (instead of ignite's ``<prefix>_<name>_<score>.pt``).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() == 0:
            save_torch(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if _rank() == 0:
            (self.dirname / (self.filename or filename)).unlink(missing_ok=True)


class EvaluatorBest:
    """``state_dict`` / ``load_state_dict`` of an evaluator's best metric and its epoch.

    ignite's ``Engine.state_dict`` keeps only counters; without this a resumed run would treat its
    first validation as a new best and overwrite the exported model with a worse one.
    """

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {"best_metric": torch.tensor(float(getattr(state, "best_metric", -1)), dtype=torch.float64),
                "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class ResumableCheckpoint:
    """Save, and on request restore, the full training state; reseed every epoch (see the module doc).

    Args:
        save_dir: folder of the checkpoints (the bundle's ``ckpt_dir``).
        objects: name -> object with ``state_dict`` / ``load_state_dict`` (None values are left
            out, e.g. no discriminator). The trainer is added as "trainer" when attached (a config
            cannot name the trainer inside its own handler list).
        save_interval: epochs between saves (0: only the final state).
        n_saved: interval checkpoints kept.
        resume: restore the newest checkpoint of ``save_dir`` (a fresh start, logged, when there is none).
        resume_from: restore this checkpoint (takes precedence over ``resume``; must exist).
        file_prefix: prefix of the interval checkpoints' file names.
        final_filename: file name of the final checkpoint (None: ignite's default name).
        seed: base seed of the per-epoch reseeding (None: no reseeding).
        datasets: datasets whose MONAI random transforms are reseeded too.
        evaluator: the validation evaluator, whose best metric is saved and restored.
    """

    def __init__(
        self,
        save_dir: str | Path,
        objects: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int = 1,
        resume: bool | str = False,
        resume_from: str | Path | None = None,
        file_prefix: str = "",
        final_filename: str | None = None,
        seed: int | None = None,
        datasets: Sequence[Any] = (),
        evaluator: Any | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.objects = {k: v for k, v in dict(objects).items() if v is not None}
        if evaluator is not None:
            self.objects["evaluator_best"] = EvaluatorBest(evaluator)
        self.save_interval, self.n_saved = int(save_interval), int(n_saved)
        self.resume, self.resume_from = as_bool(resume, "resume"), as_path(resume_from)
        self.file_prefix, self.final_filename = file_prefix, final_filename
        self.seed = None if seed is None else int(seed)
        self.datasets = [d for d in datasets if d is not None]

    def checkpoint_patterns(self) -> list[str]:
        """Glob patterns of the checkpoints this handler writes."""
        patterns = [f"{self.file_prefix}_*.pt" if self.file_prefix else "checkpoint*.pt"]
        if self.final_filename:
            patterns.append(self.final_filename)
        return patterns

    def resume_path(self) -> Path | None:
        """The checkpoint to restore, or None for a fresh start."""
        if self.resume_from is not None:
            if not self.resume_from.is_file():
                raise CheckpointError(f"{self.resume_from}: resume_from checkpoint not found")
            return self.resume_from
        if not self.resume:
            return None
        path = latest_checkpoint(self.save_dir, self.checkpoint_patterns())
        if path is None:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.save_dir)
        return path

    def attach(self, engine: Engine) -> None:
        # DDP-wrapped networks are saved and loaded as their inner module (checkpoints then load
        # with and without DDP alike, as with MONAI's CheckpointSaver / CheckpointLoader)
        wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        objects = {k: v.module if isinstance(v, wrappers) else v for k, v in self.objects.items()}
        objects["trainer"] = engine
        path = self.resume_path()
        if path is not None:
            logger.info("resume: loading %s", path)
            CheckpointLoader(load_path=str(path), load_dict=objects, map_location="cpu").attach(engine)
        if self.seed is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        if self.save_interval > 0:
            interval = Checkpoint(objects, AtomicDiskSaver(self.save_dir), filename_prefix=self.file_prefix,
                                  score_function=lambda e: e.state.epoch, score_name="epoch", n_saved=self.n_saved)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), interval)
        final = Checkpoint(objects, AtomicDiskSaver(self.save_dir, self.final_filename), filename_prefix=self.file_prefix,
                           score_function=lambda e: e.state.iteration, score_name="final_iteration", n_saved=1)
        engine.add_event_handler(Events.COMPLETED, final)

    def start_epoch(self, engine: Engine) -> None:
        """Reseed from (seed, epoch, rank) and start a new pass over the data.

        The new pass matters when ``epoch_length`` differs from the loader's length: ignite would
        otherwise carry a half-used iterator into the next epoch, which a resumed run cannot rebuild.
        """
        reseed(epoch_seed(self.seed, engine.state.epoch, _rank()), self.datasets)
        if engine.state.dataloader is not None:
            engine.set_data(engine.state.dataloader)
