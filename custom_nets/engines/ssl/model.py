"""The meduet_ssl bundle's network: its arguments, building it, loading and exporting checkpoints.

``models/model.pt`` is the state_dict of :class:`~custom_nets.nets.meduet.MeDUET` (the EMA teacher
by default) and ``models/model.json`` records what the next stages need::

    {"stage": "meduet_ssl", "network": {MeDUET constructor arguments, "encoder": {...}},
     "content_dim": 768, "style_dim": 192, "domains": [...], "vae_sha256": "...",
     "latent_channels": 4, "weights": "teacher", "epoch": ..., "iteration": ..., "sha256": "..."}
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom_nets.engines.common.ema import unwrap
from custom_nets.nets.meduet import MeDUET, meduet_config
from custom_nets.utils.checkpoint import load_stage_checkpoint, meta_path, read_stage_meta, save_stage_checkpoint
from custom_nets.utils.errors import CheckpointError, InputError
from custom_nets.utils.io import read_json

STAGE = "meduet_ssl"
logger = logging.getLogger(__name__)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update (so ``{"encoder": {"depth": 6}}`` changes one encoder argument)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def meduet_network_args(size: str = "paper", n_domains: int | None = 10, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """MeDUET constructor arguments: a named size, the number of domains, then ``overrides``.

    Args:
        size: ``"paper"`` (ViT-B; ``"B"`` is the same) or ``"demo"`` (:func:`~custom_nets.nets.meduet.meduet_config`).
        n_domains: domains of the latent datalist (size of the domain classifiers); None keeps the
            size's own (a config resolved before its latent cache exists).
        overrides: arguments to change, nested for the encoder (``{"encoder": {"depth": 6}}``).

    Returns:
        JSON-friendly arguments (what model.json records as ``network``).
    """
    domains = {"n_domains": int(n_domains)} if n_domains else {}
    args = _merge(meduet_config(size), {**domains, **dict(overrides or {})})
    return _jsonable(args)


def build_meduet(args: Mapping[str, Any]) -> MeDUET:
    """``MeDUET(**args)``, keeping ``args`` on the network for :func:`export_meduet`."""
    net = MeDUET(**copy.deepcopy(dict(args)))
    net.meduet_network_args = _jsonable(dict(args))
    return net


def network_args_for_inference(ssl_ckpt: str | Path, size: str = "paper") -> dict[str, Any]:
    """The arguments recorded beside ``ssl_ckpt`` (so that inference builds exactly the trained
    network); when the checkpoint is not there yet, those of ``size`` (the weights are loaded, and
    a missing checkpoint reported, when the bundle runs)."""
    mp = meta_path(ssl_ckpt)
    if mp.is_file():
        info = read_json(mp)
        if "network" not in info:
            raise CheckpointError(f"{mp}: no 'network' arguments; re-export the checkpoint with meduet_ssl")
        return dict(info["network"])
    logger.info("%s not found: building the %r-size network; its weights must come from a trained checkpoint", mp, size)
    return meduet_network_args(size)


def load_meduet_weights(network: nn.Module, ssl_ckpt: str | Path) -> dict[str, Any]:
    """Load a meduet_ssl checkpoint strictly into ``network`` (a DDP wrapper is unwrapped); eval mode,
    no gradients. Returns the checkpoint's metadata."""
    net = unwrap(network)
    info = load_stage_checkpoint(net, ssl_ckpt, STAGE)
    net.eval().requires_grad_(False)
    return info


def load_meduet(ssl_ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[MeDUET, dict[str, Any]]:
    """Build the network recorded in ``model.json`` and load ``model.pt`` strictly (eval, no grad)."""
    meta = read_stage_meta(ssl_ckpt, STAGE)
    if "network" not in meta:
        raise CheckpointError(f"{ssl_ckpt}: model.json has no 'network' arguments; re-export with meduet_ssl")
    net = build_meduet(meta["network"])
    load_meduet_weights(net, ssl_ckpt)
    return net.to(device), meta


def export_meduet(
    network: nn.Module,
    path: str | Path,
    network_args: Mapping[str, Any],
    domains: Sequence[str],
    vae_sha256: str | None,
    latent_channels: int,
    **extra: Any,
) -> dict[str, Any]:
    """Write a network's plain state_dict to ``path`` and the stage metadata beside it.

    Args:
        network: a MeDUET (teacher or student; DDP unwrapped).
        path: destination ``model.pt``.
        network_args: its constructor arguments.
        domains: domain names, index order of the domain classifiers.
        vae_sha256: sha256 of the VAE that encoded the training latents.
        latent_channels: latent channels.
        extra: more facts (``weights``, ``epoch``, ``iteration``, ``val_rec`` ...).

    Returns:
        The metadata written.
    """
    net = unwrap(network)
    return save_stage_checkpoint(
        net.state_dict(), path, STAGE, network=_jsonable(dict(network_args)), content_dim=int(net.content_dim),
        style_dim=int(net.style_dim), domains=list(domains), vae_sha256=vae_sha256,
        latent_channels=int(latent_channels), **extra,
    )


def check_vae_matches(vae_meta: Mapping[str, Any], latents: Mapping[str, Any], vae_ckpt: str | Path, source: str | Path) -> None:
    """Refuse a VAE other than the one that encoded the latents (their sha256 differs).

    Args:
        vae_meta: the VAE checkpoint's model.json contents.
        latents: the loaded latent datalist (its ``vae.sha256``).
        vae_ckpt: VAE checkpoint path, for the message.
        source: latent datalist path, for the message.
    """
    want = (latents.get("vae") or {}).get("sha256")
    have = vae_meta.get("sha256")
    if want and have and want != have:
        raise InputError(
            source, f"latents were encoded by the VAE with sha256 {want[:12]}..., but vae_ckpt {vae_ckpt} has "
            f"{have[:12]}...; pass --vae_ckpt with the VAE that wrote the latent cache"
        )
