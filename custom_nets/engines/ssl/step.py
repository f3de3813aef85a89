"""One MeDUET pretraining step: student and EMA teacher passes, the four losses, the update.

    L = L_rec + 0.2 L_dom + 0.5 L_MFTD + 0.3 L_SiQC            (MFTD from ``mftd_start_step`` on)

Per step, every forward pass is computed once and nothing is recomputed beyond the optional
activation checkpointing:
- teacher (no gradient): one 2B encoder pass on [clean batch, mixture with mask 1 - M] (the clean
  factors of the reversed batch are the flipped clean factors), one 2B decoder pass for its style
  swaps, one 2B plain pass re-encoding them;
- student: one B pass on the mixture and one 4B decoder pass on the dual streams and the swaps
  together, through ``student.forward`` (so that a DistributedDataParallel wrapper sees it); then
  the plain re-encoding of the two reconstructions and the two swaps (4B items), streamed in chunks
  whose gradients are taken at once (:mod:`custom_nets.engines.ssl.reencode`: same gradients, the
  activation memory of one chunk). The caller runs one backward per step.

Use from a MONAI ``SupervisedTrainer``: build the step, then pass ``iteration_update=step.iteration_update``
(``iteration_update(engine, batchdata)`` reads ``batchdata["latent"]`` and ``batchdata["domain_index"]``,
runs the step and returns the float losses as ``engine.state.output``); put ``step`` itself into
the CheckpointSaver / CheckpointLoader ``save_dict`` (it has ``state_dict`` / ``load_state_dict``)
to resume network, teacher, optimizer, scheduler, scaler, step counter and random states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from custom_nets.engines.common.ema import cosine_momentum, ema_update, make_teacher
from custom_nets.engines.common.schedule import warmup_cosine_scheduler
from custom_nets.engines.common.step import clip_and_step, precision_autocast, resolve_precision, scaled_backward
from custom_nets.engines.ssl.reencode import streamed_reencode_loss
from custom_nets.losses.clean_domain import CleanDomainAdversary, dann_lambda
from custom_nets.losses.decorrelation import cross_correlation_loss
from custom_nets.losses.demix import demix_reconstruction_loss
from custom_nets.losses.domain import domain_loss
from custom_nets.losses.domain_variance import DomainMeanBank, between_domain_share_loss
from custom_nets.losses.mftd import mftd_row_targets, mftd_terms
from custom_nets.losses.siqc import pool_groups, pool_tokens, quadruplet_ids, supcon_row_losses
from custom_nets.losses.domain_quantiles import random_directions, sliced_domain_quantile_loss
from custom_nets.losses.paired_content import paired_content_loss
from custom_nets.losses.swap_cycle import swap_cycle_targets, swap_cycle_terms
from custom_nets.utils.parallel import unwrap

__all__ = [
    "MeDUETStepConfig",
    "MeDUETTrainStep",
    "window_cubes",
    "param_groups_no_decay",
    "build_optimizer",
]

logger = logging.getLogger(__name__)

NO_DECAY_NAMES = ("cls_token", "mask_token")


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: with ``weight_decay``, and without it for biases, norm weights
    (every 1-D parameter) and the cls / mask tokens (the MAE convention).

    Args:
        model: network (a DDP wrapper is unwrapped).
        weight_decay: decay of the first group.

    Returns:
        [{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}].
    """
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.01
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups_no_decay`; the fused kernel (no full-size temporaries) where
    every parameter is a floating tensor on the CPU or CUDA."""
    groups = param_groups_no_decay(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def window_cubes(windows: torch.Tensor, crop: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Cut windows into non-overlapping cubes of the training crop's size, so that each cube is encoded
    on its own, as the factor bank encodes a volume (:mod:`custom_nets.engines.ssl.factor_bank`).

    Args:
        windows: (B, C, X, Y, Z), each side a multiple of the crop's.
        crop: (cx, cy, cz) the training crop.

    Returns:
        (B * k, C, cx, cy, cz) cubes, window by window (the k cubes of window i are rows i*k..i*k+k-1), and k.
    """
    b, c, *spatial = windows.shape
    crop = [int(v) for v in crop]
    if len(spatial) != 3 or any(s % t for s, t in zip(spatial, crop)):
        raise ValueError(f"domain_window {tuple(spatial)} must be a multiple of the training crop {tuple(crop)}: the "
                         "window is encoded as crop-size cubes, as the factor bank encodes a volume")
    g = [s // t for s, t in zip(spatial, crop)]
    cubes = windows.reshape(b, c, g[0], crop[0], g[1], crop[1], g[2], crop[2]).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return cubes.reshape(b * math.prod(g), c, *crop), math.prod(g)


@dataclass
class MeDUETStepConfig:
    """Hyper-parameters of :class:`MeDUETTrainStep` (METHOD.md section 3; lengths in iterations).

    Args:
        total_steps: iterations of the whole run (cosine lr and EMA-momentum schedules).
        warmup_steps: linear lr warm-up (paper: 50 of 5000 epochs).
        mftd_start_step: first iteration with MFTD (paper: epoch 1000 of 5000).
        lr, start_lr, final_lr: peak, warm-up start and final learning rates.
        betas, weight_decay: AdamW (no decay on biases, norms and tokens).
        momentum_base, momentum_final: EMA momentum at the start / end (cosine in between).
        weight_rec, weight_domain, weight_mftd, weight_siqc: loss weights.
        mftd_content_weight: weight of the MFTD content terms (style terms weigh 1).
        siqc: compute SiQC.
        siqc_temperature: SiQC similarity temperature.
        grad_clip: max gradient norm (<= 0 disables clipping).
        precision: "auto", "fp32", "bf16" (autocast) or "fp16" (autocast + gradient scaling, CUDA).
        checkpointing: network parts that recompute activations in backward, a subset of
            ("mixture", "decoder"); same results, less memory, more time.
        reencode_chunk: items per chunk of the student's streamed re-encoding (0: all at once);
            same results, memory of one chunk's activations.
        seed: seed of the mixing-mask generator (add the rank under DDP for different masks per rank).
        clean_domain_weight: weight of the domain adversary on the student's clean content, per
            token and pooled (:mod:`custom_nets.losses.clean_domain`); 0 (the paper) disables it.
        clean_domain_lr: learning rate of the adversary's own AdamW (no weight decay).
        clean_domain_gamma: steepness of its DANN reversal ramp over ``total_steps``.
        domain_share_weight: weight of the between-domain variance share of the student's pooled clean
            content in the batch (:mod:`custom_nets.losses.domain_variance`); 0: off (paper).
        domain_mean_weight: weight of the Fisher criterion of the student's pooled clean content over
            running per-domain means and within-domain covariance
            (:class:`~custom_nets.losses.domain_variance.DomainMeanBank`); 0: off (paper).
        domain_mean_momentum: EMA momentum of that bank.
        domain_mean_shrinkage: weight s of the mean variance in that bank's within-domain covariance,
            ``W_s = (1 - s) W + s (tr W / D) I`` (both banks); lower counts domain offsets along
            low-variance directions more, as a standardising linear probe does.
        domain_window_weight: weight of the same Fisher criterion (its own bank, same momentum) on the
            student's content pooled over each volume's fixed centre window (the batch's ``"window"``,
            meduet_ssl's ``domain_window``, a multiple of the crop), encoded as crop-size cubes and
            pooled as the factor bank pools a volume (:func:`window_cubes`), so that position does not
            inflate the within-domain spread it is measured against, as it does for crops at random
            positions; 0: off (paper).
        domain_token_weight: weight of the sliced quantile distance between the domains' distributions
            of the content *tokens* of each volume's window (the same window and cube encoding as
            ``domain_window_weight``; :mod:`custom_nets.losses.domain_quantiles`), so that single tokens,
            not only their mean, lose the domain; 0: off (paper).
        domain_token_projections: random directions of that distance (drawn anew each step).
        paired_content_weight: weight of paired content consistency: the content tokens of each
            volume's window and of the same window of another rendering of the same subject (the
            batch's ``"paired_window"``, meduet_ssl's ``pair_key``) must match token by token
            (:mod:`custom_nets.losses.paired_content`); 0: off (paper).
        self_rec_weight: weight of the all-visible reconstruction: the clean factors of every token,
            fused and decoded with no mask token, must give back the clean latent (mean squared
            error); 0: off (paper, whose decoder only ever predicts hidden tokens).
        decorrelation_weight: weight of the batch cross-correlation loss between the pooled content
            and style of the mixture's sources (:mod:`custom_nets.losses.decorrelation`); 0: off (paper).
        swap_cycle_weight: weight of swap cycle consistency on the re-encoded style swaps
            (:mod:`custom_nets.losses.swap_cycle`; needs ``siqc``); 0: off (paper).
    """

    total_steps: int = 200_000
    warmup_steps: int = 2_000
    mftd_start_step: int = 40_000
    lr: float = 1e-4
    start_lr: float = 1e-6
    final_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    momentum_base: float = 0.997
    momentum_final: float = 0.9997
    weight_rec: float = 1.0
    weight_domain: float = 0.2
    weight_mftd: float = 0.5
    weight_siqc: float = 0.3
    mftd_content_weight: float = 0.5
    siqc: bool = True
    siqc_temperature: float = 0.07
    grad_clip: float = 1.0
    precision: str = "fp32"
    # both: 0.49x the peak memory of the authors' pass structure for ~6 % more CPU time (REPORT.md, issue 18)
    checkpointing: tuple[str, ...] = field(default_factory=lambda: ("mixture", "decoder"))
    reencode_chunk: int = 2
    seed: int = 0
    clean_domain_weight: float = 0.0
    clean_domain_lr: float = 1e-3
    clean_domain_gamma: float = 10.0
    decorrelation_weight: float = 0.0
    swap_cycle_weight: float = 0.0
    domain_share_weight: float = 0.0
    domain_mean_weight: float = 0.0
    domain_mean_momentum: float = 0.95
    domain_mean_shrinkage: float = 0.1
    domain_window_weight: float = 0.0
    domain_token_weight: float = 0.0
    domain_token_projections: int = 64
    paired_content_weight: float = 0.0
    self_rec_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {self.warmup_steps}")
        if self.mftd_start_step < 0:
            raise ValueError(f"mftd_start_step must be >= 0, got {self.mftd_start_step}")
        if self.reencode_chunk < 0:
            raise ValueError(f"reencode_chunk must be >= 0, got {self.reencode_chunk}")
        for name in ("clean_domain_weight", "decorrelation_weight", "swap_cycle_weight", "domain_share_weight",
                     "domain_mean_weight", "domain_window_weight", "domain_token_weight", "paired_content_weight",
                     "self_rec_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.domain_token_projections < 1:
            raise ValueError(f"domain_token_projections must be >= 1, got {self.domain_token_projections}")
        if not 0.0 < self.domain_mean_shrinkage <= 1.0:
            raise ValueError(f"domain_mean_shrinkage must be in (0, 1], got {self.domain_mean_shrinkage}")
        if self.swap_cycle_weight > 0 and not self.siqc:
            raise ValueError("swap_cycle_weight > 0 needs siqc (the swaps it re-encodes are SiQC's)")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.checkpointing = tuple(self.checkpointing)


class MeDUETTrainStep:
    """Student, EMA teacher, optimizer, lr scheduler and gradient scaler of MeDUET pretraining.

    Args:
        student: a :class:`~custom_nets.nets.meduet.MeDUET`, possibly wrapped in
            DistributedDataParallel (wrap it before building the step).
        config: :class:`MeDUETStepConfig` or a mapping of its fields.
        teacher: EMA teacher; by default a frozen copy of the student.
        optimizer: by default :func:`build_optimizer` with the config's lr, betas and decay.
        device: device of the batches; by default the student's.

    Call ``step(latents (B, C, X, Y, Z), domain_index (B,))`` -> dict of float losses; B must be even
    (sample i is mixed with B-1-i). Under DDP each rank pairs within its own batch.
    """

    def __init__(
        self,
        student: nn.Module,
        config: MeDUETStepConfig | Mapping[str, Any] | None = None,
        teacher: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config if isinstance(config, MeDUETStepConfig) else MeDUETStepConfig(**dict(config or {}))
        cfg = self.config
        self.student = student
        self.model = unwrap(student)
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model.set_checkpointing(cfg.checkpointing)
        self.teacher = teacher if teacher is not None else make_teacher(self.model)
        self.teacher.eval()
        self.optimizer = optimizer if optimizer is not None else build_optimizer(
            self.model, cfg.lr, cfg.betas, cfg.weight_decay
        )
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.total_steps, cfg.warmup_steps, cfg.start_lr, cfg.final_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.mask_generator = torch.Generator().manual_seed(int(cfg.seed))
        self.step = 0
        # training-only domain adversary on the clean content (own optimizer; not exported)
        self.adversary: CleanDomainAdversary | None = None
        self.adversary_optimizer: torch.optim.Optimizer | None = None
        if cfg.clean_domain_weight > 0:
            n_domains = self.model.content_domain_head[-1].out_features
            self.adversary = CleanDomainAdversary(self.model.content_dim, n_domains).to(self.device)
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():  # same start on every rank, as DDP does for the network
                for p in self.adversary.parameters():
                    dist.broadcast(p.data, src=0)
            self.adversary_optimizer = torch.optim.AdamW(
                self.adversary.parameters(), lr=cfg.clean_domain_lr, betas=tuple(cfg.betas), weight_decay=0.0
            )
        # training-only running domain statistics of the clean content (not exported)
        self.domain_bank: DomainMeanBank | None = None
        if cfg.domain_mean_weight > 0:
            n_domains = self.model.content_domain_head[-1].out_features
            self.domain_bank = DomainMeanBank(self.model.content_dim, n_domains, cfg.domain_mean_momentum,
                                              cfg.domain_mean_shrinkage).to(self.device)
        self.window_bank: DomainMeanBank | None = None
        if cfg.domain_window_weight > 0:
            n_domains = self.model.content_domain_head[-1].out_features
            self.window_bank = DomainMeanBank(self.model.content_dim, n_domains, cfg.domain_mean_momentum,
                                              cfg.domain_mean_shrinkage).to(self.device)

    # ---------------------------------------------------------------- pieces
    def autocast(self):
        """Autocast context for the configured precision (a no-op for fp32)."""
        return precision_autocast(self.device, self.precision)

    @property
    def mftd_active(self) -> bool:
        """Whether the current step includes MFTD."""
        return self.step >= self.config.mftd_start_step

    def draw_mask(self, batch: int, n_tokens: int) -> torch.Tensor:
        """(B, N) mixing mask from the step's own generator (saved in :meth:`state_dict`)."""
        return self.model.random_mix_mask(batch, n_tokens, self.mask_generator, self.device)

    def compute_losses(
        self, latents: torch.Tensor, domain_index: torch.Tensor, mask: torch.Tensor | None = None,
        windows: torch.Tensor | None = None, paired_windows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher and student passes and the weighted loss (no optimizer update).

        The student's re-encoding (MFTD reconstructions and SiQC swaps) runs in chunks of
        ``config.reencode_chunk`` items whose gradients are taken at once (see
        :class:`~custom_nets.engines.ssl.reencode.StreamedReencodeLoss`); everything else stays in the autograd graph of the returned
        loss, on which the caller calls ``backward()`` once.

        Args:
            latents: (B, C, X, Y, Z) latent crops, B even.
            domain_index: (B,) domain of each crop.
            mask: (B, N) mixing mask; drawn from the step's generator when None.
            windows: (B, C, X', Y', Z') fixed centre window of each crop's volume, each side a multiple
                of the crop's; needed (only) with ``domain_window_weight``, ``domain_token_weight`` or
                ``paired_content_weight`` > 0.
            paired_windows: the same windows of another rendering of each volume's subject (same shape);
                needed (only) with ``paired_content_weight`` > 0.

        Returns:
            (total loss with gradient, dict of detached parts).
        """
        cfg = self.config
        x = latents.to(self.device, non_blocking=True).float()
        d = domain_index.to(self.device, non_blocking=True).long().view(-1)
        b = x.shape[0]
        if b < 2 or b % 2:
            raise ValueError(f"the batch must hold an even number (>= 2) of crops to pair i <-> B-1-i, got {b}")
        if d.shape[0] != b:
            raise ValueError(f"{d.shape[0]} domain indices for {b} crops")
        paired = cfg.paired_content_weight > 0
        if self.window_bank is not None or cfg.domain_token_weight > 0 or paired:
            if windows is None:
                raise ValueError("domain_window_weight, domain_token_weight and paired_content_weight > 0 need each "
                                 "volume's fixed window in the batch (meduet_ssl: set domain_window > 0, the window "
                                 "edge in latent voxels)")
            if windows.shape[0] != b:
                raise ValueError(f"{windows.shape[0]} windows for {b} crops")
            if paired:
                if paired_windows is None:
                    raise ValueError("paired_content_weight > 0 needs the batch's paired windows (meduet_ssl: set "
                                     "pair_key, the datalist key naming each volume's subject)")
                if paired_windows.shape != windows.shape:
                    raise ValueError(f"paired windows {tuple(paired_windows.shape)} differ from the windows "
                                     f"{tuple(windows.shape)}")
                # one encoder pass over both renderings' windows
                windows = torch.cat([windows, paired_windows.to(windows.device)])
            windows, cubes_per_window = window_cubes(windows.to(self.device, non_blocking=True).float(), x.shape[2:])
        else:
            windows = None  # a batch may carry windows that no loss reads
        grid = self.model.encoder.grid_of(x.shape[2:])
        if mask is None:
            mask = self.draw_mask(b, math.prod(grid))
        mask = mask.to(self.device).float()
        mftd, siqc = self.mftd_active, cfg.siqc
        cycle = cfg.swap_cycle_weight > 0
        zero = x.new_zeros(())
        with self.autocast():
            # teacher first: its activations are freed before the student's pass
            with record_function("meduet.teacher"):
                t_out = (self.teacher.forward_teacher(x, 1.0 - mask, clean=mftd or cycle, swap=siqc)
                         if (mftd or siqc or cycle) else {})
            with record_function("meduet.student"):
                # the clean-pass losses take the clean content from the mixture's own 2B encoder pass
                # (one forward through the wrapper, as DistributedDataParallel requires)
                clean = self.adversary is not None or cfg.domain_share_weight > 0 or self.domain_bank is not None
                s_out = self.student(x, mask, swap_styles=siqc, with_clean=clean, self_reconstruct=cfg.self_rec_weight > 0,
                                     windows=windows)
                clean_content = s_out.get("content")
        # losses in float32 (outside autocast)
        l_rec = demix_reconstruction_loss(s_out["pred"], self.model.patchify(x), mask)
        l_dom, l_dom_c, l_dom_s = domain_loss(s_out["domain_content"], s_out["domain_style"], d)
        total = cfg.weight_rec * l_rec + cfg.weight_domain * l_dom
        extra: dict[str, torch.Tensor] = {}
        if self.adversary is not None:
            reversal = dann_lambda(self.step / max(1, cfg.total_steps), cfg.clean_domain_gamma)
            ce_tok, ce_pool = self.adversary(clean_content, d, reversal)
            total = total + cfg.clean_domain_weight * (ce_tok + ce_pool)
            extra.update(clean_domain_token=ce_tok, clean_domain_pooled=ce_pool,
                         clean_domain_reversal=torch.tensor(reversal, device=self.device))
        if cfg.domain_share_weight > 0:
            l_share = between_domain_share_loss(clean_content, d)
            total = total + cfg.domain_share_weight * l_share
            extra["domain_share"] = l_share
        if self.domain_bank is not None:
            l_mean = self.domain_bank(clean_content, d)
            total = total + cfg.domain_mean_weight * l_mean
            extra["domain_mean"] = l_mean
        if windows is not None:
            # each window's tokens over all its cubes (equal token counts: the mean of the cubes' means)
            window_content = s_out["window_content"].reshape(-1, cubes_per_window * s_out["window_content"].shape[1],
                                                             s_out["window_content"].shape[-1])
            if paired:
                window_content, paired_content = window_content[:b], window_content[b:]
                l_paired = paired_content_loss(window_content, paired_content)
                total = total + cfg.paired_content_weight * l_paired
                extra["paired_content"] = l_paired
        if self.window_bank is not None:
            l_window = self.window_bank(window_content, d)
            total = total + cfg.domain_window_weight * l_window
            extra["domain_window"] = l_window
        if cfg.domain_token_weight > 0:
            # fresh directions each step, seeded by the step so that a resumed run draws the same ones
            directions = random_directions(window_content.shape[-1], cfg.domain_token_projections,
                                           cfg.seed * 1_000_003 + self.step, self.device)
            l_token = sliced_domain_quantile_loss(window_content, d, directions)
            total = total + cfg.domain_token_weight * l_token
            extra["domain_token"] = l_token
        if cfg.self_rec_weight > 0:
            l_self = (s_out["self_pred"].float() - self.model.patchify(x).float()).pow(2).mean()
            total = total + cfg.self_rec_weight * l_self
            extra["self_rec"] = l_self
        if cfg.decorrelation_weight > 0:
            l_decor = cross_correlation_loss(torch.cat([s_out["content1"], s_out["content2"]]),
                                             torch.cat([s_out["style1"], s_out["style2"]]))
            total = total + cfg.decorrelation_weight * l_decor
            extra["decorrelation"] = l_decor
        if cycle:
            cycle_c, cycle_s = swap_cycle_targets(t_out["content"], t_out["style"])

        # rows re-encoded by the student: [stream A; stream B] (MFTD), then [x12; x21] (SiQC)
        rows = ([s_out["pred"]] if mftd else []) + ([s_out["swap_pred"]] if siqc else [])
        siqc_offset = 2 * b if mftd else 0
        if mftd:
            targets_c, targets_s, weights = mftd_row_targets(t_out["content"], t_out["style"], mask)
        main_c = main_s = zero
        if siqc:
            # queries of groups [source 1, source 2] come from the mixture (items 0..2B of the 4B);
            # keys of all four groups from the teacher
            keys_c = pool_groups(t_out["content1"], t_out["content2"], t_out["swap_content"])
            keys_s = pool_groups(t_out["style1"], t_out["style2"], t_out["swap_style"])
            ids_c, ids_s = quadruplet_ids(b, self.device)
            first = torch.arange(2 * b, device=self.device)
            temp = cfg.siqc_temperature
            main_c = supcon_row_losses(pool_groups(s_out["content1"], s_out["content2"]), keys_c, ids_c, first, temp).sum()
            main_s = supcon_row_losses(pool_groups(s_out["style1"], s_out["style2"]), keys_s, ids_s, first, temp).sum()
            total = total + cfg.weight_siqc * (main_c + main_s) / (4 * b)

        def chunk_loss(content: torch.Tensor, style: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Weighted MFTD + SiQC contribution of re-encoded rows [start, stop) and its 4 raw sums."""
            parts = [zero] * 6  # MFTD content, MFTD style, SiQC content, SiQC style, cycle content, cycle style
            if mftd and start < 2 * b:
                hi = min(stop, 2 * b)
                parts[0], parts[1] = mftd_terms(
                    content[: hi - start], style[: hi - start], targets_c[start:hi], targets_s[start:hi], weights[start:hi]
                )
            lo = max(start, siqc_offset)
            if siqc and lo < stop:
                q_rows = torch.arange(lo, stop, device=content.device) - siqc_offset + 2 * b
                sl = slice(lo - start, stop - start)
                parts[2] = supcon_row_losses(pool_tokens(content[sl]), keys_c, ids_c, q_rows, cfg.siqc_temperature).sum()
                parts[3] = supcon_row_losses(pool_tokens(style[sl]), keys_s, ids_s, q_rows, cfg.siqc_temperature).sum()
                if cycle:
                    r = slice(lo - siqc_offset, stop - siqc_offset)
                    parts[4], parts[5] = swap_cycle_terms(content[sl], style[sl], cycle_c[r], cycle_s[r], 2 * b)
            loss = cfg.weight_mftd * (cfg.mftd_content_weight * parts[0] + parts[1])
            loss = loss + cfg.weight_siqc * (parts[2] + parts[3]) / (4 * b)
            loss = loss + cfg.swap_cycle_weight * (parts[4] + parts[5])
            return loss, torch.stack(parts)

        streamed = torch.zeros(6, device=self.device)
        if rows:
            grad_scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
            with record_function("meduet.reencode"):  # forward and backward of the re-encoding chunks
                loss_rows, streamed = streamed_reencode_loss(
                    self.model, torch.cat(rows), grid, chunk_loss, cfg.reencode_chunk, grad_scale, self.autocast
                )
            total = total + loss_rows
        l_mftd_c, l_mftd_s = streamed[0], streamed[1]
        l_mftd = cfg.mftd_content_weight * l_mftd_c + l_mftd_s
        l_siqc_c = (main_c.detach() + streamed[2]) / (4 * b)
        l_siqc_s = (main_s.detach() + streamed[3]) / (4 * b)
        parts = {
            "loss": total, "rec": l_rec, "domain": l_dom, "domain_content": l_dom_c, "domain_style": l_dom_s,
            "mftd": l_mftd, "mftd_content": l_mftd_c, "mftd_style": l_mftd_s,
            "siqc": l_siqc_c + l_siqc_s, "siqc_content": l_siqc_c, "siqc_style": l_siqc_s,
        }
        if cycle:
            extra.update(swap_cycle_content=streamed[4], swap_cycle_style=streamed[5])
        parts.update(extra)  # only the additions that are on, so the paper's outputs are unchanged
        return total, {k: v.detach().float() for k, v in parts.items()}

    # ---------------------------------------------------------------- the step
    def __call__(
        self, latents: torch.Tensor, domain_index: torch.Tensor, mask: torch.Tensor | None = None,
        windows: torch.Tensor | None = None, paired_windows: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One training step: losses, one backward, clipping, optimizer, lr schedule, EMA update.

        Args:
            latents: (B, C, X, Y, Z) latent crops, B even.
            domain_index: (B,) domain of each crop.
            mask: optional (B, N) mixing mask (drawn from the step's generator when None).
            windows: the volumes' fixed windows (:meth:`compute_losses`).
            paired_windows: the same windows of another rendering of each subject (:meth:`compute_losses`).

        Returns:
            Float losses ("loss", "rec", "domain", "mftd", "siqc" and their parts), "lr",
            "momentum", "grad_norm", "step" (the step just done, 0-based).
        """
        cfg = self.config
        self.student.train()
        self.teacher.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        total, parts = self.compute_losses(latents, domain_index, mask, windows, paired_windows)
        values = torch.stack(list(parts.values())).float().tolist()  # one synchronisation
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in zip(parts, values)
            ))
        with record_function("meduet.backward"):
            scaled_backward(total, self.scaler)
        del total
        with record_function("meduet.optimizer"):
            extra = [self.adversary_optimizer] if self.adversary_optimizer is not None else []
            if extra:
                self._average_adversary_gradients()  # outside DDP's module: averaged by hand
            grad_norm = clip_and_step(self.optimizer, self.model.parameters(), self.scaler, cfg.grad_clip,
                                      measure_norm=True, extra_optimizers=extra)
            for opt in extra:
                opt.zero_grad(set_to_none=True)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        momentum = cosine_momentum(self.step, cfg.total_steps, cfg.momentum_base, cfg.momentum_final)
        with record_function("meduet.ema"):
            ema_update(self.teacher, self.model, momentum)
        out = dict(zip(parts, values))
        out.update(lr=float(lr), momentum=float(momentum), grad_norm=float(grad_norm), step=float(self.step))
        self.step += 1
        return out

    def _average_adversary_gradients(self) -> None:
        """Average the adversary's gradients over processes (it is not inside the DDP wrapper)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for p in self.adversary.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def iteration_update(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, float]:
        """MONAI ``SupervisedTrainer(iteration_update=...)`` hook: one step on ``batchdata["latent"]``
        and ``batchdata["domain_index"]`` (and ``batchdata["window"]``, ``batchdata["paired_window"]``
        where the dataset adds them); the returned losses become ``engine.state.output``."""
        return self(batchdata["latent"], batchdata["domain_index"], windows=batchdata.get("window"),
                    paired_windows=batchdata.get("paired_window"))

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimizer, scheduler, scaler, step, random states."""
        rng = {"torch": torch.get_rng_state(), "mask_generator": self.mask_generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "network": self.model.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": rng,
            "config": asdict(self.config),
            **({"adversary": self.adversary.state_dict(), "adversary_optimizer": self.adversary_optimizer.state_dict()}
               if self.adversary is not None else {}),
            **({"domain_bank": self.domain_bank.state_dict()} if self.domain_bank is not None else {}),
            **({"window_bank": self.window_bank.state_dict()} if self.window_bank is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (strict for the networks)."""
        self.model.load_state_dict(state["network"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if self.adversary is not None and "adversary" in state:
            self.adversary.load_state_dict(state["adversary"])
            self.adversary_optimizer.load_state_dict(state["adversary_optimizer"])
        if self.domain_bank is not None and "domain_bank" in state:
            self.domain_bank.load_state_dict(state["domain_bank"])
        if self.window_bank is not None and "window_bank" in state:
            self.window_bank.load_state_dict(state["window_bank"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "mask_generator" in rng:
            self.mask_generator.set_state(rng["mask_generator"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        saved = state.get("config")
        if saved is not None and dict(saved) != asdict(self.config):
            logger.info("resuming with a changed step configuration: %s -> %s", saved, asdict(self.config))
