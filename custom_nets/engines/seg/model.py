"""The meduet_seg network from its checkpoints: constructor arguments reconciled with the upstream
checkpoints' metadata, weight loading at training start (VAE, MeDUET ViT) and at inference (the
trained segmenter). Every load goes through the stage contract of :mod:`custom_nets.utils.checkpoint`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from custom_nets.nets.latent_segmenter import LatentSegmenter
from custom_nets.utils.checkpoint import check_upstream, file_sha256, load_stage_checkpoint, meta_path, read_stage_meta
from custom_nets.utils.errors import CheckpointError
from custom_nets.utils.inputs import is_missing
from custom_nets.utils.parallel import unwrap
from custom_nets.utils.values import as_path

logger = logging.getLogger(__name__)

__all__ = [
    "finetune_source",
    "finetune_arg",
    "network_args_from_upstream",
    "build_segmenter",
    "load_vae_weights",
    "load_ssl_encoder",
    "require_checkpoint",
    "load_segmenter_weights",
    "init_from_upstream",
]


def network_args_from_upstream(
    defaults: Mapping[str, Any],
    vae_ckpt: str | Path | None = None,
    ssl_ckpt: str | Path | None = None,
    model_ckpt: str | Path | None = None,
) -> dict[str, Any]:
    """Constructor arguments, taking the parts that must match a checkpoint from its metadata.

    Order: a trained segmenter's ``model.json`` (``model_ckpt``) fixes every argument; otherwise the
    VAE arguments and ``latent_scale`` come from the VAE checkpoint's metadata and the ViT arguments
    from the SSL checkpoint's metadata, when those files exist; everything else from ``defaults``.
    Missing checkpoints are not an error here (loading them later is): configs can be checked and
    networks built before anything is trained.

    Args:
        defaults: constructor arguments from the config.
        vae_ckpt: ``meduet_vae`` checkpoint path (or None/"none").
        ssl_ckpt: ``meduet_ssl`` checkpoint path (or None/"none" for a randomly initialised ViT).
        model_ckpt: ``meduet_seg`` checkpoint path.

    Returns:
        Constructor arguments of :class:`LatentSegmenter`.
    """
    args = dict(defaults)
    if as_path(model_ckpt) is not None and meta_path(model_ckpt).is_file():
        net = read_stage_meta(model_ckpt, "meduet_seg").get("network")
        if not isinstance(net, Mapping):
            raise CheckpointError(f"{meta_path(model_ckpt)}: no 'network' arguments recorded")
        logger.info("segmenter arguments from %s", meta_path(model_ckpt))
        net = dict(net)
        # checkpoints from before decoders were named: the paper head, upsampled align_corners=False
        net.setdefault("decoder", "paper")
        net.setdefault("latent_grid", "decoder")
        return net
    if as_path(vae_ckpt) is not None and meta_path(vae_ckpt).is_file():
        meta = read_stage_meta(vae_ckpt, "meduet_vae")
        if isinstance(meta.get("network"), Mapping):
            args["vae"] = dict(meta["network"])
            logger.info("VAE arguments from %s", meta_path(vae_ckpt))
        if meta.get("scale_factor") is not None:
            args["latent_scale"] = float(meta["scale_factor"])
    if as_path(ssl_ckpt) is not None and meta_path(ssl_ckpt).is_file():
        net = read_stage_meta(ssl_ckpt, "meduet_ssl").get("network", {})
        if isinstance(net, Mapping) and isinstance(net.get("encoder"), Mapping):
            enc = {k: v for k, v in net["encoder"].items() if k != "grid"}
            args["encoder"] = enc
            logger.info("ViT arguments from %s", meta_path(ssl_ckpt))
    return args


def build_segmenter(
    args: Mapping[str, Any],
    vae_ckpt: str | Path | None = None,
    ssl_ckpt: str | Path | None = None,
    model_ckpt: str | Path | None = None,
) -> LatentSegmenter:
    """:class:`LatentSegmenter` from config arguments, reconciled with existing checkpoint metadata
    (see :func:`network_args_from_upstream`). No weights are loaded here."""
    return LatentSegmenter(**network_args_from_upstream(args, vae_ckpt, ssl_ckpt, model_ckpt))


# --------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------


def load_vae_weights(network: nn.Module, vae_ckpt: str | Path) -> dict[str, Any]:
    """Load a ``meduet_vae`` checkpoint strictly into ``network.vae``. Returns its metadata."""
    net = unwrap(network)
    info = load_stage_checkpoint(net.vae, vae_ckpt, "meduet_vae")
    scale = info.get("scale_factor")
    if scale is not None and not math.isclose(float(scale), net.latent_scale, rel_tol=1e-6):
        raise CheckpointError(
            f"{vae_ckpt}: scale_factor {scale} differs from the network's latent_scale {net.latent_scale}"
        )
    logger.info("VAE weights loaded from %s (frozen: %s)", vae_ckpt, net.freeze_vae)
    return info


def load_ssl_encoder(network: nn.Module, ssl_ckpt: str | Path) -> dict[str, Any]:
    """Initialise ``network.encoder`` from a ``meduet_ssl`` checkpoint (its ``encoder.*`` tensors).

    Patch embedding, cls token, blocks and final norm load strictly. The position table is a fixed
    sin-cos function of the token grid, not stored in either state_dict: it is recomputed for the
    segmenter's grid (logged).

    Returns:
        The SSL checkpoint's metadata.

    Raises:
        CheckpointError: missing file, wrong stage, no ``encoder.*`` keys, or any key/shape mismatch
            (named in the message).
    """
    net = unwrap(network)
    info = load_stage_checkpoint(net.encoder, ssl_ckpt, "meduet_ssl", prefix="encoder.")
    logger.info(
        "ViT initialised from %s: %d tensors (patch embedding, cls token, %d blocks, final norm); "
        "position embedding: fixed sin-cos, recomputed for grid %s",
        ssl_ckpt, len(net.encoder.state_dict()), len(net.encoder.blocks), net.encoder.grid,
    )
    return info


def require_checkpoint(model_ckpt: str | Path) -> Path:
    """Fail early (before any network is built) when the trained segmenter is missing."""
    path = Path(model_ckpt)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: trained segmenter not found; train it first with "
            "`python -m monai.bundle run --config_file bundles/meduet_seg/configs/train.json` "
            "(add configs/demo.json for the small demo) or point model_path at a meduet_seg model.pt"
        )
    return path


def load_segmenter_weights(network: nn.Module, model_ckpt: str | Path) -> dict[str, Any]:
    """Load a trained ``meduet_seg`` checkpoint strictly; a missing one names the bundle to train."""
    path = require_checkpoint(model_ckpt)
    info = load_stage_checkpoint(unwrap(network), path, "meduet_seg")
    logger.info("segmenter weights loaded from %s (epoch %s, key metric %s)", path, info.get("epoch"), info.get("key_metric"))
    return info


def finetune_source(vae_ckpt: str | Path | None, model_ckpt: str | Path | None) -> str | None:
    """The bundle's own trained ``model.pt`` when the upstream VAE is not there, else None.

    An exported bundle used on its own (MONAI Label's BundleTrainTask, nothing beside it) holds every
    weight it trains in ``models/model.pt``; training then fine-tunes that model. With the upstream
    VAE present, training starts from the upstream stages as usual.
    """
    if is_missing(vae_ckpt) and not is_missing(model_ckpt) and Path(model_ckpt).is_file():  # type: ignore[arg-type]
        return str(model_ckpt)
    return None


def finetune_arg(finetune_from: str | Path | None, name: str, default: Any) -> Any:
    """A constructor argument of the model being fine-tuned (its ``model.json``), else ``default``.

    Fine-tuning builds the network from the trained model's recorded arguments, so settings that
    must agree with the network (the crop size ``roi_size``) follow them too; a caller that cannot
    pass the original configs (MONAI Label training an exported bundle) then needs no overrides.
    """
    if as_path(finetune_from) is None:
        return default
    net = read_stage_meta(finetune_from, "meduet_seg").get("network")  # type: ignore[arg-type]
    if not isinstance(net, Mapping) or name not in net:
        raise CheckpointError(f"{meta_path(finetune_from)}: no network argument {name!r} recorded")  # type: ignore[arg-type]
    return net[name]


def init_from_upstream(
    network: nn.Module, vae_ckpt: str | Path, ssl_ckpt: str | Path | None = None,
    finetune_from: str | Path | None = None,
) -> dict[str, Any]:
    """Training start: load the VAE (required) and the MeDUET ViT (unless ``ssl_ckpt`` is None/"none"),
    or, with ``finetune_from`` (see :func:`finetune_source`), the trained segmenter to fine-tune.

    Returns:
        {"vae_sha256": ..., "ssl_sha256": ... or None, "ssl_init": bool} for the exported metadata
        (``{"finetune_from": path}`` when fine-tuning).

    Raises:
        CheckpointError: no VAE checkpoint and nothing to fine-tune; the message says what to provide.
    """
    if as_path(finetune_from) is not None:
        load_segmenter_weights(network, finetune_from)  # type: ignore[arg-type]
        logger.info("fine-tuning from %s (no upstream VAE at %s)", finetune_from, vae_ckpt)
        return {"finetune_from": str(finetune_from)}
    if is_missing(vae_ckpt):
        raise CheckpointError(
            f"{vae_ckpt}: VAE checkpoint not found. Training from scratch needs the upstream bundles "
            "(meduet_vae's models/model.pt, and meduet_ssl's for the MeDUET start) beside this bundle, or "
            "vae_ckpt / ssl_ckpt pointing at them; fine-tuning needs a trained meduet_seg models/model.pt "
            "in this bundle (model_path)"
        )
    vae_info = load_vae_weights(network, vae_ckpt)
    out: dict[str, Any] = {"vae_ckpt": str(vae_ckpt), "vae_sha256": vae_info.get("sha256"), "ssl_ckpt": None,
                           "ssl_sha256": None, "ssl_init": False}
    if as_path(ssl_ckpt) is None:
        logger.info("ViT randomly initialised (ssl_ckpt is none)")
        return out
    ssl_info = load_ssl_encoder(network, ssl_ckpt)  # type: ignore[arg-type]
    check_upstream(
        ssl_ckpt, "the MeDUET encoder", "meduet_vae", ssl_info.get("vae_sha256"), vae_info.get("sha256"),
        f"vae_ckpt {vae_ckpt}", "its features may not fit; pretrain meduet_ssl on latents of this VAE", warn=True,
    )
    out.update(ssl_ckpt=str(ssl_ckpt), ssl_sha256=ssl_info.get("sha256") or file_sha256(ssl_ckpt), ssl_init=True)
    return out
