"""Re-running an inference: which outputs are complete, where outputs may go, and writing them whole.

Every inference config (segmentation, factor bank, swaps, sampling) writes into ``output_dir``
under these rules:

- ``output_dir`` is never an input folder (:func:`check_output_dir`): outputs never replace or
  mix with the files they were computed from.
- Each output file is written to a temporary name beside it and renamed when complete, so a run
  that dies leaves whole outputs only (:func:`custom_nets.utils.io.atomic_path`,
  :class:`AtomicSaveImaged` for MONAI's ``SaveImaged``).
- ``output_dir/outputs.json`` (:class:`OutputLedger`) records, per output file, a key of the
  settings that produced it (model sha256, sampler steps, ...). With ``overwrite=false`` an output
  is skipped only when its file exists and was made with the current settings; an output made with
  other settings is recomputed and replaced. With ``overwrite=true`` every output is replaced. So a
  re-run never leaves old and new results side by side in one folder without saying so: the ledger
  names the settings of every file it lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data.folder_layout import FolderLayout
from monai.transforms import SaveImaged

from custom_nets.utils.checkpoint import file_sha256
from custom_nets.utils.errors import InputError
from custom_nets.utils.flags import as_bool
from custom_nets.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "LEDGER_NAME", "check_output_dir", "settings_key", "OutputLedger", "AtomicSaveImaged", "segmentation_name",
    "pending_segmentations", "run_evaluator",
]

LEDGER_NAME = "outputs.json"


def check_output_dir(output_dir: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """Refuse an ``output_dir`` that is an input folder.

    Args:
        output_dir: where the outputs go.
        inputs: input files and folders; a file stands for its folder. ``None`` entries are ignored.

    Returns:
        ``output_dir`` resolved.

    Raises:
        InputError: naming ``output_dir`` and the input it coincides with.
    """
    out = Path(output_dir).resolve()
    for p in inputs:
        if p in (None, ""):
            continue
        p = Path(p).resolve()
        folder = p if p.is_dir() else p.parent
        if folder == out:
            raise InputError(out, f"output_dir is an input folder (it holds {p.name if p != folder else 'the inputs'}); "
                                  f"choose a separate folder for the outputs")
    return out


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short hash of ``settings`` (canonical JSON): equal settings, equal key."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class OutputLedger:
    """``output_dir/outputs.json``: the settings of each output written there.

    Args:
        output_dir: the output folder.
        settings: what decides the outputs (JSON-able; model sha256, sampler, ...).
        overwrite: replace outputs even when they are complete and made with these settings.
        checkpoints: files whose sha256 is part of the settings, by name (read when first needed,
            so that a missing checkpoint is reported by the config's own check first).
    """

    def __init__(
        self,
        output_dir: str | Path,
        settings: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        checkpoints: Mapping[str, str | Path | None] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LEDGER_NAME
        self.settings = dict(settings or {})
        self.checkpoints = {k: v for k, v in (checkpoints or {}).items() if v not in (None, "")}
        self.overwrite = as_bool(overwrite, "overwrite")
        self._key: str | None = None
        self._entries: dict[str, dict[str, Any]] | None = None
        self._described: dict[str, Any] = {}

    @property
    def key(self) -> str:
        """Key of the current settings (checkpoint hashes included)."""
        if self._key is None:
            full = {**self.settings, **{f"{k}_sha256": file_sha256(v) for k, v in sorted(self.checkpoints.items())}}
            self._key = settings_key(full)
        return self._key

    def entries(self) -> dict[str, dict[str, Any]]:
        """``{relative file name: {"settings": key}}`` read from ``outputs.json`` (empty if none)."""
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                data = read_json(self.path)
                files = data.get("files") if isinstance(data, Mapping) else None
                if not isinstance(files, Mapping):
                    raise InputError(self.path, "not an outputs ledger (no 'files' object); move it away or delete it")
                self._entries = {str(k): dict(v) for k, v in files.items() if isinstance(v, Mapping)}
                self._described = dict(data.get("settings") or {})
        return self._entries

    def is_done(self, name: str | Path) -> bool:
        """Whether ``name`` (relative to ``output_dir``) exists and was made with the current settings,
        and ``overwrite`` is off."""
        if self.overwrite:
            return False
        rel = self._rel(name)
        return (self.output_dir / rel).is_file() and self.entries().get(rel, {}).get("settings") == self.key

    def all_done(self, names: Iterable[str | Path]) -> bool:
        """:meth:`is_done` for every name."""
        return all(self.is_done(n) for n in names)

    def mark_done(self, *names: str | Path) -> None:
        """Record ``names`` (already written) as made with the current settings."""
        entries = self.entries()
        for n in names:
            entries[self._rel(n)] = {"settings": self.key}
        used = {e.get("settings") for e in entries.values()}
        described = {k: v for k, v in self._described.items() if k in used}
        described[self.key] = self.describe()
        self._described = described
        write_json(self.path, {"settings": described, "files": dict(sorted(entries.items()))})

    def describe(self) -> dict[str, Any]:
        """The current settings as recorded (checkpoint paths, not their hashes)."""
        return {**self.settings, **{k: str(v) for k, v in self.checkpoints.items()}}

    def _rel(self, name: str | Path) -> str:
        p = Path(name)
        if p.is_absolute():
            p = p.resolve().relative_to(self.output_dir.resolve())
        return p.as_posix()


class AtomicSaveImaged(SaveImaged):
    """MONAI ``SaveImaged`` that writes into a hidden temporary folder inside ``output_dir`` and
    renames each file into place when it is complete (and records it in an :class:`OutputLedger`).

    A subclass, so that clients that drop ``SaveImaged`` from a bundle's postprocessing (MONAI
    Label's ``BundleInferTask``) drop this one too.

    Args:
        ledger: optional ledger to mark the written files in.
        kwargs: ``SaveImaged`` arguments (``keys``, ``output_dir``, ``output_postfix``, ...).
    """

    def __init__(self, *args: Any, ledger: OutputLedger | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger

    def __call__(self, data: Any) -> Any:
        layout = self.saver.folder_layout
        final_dir = Path(layout.output_dir)
        final_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=final_dir))
        layout.output_dir = str(staging)
        try:
            out = super().__call__(data)
            written = []
            for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                dest = final_dir / f.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
                written.append(dest)
            if self.ledger is not None and written:
                self.ledger.mark_done(*written)
            for f in written:
                logger.info("wrote %s", f)
            return out
        finally:
            layout.output_dir = str(final_dir)
            shutil.rmtree(staging, ignore_errors=True)


def segmentation_name(image: str | Path, postfix: str = "seg", ext: str = ".nii.gz") -> str:
    """File name ``SaveImaged(output_postfix=postfix, separate_folder=False)`` gives ``image``'s output."""
    layout = FolderLayout(output_dir="", postfix=postfix, extension=ext, parent=False, makedirs=False)
    return Path(layout.filename(subject=str(image))).name


def pending_segmentations(
    items: Sequence[Mapping[str, Any]],
    ledger: OutputLedger,
    inputs: Iterable[str | Path | None] = (),
    postfix: str = "seg",
    ext: str = ".nii.gz",
) -> list[dict[str, Any]]:
    """The items whose segmentation is still to be written (see the module docstring).

    Args:
        items: inference items (``image`` paths).
        ledger: the output folder's ledger.
        inputs: more input files/folders that ``output_dir`` must differ from (e.g. ``dataset_dir``).
        postfix: ``SaveImaged`` ``output_postfix``.
        ext: ``SaveImaged`` ``output_ext``.

    Returns:
        The items to run, in their order.
    """
    check_output_dir(ledger.output_dir, [*(it["image"] for it in items), *inputs])
    todo = [dict(it) for it in items if not ledger.is_done(segmentation_name(it["image"], postfix, ext))]
    skipped = len(items) - len(todo)
    if skipped:
        logger.info("%s: %d of %d volumes already segmented with this model and settings (skipped; set "
                    "overwrite true to redo them)", ledger.output_dir, skipped, len(items))
    return todo


def run_evaluator(evaluator: Any, what: str = "volumes") -> None:
    """``evaluator.run()``, or a log line when every output is already complete (ignite refuses an
    empty data loader)."""
    loader = evaluator.data_loader
    if hasattr(loader, "__len__") and len(loader) == 0:
        logger.info("all %s are complete; nothing to do (set overwrite true to redo them)", what)
        return
    evaluator.run()
