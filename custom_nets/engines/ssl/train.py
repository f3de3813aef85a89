"""MONAI engine pieces of the meduet_ssl training config.

The trainer is a MONAI ``SupervisedTrainer`` whose ``iteration_update`` is
:meth:`custom_nets.engines.ssl.step.MeDUETTrainStep.iteration_update` (optimizer, EMA teacher,
schedules and mixed precision live in the step). This module adds what the config wires around it:

- :func:`latent_crop_dataset` (training crops) and :class:`FixedCropDataset` (validation crops);
- :class:`SamplerEpoch`: new mixing pairs every epoch (MONAI only does this for ``DistributedSampler``);
- (resumable checkpoints: :class:`custom_nets.engines.common.resume.ResumableCheckpoint`, shared by
  every bundle);
- :class:`ValidationReconstruction`: the evaluator's iteration, the teacher's token-demixing
  reconstruction loss on validation crops with fixed masks (comparable across evaluations);
- :class:`TeacherExporter`: writes ``models/model.pt`` + ``model.json`` (stage meduet_ssl);
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

from custom_nets.engines.common.step import first_item
from custom_nets.engines.ssl.model import export_meduet
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


def latent_crop_dataset(data: Sequence[Mapping[str, Any]], crop: int = 24, flip_prob: float = 0.2, rot90_prob: float = 0.2) -> Any:
    """The latent cache's crop dataset over ``data`` (a config's ``train#dataset#data``, the id
    MONAI Label and the bundle property checks look for)."""
    from custom_nets.data.latent_cache import LatentCropDataset

    return LatentCropDataset(list(data), crop=crop, flip_prob=flip_prob, rot90_prob=rot90_prob)


class FixedCropDataset(torch.utils.data.Dataset):
    """Validation crops: the same window of each volume at every evaluation (seeded per item), no
    augmentation, so that the validation loss moves only with the weights.

    Args:
        data: latent items (absolute ``latent`` paths).
        crop: crop edge in latent voxels (shorter axes are edge-padded, as in training).
        seed: base seed of the window positions.

    Returns (per item):
        ``{"latent": float32 tensor (C, crop, crop, crop), "domain_index": int}``.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], crop: int = 24, seed: int = 0) -> None:
        self.items, self.crop, self.seed = list(data), int(crop), int(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from custom_nets.data.latent_cache import open_latent, random_crop

        item = self.items[index]
        gen = torch.Generator().manual_seed(self.seed + index)
        window = random_crop(open_latent(item["latent"]), self.crop, generator=gen)
        return {"latent": torch.from_numpy(window), "domain_index": int(item["domain_index"])}


def lower_is_better(current: float, prev: float) -> bool:
    """Key-metric comparison for a loss (MONAI's default treats higher as better)."""
    return current < prev


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


class TeacherExporter:
    """Export the teacher as ``models/model.pt`` + ``model.json`` (stage meduet_ssl).

    Args:
        step: the :class:`~custom_nets.engines.ssl.step.MeDUETTrainStep` (its ``teacher``,
            or its student with ``weights="student"``).
        path: destination ``model.pt``.
        network_args: MeDUET constructor arguments.
        domains: domain names.
        vae_sha256: sha256 of the VAE of the training latents.
        latent_channels: latent channels.
        on: ``"completed"`` (attach to the trainer: export when training ends) or ``"improved"``
            (attach to the evaluator: export when the key metric reaches a new best).
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
        on: str = "completed",
        weights: str = "teacher",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if on not in ("completed", "improved"):
            raise ValueError(f"on must be 'completed' or 'improved', got {on!r}")
        if weights not in ("teacher", "student"):
            raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
        self.step, self.path, self.on, self.weights = step, Path(path), on, weights
        self.network_args, self.domains = dict(network_args), list(domains)
        self.vae_sha256, self.latent_channels, self.extra = vae_sha256, int(latent_channels), dict(extra or {})

    def attach(self, engine: Engine) -> None:
        event = Events.COMPLETED if self.on == "completed" else Events.EPOCH_COMPLETED
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        facts: dict[str, Any] = {"weights": self.weights, "iteration": int(self.step.step), **self.extra}
        if self.on == "improved":
            # MONAI's evaluator updates best_metric before handlers attached later run
            if engine.state.best_metric_epoch != engine.state.epoch:
                return
            facts.update(epoch=int(engine.state.epoch), val_rec=float(engine.state.best_metric))
        else:
            facts.update(epoch=int(engine.state.epoch))
        net = self.step.teacher if self.weights == "teacher" else self.step.model
        info = export_meduet(net, self.path, self.network_args, self.domains, self.vae_sha256, self.latent_channels, **facts)
        logger.info("exported the %s to %s (epoch %s, sha256 %s...)", self.weights, self.path, facts["epoch"], info["sha256"][:12])
