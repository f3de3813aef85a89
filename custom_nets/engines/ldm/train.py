"""Training of the conditioned latent generator (meduet_ldm): objective, conditions, steps, export.

Objective (METHOD.md section 4):
- rectified flow / flow matching (SiT, default) with MONAI's ``RFlowScheduler``. MONAI's
  convention, checked in its source: timesteps t run over [0, T] (T = num_train_timesteps),
  ``add_noise`` gives x_t = (1 - t/T) x0 + (t/T) noise (t = T is pure noise; it needs 5-D
  tensors), and the network predicts the velocity v = x0 - noise, which sampling integrates from
  t = T down to 0 as x <- x + v (t - t_next) / T;
- DDPM with 1000 linear-beta steps (DiT) through ``DDPMScheduler``: the network predicts the
  noise (or ``v`` / ``sample`` per the scheduler's prediction_type).

Latents are multiplied by a scale factor (1 / standard deviation of the training latents) before
noise is added; the factor is computed once on the data, stored in the resumable state and in
``model.json``, and divided out again before decoding.

Conditions: the meduet_ssl factor bank gives one content and one style vector per volume; every
training crop carries its own volume's vectors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.scheduler import Scheduler
from torch.utils.data import Dataset

from custom_nets.engines.common.ema import ema_update, make_teacher
from custom_nets.nets.latent_dit import LatentDiT, maybe_init_from_meduet
from custom_nets.utils.checkpoint import file_sha256, read_stage_meta, save_stage_checkpoint
from custom_nets.utils.errors import InputError, InputErrors
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import read_json

logger = logging.getLogger(__name__)

STAGE = "meduet_ldm"


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------


def is_flow(scheduler: Scheduler) -> bool:
    """True for rectified flow (velocity target), False for DDPM-family schedulers."""
    return isinstance(scheduler, RFlowScheduler)


def make_scheduler(objective: str = "flow", num_train_timesteps: int = 1000, **kwargs: Any) -> Scheduler:
    """Training scheduler of an objective.

    Args:
        objective: "flow" (``RFlowScheduler``, continuous uniform timesteps unless overridden) or
            "ddpm" (``DDPMScheduler``, linear betas, epsilon prediction, no clipping of x0 since
            scaled latents are not bounded to [-1, 1]).
        num_train_timesteps: T.
        kwargs: further scheduler arguments.
    """
    if objective == "flow":
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **{"use_discrete_timesteps": False, **kwargs})
    if objective == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps, **{"schedule": "linear_beta", "clip_sample": False, **kwargs}
        )
    raise ValueError(f"unknown objective {objective!r}; expected 'flow' or 'ddpm'")


def scheduler_args(scheduler: Scheduler) -> dict[str, Any]:
    """What model.json records so that sampling rebuilds the training scheduler."""
    if is_flow(scheduler):
        return dict(
            objective="flow",
            num_train_timesteps=scheduler.num_train_timesteps,
            use_discrete_timesteps=scheduler.use_discrete_timesteps,
            sample_method=scheduler.sample_method,
            use_timestep_transform=scheduler.use_timestep_transform,
            base_img_size_numel=scheduler.base_img_size_numel,
        )
    return dict(
        objective="ddpm",
        num_train_timesteps=scheduler.num_train_timesteps,
        prediction_type=str(scheduler.prediction_type),
        # betas are a function of the schedule; record the two ends of the linear schedule
        beta_start=float(scheduler.betas[0]),
        beta_end=float(scheduler.betas[-1]),
    )


def scheduler_from_args(args: Mapping[str, Any]) -> Scheduler:
    """Inverse of :func:`scheduler_args`."""
    args = dict(args)
    objective = args.pop("objective")
    return make_scheduler(objective, **args)


def sample_training_timesteps(scheduler: Scheduler, x0: torch.Tensor) -> torch.Tensor:
    """(B,) training timesteps in [0, T]: the flow scheduler's own sampler, uniform integers for DDPM."""
    if is_flow(scheduler):
        return scheduler.sample_timesteps(x0)
    return torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)


def training_target(scheduler: Scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict at (x_t, t)."""
    if is_flow(scheduler):
        return x0 - noise
    kind = str(scheduler.prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def diffusion_loss(
    network: torch.nn.Module,
    x0: torch.Tensor,
    content: torch.Tensor | None,
    style: torch.Tensor | None,
    scheduler: Scheduler,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
) -> torch.Tensor:
    """Loss (mean squared error by default) between the network's prediction and the objective's target.

    Args:
        network: the generator, called as ``network(x_t, t, content, style)``.
        x0: (B, C, X, Y, Z) scaled clean latents.
        content, style: (B, D) factors (the network applies its condition dropout in train mode).
        scheduler: ``RFlowScheduler`` (velocity) or a DDPM-family scheduler.
        noise: fixed noise (default: standard normal).
        timesteps: fixed (B,) timesteps (default: sampled).
        loss_fn: (prediction, target) -> scalar.

    Returns:
        Scalar loss.
    """
    if x0.ndim != 5:
        raise ValueError(f"expected (B, C, X, Y, Z) latents, got {tuple(x0.shape)}")
    noise = torch.randn_like(x0) if noise is None else noise
    t = sample_training_timesteps(scheduler, x0) if timesteps is None else timesteps.to(x0.device)
    xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    pred = network(xt, t, content, style)
    return loss_fn(pred.float(), training_target(scheduler, x0, noise, t).float())


# --------------------------------------------------------------------------------------------
# Latent scale
# --------------------------------------------------------------------------------------------


def latent_scale_factor(items: Sequence[Mapping[str, Any]], max_volumes: int = 16) -> float:
    """1 / standard deviation of the voxels of the first ``max_volumes`` training latents.

    Whole volumes rather than the first random batch (the paper's choice): the value is then the
    same on every rank of a multi-GPU run and from run to run.

    Args:
        items: latent datalist items (absolute ``latent`` paths, as ``load_latent_datalist`` gives).
        max_volumes: how many volumes to read.
    """
    from custom_nets.data.latent_cache import open_latent

    if not items:
        raise ValueError("no training latents to compute the scale factor from")
    total, total_sq, count = 0.0, 0.0, 0
    for item in items[:max_volumes]:
        z = np.asarray(open_latent(item["latent"]), dtype=np.float64)
        total += float(z.sum())
        total_sq += float(np.square(z).sum())
        count += z.size
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if not std > 1e-8:
        raise InputError(items[0]["latent"], "training latents are constant; cannot compute a scale factor")
    factor = 1.0 / std
    logger.info("latent scale factor 1/std = %.6f (from %d volumes)", factor, min(len(items), max_volumes))
    return factor


# --------------------------------------------------------------------------------------------
# Conditions: the factor bank
# --------------------------------------------------------------------------------------------


@dataclass
class FactorBank:
    """Per-volume content and style vectors written by meduet_ssl inference.

    Attributes:
        content: (N, content_dim) float32.
        style: (N, style_dim) float32.
        domain_index: (N,) int64.
        items: one dict per row ({"latent", "image", "domain"}), as in factor_bank.json.
        domains: domain names.
        meta: the rest of factor_bank.json (``ssl_sha256``, dims).
        path: the factor_bank.pt file.
    """

    content: torch.Tensor
    style: torch.Tensor
    domain_index: torch.Tensor
    items: list[dict]
    domains: list[str]
    meta: dict = field(default_factory=dict)
    path: Path = Path()

    @property
    def content_dim(self) -> int:
        return int(self.content.shape[1])

    @property
    def style_dim(self) -> int:
        return int(self.style.shape[1])

    def __len__(self) -> int:
        return int(self.content.shape[0])

    def rows_for(self, latents: Sequence[str | Path]) -> list[int]:
        """Bank rows of the given latent files; InputErrors names every file without a row.

        Paths are compared resolved; a relative latent path in factor_bank.json is taken from the
        bank's folder (meduet_ssl writes absolute ones).
        """
        index: dict[str, int] = {}
        for i, item in enumerate(self.items):
            index.setdefault(str((self.path.parent / item["latent"]).resolve()), i)
        rows, errors = [], []
        for lat in latents:
            key = str(Path(lat).resolve())
            if key in index:
                rows.append(index[key])
            else:
                errors.append(InputError(lat, f"latent has no entry in the factor bank {self.path}; rerun meduet_ssl inference on this latent datalist"))
        if errors:
            raise InputErrors(errors)
        return rows


def load_factor_bank(path: str | Path, missing_ok: bool = False) -> FactorBank:
    """Read a meduet_ssl factor bank (its folder or ``factor_bank.pt``) into a :class:`FactorBank`.

    Reading and checking is :func:`custom_nets.engines.ssl.factor_bank.load_factor_bank`'s job; this
    adds the per-row lookup the generator needs. ``missing_ok``: a missing bank gives an empty one
    with the paper's factor widths (a config resolved before the bank exists; its run stops in
    :func:`custom_nets.utils.inputs.require_inputs`).
    """
    from custom_nets.engines.ssl import factor_bank

    if as_bool(missing_ok, "missing_ok") and is_missing(path):
        from custom_nets.nets.meduet import meduet_config

        note_missing(path, "factor bank")
        cfg = meduet_config("paper")
        width = int(cfg["encoder"]["embed_dim"])
        style = int(width * cfg["style_ratio"])
        return FactorBank(torch.zeros(0, width), torch.zeros(0, style), torch.zeros(0, dtype=torch.long), [], [],
                          {"missing": str(path)}, Path(str(path)))

    tensors, meta = factor_bank.load_factor_bank(path)
    path = Path(path)
    pt = path / factor_bank.FACTOR_BANK_PT if path.is_dir() else path
    items = meta.get("items", [])
    bad = [i for i, it in enumerate(items) if not isinstance(it, dict) or "latent" not in it]
    if bad:
        raise InputError(pt.with_name(factor_bank.FACTOR_BANK_JSON), f"items {bad[:10]} have no 'latent' path")
    extra = {k: v for k, v in meta.items() if k not in ("items", "domains")}
    return FactorBank(
        tensors["content"].float(), tensors["style"].float(), tensors["domain_index"].long(), list(items),
        list(meta.get("domains", [])), extra, pt,
    )


def random_window(arr: np.ndarray, size: Sequence[int], generator: torch.Generator | None = None) -> np.ndarray:
    """A random window of spatial ``size`` (X, Y, Z) from a ``(C, X, Y, Z)`` array.

    The per-axis form of :func:`custom_nets.data.latent_cache.random_crop` (which cuts cubes): the
    generator trains on 64 x 64 x 32 crops. Only the window is read from a memory-mapped array;
    axes shorter than the window are edge-padded at the far end, as there.
    """
    size = [int(s) for s in size]
    starts = [int(torch.randint(0, max(n - s, 0) + 1, (1,), generator=generator)) for n, s in zip(arr.shape[1:], size)]
    window = np.asarray(arr[(slice(None), *[slice(a, a + s) for a, s in zip(starts, size)])], dtype=np.float32)
    pad = [(0, 0)] + [(0, s - n) for n, s in zip(window.shape[1:], size)]
    if any(p[1] for p in pad):
        window = np.pad(window, pad, mode="edge")
    return window


class ConditionedLatentDataset(Dataset):
    """Random latent windows of each volume paired with the volume's content and style vectors.

    No flips or rotations: a generator should not learn mirrored or rotated anatomy.

    Args:
        items: latent datalist items with absolute ``latent`` paths (``load_latent_datalist``).
        content: (N, Dc) one row per item, in the same order.
        style: (N, Ds).
        crop: window (X, Y, Z) in latent voxels.
        seed: None draws a new random window at every access (training); an integer fixes the
            window of item i (drawn with seed + i), so that successive validations score the same
            crops.

    Returns (per item):
        {"latent": float32 (C, X, Y, Z), "content": (Dc,), "style": (Ds,), "domain_index": int}.
    """

    def __init__(self, items: Sequence[Mapping[str, Any]], content: torch.Tensor, style: torch.Tensor,
                 crop: Sequence[int], seed: int | None = None) -> None:
        # no items only when the config resolved before its cache exists (load_latent_datalist
        # refuses an empty training split; split_items falls back to it)
        if len(items) != content.shape[0] or len(items) != style.shape[0]:
            raise ValueError(f"{len(items)} volumes but {content.shape[0]} content / {style.shape[0]} style rows")
        if len(crop) != 3 or min(int(c) for c in crop) < 1:
            raise ValueError(f"crop must be 3 positive sizes, got {crop}")
        self.items, self.content, self.style = [dict(it) for it in items], content, style
        self.crop = [int(c) for c in crop]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from custom_nets.data.latent_cache import open_latent

        item = self.items[i]
        gen = None if self.seed is None else torch.Generator().manual_seed(int(self.seed) + i)
        window = random_window(open_latent(item["latent"]), self.crop, gen)
        return {
            "latent": torch.from_numpy(window), "content": self.content[i], "style": self.style[i],
            "domain_index": int(item.get("domain_index", -1)),
        }


def conditioned_dataset(
    items: Sequence[Mapping[str, Any]], bank: FactorBank, crop: Sequence[int], seed: int | None = None
) -> ConditionedLatentDataset:
    """Latent windows of ``items`` with the factor bank's vectors of each volume (InputErrors names
    every latent without a bank row); ``seed`` fixes the windows (validation)."""
    rows = bank.rows_for([it["latent"] for it in items])
    return ConditionedLatentDataset(items, bank.content[rows], bank.style[rows], crop, seed)


def split_items(latents: Mapping[str, Any], split: str = "validation", fallback: str = "training") -> list[dict]:
    """Items of one split of a loaded latent datalist; the ``fallback`` split (with a warning) when
    it is empty, so that a cache with a single split still trains (its validation loss is then
    measured on training volumes)."""
    items = list(latents.get(split) or [])
    if items:
        return items
    logger.warning("latent datalist has no %r items; validating on the %r items", split, fallback)
    return list(latents.get(fallback) or [])


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a loss: MONAI starts ``best_metric`` at -1, which any loss would never beat."""
    return best == -1 or current < best


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMAModel(torch.nn.Module):
    """Exponential moving average of a network's parameters (buffers copied).

    decay_k = min(decay, (1 + k) / (10 + k)) at update k: the usual warm-up, so that short runs
    (the demo's few dozen steps) export an average of what was learned rather than the
    initialisation; the target decay 0.9999 applies from update ~90 000 on.

    The copy and the update are those of the MeDUET EMA teacher (:mod:`custom_nets.engines.common.ema`).

    Args:
        network: the trained network (DDP wrappers are unwrapped).
        decay: the target decay (0.9999 in the paper).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.module = make_teacher(network)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        k = int(self.num_updates)
        return min(self.decay, (1 + k) / (10 + k))

    def update(self, network: torch.nn.Module) -> None:
        """One EMA step towards ``network`` (custom_nets.engines.common.ema.ema_update) at the current decay."""
        ema_update(self.module, network, self.current_decay())
        self.num_updates += 1


# --------------------------------------------------------------------------------------------
# Engine steps
# --------------------------------------------------------------------------------------------


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
        def call(x, t, c, s):
            return engine.inferer(x, engine.network, t, c, s) if engine.inferer is not None else engine.network(x, t, c, s)

        return call

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        device = engine.state.device
        x0 = batch["latent"].to(device, torch.float32, non_blocking=engine.non_blocking) * self.scale_factor
        content = batch["content"].to(device, torch.float32)
        style = batch["style"].to(device, torch.float32)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        use_amp = bool(engine.amp) and device.type == "cuda"
        with torch.autocast("cuda", enabled=use_amp):
            loss = diffusion_loss(self._forward(engine), x0, content, style, self.scheduler, loss_fn=engine.loss_function)
        if use_amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.scaler.unscale_(engine.optimizer)
            grad_norm = self._clip(engine)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            grad_norm = self._clip(engine)
            engine.optimizer.step()
        if self.ema is not None:
            self.ema.update(engine.network)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm}

    def _clip(self, engine: Engine) -> float:
        if self.grad_clip is None:
            return float("nan")
        return float(torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip))


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
        gen = torch.Generator().manual_seed(self.seed + int(engine.state.iteration))
        noise = torch.randn(x0.shape, generator=gen).to(device)
        losses = []
        for t in self.timesteps:
            tt = torch.full((x0.shape[0],), t, device=device)
            if not is_flow(self.scheduler):
                tt = tt.long()
            losses.append(float(diffusion_loss(net, x0, content, style, self.scheduler, noise=noise, timesteps=tt)))
        return {"loss": float(np.mean(losses))}


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


class GeneratorExporter:
    """Writes the EMA generator as ``models/model.pt`` + ``model.json`` (stage meduet_ldm).

    Attached to the trainer: after every ``every`` epochs and when training completes.

    Args:
        ema: the EMA whose weights are exported (its module's ``network_args`` are recorded).
        path: destination ``model.pt``.
        train_step: gives the scale factor.
        scheduler: training scheduler (recorded for sampling).
        bank: the factor bank the conditions came from.
        latent_datalist: the latent datalist (its VAE checkpoint and hash are recorded).
        ssl_ckpt: the MeDUET checkpoint used to initialise the generator (None: random init).
        every: export period in epochs (0: only at the end).
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
        every: int = 1,
    ) -> None:
        self.ema, self.path, self.train_step, self.scheduler = ema, Path(path), train_step, scheduler
        self.bank, self.latent_datalist, self.ssl_ckpt, self.every = bank, Path(latent_datalist), ssl_ckpt, every

    def attach(self, engine: Engine) -> None:
        if self.every > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def metadata(self, engine: Engine | None = None) -> dict[str, Any]:
        """The facts model.json records for sampling and for the next user."""
        vae = (read_json(self.latent_datalist).get("vae") or {}) if self.latent_datalist.is_file() else {}
        net = self.ema.module
        return dict(
            network=dict(net.network_args),
            scheduler=scheduler_args(self.scheduler),
            scale_factor=self.train_step.scale_factor,
            latent_channels=int(net.in_channels),
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
            iterations=int(engine.state.iteration) if engine is not None else None,
        )

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == 0:
            return
        info = save_stage_checkpoint(self.ema.module.state_dict(), self.path, STAGE, **self.metadata(engine))
        logger.info("exported EMA generator to %s (sha256 %s...)", self.path, info["sha256"][:12])


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
    maybe_init_from_meduet(getattr(generator, "module", generator), ssl_ckpt, init)
    check_ssl_consistency(bank, ssl_ckpt, init)
    return generator


def check_ssl_consistency(bank: FactorBank, ssl_ckpt: str | Path | None, init: bool) -> None:
    """Warn when the generator is initialised from another SSL model than the one whose factors
    condition it (on-the-fly factors at inference would then come from the wrong model)."""
    if not (as_bool(init, "init_from_ssl") and ssl_ckpt):
        return
    read_stage_meta(ssl_ckpt, "meduet_ssl")
    want = bank.meta.get("ssl_sha256")
    have = file_sha256(ssl_ckpt)
    if want and want != have:
        logger.warning(
            "factor bank %s was computed with SSL checkpoint sha256 %s..., but the generator is initialised "
            "from %s (sha256 %s...)", bank.path, str(want)[:12], ssl_ckpt, have[:12],
        )
