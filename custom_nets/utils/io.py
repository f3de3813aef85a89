"""Atomic file writing: write to a temporary file in the same folder, then rename.

A run that dies half-way never leaves a truncated output behind, and readers never see one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from custom_nets.utils.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Args:
        path: final destination.
        suffix: suffix for the temporary file (defaults to the destination's full suffix, so that
            writers that choose a format by extension, e.g. ``.nii.gz``, still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``. Returns ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def jsonable(obj: Any) -> Any:
    """Tuples -> lists and keys -> strings, recursively (constructor arguments as JSON records them)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""

    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, _write)


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from e


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_nifti(path: str | Path, image: Any, affine: Any, dtype: Any = np.float32) -> Path:
    """Write a 3-D image as NIfTI, atomically; qform and sform both set to ``affine`` (world mm).

    Args:
        path: destination (``.nii`` or ``.nii.gz``).
        image: (X, Y, Z) or (1, X, Y, Z) array or tensor.
        affine: 4x4 voxel-to-world matrix (RAS, as MONAI's MetaTensor affines).
        dtype: stored data type; None keeps the array's own (e.g. integer labels, HU as int16).

    Returns:
        ``path``.
    """
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image) if dtype is None else np.asarray(image, dtype=dtype)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
