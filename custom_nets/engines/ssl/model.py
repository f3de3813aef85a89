"""The meduet_ssl bundle's network: its arguments, building it, loading its weights, what its ``model.json`` records.

``models/model.pt`` is the state_dict of :class:`~custom_nets.nets.meduet.MeDUET` (the EMA teacher
by default) and ``models/model.json`` records what the next stages need::

    {"stage": "meduet_ssl", "network": {MeDUET constructor arguments, "encoder": {...}},
     "content_dim": 768, "style_dim": 192, "domains": [...], "vae_sha256": "...",
     "latent_channels": 4, "weights": "teacher", "export": "final", "epoch": ..., "iteration": ..., "sha256": "..."}

Written by :class:`custom_nets.engines.ssl.train.TeacherExporter`; read back with
:func:`custom_nets.nets.meduet.load_meduet`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from custom_nets.nets.meduet import STAGE, MeDUET, meduet_config
from custom_nets.utils.checkpoint import load_stage_checkpoint, meta_path
from custom_nets.utils.errors import CheckpointError
from custom_nets.utils.io import jsonable, read_json
from custom_nets.utils.parallel import unwrap

logger = logging.getLogger(__name__)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update (so ``{"encoder": {"depth": 6}}`` changes one encoder argument)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


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
    return jsonable(args)


def build_meduet(args: Mapping[str, Any]) -> MeDUET:
    """``MeDUET(**args)``, keeping ``args`` on the network for its export."""
    net = MeDUET(**copy.deepcopy(dict(args)))
    net.meduet_network_args = jsonable(dict(args))
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


def meduet_metadata(
    network: nn.Module,
    network_args: Mapping[str, Any],
    domains: Sequence[str],
    vae_sha256: str | None,
    latent_channels: int,
) -> dict[str, Any]:
    """What a meduet_ssl ``model.json`` records for the next stages.

    Args:
        network: a MeDUET (teacher or student; DDP unwrapped).
        network_args: its constructor arguments.
        domains: domain names, index order of the domain classifiers.
        vae_sha256: sha256 of the VAE that encoded the training latents.
        latent_channels: latent channels.
    """
    net = unwrap(network)
    return dict(network=jsonable(dict(network_args)), content_dim=int(net.content_dim), style_dim=int(net.style_dim),
                domains=list(domains), vae_sha256=vae_sha256, latent_channels=int(latent_channels))
