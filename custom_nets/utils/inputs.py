"""Inputs a bundle config names (datalists, image folders, latent caches, factor banks, checkpoints).

Model Zoo's tooling resolves a config before any data exists (``ConfigWorkflow.check_properties``
on a fresh clone, with the data paths still at their placeholders). The config's loaders therefore
accept a missing input (``missing_ok``) and give an empty value, and every ``run`` list starts with
:func:`require_inputs`, which stops a real run before any work with one line naming the config id
to set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from custom_nets.utils.errors import InputError
from custom_nets.utils.values import as_path

logger = logging.getLogger(__name__)


def is_missing(path: str | Path | None) -> bool:
    """True for no path (None, "", "none", "null") and for a path that does not exist."""
    p = as_path(path)
    return p is None or not p.exists()


def note_missing(path: str | Path | None, what: str) -> None:
    """Log that a config resolved without ``path`` (its run will stop in :func:`require_inputs`)."""
    logger.warning("%s %s not found: resolved as empty; a run needs it", what, path)


def require_inputs(inputs: Mapping[str, str | Path | None]) -> None:
    """Stop with one line naming the first config id whose input is missing.

    Args:
        inputs: config id -> the path it holds (file or folder).

    Raises:
        InputError: ``"<id>: <path> not found; set it with --<id> PATH"``.
    """
    for key, path in inputs.items():
        if is_missing(path):
            raise InputError(key, f"{path} not found; set it with --{key} PATH")


__all__ = ["is_missing", "note_missing", "require_inputs"]
