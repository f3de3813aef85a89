"""The MAISI CT autoencoder (MONAI ``AutoencoderKlMaisi``): factory, weight loading, tiled encode/decode.

Sections: size factories, construction, checkpoints (own stage checkpoints and MONAI's published
MAISI weights), tiling (overlapping tiles blended with a Gaussian window), encode / decode.

Shapes: an image ``(B, 1, X, Y, Z)`` with X, Y, Z multiples of 4 encodes to a latent
``(B, 4, X/4, Y/4, Z/4)``; 96^3 voxels -> 4 x 24^3.

Command line (imports MONAI's published MAISI VAE weights as a meduet_vae stage checkpoint)::

    python -m custom_nets.nets.vae import-maisi --src models/autoencoder.pt --out models/model.pt
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from custom_nets.utils.checkpoint import (
    check_state_dict,
    load_stage_network,
    meta_path,
    read_stage_meta,
    save_stage_checkpoint,
)
from custom_nets.utils.errors import CheckpointError
from custom_nets.utils.hardware import cpu_has_native_bf16

STAGE = "meduet_vae"
DOWNSAMPLE = 4  # two stride-2 downsamplings per axis

# ---------------------------------------------------------------------------------------------
# Size factories
# ---------------------------------------------------------------------------------------------

#: Constructor arguments that change the architecture (and so the state_dict). Recorded in model.json.
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # MAISI CT VAE as published in MONAI's maisi_ct_generative bundle (~20.9 M parameters).
    "paper": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 4,
        "num_channels": [64, 128, 256],
        "num_res_blocks": [2, 2, 2],
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_convtranspose": False,
    },
    # Same architecture family, small enough to train for a few steps on a 2-core CPU.
    "demo": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 4,
        "num_channels": [8, 16, 16],
        "num_res_blocks": [1, 1, 1],
        "norm_num_groups": 4,
        "norm_eps": 1e-6,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_convtranspose": False,
    },
}

#: Constructor arguments that only change how the forward pass runs (state_dicts are identical).
RUNTIME_KEYS = ("norm_float16", "num_splits", "dim_split", "print_info", "save_mem", "use_checkpointing",
                "use_flash_attention")


def vae_config(name: str = "paper") -> dict[str, Any]:
    """Architecture arguments of a named size (``"paper"`` or ``"demo"``), as a fresh dict."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE size {name!r}; expected one of {sorted(VAE_CONFIGS)}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in VAE_CONFIGS[name].items()}


def architecture_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of constructor arguments that defines the state_dict (what model.json records)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in args.items() if k not in RUNTIME_KEYS}


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def maisi_vae(size: str = "paper", **overrides: Any) -> torch.nn.Module:
    """Build a MONAI ``AutoencoderKlMaisi``.

    Args:
        size: named architecture (see :data:`VAE_CONFIGS`); ``overrides`` replace single arguments.
        overrides: any ``AutoencoderKlMaisi`` argument. Runtime defaults here: ``norm_float16=False``
            (MONAI's float16 GroupNorm crashes on CPU; the flag does not change the state_dict),
            ``num_splits=1`` (MAISI splits convolutions to save GPU memory; tiling does that here).

    Returns:
        The network (training mode, float32).
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    args: dict[str, Any] = {**vae_config(size), "norm_float16": False, "num_splits": 1, "dim_split": 0}
    args.update(overrides)
    channels, groups = list(args["num_channels"]), int(args["norm_num_groups"])
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"num_channels {channels} must all be divisible by norm_num_groups={groups} (not: {bad})")
    if len(args["num_res_blocks"]) != len(channels) or len(args["attention_levels"]) != len(channels):
        raise ValueError("num_res_blocks and attention_levels need one entry per num_channels level")
    net = AutoencoderKlMaisi(**args)
    net.meduet_network_args = architecture_args(args)  # read back by network_args() for model.json
    return net


def vae_for_checkpoint(ckpt_path: str | Path | None, size: str = "paper", **runtime: Any) -> torch.nn.Module:
    """An untrained VAE shaped like the checkpoint's ``model.json`` records, or of ``size`` when there is none yet.

    Lets a config build its network before the checkpoint exists (e.g. when checking a fresh clone);
    loading the weights later (strictly) is what fails, with a message, if they are still missing.
    """
    if ckpt_path is not None and meta_path(ckpt_path).is_file():
        meta = read_stage_meta(ckpt_path, STAGE)
        if isinstance(meta.get("network"), Mapping):
            return maisi_vae(**{**meta["network"], **runtime})
    return maisi_vae(size, **runtime)


def network_args(net: torch.nn.Module) -> dict[str, Any]:
    """Architecture arguments of a network built by :func:`maisi_vae` (what model.json records)."""
    args = getattr(net, "meduet_network_args", None)
    if args is None:
        raise ValueError("network was not built by custom_nets.nets.vae.maisi_vae; its arguments are unknown")
    return dict(args)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def load_vae(ckpt_path: str | Path, device: str | torch.device = "cpu", **runtime: Any) -> tuple[torch.nn.Module, dict]:
    """Build the VAE recorded in a meduet_vae ``model.json`` and load ``model.pt`` strictly.

    Args:
        ckpt_path: ``bundles/meduet_vae/models/model.pt`` (or any meduet_vae stage checkpoint).
        device: where to put the network.
        runtime: runtime-only arguments (e.g. ``norm_float16=True`` on CUDA, ``num_splits``).

    Returns:
        ``(network in eval mode without gradients, metadata dict)``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        runtime["norm_float16"] = False
    return load_stage_network(ckpt_path, STAGE, lambda args: maisi_vae(**{**args, **runtime}), device)


#: Keys under which training scripts commonly nest a state_dict.
_NESTING_KEYS = ("state_dict", "model", "autoencoder", "autoencoder_state_dict", "vae", "network", "net",
                 "model_state_dict", "ema")
#: Prefixes added by wrappers (DDP, torch.compile) or by saving a parent module.
_PREFIXES = ("module.", "_orig_mod.", "autoencoder.", "vae.", "model.", "network.", "net.")


def _unnest(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Descend through ``{"state_dict": {...}}``-style nesting until a mapping of tensors is found."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        nested = [k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{source}: no state_dict of tensors found (top-level keys: {keys})")


def map_state_dict_keys(state_dict: Mapping[str, torch.Tensor], expected: Sequence[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``autoencoder.``, ...) shared by every key but absent in ``expected``."""
    sd = dict(state_dict)
    expected_set = set(expected)
    changed = True
    while changed and not set(sd) <= expected_set:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def load_maisi_weights(net: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load MONAI's published MAISI VAE weights (maisi_ct_generative ``models/autoencoder*.pt``) strictly.

    Accepts a plain state_dict, one nested under common keys (``state_dict``, ``model``,
    ``autoencoder``, ...) and keys with wrapper prefixes (``module.``, ``autoencoder.``, ...).

    Args:
        net: a network built with :func:`maisi_vae` (paper size for the published weights).
        path: the ``.pt`` file.

    Returns:
        ``net`` with the weights loaded.

    Raises:
        CheckpointError: the file is missing or unreadable, or any tensor is missing, unexpected
            or of another shape (all listed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: MAISI VAE weights not found; fetch them with `python -m monai.bundle download_large_files "
            f"--bundle_path bundles/meduet_vae` (see bundles/meduet_vae/large_files.yml)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated downloads
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only checkpoint ({e})") from e
    sd = map_state_dict_keys(_unnest(obj, str(path)), list(net.state_dict()))
    check_state_dict(sd, net, path, STAGE)
    net.load_state_dict(sd, strict=True)
    return net


def import_maisi_weights(src: str | Path, out: str | Path, **meta: Any) -> dict[str, Any]:
    """Load MAISI weights into a paper-size VAE and save them as a meduet_vae stage checkpoint.

    Args:
        src: MONAI's published MAISI autoencoder file.
        out: destination ``model.pt`` (``model.json`` is written beside it).
        meta: extra metadata (e.g. ``scale_factor``).

    Returns:
        The metadata written.
    """
    net = load_maisi_weights(maisi_vae("paper"), src)
    return save_stage_checkpoint(
        net.state_dict(), out, STAGE, network=network_args(net), latent_channels=int(net.latent_channels),
        source=f"MAISI CT VAE weights from {Path(src).name} (MONAI maisi_ct_generative)", **meta,
    )


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised inside a forward pass once the statistics of the layer being collected are summed."""


class GlobalGroupNorm:
    """Make GroupNorm layers normalise with whole-volume statistics while a network runs on tiles.

    GroupNorm normalises with the mean and variance of its whole input, so a network run on a tile
    normalises differently from the same network run on the whole volume: tiles disagree with each
    other (stitch artefacts) and with an untiled pass. Inside this context manager the given layers
    normalise with frozen statistics once they have them, and :meth:`collect` prepares one layer to
    accumulate the mean and variance of its input over a tile's *core* region (the cores of a pass
    partition the volume, so the totals are whole-volume statistics) and then stop the forward
    pass. Collecting the layers one by one, in execution order, with the earlier ones frozen, gives
    exactly the statistics of an untiled pass.

    Args:
        norms: the GroupNorm layers (MONAI's ``MaisiGroupNorm3D`` included), in execution order.
    """

    def __init__(self, norms: Sequence[torch.nn.GroupNorm]) -> None:
        self.norms = list(norms)
        self.frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.collecting: int | None = None
        self.sums: list | None = None
        self.core: tuple[tuple[int, int], ...] | None = None  # core region in tile-input voxels
        self.tile_shape: tuple[int, ...] | None = None

    def __enter__(self) -> GlobalGroupNorm:
        for i, m in enumerate(self.norms):
            m.forward = self._forward_fn(i, m)  # an instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self.norms:
            m.__dict__.pop("forward", None)

    def collect(self, index: int) -> None:
        """Start summing the input of layer ``index`` (all earlier layers must be frozen)."""
        self.collecting, self.sums = index, None

    def freeze(self) -> None:
        """Turn the sums of the layer being collected into its frozen statistics."""
        if self.collecting is None or self.sums is None:
            raise RuntimeError("no statistics were collected")
        mean, m2, n = self.sums
        self.frozen[self.collecting] = (mean, (m2 / n).clamp_min(0))
        self.collecting, self.sums = None, None

    def _forward_fn(self, index: int, m: torch.nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            b, c = x.shape[:2]
            xg = x.reshape(b, m.num_groups, -1)
            if index == self.collecting:
                self._accumulate(x.reshape(b, m.num_groups, c // m.num_groups, *x.shape[2:]))
                raise _StopForward
            if index in self.frozen:
                mean, var = (t.to(x.device, torch.float32) for t in self.frozen[index])
            else:
                xf = xg.float()
                mean, var = xf.mean(-1), xf.var(-1, unbiased=False)
            y = xg.float() - mean[..., None]  # one new tensor; the rest is in place (tiles are large)
            y.mul_(torch.rsqrt(var[..., None] + m.eps))
            y = y.reshape(x.shape)
            if m.affine:
                shape = (1, c) + (1,) * (x.ndim - 2)
                y.mul_(m.weight.reshape(shape)).add_(m.bias.reshape(shape))
            # under autocast a normalised activation stays float32, as MAISI's own GroupNorm returns it
            return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

        return forward

    def _accumulate(self, xg: torch.Tensor) -> None:
        """Merge the per-group mean and variance of ``xg`` (B, G, C/G, *spatial) over the core region
        into the running totals (Chan et al.'s pairwise update: no float64 copy of the activations)."""
        if self.core is None or self.tile_shape is None:
            raise RuntimeError("GlobalGroupNorm.core and .tile_shape must be set before each tile")
        spatial = xg.shape[3:]
        region = tuple(slice(lo * n // t, hi * n // t) for (lo, hi), n, t in zip(self.core, spatial, self.tile_shape))
        core = xg[(slice(None), slice(None), slice(None), *region)]
        var, mean = torch.var_mean(core.float(), dim=tuple(range(2, core.ndim)), unbiased=False)
        n = core[0, 0].numel()
        mean, m2 = mean.double(), var.double() * n
        if self.sums is None:
            self.sums = [mean, m2, n]
            return
        mean_a, m2_a, n_a = self.sums
        total = n_a + n
        delta = mean - mean_a
        self.sums = [mean_a + delta * (n / total), m2_a + m2 + delta**2 * (n_a * n / total), total]


def partition_tiles(size: int, core: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Cores that partition ``[0, size)``, each widened by ``halo`` on both sides (clipped to the axis).

    Returns:
        ``(tile_start, tile_stop, core_start, core_stop)`` per tile, in axis voxels.
    """
    return [(max(0, lo - halo), min(size, lo + core + halo), lo, min(lo + core, size)) for lo in range(0, size, core)]


def _resampling(block: torch.nn.Module) -> Fraction:
    """Output/input size ratio of one MAISI block (1/2 for a downsampling block, 2 for an upsampling one)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiDownsample, MaisiUpsample

    if isinstance(block, MaisiDownsample):
        return Fraction(1, 2)
    if isinstance(block, MaisiUpsample):
        return Fraction(2)
    return Fraction(1)


def _has_norm(block: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.GroupNorm) for m in block.modules())


class ResBlockFirstHalf(torch.nn.Module):
    """First half of a MAISI ResBlock as its own stage unit: ``x -> cat[conv1(silu(norm1(x))), x]``.

    The block input rides along in the channels so that :class:`ResBlockSecondHalf` can add the
    residual; the two halves compute exactly what the block computes.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.norm1, self.conv1 = block.norm1, block.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        return torch.cat([h, x], dim=1)  # promoted to the wider dtype: the residual is not rounded


class ResBlockSecondHalf(torch.nn.Module):
    """Second half of a MAISI ResBlock: ``cat[h, x] -> shortcut(x) + conv2(silu(norm2(h)))``."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.norm2, self.conv2 = block.norm2, block.conv2
        self.hidden = int(block.out_channels)  # channels of h in the stored cat[h, x]
        self.shortcut = block.nin_shortcut if block.in_channels != block.out_channels else torch.nn.Identity()

    def forward(self, hx: torch.Tensor) -> torch.Tensor:
        h, x = hx[:, : self.hidden], hx[:, self.hidden :]
        return self.shortcut(x) + self.conv2(torch.nn.functional.silu(self.norm2(h)))


def split_res_blocks(blocks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The block list with every MAISI ResBlock replaced by its two halves (one GroupNorm each)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock

    out: list[torch.nn.Module] = []
    for blk in blocks:
        out += [ResBlockFirstHalf(blk), ResBlockSecondHalf(blk)] if isinstance(blk, MaisiResBlock) else [blk]
    return out


GRANULARITIES = ("resolution", "block", "norm")


def split_stages(blocks: Sequence[torch.nn.Module], granularity: str = "resolution") -> list[list[torch.nn.Module]]:
    """Split a MAISI block list into stages for :func:`run_stage_exact`.

    Each stage's input is kept whole in memory, and the GroupNorm statistics of a stage cost one
    partial pass per GroupNorm layer, each recomputing the stage up to that layer.

    Args:
        blocks: the block list.
        granularity: ``"resolution"``: stages end at a downsampling block or start at an upsampling
            one, which keeps every stored input at the lowest resolution (least memory, but every
            statistics pass recomputes the stage's full-resolution convolutions). ``"block"``: each
            stage holds at most one block with GroupNorm layers, blocks without any attach to the
            stage before them; statistics passes then recompute at most one block (about 3x less
            compute on the paper-size decoder), at the price of whole volumes stored at the
            resolution and width of each block's output. ``"norm"``: ``"block"`` after splitting
            each ResBlock in two (:func:`split_res_blocks`), so that every stage starts at its
            only GroupNorm: no convolution after the first is computed twice, at the price of
            storing the ResBlock input beside the first half's output (twice the width).

    Returns:
        The stages, in order.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "norm":
        blocks, granularity = split_res_blocks(blocks), "block"
    stages: list[list[torch.nn.Module]] = [[]]
    for blk in blocks:
        if granularity == "block":
            if _has_norm(blk) and any(_has_norm(b) for b in stages[-1]):
                stages.append([])
        elif _resampling(blk) > 1 and stages[-1]:
            stages.append([])
        stages[-1].append(blk)
        if granularity == "resolution" and _resampling(blk) < 1:
            stages.append([])
    return [st for st in stages if st]


def _stage_halo(stage: Sequence[torch.nn.Module]) -> int:
    """Receptive-field radius of a stage in input voxels (each conv with kernel k adds at most k // 2)."""
    radius = 0
    for blk in stage:
        radius += sum(max(m.kernel_size) // 2 for m in blk.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        radius += 1 if _resampling(blk) != 1 else 0  # padding / interpolation at the resampling step
    return radius


def _stage_scale(stage: Sequence[torch.nn.Module]) -> Fraction:
    """Output over input resolution of a stage (product of its blocks' resampling factors)."""
    scale = Fraction(1)
    for blk in stage:
        scale *= _resampling(blk)
    return scale


def _stage_tiling(stage: Sequence[torch.nn.Module], tile: int) -> tuple[Fraction, int, int, int]:
    """``(scale, align, halo, core)`` of a stage tiled with edge ``tile`` (input voxels, halo included).

    Tile starts must land on the coarser grid of a downsampling stage (``align``); the halo covers
    the receptive field, rounded up to that grid; the core is what remains of the tile, at least
    one grid step.
    """
    scale = _stage_scale(stage)
    align = scale.denominator
    halo = -(-(_stage_halo(stage) + 1) // align) * align
    core = max(align, (tile - 2 * halo) // align * align)
    return scale, align, halo, core


def _stage_tile(stage: Sequence[torch.nn.Module], roi: int, res: Fraction) -> int:
    """Tile edge of a stage at resolution ``res``: ``roi`` scaled, but cores kept wider than the halos."""
    return max(int(roi * res), 6 * (_stage_halo(stage) + 2))


def _crop(t: torch.Tensor, sl: Sequence[slice]) -> torch.Tensor:
    return t[(slice(None), slice(None), *sl)]


def _progress(items: list, desc: str, enabled: bool) -> Any:
    if not enabled:
        return items

    return tqdm(items, desc=desc, leave=False)


def _collect_statistics(
    seq: torch.nn.Module,
    gn: GlobalGroupNorm,
    parts: Sequence[tuple[tuple[int, int, int, int], ...]],
    crop: Callable[[Sequence[slice]], torch.Tensor],
    device: torch.device,
    progress: bool,
) -> None:
    """Freeze whole-volume statistics of every GroupNorm of ``gn``, one pass over all tiles per layer.

    Args:
        seq: the stage.
        gn: its GroupNorm layers, patched (inside the ``GlobalGroupNorm`` context).
        parts: per tile and axis ``(tile_start, tile_stop, core_start, core_stop)``; the cores partition the volume.
        crop: the stage input's region for a tuple of slices.
        device: where the network runs.
        progress: tqdm bars.
    """
    for i in range(len(gn.norms)):
        gn.collect(i)
        for part in _progress(parts, f"GroupNorm statistics {i + 1}/{len(gn.norms)}", progress):
            gn.tile_shape = tuple(t1 - t0 for t0, t1, _, _ in part)
            gn.core = tuple((c0 - t0, c1 - t0) for t0, _, c0, c1 in part)
            try:
                seq(crop([slice(t0, t1) for t0, t1, _, _ in part]).to(device, torch.float32))
            except _StopForward:
                pass
        gn.freeze()


def run_stage_exact(
    stage: Sequence[torch.nn.Module],
    x: torch.Tensor,
    tile: int,
    device: torch.device,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Run one stage on a whole volume in tiles, exactly as an untiled pass would.

    Tiles are cores that partition the volume, widened by a halo that covers the stage's receptive
    field; GroupNorm layers get whole-volume statistics (:class:`GlobalGroupNorm`, one collect pass
    per layer, each stopping at that layer); the final pass keeps each tile's core.

    Args:
        stage: blocks run in sequence (from :func:`split_stages`).
        x: ``(B, C, *spatial)`` whole-volume input (on any device; tiles are moved to ``device``).
        tile: tile edge in input voxels (halo included).
        device: where the network runs.
        store_dtype: dtype of the whole-volume output kept between stages.
        progress: tqdm bars.

    Returns:
        The stage output for the whole volume, on ``x``'s device.
    """
    scale, align, halo, core = _stage_tiling(stage, tile)
    size = list(x.shape[2:])
    if any(n % align for n in size):
        raise ValueError(f"stage input size {size} must be a multiple of {align}")
    axes = [partition_tiles(n, core, halo) for n in size]
    parts = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    seq = torch.nn.Sequential(*stage)
    norms = [m for blk in stage for m in blk.modules() if isinstance(m, torch.nn.GroupNorm)]
    out: torch.Tensor | None = None
    with GlobalGroupNorm(norms) as gn:
        _collect_statistics(seq, gn, parts, lambda sl: _crop(x, sl), device, progress)
        for part in _progress(parts, "tiles", progress):
            y = seq(_crop(x, [slice(t0, t1) for t0, t1, _, _ in part]).to(device, torch.float32))
            if out is None:
                out = torch.empty([x.shape[0], y.shape[1], *[int(n * scale) for n in size]], dtype=store_dtype,
                                  device=x.device)
            src = [slice(int((c0 - t0) * scale), int((c1 - t0) * scale)) for t0, _, c0, c1 in part]
            dst = [slice(int(c0 * scale), int(c1 * scale)) for _, _, c0, c1 in part]
            _crop(out, dst).copy_(_crop(y, src))
    assert out is not None
    return out


def run_blocks_exact(
    blocks: Sequence[torch.nn.Module],
    x: torch.Tensor,
    roi: int,
    device: torch.device,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    granularity: str = "resolution",
) -> torch.Tensor:
    """Run a MAISI block list stage by stage with :func:`run_stage_exact`.

    Args:
        blocks: e.g. ``[*vae.encoder.blocks, vae.quant_conv_mu]``.
        x: ``(B, C, *spatial)`` whole-volume input.
        roi: tile edge at the resolution of ``x``; deeper stages scale it with their resolution.
        device: where the network runs.
        store_dtype: dtype of the intermediate whole volumes.
        progress: tqdm bars.
        granularity: how the blocks are split into stages (:func:`split_stages`).
    """
    res = Fraction(1)
    for stage in split_stages(blocks, granularity):
        x = run_stage_exact(stage, x, _stage_tile(stage, roi, res), device, store_dtype=store_dtype, progress=progress)
        res *= _stage_scale(stage)
    return x


# ---------------------------------------------------------------------------------------------
# Low-memory exact tiling: whole volumes as slabs, each stage replacing its input slab by slab
# ---------------------------------------------------------------------------------------------


#: Rows of a stage's output per slab in the low-memory path (:func:`run_stage_slabs`). Thin slabs
#: let the next stage free its input a few rows at a time; a full-resolution row of the paper VAE's
#: 128-channel volume is 10.5 MB in bfloat16.
SLAB_ROWS = 4


class SlabVolume:
    """A whole volume ``(B, C, X, Y, Z)`` held as slabs along X, each its own tensor.

    A stage reads its input through :meth:`crop` and frees the rows it no longer needs with
    :meth:`drop_before`, so that the input shrinks while the output grows: a stage holds about one
    volume plus one slab instead of its whole input and its whole output at once.

    Args:
        slabs: tensors ``(B, C, x_i, Y, Z)`` in X order (may be empty; :meth:`append` adds more).
        start: X index of the first slab's first row.
    """

    def __init__(self, slabs: Sequence[torch.Tensor] = (), start: int = 0) -> None:
        self.slabs: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.stop = start  # X index after the last row held
        for s in slabs:
            self.append(s)

    def append(self, slab: torch.Tensor) -> None:
        """Add the rows that follow the last slab."""
        if self.slabs and slab.shape[:2] + slab.shape[3:] != self.slabs[0].shape[:2] + self.slabs[0].shape[3:]:
            raise ValueError(f"slab {tuple(slab.shape)} does not continue slabs of {tuple(self.slabs[0].shape)}")
        self.slabs.append(slab)
        self.starts.append(self.stop)
        self.stop += slab.shape[2]

    @property
    def first_row(self) -> int:
        """X index of the first row still held."""
        return self.starts[0] if self.starts else self.stop

    def spatial_shape(self, rows: int) -> list[int]:
        """``[rows, Y, Z]``: spatial size of a volume of ``rows`` rows along X."""
        return [rows, *self.slabs[0].shape[3:]]

    def nbytes(self) -> int:
        """Bytes of the rows held."""
        return sum(s.numel() * s.element_size() for s in self.slabs)

    def crop(self, sl: Sequence[slice]) -> torch.Tensor:
        """The region ``[:, :, sl[0], sl[1], sl[2]]`` (a view when it lies in one slab, else a new tensor).

        Raises:
            IndexError: some of the rows were dropped or are not there yet.
        """
        lo, hi = sl[0].start, sl[0].stop
        if lo < self.first_row or hi > self.stop:
            raise IndexError(f"rows [{lo}, {hi}) requested, rows [{self.first_row}, {self.stop}) held")
        pieces = []
        for s, a in zip(self.slabs, self.starts):
            b = a + s.shape[2]
            if b > lo and a < hi:
                pieces.append(_crop(s, [slice(max(lo, a) - a, min(hi, b) - a), *sl[1:]]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def drop_before(self, row: int) -> None:
        """Free the rows before ``row``: slabs that end there go; a slab across it keeps a copy of its rows
        from ``row`` on (the halo rows later tiles still read), so the rest of it is freed too."""
        while self.slabs and self.starts[0] + self.slabs[0].shape[2] <= row:
            self.slabs.pop(0)
            self.starts.pop(0)
        if self.slabs and self.starts[0] < row:
            self.slabs[0] = self.slabs[0][:, :, row - self.starts[0]:].clone()
            self.starts[0] = row

    def tensor(self) -> torch.Tensor:
        """The whole volume as one tensor (all rows must still be held)."""
        if self.first_row != 0:
            raise IndexError(f"rows before {self.first_row} were dropped")
        return self.slabs[0] if len(self.slabs) == 1 else torch.cat(self.slabs, dim=2)


def row_cores(size: int, core: int, align: int = 1) -> list[tuple[int, int]]:
    """Cores that partition ``[0, size)`` along X for :func:`run_stage_slabs`, growing from ``core / 4``.

    At the start of a stage its whole input is held; the first output slab comes on top of it, so the
    first cores are thin (less memory at that moment) and later ones, while the input has shrunk,
    double up to ``core`` (fewer halos to recompute).

    Returns:
        ``(start, stop)`` per core, multiples of ``align`` (but the last stop, ``size``).
    """
    cores, lo = [], 0
    width = max(align, core // 4 // align * align)
    while lo < size:
        cores.append((lo, min(size, lo + width)))
        lo += width
        width = min(core, 2 * width)
    return cores


def detach_resampling(stages: Sequence[Sequence[torch.nn.Module]]) -> list[list[torch.nn.Module]]:
    """Put each up/downsampling block in a stage of its own.

    A resampling block has no GroupNorm, so its stage needs no statistics pass; alone, its halo is
    its own (3 voxels), not that of the ResBlock before it too, and its tile can be sized for its
    larger output (the tile cap of :func:`run_blocks_slabs`) without shrinking the ResBlock's tile.
    """
    out: list[list[torch.nn.Module]] = []
    for stage in stages:
        current: list[torch.nn.Module] = []
        for blk in stage:
            if _resampling(blk) != 1:
                out += [current] if current else []
                out.append([blk])
                current = []
            else:
                current.append(blk)
        out += [current] if current else []
    return out


def run_stage_slabs(
    stage: Sequence[torch.nn.Module],
    vol: SlabVolume,
    tile: int,
    device: torch.device,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[SlabVolume, int]:
    """:func:`run_stage_exact` on a :class:`SlabVolume`, giving up the input as the output is written.

    The tiles, halos and GroupNorm statistics passes are those of :func:`run_stage_exact` (the
    statistics passes read the whole input). The final pass runs row of tiles by row of tiles along X
    (:func:`row_cores`); each row's output is one new slab, after which the input rows that no later
    tile's halo reaches are freed (``vol`` is emptied by the end).

    Args:
        stage: blocks run in sequence.
        vol: the stage input (consumed).
        tile: tile edge in input voxels (halo included).
        device: where the network runs.
        store_dtype: dtype of the output slabs.
        progress: tqdm bars.

    Returns:
        ``(output volume, most bytes held by input and output slabs together at any time)``.
    """
    scale, align, halo, core = _stage_tiling(stage, tile)
    size = vol.spatial_shape(vol.stop - vol.first_row)
    if vol.first_row != 0 or any(n % align for n in size):
        raise ValueError(f"stage input must be whole (first row {vol.first_row}) with size {size} a multiple of {align}")
    rows = [(max(0, lo - halo), min(size[0], hi + halo), lo, hi) for lo, hi in row_cores(size[0], core, align)]
    cols = [partition_tiles(n, core, halo) for n in size[1:]]
    seq = torch.nn.Sequential(*stage)
    norms = [m for blk in stage for m in blk.modules() if isinstance(m, torch.nn.GroupNorm)]
    out = SlabVolume()
    peak = vol.nbytes()
    with GlobalGroupNorm(norms) as gn:
        parts = [(a, b, c) for a in rows for b in cols[0] for c in cols[1]]
        _collect_statistics(seq, gn, parts, vol.crop, device, progress)
        for k, row in enumerate(_progress(rows, "rows of tiles", progress)):
            # the row's output as thin slabs of their own: the next stage frees them as it goes, and a
            # slab across the rows it still needs costs a copy of at most SLAB_ROWS - 1 rows
            out_rows = int((row[3] - row[2]) * scale)
            bounds = [(r, min(out_rows, r + SLAB_ROWS)) for r in range(0, out_rows, SLAB_ROWS)]
            slabs: list[torch.Tensor] = []
            for part in [(row, b, c) for b in cols[0] for c in cols[1]]:
                y = seq(vol.crop([slice(t0, t1) for t0, t1, _, _ in part]).to(device, torch.float32))
                if not slabs:
                    yz = [int(n * scale) for n in size[1:]]
                    slabs = [torch.empty([y.shape[0], y.shape[1], r1 - r0, *yz], dtype=store_dtype,
                                         device=vol.slabs[0].device) for r0, r1 in bounds]
                x0 = int((row[2] - row[0]) * scale)  # first core row in the tile's output
                src_yz = [slice(int((c0 - t0) * scale), int((c1 - t0) * scale)) for t0, _, c0, c1 in part[1:]]
                dst_yz = [slice(int(c0 * scale), int(c1 * scale)) for _, _, c0, c1 in part[1:]]
                for slab, (r0, r1) in zip(slabs, bounds):
                    _crop(slab, [slice(None), *dst_yz]).copy_(_crop(y, [slice(x0 + r0, x0 + r1), *src_yz]))
                del y  # the tile's output: freed before the next tile is computed
            for slab in slabs:
                out.append(slab)
            peak = max(peak, vol.nbytes() + out.nbytes())
            vol.drop_before(rows[k + 1][0] if k + 1 < len(rows) else size[0])
    return out, peak


def run_blocks_slabs(
    blocks: Sequence[torch.nn.Module],
    x: torch.Tensor,
    roi: int,
    device: torch.device,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    granularity: str = "block",
    tile_cap: int | None = 64,
) -> tuple[torch.Tensor, int]:
    """:func:`run_blocks_exact` with each stage replacing its input by its output slab by slab.

    The same numbers as :func:`run_blocks_exact` (both equal one untiled pass up to float rounding),
    holding about one stored volume plus one slab per stage instead of two volumes
    (:func:`run_stage_slabs`). Resampling blocks get stages of their own (:func:`detach_resampling`)
    except with the "resolution" split, whose stages start at them on purpose.

    Args:
        blocks, x, roi, device, store_dtype, progress, granularity: as for :func:`run_blocks_exact`.
        tile_cap: largest tile edge in *output* voxels of a stage (an upsampling stage's tile is
            half of it in its input). A tile's activations are several float32 copies of it (about
            1.5 kB a voxel for a 128-channel ResBlock): the cap bounds them where the stored volumes
            are largest. ``None``: tiles as in :func:`run_blocks_exact`.

    Returns:
        ``(output (B, C', *spatial) in store_dtype, most bytes of stored volumes held at once)``.
    """
    stages = split_stages(blocks, granularity)
    if granularity != "resolution":
        stages = detach_resampling(stages)
    vol = SlabVolume([x])
    peak, res = 0, Fraction(1)
    for stage in stages:
        scale = _stage_scale(stage)
        tile = _stage_tile(stage, roi, res)
        if tile_cap is not None:
            # keep the tile's output edge (tile * scale) within the cap, but the core wider than the halo
            tile = min(tile, max(int(tile_cap / scale), 4 * (_stage_halo(stage) + 2)))
        vol, stage_peak = run_stage_slabs(stage, vol, tile, device, store_dtype=store_dtype, progress=progress)
        peak = max(peak, stage_peak)
        res *= scale
    return vol.tensor(), peak


def gaussian_window(shape: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> torch.Tensor:
    """Separable Gaussian weights peaking at the tile centre, ``floor`` times the peak at the border."""
    w = torch.ones(())
    for n in shape:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        w = w[..., None] * torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)
    return (w / w.max()).clamp_min(floor).float()


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of overlapping tiles along one axis; the last tile ends at ``size``."""
    if tile >= size:
        return [0]
    return sorted(set(list(range(0, size - tile, stride)) + [size - tile]))


def blended_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    roi: Sequence[int],
    overlap: float,
    scale: tuple[int, int],
    progress: bool = False,
) -> torch.Tensor:
    """Sliding-window alternative: each tile normalises by itself; outputs blend with Gaussian weights.

    This is what MAISI's own sliding-window decoding does. Tiles disagree where their GroupNorm
    statistics differ; the Gaussian weights hide the tile borders but the result depends on the
    tiling. :func:`run_blocks_exact` does not have that problem.

    Args:
        fn: maps a tile ``(B, C, *t)`` to ``(B, C', *(t * num // den))``.
        x: ``(B, C, X, Y, Z)``, each axis a multiple of ``den``.
        roi: tile size in input voxels (multiples of ``den``; clipped to the volume).
        overlap: fraction of a tile shared with its neighbour.
        scale: output/input size ratio ``(num, den)``.
        progress: tqdm bar.
    """
    num, den = scale
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    size = list(x.shape[2:])
    tile = [min(int(r), n) for r, n in zip(roi, size)]
    if any(n % den for n in size) or any(t % den for t in tile):
        raise ValueError(f"volume {size} and tile {list(roi)} sizes must be multiples of {den}")
    stride = [max(den, int(t * (1 - overlap)) // den * den) for t in tile]
    starts = [tile_starts(n, t, st) for n, t, st in zip(size, tile, stride)]
    out_tile = [t * num // den for t in tile]
    weight = gaussian_window(out_tile)
    out: torch.Tensor | None = None
    norm = torch.zeros([1, 1, *[n * num // den for n in size]])
    grid = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for st in _progress(grid, "tiles", progress):
        y = fn(_crop(x, [slice(p, p + t) for p, t in zip(st, tile)])).float().cpu()
        if out is None:
            out = torch.zeros([x.shape[0], y.shape[1], *norm.shape[2:]])
        dst = [slice(p * num // den, p * num // den + t) for p, t in zip(st, out_tile)]
        _crop(out, dst).add_(y * weight)
        _crop(norm, dst).add_(weight)
    assert out is not None
    return out / norm


# ---------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------

#: ``precision`` values of :func:`encode_volume`: float32, bfloat16 autocast, or bf16 where it is native.
ENCODE_PRECISIONS = ("fp32", "bf16", "auto")

#: How far a bf16 encode may lie from the float32 encode of the same tiling, as fractions of the
#: float32 latent's standard deviation: root-mean-square and largest absolute difference. Measured
#: (random weights, smooth phantom): demo VAE rms 0.017 / max 0.14, paper VAE rms 0.019 / max 0.12;
#: each convolution rounds its inputs and output to 8 significant bits, which no layout avoids.
BF16_LATENT_TOLERANCE: dict[str, float] = {"rms": 0.03, "max": 0.25}

#: How far a decode with bfloat16 stored volumes (``store_dtype=torch.bfloat16``) may lie from the
#: float32-stored decode, as fractions of the float32 image's standard deviation: root-mean-square and
#: largest absolute difference. Measured (random weights, standard normal latents): paper VAE, 4x30x23x28
#: latent, rms 0.0072 / max 0.054; the paper VAE's structure at 1/8 of its widths on the chest CT's
#: 4x61x46x56 latent, max 0.21 (the largest of 10 M voxels); demo VAE rms 0.0064 / max 0.042. Only the
#: stored stage outputs are rounded (8 significant bits); the convolutions still run in float32.
BF16_DECODE_TOLERANCE: dict[str, float] = {"rms": 0.02, "max": 0.25}


def resolve_encode_precision(precision: str, device: str | torch.device) -> str:
    """"fp32" or "bf16" for ``device``.

    Args:
        precision: "fp32", "bf16" (autocast to bfloat16 around the VAE's convolutions) or "auto"
            (bf16 on CUDA GPUs that support it and on CPUs with native bf16 instructions, else fp32).
        device: where the VAE runs.

    Returns:
        The precision to run at. "bf16" on a CPU without native bf16 is kept, with a warning: it is
        emulated there and several times slower than fp32.
    """
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bfloat16 instructions: a bf16 VAE encode will be slower than fp32",
                      stacklevel=3)
    return precision


@contextmanager
def vae_runtime(vae: torch.nn.Module, precision: str = "fp32", channels_last: bool = False) -> Iterator[None]:
    """Run the VAE's convolutions in bfloat16 autocast and/or with channels-last-3d weights for a while.

    Channels-last weights make the convolutions pick the channels-last kernels (the layout of the
    weights, not their values, changes; it is restored on exit). GroupNorm layers get their input
    back in the standard layout: MAISI's GroupNorm reduces a channels-last input in another order,
    which moved its output by up to 5e-4 of its scale on a phantom (the latent by 1.4e-3).
    GroupNorm outputs stay float32 under autocast.

    Args:
        vae: the network (its parameters tell the device).
        precision: "fp32" (as the caller runs: no autocast is added), "bf16" or "auto" (see
            :func:`resolve_encode_precision`).
        channels_last: convert 5-D weights to ``torch.channels_last_3d``.
    """
    device = next(vae.parameters()).device
    precision = resolve_encode_precision(precision, device)
    convert = channels_last and not any(
        p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
        for p in vae.parameters()
    )
    hooks = []
    if channels_last:
        hooks = [m.register_forward_pre_hook(_standard_layout) for m in vae.modules()
                 if isinstance(m, torch.nn.GroupNorm)]
    if convert:
        vae.to(memory_format=torch.channels_last_3d)
    # fp32 adds no context: an outer autocast (the bundle evaluator's amp on CUDA) still applies
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    try:
        with cast:
            yield
    finally:
        if convert:
            vae.to(memory_format=torch.contiguous_format)
        for h in hooks:
            h.remove()


def _standard_layout(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the first input in the standard (contiguous) memory layout."""
    return (args[0].contiguous(), *args[1:])


def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Accept ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``; return the 5-D tensor and whether a batch axis was added."""
    x = torch.as_tensor(x)
    if x.ndim == 4:
        return x[None], True
    if x.ndim == 5:
        return x, False
    raise ValueError(f"expected a (C, X, Y, Z) or (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")


@torch.no_grad()
def encode_volume(
    vae: torch.nn.Module,
    image: torch.Tensor,
    roi: int | None = 128,
    overlap: float = 0.25,
    exact: bool = True,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    granularity: str = "resolution",
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """Posterior-mean latent of a whole volume, computed in tiles.

    ``exact=True`` (default) runs the encoder stage by stage on tiles with halos and whole-volume
    GroupNorm statistics (:func:`run_blocks_exact`): the result equals one untiled pass up to
    float rounding, while memory stays bounded by the tile size plus the low-resolution stage
    outputs. ``exact=False`` is MAISI-style sliding-window encoding (:func:`blended_apply`).

    Args:
        vae: an ``AutoencoderKlMaisi`` (eval mode).
        image: ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` float in [0, 1]; X, Y, Z multiples of 4.
        roi: tile edge in image voxels; ``None`` encodes in one untiled pass.
        overlap: tile overlap of the sliding-window mode (``exact=False``).
        exact: stage-wise exact tiling (True) or sliding window with Gaussian blending (False).
        store_dtype: dtype of the whole-volume intermediates of the exact mode (bfloat16 halves them).
        progress: tqdm bars.
        granularity: stage split of the exact mode (:func:`split_stages`); ``"resolution"`` keeps
            the encoder's memory lowest.
        precision: "fp32", "bf16" (autocast) or "auto" (:func:`resolve_encode_precision`); bf16
            keeps the latent within ``BF16_LATENT_TOLERANCE`` of the float32 untiled encode (tested).
        channels_last: run the convolutions with channels-last-3d weights (:func:`vae_runtime`).

    Returns:
        Latent ``(latent_channels, X/4, Y/4, Z/4)`` (with a batch axis if one was given), float32 on CPU.
    """
    x, added = _as_batch(image)
    x = x.as_subclass(torch.Tensor).float().cpu()
    if any(n % DOWNSAMPLE for n in x.shape[2:]):
        raise ValueError(f"image size {tuple(x.shape[2:])} must be a multiple of {DOWNSAMPLE} on every axis")
    device = next(vae.parameters()).device
    with vae_runtime(vae, precision, channels_last):
        if roi is None:
            z = vae.encode(x.to(device))[0].float().cpu()
        elif exact:
            blocks = [*vae.encoder.blocks, vae.quant_conv_mu]
            z = run_blocks_exact(blocks, x, int(roi), device, store_dtype=store_dtype, progress=progress,
                                 granularity=granularity).float()
        else:
            z = blended_apply(lambda t: vae.encode(t.to(device))[0], x, [int(roi)] * 3, overlap, (1, DOWNSAMPLE),
                              progress=progress)
    return z[0] if added else z


@torch.no_grad()
def decode_latent(
    vae: torch.nn.Module,
    latent: torch.Tensor,
    roi: int | None = 32,
    overlap: float = 0.25,
    exact: bool = True,
    store_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    granularity: str = "block",
    low_memory: bool = True,
    tile_cap: int | None = 64,
) -> torch.Tensor:
    """Decode a whole latent in tiles (see :func:`encode_volume` for the two tiling modes).

    Args:
        vae: an ``AutoencoderKlMaisi`` (eval mode).
        latent: ``(C, x, y, z)`` or ``(B, C, x, y, z)``.
        roi: tile edge in latent voxels; ``None`` decodes in one untiled pass.
        overlap: tile overlap of the sliding-window mode (``exact=False``).
        exact: stage-wise exact tiling (True) or sliding window with Gaussian blending (False).
        store_dtype: dtype of the whole-volume intermediates of the exact mode.
        progress: tqdm bars.
        granularity: stage split of the exact mode (:func:`split_stages`); ``"block"`` avoids
            recomputing the full-resolution upsampling convolution once per GroupNorm layer.
        low_memory: exact mode only: each stage replaces its input by its output slab by slab
            (:func:`run_blocks_slabs`) instead of holding both whole, with tiles capped at
            ``tile_cap``; the same numbers up to float rounding. With ``store_dtype=torch.bfloat16``
            the paper VAE decodes the 244x184x224 chest CT in under 4 GB (benchmarks/REPORT.md,
            "VAE whole-volume encoding"); the decoded image then stays within
            ``BF16_DECODE_TOLERANCE`` of the float32 decode.
        tile_cap: largest tile edge in output voxels of a stage (:func:`run_blocks_slabs`).

    Returns:
        Image ``(1, 4x, 4y, 4z)`` (with a batch axis if one was given), float32 on CPU.
    """
    z, added = _as_batch(latent)
    z = z.as_subclass(torch.Tensor).float().cpu()
    device = next(vae.parameters()).device
    if roi is None:
        x = vae.decode(z.to(device)).float().cpu()
    elif exact and low_memory:
        blocks = [vae.post_quant_conv, *vae.decoder.blocks]
        x = run_blocks_slabs(blocks, z, int(roi), device, store_dtype=store_dtype, progress=progress,
                             granularity=granularity, tile_cap=tile_cap)[0].float()
    elif exact:
        blocks = [vae.post_quant_conv, *vae.decoder.blocks]
        x = run_blocks_exact(blocks, z, int(roi), device, store_dtype=store_dtype, progress=progress,
                             granularity=granularity).float()
    else:
        x = blended_apply(lambda t: vae.decode(t.to(device)), z, [int(roi)] * 3, overlap, (DOWNSAMPLE, 1),
                          progress=progress)
    return x[0] if added else x


def latent_affine(affine: Any) -> list[list[float]]:
    """Affine of the latent grid: voxel size x4, origin at the centre of the first 4^3 image block.

    Args:
        affine: 4x4 affine of the (preprocessed) image grid.
    """
    a = torch.as_tensor(affine, dtype=torch.float64).reshape(4, 4)
    s = torch.eye(4, dtype=torch.float64)
    s[:3, :3] *= DOWNSAMPLE
    s[:3, 3] = (DOWNSAMPLE - 1) / 2  # mean index of voxels 0..3
    return (a @ s).tolist()


def parameter_count(net: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``import-maisi --src FILE --out model.pt``: convert MONAI's MAISI VAE weights to a stage checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m custom_nets.nets.vae", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-maisi", help="save MAISI VAE weights as a meduet_vae checkpoint")
    imp.add_argument("--src", required=True, help="MONAI maisi_ct_generative autoencoder .pt")
    imp.add_argument("--out", required=True, help="destination model.pt (model.json is written beside it)")
    args = parser.parse_args(argv)
    try:
        info = import_maisi_weights(args.src, args.out)
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {args.out} and its model.json (sha256 {info['sha256'][:12]}..., "
          f"latent_channels {info['latent_channels']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
