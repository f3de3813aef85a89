"""Stage checkpoints: a plain ``state_dict`` in ``model.pt`` plus ``model.json`` beside it.

``model.pt`` loads with ``torch.load(weights_only=True)`` (what Model Zoo and MONAI Label expect).
``model.json`` records what the next stage needs, e.g.::

    {"stage": "meduet_vae", "network": {...constructor args...}, "latent_channels": 4,
     "upstream_sha256": "...", "sha256": "<sha256 of model.pt>"}

The stage contract, in one place:

- :func:`save_stage_checkpoint` writes a stage's network (the exporter of every train config,
  :class:`custom_nets.engines.common.export.StageExporter`, calls it);
- :func:`load_stage_network` builds a stage's network from the arguments in its ``model.json`` and
  loads it; :func:`load_stage_checkpoint` loads into a network the caller built (both refuse a
  missing checkpoint, one from another stage, or one whose tensors do not fit the network, naming
  the bundle to train first);
- :func:`check_upstream` refuses (or warns about) an output made with another upstream checkpoint
  than the configured one, with one message format.

Downstream bundles find their upstream checkpoint through one config id (``vae_ckpt``, ``ssl_ckpt``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from custom_nets.utils.errors import CheckpointError, InputError
from custom_nets.utils.io import atomic_path, file_sha256, read_json, write_json

logger = logging.getLogger(__name__)

STAGE_BUNDLES = {
    "meduet_vae": "bundles/meduet_vae",
    "meduet_ssl": "bundles/meduet_ssl",
    "meduet_ldm": "bundles/meduet_ldm",
    "meduet_seg": "bundles/meduet_seg",
}


def meta_path(ckpt: str | Path) -> Path:
    """The ``.json`` metadata file that sits beside a checkpoint (``model.pt`` -> ``model.json``)."""
    return Path(ckpt).with_suffix(".json")


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and a rename (never a half-written file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_stage_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, stage: str, **meta: Any
) -> dict[str, Any]:
    """Write ``state_dict`` to ``path`` and its metadata to ``path.with_suffix('.json')``.

    Args:
        state_dict: plain tensors only (so that ``weights_only=True`` loading works).
        path: destination ``.pt`` file.
        stage: one of :data:`STAGE_BUNDLES`.
        meta: JSON-serialisable facts for the next stage (network arguments, domains, ...).

    Returns:
        The metadata written, including ``sha256`` of the checkpoint.
    """
    if stage not in STAGE_BUNDLES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_BUNDLES)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_torch(tensors, path)
    info = {"stage": stage, **meta, "sha256": file_sha256(path)}
    write_json(meta_path(path), info)
    return info


def read_stage_meta(path: str | Path, stage: str) -> dict[str, Any]:
    """Read and check the metadata beside a checkpoint without loading its tensors."""
    path = Path(path)
    bundle = STAGE_BUNDLES.get(stage, stage)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found; train the {stage} stage first ({bundle}) or point the "
            f"config id at an existing checkpoint"
        )
    mp = meta_path(path)
    if not mp.is_file():
        raise CheckpointError(f"{mp}: metadata for {path} not found; it must be written by {bundle}")
    info = read_json(mp)
    if info.get("stage") != stage:
        raise CheckpointError(
            f"{path}: checkpoint of stage {info.get('stage')!r}, expected {stage!r} (written by {bundle})"
        )
    return info


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a plain state_dict with ``weights_only=True``; unwrap ``{"model": ...}`` / ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise CheckpointError(f"{path}: cannot be loaded as a weights-only checkpoint ({e})") from e
    for key in ("model", "state_dict", "network"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return dict(obj)


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    module: torch.nn.Module,
    source: str | Path,
    stage: str,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` fits ``module`` exactly.

    Args:
        state_dict: tensors to load.
        module: the configured network.
        source: checkpoint path, for the message.
        stage: the stage that writes such checkpoints, for the message.
        allow_missing: key prefixes of ``module`` that may be absent from the checkpoint.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + "; ".join(mismatched[:10]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:10]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:10]))
        raise CheckpointError(
            f"{source}: does not match the configured network ({'; '.join(parts)}); "
            f"check the network arguments or retrain {STAGE_BUNDLES.get(stage, stage)}"
        )


def load_stage_checkpoint(
    module: torch.nn.Module, path: str | Path, stage: str, allow_missing: tuple[str, ...] = (), prefix: str = ""
) -> dict[str, Any]:
    """Check stage and shapes, then load ``path`` into ``module`` strictly. Returns the metadata.

    Args:
        module: the network (or the part of it that ``prefix`` selects).
        path: the stage checkpoint.
        stage: the stage that must have written it.
        allow_missing: key prefixes of ``module`` that may be absent from the checkpoint.
        prefix: load only the checkpoint's tensors under this prefix (e.g. ``"encoder."``), with
            the prefix removed; the checkpoint must have some.
    """
    info = read_stage_meta(path, stage)
    sd = load_state_dict(path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{path}: no '{prefix}*' tensors; is this a {stage} checkpoint?")
    check_state_dict(sd, module, path, stage, allow_missing=allow_missing)
    module.load_state_dict(sd, strict=not allow_missing)
    return info


def load_stage_network(
    path: str | Path,
    stage: str,
    build: Callable[[Mapping[str, Any]], torch.nn.Module],
    device: str | torch.device = "cpu",
    frozen: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a stage's network from the constructor arguments in its ``model.json`` and load its weights.

    Args:
        path: the stage checkpoint (``model.pt``).
        stage: the stage that must have written it.
        build: constructor arguments (``model.json``'s ``network``) -> network.
        device: where to put the network.
        frozen: eval mode without gradients (what an upstream network used by a later stage needs).

    Returns:
        ``(network, metadata)``.

    Raises:
        CheckpointError: missing checkpoint, another stage, no recorded arguments, or tensors that
            do not fit (each naming the file and the bundle to train).
    """
    meta = read_stage_meta(path, stage)
    args = meta.get("network")
    if not isinstance(args, Mapping):
        raise CheckpointError(f"{meta_path(path)}: no 'network' arguments recorded; re-export the checkpoint with "
                              f"{STAGE_BUNDLES.get(stage, stage)}")
    net = build(args)
    load_stage_checkpoint(net, path, stage)
    net = net.to(device)
    if frozen:
        net.eval().requires_grad_(False)
    return net, meta


def check_upstream(
    source: str | Path,
    made: str,
    stage: str,
    recorded_sha256: str | None,
    expected_sha256: str | None,
    expected_by: str,
    fix: str,
    recorded_from: str | Path | None = None,
    error: type[Exception] = CheckpointError,
    required: bool = False,
    warn: bool = False,
) -> bool:
    """Refuse (or, with ``warn``, log) an output made with another upstream checkpoint than the one configured.

    One message format for every stage::

        {source}: {made} was made with the {stage} checkpoint of sha256 {recorded}... ({recorded_from}),
        but {expected_by} has sha256 {expected}...; {fix}

    Args:
        source: the file (or config id) the message starts with: the one to change.
        made: what was made with the upstream (``"the latent cache"``, ``"the generator"`` ...).
        stage: the upstream stage (``meduet_vae``, ``meduet_ssl``).
        recorded_sha256: the upstream's sha256 that ``made`` records.
        expected_sha256: the sha256 of the upstream the configuration uses.
        expected_by: names that upstream (``"vae_ckpt models/model.pt"``).
        fix: what to do, in words.
        recorded_from: the upstream checkpoint path ``made`` records, if any.
        error: :class:`CheckpointError` or :class:`InputError` (the kind of ``source``).
        required: a missing ``recorded_sha256`` is a mismatch too (otherwise a side that records
            none is not checked).
        warn: log a warning instead of raising.

    Returns:
        True when the two agree (or one is not recorded and not ``required``).
    """
    if not expected_sha256 or (not recorded_sha256 and not required) or recorded_sha256 == expected_sha256:
        return True
    problem = (
        f"{made} was made with the {stage} checkpoint of sha256 {str(recorded_sha256)[:12]}... "
        f"({recorded_from or 'path not recorded'}), but {expected_by} has sha256 {expected_sha256[:12]}...; {fix}"
    )
    if warn:
        logger.warning("%s: %s", source, problem)
        return False
    if issubclass(error, InputError):
        raise error(source, problem)
    raise error(f"{source}: {problem}")


def write_stage_meta(path: str | Path, stage: str, **meta: Any) -> dict[str, Any]:
    """(Re)write the metadata beside an existing checkpoint (e.g. one written by MONAI's CheckpointSaver)."""
    info = {"stage": stage, **meta, "sha256": file_sha256(path)}
    write_json(meta_path(path), info)
    return info
