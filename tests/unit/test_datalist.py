"""Datalist builder, validator, DICOM conversion and loader on small synthetic sources."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.data.datalist import (
    build_datalist,
    detect_source_kind,
    folder_items,
    load_datalist,
    main,
    split_training,
)
from custom_nets.data.dicom import scan_series
from custom_nets.data.validate import check_image, read_header
from custom_nets.utils.errors import InputError, InputErrors

AFFINE = np.array([[1.2, 0, 0, -10.0], [0, 1.2, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


# ------------------------------------------------------------------------------------- fixtures


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def volume(seed: int = 0, shape: tuple[int, ...] = (10, 9, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(np.float32)


def label(shape: tuple[int, ...] = (10, 9, 8), value: int = 2) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:6, 2:6, 2:5] = value
    lab[6:8, 6:8, 5:7] = 1
    return lab


def make_msd(root: Path, n: int = 3) -> Path:
    training = []
    for i in range(n):
        write_nifti(root / "imagesTr" / f"case_{i}.nii.gz", volume(i))
        write_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label())
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    write_nifti(root / "imagesTs" / "case_9.nii.gz", volume(9))
    meta = {"name": "Demo", "modality": {"0": "CT"}, "training": training, "test": ["./imagesTs/case_9.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(root: Path) -> Path:
    for case in ("liver_001", "liver_002"):
        write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", volume(1))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label())
    write_nifti(root / "imagesTr" / "liver_002_0001.nii.gz", volume(2))  # second channel: warned, unused
    write_nifti(root / "imagesTs" / "liver_003_0000.nii.gz", volume(3))
    meta = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_folder(root: Path) -> Path:
    write_nifti(root / "a.nii.gz", volume(4))
    write_nifti(root / "labels" / "a.nii.gz", label())
    write_nifti(root / "b.nii", volume(5))  # no label
    write_nifti(root / "c.nii.gz", volume(6))
    write_nifti(root / "c_seg.nii.gz", label())
    return root


def write_dicom_series(
    folder: Path,
    n_slices: int = 8,
    skip: tuple[int, ...] = (),
    series_uid: str | None = None,
    tilt_deg: float = 30.0,
    prefix: str = "IM",
    spacing: float = 2.5,
    decimals: int = 4,
) -> dict:
    """CT slices 16 rows x 12 columns, oblique (rotated about x), files named in reverse order;
    positions written with ``decimals`` decimals (scanners often round to 0.1 mm)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    c, s = np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg))
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, c, -s])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-100.0, -120.0, -50.0])
    pixels = {}
    for k in range(n_slices):
        if k in skip:
            continue
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series_uid
        ds.PatientID = "phantom"
        ds.Rows, ds.Columns = 16, 12
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient = [round(float(v), decimals) for v in origin + k * spacing * normal]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in np.r_[row_dir, col_dir]]
        ds.PixelSpacing = [0.7, 0.8]  # between rows, between columns
        ds.SliceThickness = spacing
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.InstanceNumber = k + 1
        arr = (np.arange(16 * 12).reshape(16, 12) + 100 * k).astype(np.uint16)
        ds.PixelData = arr.tobytes()
        pixels[k] = arr
        pydicom.dcmwrite(str(folder / f"{prefix}{n_slices - k:04d}"), ds, enforce_file_format=True)
    return {"row_dir": row_dir, "col_dir": col_dir, "normal": normal, "origin": origin, "pixels": pixels}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------------ good input


def test_detect_kinds(tmp_path: Path) -> None:
    assert detect_source_kind(make_msd(tmp_path / "msd")) == "msd"
    assert detect_source_kind(make_nnunet(tmp_path / "nnunet")) == "nnunet"
    assert detect_source_kind(make_folder(tmp_path / "plain")) == "folder"
    write_dicom_series(tmp_path / "dicom" / "s1", n_slices=3)
    assert detect_source_kind(tmp_path / "dicom") == "dicom"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        detect_source_kind(tmp_path / "empty")


def test_build_all_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_msd(tmp_path / "msd")
    make_nnunet(tmp_path / "nnunet")
    make_folder(tmp_path / "plain")
    geometry = write_dicom_series(tmp_path / "dicom" / "patient1" / "series1")
    out = tmp_path / "lists" / "datalist.json"
    status, stdout, stderr = run_cli(
        capsys,
        "--source", f"MSD={tmp_path / 'msd'}", "--source", f"NNU={tmp_path / 'nnunet'}",
        "--source", f"PLAIN={tmp_path / 'plain'}", "--source", f"DCM={tmp_path / 'dicom'}",
        "--out", str(out), "--val-fraction", "0.34", "--seed", "3", "--modality", "PLAIN=mr",
        "--num-classes", "2",
    )
    assert status == 0, stderr
    assert "wrote" in stdout
    assert "liver_002" in stderr and "channels" in stderr  # multi-channel case warned
    data = json.loads(out.read_text())
    assert data["domains"] == ["MSD", "NNU", "PLAIN", "DCM"]
    items = data["training"] + data["validation"]
    by_domain = {d: [it for it in items if it["domain"] == d] for d in data["domains"]}
    assert [len(by_domain[d]) for d in data["domains"]] == [3, 2, 3, 1]
    assert {it["modality"] for it in by_domain["MSD"]} == {"CT"}
    assert {it["modality"] for it in by_domain["NNU"]} == {"MR"}  # channel "T2"
    assert {it["modality"] for it in by_domain["PLAIN"]} == {"MR"}  # --modality override
    assert by_domain["DCM"][0]["modality"] == "CT"  # DICOM Modality tag
    # Stratified: every domain with >= 2 items has one in validation.
    assert sorted(it["domain"] for it in data["validation"]) == ["MSD", "NNU", "PLAIN"]
    assert len(data["testing"]) == 2
    plain = {Path(it["image"]).name: it.get("label") for it in by_domain["PLAIN"]}
    assert plain == {"a.nii.gz": "../plain/labels/a.nii.gz", "b.nii": None, "c.nii.gz": "../plain/c_seg.nii.gz"}
    nnu = sorted(Path(it["image"]).name for it in by_domain["NNU"])
    assert nnu == ["liver_001_0000.nii.gz", "liver_002_0000.nii.gz"]
    # Paths are relative to the datalist's folder; the DICOM series went to <out dir>/converted/<domain>/.
    assert all(not Path(it["image"]).is_absolute() for it in items)
    assert by_domain["DCM"][0]["image"] == "converted/DCM/patient1__series1.nii.gz"

    loaded = load_datalist(out, keys=("training", "validation"), verify_data=True, num_classes=2)
    dcm = next(it for it in loaded["training"] + loaded["validation"] if it["domain"] == "DCM")
    assert dcm["domain_index"] == 3 and Path(dcm["image"]).is_absolute()
    _check_converted_dicom(Path(dcm["image"]), geometry)


def _check_converted_dicom(path: Path, geometry: dict) -> None:
    """Voxel (i=column, j=row, k=slice) lies at IPP_k + i*0.8*row_dir + j*0.7*col_dir (LPS), in RAS."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.shape == (12, 16, 8) and data.dtype == np.int16
    for k, arr in geometry["pixels"].items():
        np.testing.assert_array_equal(data[:, :, k], arr.T.astype(np.int16) - 1024)
    for i, j, k in [(0, 0, 0), (5, 3, 2), (11, 15, 7)]:
        lps = geometry["origin"] + k * 2.5 * geometry["normal"]
        lps = lps + i * 0.8 * geometry["row_dir"] + j * 0.7 * geometry["col_dir"]
        ras = lps * np.array([-1, -1, 1])
        np.testing.assert_allclose(img.affine @ [i, j, k, 1], [*ras, 1], atol=1e-3)
    np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-4)


def test_dicom_positions_rounded_to_a_tenth_of_a_mm_are_one_series(tmp_path: Path) -> None:
    """An oblique series (20 slices, 7 mm) whose positions are stored to 0.1 mm: gaps of 6.9-7.1 mm
    are rounding, not missing slices; a real gap in the same series is still reported."""
    write_dicom_series(tmp_path / "rounded", n_slices=20, spacing=7.0, tilt_deg=17.0, decimals=1)
    series = scan_series(tmp_path / "rounded")
    assert series.shape[2] == 20
    np.testing.assert_allclose(np.linalg.norm(series.affine[:3, 2]), 7.0, atol=0.02)
    write_dicom_series(tmp_path / "gap", n_slices=20, spacing=7.0, tilt_deg=17.0, decimals=1, skip=(9,))
    with pytest.raises(InputError, match="missing slice\\(s\\): 1 missing"):
        scan_series(tmp_path / "gap")
    write_dicom_series(tmp_path / "uneven", n_slices=6, spacing=7.0, tilt_deg=17.0, decimals=1, skip=())
    import pydicom  # a slice moved by 1 mm: more than rounding, less than a slice

    f = sorted((tmp_path / "uneven").iterdir())[2]
    ds = pydicom.dcmread(str(f))
    ds.ImagePositionPatient = [float(v) + d for v, d in zip(ds.ImagePositionPatient, (0.0, 0.0, 1.0))]
    ds.save_as(str(f))
    with pytest.raises(InputError, match="inconsistent slice spacing"):
        scan_series(tmp_path / "uneven")


def test_dicom_affine_matches_itk(tmp_path: Path) -> None:
    """Independent check of the LPS->RAS affine: MONAI's ITKReader reads the same series via GDCM."""
    from monai.data import ITKReader

    from custom_nets.data.dicom import convert_series

    write_dicom_series(tmp_path / "s")
    series = scan_series(tmp_path / "s")
    out = convert_series(series, tmp_path / "s.nii.gz")
    reader = ITKReader()
    itk_data, itk_meta = reader.get_data(reader.read(str(tmp_path / "s")))
    ours = nib.load(str(out))
    np.testing.assert_allclose(ours.affine, itk_meta["affine"], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), itk_data)
    # A second conversion of an unchanged series reuses the cache.
    mtime = out.stat().st_mtime_ns
    assert convert_series(series, out) == out and out.stat().st_mtime_ns == mtime


def test_split_deterministic_and_stratified() -> None:
    items = [{"image": f"/d/{d}_{i}.nii.gz", "domain": d} for d in ("A", "B") for i in range(10)] + [
        {"image": "/d/C_0.nii.gz", "domain": "C"}
    ]
    train, val = split_training(items, 0.2, seed=1)
    rev_train, rev_val = split_training(list(reversed(items)), 0.2, seed=1)  # input order irrelevant
    assert sorted(it["image"] for it in rev_val) == sorted(it["image"] for it in val)
    assert sorted(it["image"] for it in rev_train) == sorted(it["image"] for it in train)
    assert sorted(it["domain"] for it in val) == ["A", "A", "B", "B"]
    assert len(train) == 17 and "C" in {it["domain"] for it in train}
    other = split_training(items, 0.2, seed=2)[1]
    assert {it["image"] for it in other} != {it["image"] for it in val}
    # Adding a domain does not change the split of the others.
    assert split_training(items + [{"image": "/d/Z.nii.gz", "domain": "Z"}], 0.2, seed=1)[1] == val


def test_nrrd_image_and_singleton_4d_accepted(tmp_path: Path) -> None:
    import itk

    arr = volume(7, shape=(8, 9, 10))  # numpy (z, y, x) -> ITK size (10, 9, 8)
    image = itk.image_from_array(arr)
    image.SetSpacing([0.5, 0.6, 0.7])
    (tmp_path / "src").mkdir()
    itk.imwrite(image, str(tmp_path / "src" / "x.nrrd"))
    write_nifti(tmp_path / "src" / "y.nii.gz", volume(8)[..., None])  # (X, Y, Z, 1)
    header = read_header(tmp_path / "src" / "x.nrrd")
    assert header.shape == (10, 9, 8)
    np.testing.assert_allclose(header.spacing, (0.5, 0.6, 0.7))
    np.testing.assert_allclose(np.diag(header.affine)[:3], (-0.5, -0.6, 0.7))  # LPS identity -> RAS
    data = build_datalist([("X", tmp_path / "src")], tmp_path / "dl.json", val_fraction=0.0)
    assert sorted(Path(it["image"]).name for it in data["training"]) == ["x.nrrd", "y.nii.gz"]


def test_label_stored_las_on_same_grid_passes(tmp_path: Path) -> None:
    lab = label()
    flipped_affine = AFFINE.copy()
    flipped_affine[0, 0] = -AFFINE[0, 0]
    flipped_affine[0, 3] = AFFINE[0, 3] + AFFINE[0, 0] * (lab.shape[0] - 1)
    write_nifti(tmp_path / "p" / "im.nii.gz", volume(0))
    write_nifti(tmp_path / "p" / "im_label.nii.gz", lab[::-1].copy(), flipped_affine)
    data = build_datalist([("P", tmp_path / "p")], tmp_path / "dl.json", val_fraction=0.0, num_classes=2)
    assert data["training"][0]["label"] == "p/im_label.nii.gz"


def test_folder_items_for_dataset_dir(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "dcm" / "s1", n_slices=4)
    items = folder_items(tmp_path / "dcm", domain="site")
    assert len(items) == 1 and Path(items[0]["image"]).is_file()
    assert Path(items[0]["image"]).parent == tmp_path / "converted" / "site"
    items = folder_items(make_msd(tmp_path / "msd", n=2))
    assert len(items) == 3 and all(Path(it["image"]).is_absolute() for it in items)


def test_load_datalist_resolves_and_checks(tmp_path: Path) -> None:
    make_folder(tmp_path / "plain")
    out = tmp_path / "dl.json"
    build_datalist([("P", tmp_path / "plain")], out, val_fraction=0.0)
    loaded = load_datalist(out)
    assert all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in loaded["training"])
    assert all(it["modality"] == "CT" and it["domain_index"] == 0 for it in loaded["training"])
    with pytest.raises(InputError, match="no label given") as e:
        load_datalist(out, require_labels=True)
    assert "b.nii" in str(e.value)
    with pytest.raises(InputError, match="'validation' is empty") as e:
        load_datalist(out, keys=("training", "validation"))
    assert str(out) in str(e.value)
    # Only existence when headers are not checked.
    (tmp_path / "plain" / "b.nii").unlink()
    with pytest.raises(InputError, match="file not found") as e:
        load_datalist(out, check_headers=False)
    assert "b.nii" in str(e.value)


# ------------------------------------------------------------------------------------- bad input


def _truncated(root: Path) -> str:
    path = write_nifti(root / "trunc.nii.gz", volume(0, (20, 20, 20)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "unreadable voxel data"


def _two_d(root: Path) -> str:
    write_nifti(root / "flat.nii.gz", volume(0, (10, 9)))
    return "2D image"


def _four_d(root: Path) -> str:
    write_nifti(root / "multi.nii.gz", volume(0, (10, 9, 8, 3)))
    return "4D image"


def _nan(root: Path) -> str:
    data = volume(0)
    data[1, 2, 3] = np.nan
    data[2, 2, 3] = np.inf
    write_nifti(root / "nan.nii.gz", data)
    return "2 non-finite voxel(s)"


def _grid_shape(root: Path) -> str:
    write_nifti(root / "img.nii.gz", volume(0))
    write_nifti(root / "labels" / "img.nii.gz", label(shape=(10, 9, 7)))
    return "label grid [10, 9, 7] differs from image grid [10, 9, 8]"


def _grid_affine(root: Path) -> str:
    write_nifti(root / "img.nii.gz", volume(0))
    shifted = AFFINE.copy()
    shifted[2, 3] += 1.0
    write_nifti(root / "img_label.nii.gz", label(), shifted)
    return "label affine differs from image affine"


def _label_value(root: Path) -> str:
    write_nifti(root / "img.nii.gz", volume(0))
    write_nifti(root / "img_seg.nii.gz", label(value=5))
    return "label value 5 above the largest class 2"


def _dicom_two_series(root: Path) -> str:
    write_dicom_series(root / "mixed", n_slices=3, series_uid="1.2.3.1", prefix="A")
    write_dicom_series(root / "mixed", n_slices=3, series_uid="1.2.3.2", prefix="B")
    return "2 series in one folder"


def _dicom_missing_slice(root: Path) -> str:
    write_dicom_series(root / "gappy", n_slices=8, skip=(4,))
    return "missing slice(s): 1 missing"


BAD_CASES = {
    "truncated": ("trunc.nii.gz", _truncated),
    "2d": ("flat.nii.gz", _two_d),
    "4d": ("multi.nii.gz", _four_d),
    "nan": ("nan.nii.gz", _nan),
    "label_grid_shape": ("labels/img.nii.gz", _grid_shape),
    "label_grid_affine": ("img_label.nii.gz", _grid_affine),
    "label_value": ("img_seg.nii.gz", _label_value),
    "dicom_two_series": ("mixed", _dicom_two_series),
    "dicom_missing_slice": ("gappy", _dicom_missing_slice),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_reported_and_nothing_written(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_name, make = BAD_CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    problem = make(src)
    out = tmp_path / "out" / "datalist.json"
    status, stdout, stderr = run_cli(capsys, "--source", f"S={src}", "--out", str(out), "--num-classes", "2")
    assert status == 1
    line = next((ln for ln in stderr.splitlines() if str(src / bad_name) in ln), None)
    assert line is not None, stderr
    assert problem in line, line
    assert "not written" in stderr
    assert not (tmp_path / "out").exists()  # neither the datalist nor a DICOM cache


def test_all_problems_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for name in ("truncated", "2d", "4d", "nan", "label_value"):
        BAD_CASES[name][1](src)
    write_nifti(src / "good.nii.gz", volume(3))
    dicom = tmp_path / "dicom"
    _dicom_missing_slice(dicom)
    write_dicom_series(dicom / "fine", n_slices=4)
    out = tmp_path / "datalist.json"
    status, _, stderr = run_cli(
        capsys, "--source", f"A={src}", "--source", f"B={dicom}", "--out", str(out), "--num-classes", "2"
    )
    assert status == 1
    bad = [ln for ln in stderr.splitlines() if ln.startswith(str(tmp_path))]
    assert len(bad) == 6, stderr
    for name in ("trunc.nii.gz", "flat.nii.gz", "multi.nii.gz", "nan.nii.gz", "img_seg.nii.gz", "gappy"):
        assert sum(name in ln for ln in bad) == 1, (name, stderr)
    assert not out.exists() and not (tmp_path / "converted").exists()


def test_check_image_direct() -> None:
    header, problems = check_image("/nonexistent/x.nii.gz")
    assert header is None and "file not found" in str(problems[0])
    _, problems = check_image(__file__)
    assert "unsupported file type" in str(problems[0])


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header"))
    _, problems = check_image(path)
    assert str(path) in str(problems[0]) and "unreadable header" in str(problems[0])


def _datalist_file(tmp_path: Path, training: list, domains: list) -> Path:
    write_nifti(tmp_path / "img.nii.gz", volume(0))
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": training, "validation": [], "testing": [], "domains": domains}))
    return path


def test_load_empty_datalist(tmp_path: Path) -> None:
    path = _datalist_file(tmp_path, [], ["A"])
    with pytest.raises(InputError) as e:
        load_datalist(path)
    assert str(path) in str(e.value) and "'training' is empty" in str(e.value)


def test_load_unknown_domain(tmp_path: Path) -> None:
    path = _datalist_file(tmp_path, [{"image": "img.nii.gz", "domain": "B"}], ["A"])
    with pytest.raises(InputError) as e:
        load_datalist(path)
    assert str(tmp_path / "img.nii.gz") in str(e.value) and "domain 'B'" in str(e.value)


def test_load_collects_every_bad_file(tmp_path: Path) -> None:
    items = [{"image": "img.nii.gz", "domain": "A"}, {"image": "gone1.nii.gz", "domain": "A"},
             {"image": "gone2.nii.gz", "domain": "A", "modality": "PET"}]
    path = _datalist_file(tmp_path, items, ["A"])
    with pytest.raises(InputErrors) as e:
        load_datalist(path)
    text = str(e.value)
    assert "gone1.nii.gz: file not found" in text and "gone2.nii.gz: file not found" in text
    assert "unknown modality 'PET'" in text


def test_cli_usage_errors_and_exit_status(tmp_path: Path) -> None:
    make_folder(tmp_path / "plain")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "custom_nets.data.datalist", "--out", str(tmp_path / "dl.json")]
    ok = subprocess.run(cmd + ["--source", f"P={tmp_path / 'plain'}"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "dl.json").is_file()
    bad = subprocess.run(cmd + ["--source", f"P={tmp_path / 'nope'}"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and f"{tmp_path / 'nope'}: source is not a folder" in bad.stderr
    dup_args = ["--source", f"P={tmp_path}", "--source", f"P={tmp_path}"]
    dup = subprocess.run(cmd + dup_args, capture_output=True, text=True, env=env)
    assert dup.returncode == 2 and "unique" in dup.stderr


def test_a_missing_datalist_resolves_empty_only_when_allowed(tmp_path: Path) -> None:
    """Configs resolve before their data exist (missing_ok); a run then stops naming the config id."""
    from custom_nets.engines.seg.inference import inference_items
    from custom_nets.utils.inputs import require_inputs

    missing = tmp_path / "nowhere" / "datalist.json"
    with pytest.raises(InputError, match="file not found"):
        load_datalist(missing)
    empty = load_datalist(missing, keys=("training", "validation"), missing_ok=True)
    assert empty["training"] == empty["validation"] == empty["domains"] == [] and empty["missing"] == str(missing)
    assert inference_items(tmp_path / "no_images", missing_ok=True) == []
    with pytest.raises(InputError, match="no_images"):
        inference_items(tmp_path / "no_images")
    with pytest.raises(InputError, match=f"^datalist: {missing} not found; set it with --datalist PATH$"):
        require_inputs({"datalist": missing})
    require_inputs({"datalist": make_folder(tmp_path / "present")})  # an existing path passes
