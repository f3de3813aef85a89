"""Datalist builder, loader and command line.

Builds the project's image datalist ({"training", "validation", "testing", "domains"}) from several
sources, one domain each. A source folder is recognised as:

- MSD: ``dataset.json`` with a "training" list of {"image", "label"} (and optionally "test");
- nnU-Net raw: ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, optional ``imagesTs``;
- DICOM: sub-folders that each hold the slices of one series (converted to NIfTI in
  ``<datalist folder>/converted/<domain>/``);
- plain folder of image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), labels optional: a
  ``labels`` folder beside the images (or ``images/`` + ``labels/``) or files named ``*_label``/``*_seg``.

Every file is checked (see :mod:`custom_nets.data.validate`); if anything is wrong, every problem is
reported (one line per bad file) and nothing is written. Command line::

    python -m custom_nets.data.datalist --source NAME=PATH [--source NAME=PATH ...] --out FILE \
        [--val-fraction F] [--seed N] [--modality NAME=MR] [--num-classes K]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custom_nets.data.dicom import DicomSeries, convert_series, find_series_folders, is_dicom_file, scan_series
from custom_nets.data.validate import check_items, image_suffix, strip_image_suffix
from custom_nets.utils.errors import InputError, InputErrors
from custom_nets.utils.flags import as_bool
from custom_nets.utils.inputs import is_missing, note_missing
from custom_nets.utils.io import read_json, write_json

logger = logging.getLogger(__name__)

DATALIST_KEYS: tuple[str, ...] = ("training", "validation", "testing")
SOURCE_KINDS: tuple[str, ...] = ("msd", "nnunet", "dicom", "folder")
LABEL_NAME_SUFFIXES: tuple[str, ...] = ("_label", "_seg")
CONVERTED_DIR = "converted"

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

MODALITIES: tuple[str, ...] = ("CT", "MR")
DEFAULT_MODALITY = "CT"


def normalize_modality(modality: str) -> str:
    """Upper-case ``modality`` and check it is one of :data:`MODALITIES` (ValueError otherwise)."""
    m = modality.strip().upper()
    if m not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return m


@dataclass
class SourceScan:
    """What one source contributes, before validation.

    Attributes:
        domain: the source's domain name.
        path: the source folder.
        kind: one of :data:`SOURCE_KINDS`.
        training: items with absolute paths (and "domain", "modality").
        testing: unlabelled items to go to "testing".
        problems: files that cannot be used.
        warnings: things the user should know that do not stop the build.
        dicom: (item, series) pairs whose item image is the NIfTI the series will be converted to.
    """

    domain: str
    path: Path
    kind: str
    training: list[dict[str, Any]] = field(default_factory=list)
    testing: list[dict[str, Any]] = field(default_factory=list)
    problems: list[InputError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dicom: list[tuple[dict[str, Any], DicomSeries]] = field(default_factory=list)


# ---------------------------------------------------------------------------------- source kinds


def detect_source_kind(path: str | Path) -> str:
    """Which kind of source folder ``path`` is (see module docstring).

    Raises:
        InputError: ``path`` is not a folder, or holds neither image files nor DICOM series.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "source is not a folder")
    dataset_json = path / "dataset.json"
    if dataset_json.is_file():
        meta = read_json(dataset_json)
        if isinstance(meta, dict) and isinstance(meta.get("training"), list):
            return "msd"
    if (path / "imagesTr").is_dir():
        return "nnunet"
    if _image_files(path) or _image_files(path / "images"):
        return "folder"
    if any(is_dicom_file(f) for f in path.rglob("*")):
        return "dicom"
    raise InputError(path, "no image files or DICOM series found (expected MSD, nnU-Net, image files or DICOM folders)")


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files such as macOS '._x.nii.gz' excluded), sorted."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and image_suffix(f))


def modality_from_channel_name(name: str) -> str:
    """Map an MSD/nnU-Net channel name to "CT" or "MR".

    Anything that is not CT (MRI, T1, T2, FLAIR, ADC, "nonCT", ...) has no fixed intensity scale and
    is normalised by percentiles, which is the "MR" rule.
    """
    return "CT" if name.strip().upper().startswith("CT") else "MR"


def _channel_modality(meta: Any, scan: SourceScan) -> str | None:
    """Modality from dataset.json's "modality" (MSD, nnU-Net v1) or "channel_names" (nnU-Net v2)."""
    if not isinstance(meta, dict):
        return None
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict) or not channels:
        return None
    names = [str(v) for _, v in sorted(channels.items(), key=lambda kv: str(kv[0]))]
    if len(names) > 1:
        scan.warnings.append(f"{scan.path}: {len(names)} channels {names}; using channel 0 ({names[0]})")
    return modality_from_channel_name(names[0])


def _msd_path(root: Path, entry: Any, scan: SourceScan, what: str) -> Path | None:
    if not isinstance(entry, str) or not entry:
        scan.problems.append(InputError(root / "dataset.json", f"bad {what} entry {entry!r}"))
        return None
    path = (root / entry).resolve()
    if not path.exists():
        # nnU-Net v1 raw folders keep an MSD dataset.json but name the files CASE_0000.
        suffix = image_suffix(path)
        if suffix:
            alt = path.with_name(strip_image_suffix(path) + "_0000" + suffix)
            if alt.exists():
                return alt
    return path


def collect_msd(scan: SourceScan, modality: str | None) -> None:
    """Fill ``scan`` from an MSD folder's dataset.json."""
    meta = read_json(scan.path / "dataset.json")
    modality = modality or _channel_modality(meta, scan) or DEFAULT_MODALITY
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            scan.problems.append(InputError(scan.path / "dataset.json", f"training entry {i} has no 'image'"))
            continue
        image = _msd_path(scan.path, entry["image"], scan, "image")
        if image is None:
            continue
        item: dict[str, Any] = {"image": str(image)}
        if entry.get("label"):
            label = _msd_path(scan.path, entry["label"], scan, "label")
            if label is None:
                continue
            item["label"] = str(label)
        scan.training.append(_tag(item, scan.domain, modality))
    for entry in meta.get("test", []) or []:
        image = _msd_path(scan.path, entry.get("image") if isinstance(entry, dict) else entry, scan, "test")
        if image is not None:
            scan.testing.append(_tag({"image": str(image)}, scan.domain, modality))


def _nnunet_cases(folder: Path, scan: SourceScan, file_ending: str | None) -> dict[str, Path]:
    """Case id -> channel-0 file of an nnU-Net images folder."""
    channels: dict[str, dict[int, Path]] = {}
    for f in _image_files(folder):
        if file_ending and not f.name.endswith(file_ending):
            continue
        m = _NNUNET_CHANNEL.match(strip_image_suffix(f))
        if not m:
            scan.problems.append(InputError(f, "not named CASE_XXXX (nnU-Net channel suffix, e.g. _0000)"))
            continue
        channels.setdefault(m["case"], {})[int(m["channel"])] = f
    cases: dict[str, Path] = {}
    for case, files in sorted(channels.items()):
        if 0 not in files:
            scan.problems.append(InputError(folder / case, f"case has channels {sorted(files)} but no _0000"))
            continue
        if len(files) > 1:
            scan.warnings.append(f"{files[0]}: case {case} has {len(files)} channels; using _0000 only")
        cases[case] = files[0]
    return cases


def _nnunet_labels(folder: Path, file_ending: str | None) -> dict[str, Path]:
    return {
        strip_image_suffix(f): f
        for f in _image_files(folder)
        if not file_ending or f.name.endswith(file_ending)
    }


def collect_nnunet(scan: SourceScan, modality: str | None) -> None:
    """Fill ``scan`` from an nnU-Net raw folder (imagesTr/labelsTr/imagesTs)."""
    meta = read_json(scan.path / "dataset.json") if (scan.path / "dataset.json").is_file() else {}
    modality = modality or _channel_modality(meta, scan) or DEFAULT_MODALITY
    file_ending = meta.get("file_ending") if isinstance(meta, dict) else None
    images = _nnunet_cases(scan.path / "imagesTr", scan, file_ending)
    labels = _nnunet_labels(scan.path / "labelsTr", file_ending)
    for case, image in images.items():
        label = labels.get(case)
        if label is None:
            scan.problems.append(InputError(image, f"no label for case {case} in {scan.path / 'labelsTr'}"))
            continue
        scan.training.append(_tag({"image": str(image), "label": str(label)}, scan.domain, modality))
    for case in sorted(set(labels) - set(images)):
        scan.warnings.append(f"{labels[case]}: label without an image in imagesTr (ignored)")
    test_labels = _nnunet_labels(scan.path / "labelsTs", file_ending)
    for case, image in _nnunet_cases(scan.path / "imagesTs", scan, file_ending).items():
        item = {"image": str(image)}
        if case in test_labels:
            item["label"] = str(test_labels[case])
        scan.testing.append(_tag(item, scan.domain, modality))


def _is_label_name(path: Path) -> bool:
    return strip_image_suffix(path).endswith(LABEL_NAME_SUFFIXES)


def _find_label(image: Path, label_dirs: Sequence[Path]) -> Path | None:
    """The label of ``image``: in a ``labels`` folder named like the image (optionally with
    ``_label``/``_seg``), or beside the image named ``<stem>_label``/``<stem>_seg``."""
    stem = strip_image_suffix(image)
    tagged = {stem + s for s in LABEL_NAME_SUFFIXES}
    for folder in label_dirs:
        if (folder / image.name).is_file():
            return folder / image.name
        for f in _image_files(folder):
            if strip_image_suffix(f) in tagged | {stem}:
                return f
    for f in _image_files(image.parent):
        if strip_image_suffix(f) in tagged:
            return f
    return None


def collect_folder(scan: SourceScan, modality: str | None) -> None:
    """Fill ``scan`` from a folder of image files (labels optional, see module docstring)."""
    modality = modality or DEFAULT_MODALITY
    image_dir = scan.path / "images" if _image_files(scan.path / "images") else scan.path
    label_dirs = list(dict.fromkeys(d for d in (image_dir / "labels", scan.path / "labels") if d.is_dir()))
    used_labels: set[Path] = set()
    for image in _image_files(image_dir):
        if _is_label_name(image):
            continue
        item: dict[str, Any] = {"image": str(image.resolve())}
        label = _find_label(image, label_dirs)
        if label is not None:
            item["label"] = str(label.resolve())
            used_labels.add(label.resolve())
        scan.training.append(_tag(item, scan.domain, modality))
    for folder in [*label_dirs, image_dir]:
        for f in _image_files(folder):
            if (folder != image_dir or _is_label_name(f)) and f.resolve() not in used_labels:
                scan.warnings.append(f"{f}: label file without a matching image (ignored)")


def _series_key(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).parts or (root.name,)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel))


def collect_dicom(scan: SourceScan, modality: str | None, cache_dir: Path) -> None:
    """Fill ``scan`` from a folder of DICOM series (headers only; conversion happens after validation)."""
    for folder in find_series_folders(scan.path):
        try:
            series = scan_series(folder)
        except InputError as e:
            scan.problems.append(e)
            continue
        series_modality = modality
        if series_modality is None:
            if series.modality not in MODALITIES:
                problem = f"DICOM modality {series.modality!r} is not CT or MR (use --modality {scan.domain}=CT|MR)"
                scan.problems.append(InputError(folder, problem))
                continue
            series_modality = series.modality
        target = cache_dir / f"{_series_key(scan.path, folder)}.nii.gz"
        item = _tag({"image": str(target.resolve())}, scan.domain, series_modality)
        scan.training.append(item)
        scan.dicom.append((item, series))


def _tag(item: dict[str, Any], domain: str, modality: str) -> dict[str, Any]:
    item["domain"] = domain
    item["modality"] = modality
    return item


def scan_source(domain: str, path: str | Path, cache_dir: str | Path, modality: str | None = None) -> SourceScan:
    """Collect the items of one source folder (no voxel reads; DICOM headers only).

    Args:
        domain: domain name given to every item.
        path: the source folder.
        cache_dir: where DICOM series of this source will be converted to NIfTI.
        modality: "CT" or "MR" for every item; None to take it from dataset.json / DICOM (default CT).

    Returns:
        the scan; problems are recorded in it, never raised.
    """
    path = Path(path).resolve()
    modality = normalize_modality(modality) if modality else None
    scan = SourceScan(domain=domain, path=path, kind="")
    try:
        scan.kind = detect_source_kind(path)
        if scan.kind == "msd":
            collect_msd(scan, modality)
        elif scan.kind == "nnunet":
            collect_nnunet(scan, modality)
        elif scan.kind == "dicom":
            collect_dicom(scan, modality, Path(cache_dir))
        else:
            collect_folder(scan, modality)
    except InputError as e:
        scan.problems.append(e)
        return scan
    if not scan.training and not scan.testing and not scan.problems:
        scan.problems.append(InputError(path, f"no images found in this {scan.kind} source"))
    return scan


def folder_items(
    dataset_dir: str | Path,
    domain: str = "dataset",
    cache_dir: str | Path | None = None,
    modality: str | None = None,
    verify_data: bool = False,
) -> list[dict[str, Any]]:
    """Items (absolute paths) for every image of one source folder, for bundles given a ``dataset_dir``.

    MSD/nnU-Net training and test images are all returned; DICOM series are converted into
    ``cache_dir`` (default ``<dataset_dir>/../converted/<domain>``).

    Raises:
        InputError / InputErrors: naming every bad file.
    """
    dataset_dir = Path(dataset_dir).resolve()
    cache = Path(cache_dir) if cache_dir else dataset_dir.parent / CONVERTED_DIR / domain
    scan = scan_source(domain, dataset_dir, cache, modality)
    dicom_items = {id(item) for item, _ in scan.dicom}
    plain = [it for it in scan.training + scan.testing if id(it) not in dicom_items]
    problems = scan.problems + check_items(plain, verify_data=verify_data)
    _raise_if_any(problems)
    _convert_all(scan.dicom)
    for w in scan.warnings:
        logger.warning(w)
    return scan.training + scan.testing


# ------------------------------------------------------------------------------------------ build


def split_training(
    items: Sequence[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split items into (training, validation), stratified per domain and deterministic.

    Within a domain, items are ordered by image path and shuffled with a generator seeded by
    ``seed`` and the domain name, so adding a domain does not change another domain's split. Each
    domain with two or more items keeps at least one item on each side when ``val_fraction`` > 0.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_domain.setdefault(item["domain"], []).append(item)
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for domain, group in by_domain.items():
        group = sorted(group, key=lambda it: it["image"])
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        order = list(range(len(group)))
        random.Random(f"{seed}:{domain}").shuffle(order)
        val_idx = set(order[:n_val])
        train += [it for i, it in enumerate(group) if i not in val_idx]
        val += [it for i, it in enumerate(group) if i in val_idx]
    return train, val


def _raise_if_any(problems: Sequence[InputError]) -> None:
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InputErrors(list(problems))


def _convert_all(pending: Sequence[tuple[dict[str, Any], DicomSeries]]) -> None:
    problems: list[InputError] = []
    for item, series in pending:
        try:
            convert_series(series, item["image"])
        except InputError as e:
            problems.append(e)
    _raise_if_any(problems)


def _relative(item: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(item)
    for key in ("image", "label"):
        if out.get(key):
            out[key] = Path(os.path.relpath(out[key], base)).as_posix()
    return out


def build_datalist(
    sources: Sequence[tuple[str, str | Path]],
    out: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    modalities: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    verify_data: bool = True,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Scan, validate, split and write a datalist; write nothing if any file has a problem.

    Args:
        sources: (domain name, folder) pairs; the order gives "domains".
        out: datalist JSON to write (paths in it are relative to its folder).
        val_fraction: fraction of each domain's training items moved to "validation".
        seed: seed of the split.
        modalities: domain -> "CT"/"MR" overriding what the source says (default CT).
        num_classes: label values must lie in 0..num_classes (None: not checked).
        verify_data: read every voxel (truncated files, NaN/Inf, label values); False checks headers.
        warn: receives each warning (e.g. a multi-channel case); default: this module's logger.

    Returns:
        the datalist as written.

    Raises:
        InputError / InputErrors: every bad file, one problem each ("<file>: <problem>").
        ValueError: bad arguments (duplicate or unknown domain names, val_fraction).
    """
    out = Path(out).resolve()
    names = [name for name, _ in sources]
    if not names:
        raise ValueError("at least one source is needed")
    for name in names:
        if not name or names.count(name) > 1:
            raise ValueError(f"domain names must be unique and non-empty, got {names}")
    modalities = dict(modalities or {})
    unknown = sorted(set(modalities) - set(names))
    if unknown:
        raise ValueError(f"modality given for unknown source(s) {unknown}; sources are {names}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    scans = [
        scan_source(name, path, out.parent / CONVERTED_DIR / name, modalities.get(name)) for name, path in sources
    ]
    problems = [p for s in scans for p in s.problems]
    dicom_items = {id(item) for s in scans for item, _ in s.dicom}
    plain = [it for s in scans for it in s.training + s.testing if id(it) not in dicom_items]
    problems += check_items(plain, verify_data=verify_data, num_classes=num_classes)
    warn = warn or logger.warning
    for s in scans:
        for w in s.warnings:
            warn(w)
    _raise_if_any(problems)
    _convert_all([p for s in scans for p in s.dicom])

    train, val = split_training([it for s in scans for it in s.training], val_fraction, seed)
    testing = [it for s in scans for it in s.testing]
    base = out.parent
    datalist = {
        "training": [_relative(it, base) for it in train],
        "validation": [_relative(it, base) for it in val],
        "testing": [_relative(it, base) for it in testing],
        "domains": names,
    }
    write_json(out, datalist)
    return datalist


# ------------------------------------------------------------------------------------------- load


def load_datalist(
    path: str | Path,
    keys: Sequence[str] = ("training",),
    require_labels: bool = False,
    num_classes: int | None = None,
    check_headers: bool = True,
    verify_data: bool = False,
    missing_ok: bool = False,
) -> dict[str, Any]:
    """Read a datalist, resolve its paths and validate the lists named in ``keys``.

    Args:
        path: datalist JSON.
        keys: lists that must be present, non-empty and valid (e.g. ("training", "validation")).
        require_labels: every item of ``keys`` must have a "label".
        num_classes: label values must lie in 0..num_classes (checked only with ``verify_data``).
        check_headers: read each file's header (3D volume, label on the image's grid); False only
            checks that the files exist.
        verify_data: also read every voxel (truncated files, NaN/Inf, label values); slow.
        missing_ok: a missing file gives empty lists (a config resolved before its data exists;
            its run stops in :func:`custom_nets.utils.inputs.require_inputs`).

    Returns:
        the datalist with absolute "image"/"label" paths in every list, "modality" filled in
        (default CT) and "domain_index" (position in "domains") added to each item.

    Raises:
        InputError: one problem (e.g. an empty list, an unknown domain, a missing file).
        InputErrors: several problems, one per bad file.
    """
    if as_bool(missing_ok, "missing_ok") and is_missing(path):
        note_missing(path, "datalist")
        return {**{k: [] for k in dict.fromkeys(list(DATALIST_KEYS) + list(keys))}, "domains": [], "missing": str(path)}
    path, verify_data = Path(path).resolve(), as_bool(verify_data, "verify_data")
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "a datalist must be a JSON object with 'training', 'validation', 'testing', 'domains'")
    domains = data.get("domains")
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise InputError(path, "'domains' must be a non-empty list of domain names")
    base = path.parent
    result: dict[str, Any] = dict(data)
    problems: list[InputError] = []
    for key in dict.fromkeys(list(DATALIST_KEYS) + list(keys)):
        items = data.get(key)
        if items is None and key not in keys:
            continue
        if not isinstance(items, list) or (key in keys and not items):
            state = "missing" if items is None else "empty" if isinstance(items, list) else "not a list"
            raise InputError(path, f"'{key}' is {state}; it must list at least one item")
        resolved = []
        for i, item in enumerate(items):
            where = f"{path} [{key}][{i}]"
            if not isinstance(item, dict) or not item.get("image"):
                problems.append(InputError(where, "item must be an object with an 'image' path"))
                continue
            item = dict(item)
            for k in ("image", "label"):
                if item.get(k):
                    item[k] = os.path.normpath(base / item[k])
            domain = item.get("domain")
            if domain not in domains:
                problems.append(InputError(item["image"], f"domain {domain!r} ({where}) is not in 'domains' {domains}"))
            else:
                item["domain_index"] = domains.index(domain)
            try:
                item["modality"] = normalize_modality(str(item.get("modality") or DEFAULT_MODALITY))
            except ValueError as e:
                problems.append(InputError(item["image"], f"{e} ({where})"))
            resolved.append(item)
        result[key] = resolved
        if key in keys:
            problems += _check_loaded(resolved, require_labels, num_classes, check_headers, verify_data)
    _raise_if_any(problems)
    return result


def _check_loaded(
    items: list[dict[str, Any]], require_labels: bool, num_classes: int | None, check_headers: bool, verify_data: bool
) -> list[InputError]:
    if check_headers or verify_data:
        return check_items(items, verify_data=verify_data, require_label=require_labels, num_classes=num_classes)
    problems = []
    for item in items:
        if require_labels and not item.get("label"):
            problems.append(InputError(item["image"], "no label given for this image"))
        for k in ("image", "label"):
            if item.get(k) and not Path(item[k]).is_file():
                problems.append(InputError(item[k], "file not found"))
    return problems


# ------------------------------------------------------------------------------------------- CLI


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{what} must be NAME=VALUE, got {text!r}")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 written, 1 bad input, 2 bad arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m custom_nets.data.datalist",
        description="Build and validate a MeDUET image datalist from MSD, nnU-Net, image-folder or DICOM sources.",
    )
    parser.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                        type=lambda s: _name_value(s, "--source"), help="a source folder and its domain name (repeat)")
    parser.add_argument("--out", required=True, type=Path, help="datalist JSON to write")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="per-domain validation fraction (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training/validation split (default 0)")
    parser.add_argument("--modality", action="append", default=[], metavar="NAME=CT|MR",
                        type=lambda s: _name_value(s, "--modality"), help="override a source's modality (repeat)")
    parser.add_argument("--num-classes", type=int, default=None, help="label values must lie in 0..K")
    args = parser.parse_args(argv)
    try:
        modalities = {name: normalize_modality(value) for name, value in args.modality}
        datalist = build_datalist(
            args.source, args.out, val_fraction=args.val_fraction, seed=args.seed,
            modalities=modalities, num_classes=args.num_classes,
            warn=lambda text: print(f"warning: {text}", file=sys.stderr),
        )
    except ValueError as e:
        if isinstance(e, InputErrors):
            errors = e.errors
        elif isinstance(e, InputError):
            errors = [e]
        else:
            parser.print_usage(sys.stderr)
            print(f"error: {e}", file=sys.stderr)
            return 2
        for err in errors:
            print(err, file=sys.stderr)
        print(f"{len(errors)} problem(s); {args.out} not written", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {len(datalist[k])}" for k in DATALIST_KEYS)
    print(f"wrote {args.out}: {counts}; domains {datalist['domains']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
