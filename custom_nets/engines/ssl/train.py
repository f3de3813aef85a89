"""MONAI engine pieces of the meduet_ssl training config.

The trainer is a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is
:meth:`custom_nets.engines.ssl.step.MeDUETTrainStep.iteration_update` (optimizer, EMA teacher,
schedules and mixed precision live in the step). This module adds what the config wires around it:

- (training and validation crops: :mod:`custom_nets.data.latent_datasets`);
- :class:`SamplerEpoch`: new mixing pairs every epoch (MONAI only does this for ``DistributedSampler``);
- (resumable checkpoints: :class:`custom_nets.engines.common.resume.ResumableCheckpoint`, shared by
  every bundle);
- :class:`ValidationReconstruction`: the evaluator's iteration, the teacher's token-demixing
  reconstruction loss on validation crops with fixed masks (comparable across evaluations);
- :class:`TeacherExporter`: writes ``models/model.pt`` + ``model.json`` (stage meduet_ssl; the
  shared :class:`~custom_nets.engines.common.export.StageExporter` policies);
- :func:`tensorboard_scalars`: every loss term of the step's output as a TensorBoard scalar (the
  progress bar is :class:`custom_nets.engines.common.step.LossProgressBar`, shared by every bundle).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from custom_nets.engines.common.export import StageExporter
from custom_nets.engines.common.step import first_item
from custom_nets.engines.ssl.model import STAGE, meduet_metadata
from custom_nets.losses.demix import demix_reconstruction_loss
from custom_nets.utils.errors import InputError
from custom_nets.utils.inputs import is_missing

logger = logging.getLogger(__name__)


def domain_indices(items: Sequence[Mapping[str, Any]], source: str | Path = "latent datalist") -> list[int]:
    """``domain_index`` of every latent item (what the pair sampler needs); refuses an empty list
    (unless the datalist itself is missing: the run's require_inputs reports that)."""
    if not items and not is_missing(source):
        raise InputError(source, "no items to train or validate on (check the 'training' / 'validation' lists)")
    return [int(it["domain_index"]) for it in items]


def tensorboard_scalars(output: Any) -> dict[str, float]:
    """The step's output (``[dict]``, see :func:`~custom_nets.engines.common.step.as_decollated`)
    as TensorBoard scalars: losses under ``loss/``, lr/momentum/grad norm under ``optim/`` (the step
    counter itself is the x axis, not a curve)."""
    out = {}
    for k, v in first_item(output).items():
        if k == "step":
            continue
        out[("optim/" if k in ("lr", "momentum", "grad_norm") else "loss/") + k] = float(v)
    return out


class SamplerEpoch:
    """Call ``sampler.set_epoch(epoch)`` when each epoch starts (new pairs every epoch, resumable)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.set_epoch(engine.state.epoch)


class ValidationReconstruction:
    """Evaluator iteration: the teacher's token-demixing reconstruction loss on a validation batch.

    Batch ``k`` of every evaluation uses the same mixing mask (seeded with ``seed + k``), so the
    value moves only with the weights. Pairs are mirror positions, as in training.

    Args:
        seed: base seed of the masks.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        network = getattr(engine.network, "module", engine.network)
        network.eval()
        x = batchdata["latent"].to(engine.state.device).float()
        if x.shape[0] % 2:  # a last odd item has no partner
            x = x[:-1]
        if x.shape[0] < 2:
            raise ValueError("validation batches need at least 2 crops (val_batch_size >= 2)")
        n_tokens = int(torch.tensor(network.encoder.grid_of(x.shape[2:])).prod())
        gen = torch.Generator().manual_seed(self.seed + engine.state.iteration)
        mask = network.random_mix_mask(x.shape[0], n_tokens, gen, x.device)
        out = network.forward_pretrain(x, mask, swap_styles=False)
        return {"val_rec": demix_reconstruction_loss(out["pred"], network.patchify(x), mask)}


class TeacherExporter(StageExporter):
    """Export the EMA teacher (or the student) as ``models/model.pt`` + ``model.json`` (stage meduet_ssl).

    Args:
        step: the :class:`~custom_nets.engines.ssl.step.MeDUETTrainStep` (its ``teacher``,
            or its student with ``weights="student"``).
        path: destination ``model.pt``.
        network_args: MeDUET constructor arguments.
        domains: domain names.
        vae_sha256: sha256 of the VAE of the training latents.
        latent_channels: latent channels.
        policy: "best", "final" or "every N" (:class:`~custom_nets.engines.common.export.StageExporter`).
        evaluator: the validation evaluator (its reconstruction loss decides "best").
        weights: ``"teacher"`` (default export) or ``"student"``.
        extra: more facts for model.json (e.g. ``pair_sampling``).
    """

    def __init__(
        self,
        step: Any,
        path: str | Path,
        network_args: Mapping[str, Any],
        domains: Sequence[str],
        vae_sha256: str | None,
        latent_channels: int,
        policy: str = "final",
        evaluator: Any | None = None,
        weights: str = "teacher",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if weights not in ("teacher", "student"):
            raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
        super().__init__(None, path, STAGE, policy, evaluator, extra)
        self.step, self.weights = step, weights
        self.network_args, self.domains = dict(network_args), list(domains)
        self.vae_sha256, self.latent_channels = vae_sha256, int(latent_channels)

    def exported_network(self) -> torch.nn.Module:
        return self.step.teacher if self.weights == "teacher" else self.step.model

    def metadata(self, network: torch.nn.Module) -> dict[str, Any]:
        facts = meduet_metadata(network, self.network_args, self.domains, self.vae_sha256, self.latent_channels)
        best = self.key_metric()
        return {**facts, "weights": self.weights, **({} if best is None else {"val_rec": best})}
