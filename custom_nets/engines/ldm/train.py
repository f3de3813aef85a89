"""Training of the conditioned latent generator (meduet_ldm): the engine steps and the export.

The objective (rectified flow or DDPM) and the latent scale factor are in
:mod:`custom_nets.engines.ldm.objective`; the training windows with their content and style
vectors in :mod:`custom_nets.data.latent_datasets` (the meduet_ssl factor bank gives one content
and one style vector per volume; every training crop carries its own volume's vectors); the EMA
of the generator in :mod:`custom_nets.engines.common.ema`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.networks.schedulers.scheduler import Scheduler

from custom_nets.engines.common.ema import EMAModel
from custom_nets.engines.common.export import StageExporter
from custom_nets.engines.common.step import engine_amp, optimizer_step
from custom_nets.engines.ldm.objective import diffusion_loss, is_flow, scheduler_args
from custom_nets.engines.ssl.factor_bank import FactorBank
from custom_nets.nets.latent_dit import LatentDiT, maybe_init_from_meduet
from custom_nets.utils.checkpoint import check_upstream, file_sha256, read_stage_meta
from custom_nets.utils.flags import as_bool
from custom_nets.utils.io import read_json
from custom_nets.utils.parallel import unwrap

logger = logging.getLogger(__name__)

STAGE = "meduet_ldm"


# --------------------------------------------------------------------------------------------
# Engine steps
# --------------------------------------------------------------------------------------------


CONTENT_CONDITIONING = ("vector", "map")


def uses_content_map(content_conditioning: str) -> bool:
    """meduet_ldm's ``content_conditioning``: "vector" (the paper: one pooled content vector per volume)
    or "map" (also the content token map over the crop, :class:`~custom_nets.nets.latent_dit.LatentDiT`'s
    ``content_map``). Returns whether maps are used; any other value is refused by name."""
    if content_conditioning not in CONTENT_CONDITIONING:
        raise ValueError(f"content_conditioning must be one of {CONTENT_CONDITIONING}, got {content_conditioning!r}")
    return content_conditioning == "map"


class FlowMatchingStep:
    """``iteration_update`` of a MONAI ``SupervisedTrainer``: one optimisation step of the generator.

    Uses ``engine.network``, ``engine.optimizer``, ``engine.loss_function``, ``engine.inferer`` (the
    forward call), ``engine.amp`` / ``engine.scaler``. Batches are {"latent", "content", "style"}.

    Args:
        scheduler: training scheduler (rectified flow or DDPM).
        scale_factor: multiplies the latents (1/std); kept in this object's state_dict so that a
            resumed run keeps the value it started with.
        ema: EMA of the network, updated after every optimiser step (None: no EMA).
        grad_clip: max gradient norm (None: no clipping).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        scale_factor: float,
        ema: EMAModel | None = None,
        grad_clip: float | None = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self.scale_factor = float(scale_factor)
        self.ema = ema
        self.grad_clip = grad_clip

    def state_dict(self) -> dict[str, Any]:
        return {"scale_factor": torch.tensor(self.scale_factor, dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale_factor = float(state["scale_factor"])

    def _forward(self, engine: Engine) -> Any:
        def call(x, t, c, s, **kw):
            return engine.inferer(x, engine.network, t, c, s, **kw) if engine.inferer is not None else engine.network(x, t, c, s, **kw)

        return call

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        device = engine.state.device
        x0 = batch["latent"].to(device, torch.float32, non_blocking=engine.non_blocking) * self.scale_factor
        content = batch["content"].to(device, torch.float32)
        style = batch["style"].to(device, torch.float32)
        content_map = batch["content_map"].to(device, torch.float32) if "content_map" in batch else None
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        autocast, scaler = engine_amp(engine)
        with autocast:
            loss = diffusion_loss(self._forward(engine), x0, content, style, self.scheduler, loss_fn=engine.loss_function,
                                  content_map=content_map)
        grad_norm = optimizer_step(loss, engine.optimizer, engine.network.parameters(), scaler, self.grad_clip)
        if self.ema is not None:
            self.ema.update(engine.network)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}


class FlowMatchingValidationStep:
    """``iteration_update`` of a ``SupervisedEvaluator``: the objective's loss with the conditions,
    fixed noise and a fixed set of timesteps, so that successive validations are comparable.

    Args:
        scheduler: the training scheduler.
        train_step: the :class:`FlowMatchingStep` whose scale factor applies.
        timesteps: timesteps at which every validation crop is scored (losses averaged).
        seed: seeds the noise of batch k with ``seed + k``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        train_step: FlowMatchingStep,
        timesteps: Sequence[float] = (100, 300, 500, 700, 900),
        seed: int = 0,
    ) -> None:
        self.scheduler, self.train_step = scheduler, train_step
        self.timesteps = [float(t) for t in timesteps]
        self.seed = seed

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        device = engine.state.device
        net = engine.network
        net.eval()
        x0 = batch["latent"].to(device, torch.float32) * self.train_step.scale_factor
        content, style = batch["content"].to(device, torch.float32), batch["style"].to(device, torch.float32)
        content_map = batch["content_map"].to(device, torch.float32) if "content_map" in batch else None
        gen = torch.Generator().manual_seed(self.seed + int(engine.state.iteration))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        losses = []
        for t in self.timesteps:
            tt = torch.full((x0.shape[0],), t, device=device)
            if not is_flow(self.scheduler):
                tt = tt.long()
            losses.append(float(diffusion_loss(net, x0, content, style, self.scheduler, noise=noise, timesteps=tt,
                                               content_map=content_map)))
        return {"loss": float(np.mean(losses))}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


class GeneratorExporter(StageExporter):
    """Writes the EMA generator as ``models/model.pt`` + ``model.json`` (stage meduet_ldm), with what
    sampling needs (scheduler, scale factor, condition sizes) and where the conditions came from.

    Args:
        ema: the EMA whose weights are exported (its module's ``network_args`` are recorded).
        path: destination ``model.pt``.
        train_step: gives the scale factor.
        scheduler: training scheduler (recorded for sampling).
        bank: the factor bank the conditions came from.
        latent_datalist: the latent datalist (its VAE checkpoint and hash are recorded).
        ssl_ckpt: the MeDUET checkpoint used to initialise the generator (None: random init).
        policy: "best", "final" or "every N" (:class:`~custom_nets.engines.common.export.StageExporter`).
        evaluator: the validation evaluator (for "best").
    """

    def __init__(
        self,
        ema: EMAModel,
        path: str | Path,
        train_step: FlowMatchingStep,
        scheduler: Scheduler,
        bank: FactorBank,
        latent_datalist: str | Path,
        ssl_ckpt: str | Path | None = None,
        policy: str = "every 1",
        evaluator: Any | None = None,
    ) -> None:
        super().__init__(None, path, STAGE, policy, evaluator)
        self.ema, self.train_step, self.scheduler = ema, train_step, scheduler
        self.bank, self.latent_datalist, self.ssl_ckpt = bank, Path(latent_datalist), ssl_ckpt

    def exported_network(self) -> torch.nn.Module:
        return self.ema.module

    def metadata(self, network: torch.nn.Module) -> dict[str, Any]:
        """The facts model.json records for sampling and for the next user."""
        vae = (read_json(self.latent_datalist).get("vae") or {}) if self.latent_datalist.is_file() else {}
        return dict(
            network=dict(network.network_args),
            scheduler=scheduler_args(self.scheduler),
            scale_factor=self.train_step.scale_factor,
            latent_channels=int(network.in_channels),
            content_dim=self.bank.content_dim,
            style_dim=self.bank.style_dim,
            domains=self.bank.domains,
            factor_bank=str(self.bank.path),
            factor_ssl_sha256=self.bank.meta.get("ssl_sha256"),
            init_ssl_ckpt=str(self.ssl_ckpt) if self.ssl_ckpt else None,
            init_ssl_sha256=file_sha256(self.ssl_ckpt) if self.ssl_ckpt and Path(self.ssl_ckpt).is_file() else None,
            latent_datalist=str(self.latent_datalist),
            vae_ckpt=vae.get("ckpt"),
            vae_sha256=vae.get("sha256"),
            ema_decay=self.ema.decay,
            ema_updates=int(self.ema.num_updates),
        )


def load_upstream(generator: LatentDiT, bank: FactorBank, ssl_ckpt: str | Path | None, init: bool) -> LatentDiT:
    """The generator's start from the previous stage (the config's ``load_upstream``, run by ``initialize``).

    Args:
        generator: the untrained network (``network_def``; a DDP wrapper's module is reached the same).
        bank: the factor bank that conditions training.
        ssl_ckpt: the meduet_ssl checkpoint.
        init: initialise from the MeDUET encoder (``init_from_ssl``; any switch spelling).

    Returns:
        ``generator``, initialised in place when ``init``.
    """
    maybe_init_from_meduet(unwrap(generator), ssl_ckpt, init)
    check_ssl_consistency(bank, ssl_ckpt, init)
    return generator


def check_ssl_consistency(bank: FactorBank, ssl_ckpt: str | Path | None, init: bool) -> None:
    """Warn when the generator is initialised from another SSL model than the one whose factors
    condition it (on-the-fly factors at inference would then come from the wrong model)."""
    if not (as_bool(init, "init_from_ssl") and ssl_ckpt):
        return
    read_stage_meta(ssl_ckpt, "meduet_ssl")
    check_upstream(
        bank.path, "the factor bank", "meduet_ssl", bank.meta.get("ssl_sha256"), file_sha256(ssl_ckpt),
        f"ssl_ckpt {ssl_ckpt} (the generator's initialisation)",
        "factors computed on the fly at inference would come from another model than the bank's", warn=True,
    )
