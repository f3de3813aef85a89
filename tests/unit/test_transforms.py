"""Preprocessing chain: intensity rules, geometry (spacing, crop, pad) and inversion to the original grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import Compose, Invertd

from custom_nets.data.transforms import (
    CT_WINDOW,
    NormalizeIntensityByModalityd,
    check_finite,
    input_error_from,
    preprocess_transforms,
)
from custom_nets.utils.errors import InputError

# 1 x 2 x 3 mm voxels, stored L-P-S-ward on x and y (not RAS), so Orientationd has work to do.
AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, -2.0, 0, 30.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def body(shape: tuple[int, int, int] = (30, 20, 12)) -> tuple[np.ndarray, np.ndarray]:
    """CT-like volume: air (-1000 HU) around an ellipsoid of soft tissue (40 HU) with a 'organ' label."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    image = np.where(r < 0.8, 40.0, -1000.0).astype(np.float32)
    label = (np.sqrt(((grid - 0.15) ** 2).sum(0)) < 0.45).astype(np.uint8)
    return image, label


def test_ct_window_values() -> None:
    hu = torch.tensor([-1000.0, -175.0, 0.0, 37.5, 250.0, 3000.0]).reshape(1, 6, 1, 1)
    out = NormalizeIntensityByModalityd("image")({"image": MetaTensor(hu), "modality": "CT"})["image"]
    expected = np.clip((hu.numpy() - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out.flatten()[[1, 3, 4]].numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    # No modality key means CT.
    same = NormalizeIntensityByModalityd("image")({"image": MetaTensor(hu)})["image"]
    np.testing.assert_allclose(same.numpy(), expected, atol=1e-6)


def test_mr_percentile_scaling() -> None:
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 150.0, size=(1, 20, 20, 20)).astype(np.float32)
    values[0, 0, 0, :3] = 1e6  # bright outliers must not squash the range
    out = NormalizeIntensityByModalityd("image")({"image": MetaTensor(torch.from_numpy(values)), "modality": "mr"})
    lo, hi = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-5)
    assert out["image"].min() == 0.0 and out["image"].max() == 1.0
    assert 0.2 < float(out["image"].median()) < 0.5
    with pytest.raises(ValueError, match="unknown modality"):
        NormalizeIntensityByModalityd("image")({"image": MetaTensor(torch.zeros(1, 2, 2, 2)), "modality": "PET"})


def test_geometry_spacing_min_size_and_divisor(tmp_path: Path) -> None:
    image, label = body()
    data = {"image": write_nifti(tmp_path / "im.nii.gz", image), "label": write_nifti(tmp_path / "lb.nii.gz", label)}
    out = preprocess_transforms(label_key="label")(data)  # defaults: 1.5 mm, min 96, divisor 4
    img, lab = out["image"], out["label"]
    assert img.dtype == torch.float32 and img.shape[0] == 1
    assert tuple(img.shape[1:]) == (96, 96, 96) and tuple(lab.shape) == tuple(img.shape)
    np.testing.assert_allclose(img.pixdim.numpy(), [1.5, 1.5, 1.5], atol=1e-6)
    assert np.all(np.diag(img.affine.numpy())[:3] > 0)  # RAS
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert set(np.unique(lab.numpy())) == {0.0, 1.0}  # nearest interpolation keeps label values
    # Foreground crop then padding: the body (fg > 0) is centred and the padding is 0.
    assert float(img[0, 0].max()) == 0.0 and float(img[0, 48].max()) > 0.0


def test_then_appends_transforms_after_the_preprocessing(tmp_path: Path) -> None:
    """``then=`` (a config's ``@train#augmentation``) runs on the preprocessed item, list or Compose alike."""
    from monai.transforms import CenterSpatialCropd

    image, _ = body()
    data = {"image": write_nifti(tmp_path / "im.nii.gz", image)}
    plain = preprocess_transforms()
    crop = [CenterSpatialCropd(keys=["image"], roi_size=[32, 32, 32])]
    for then in (crop, Compose(crop)):
        chained = preprocess_transforms(then=then)
        assert len(chained.transforms) == len(plain.transforms) + 1
        out = chained(data)["image"]
        assert tuple(out.shape[1:]) == (32, 32, 32)
        torch.testing.assert_close(out, CenterSpatialCropd(keys=["image"], roi_size=[32, 32, 32])(plain(data))["image"])


def test_crop_foreground_max_size_and_divisibility(tmp_path: Path) -> None:
    image = np.full((40, 30, 20), -1000.0, dtype=np.float32)
    image[5:26, 4:17, 3:12] = 100.0  # 21 x 13 x 9 voxels of 1.5 mm
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    path = write_nifti(tmp_path / "box.nii.gz", image, aff)
    out = preprocess_transforms(min_size=8, divisor=4)({"image": path})["image"]
    assert tuple(out.shape[1:]) == (24, 16, 12)  # box size rounded up to multiples of 4
    assert all(s % 4 == 0 for s in out.shape[1:])
    out = preprocess_transforms(min_size=8, divisor=4, max_size=(16, 16, 16))({"image": path})["image"]
    assert tuple(out.shape[1:]) == (16, 16, 12)
    out = preprocess_transforms(min_size=8, crop_foreground=False)({"image": path})["image"]
    assert tuple(out.shape[1:]) == (40, 32, 20)


def test_invert_round_trip(tmp_path: Path) -> None:
    image, label = body()
    data = {"image": write_nifti(tmp_path / "im.nii.gz", image), "label": write_nifti(tmp_path / "lb.nii.gz", label)}
    pre = preprocess_transforms(label_key="label", min_size=32)
    out = pre(data)
    out["pred"] = out["label"].clone()  # stands in for a segmentation on the preprocessed grid
    back = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert tuple(back.shape) == (1, *image.shape)
    np.testing.assert_allclose(back.affine.numpy(), AFFINE, atol=1e-5)
    agreement = float((back[0].numpy() == label).mean())
    assert agreement > 0.97, agreement
    img_back = Invertd(keys="image", transform=pre, orig_keys="image")(pre(data))["image"]
    assert tuple(img_back.shape) == (1, *image.shape)
    np.testing.assert_allclose(img_back.affine.numpy(), AFFINE, atol=1e-5)


def test_nrrd_and_nifti_give_the_same_result(tmp_path: Path) -> None:
    """ITK (LPS) and nibabel (RAS) readers must agree once both are reoriented to RAS."""
    import itk

    image, _ = body((16, 12, 10))
    nifti = write_nifti(tmp_path / "a.nii.gz", image)
    itk_img = itk.image_from_array(np.ascontiguousarray(image.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    itk_img.SetSpacing(spacing.tolist())
    itk_img.SetOrigin(lps[:3, 3].tolist())
    itk_img.SetDirection(itk.matrix_from_array(lps[:3, :3] / spacing))
    nrrd = str(tmp_path / "a.nrrd")
    itk.imwrite(itk_img, nrrd)
    pre = preprocess_transforms(min_size=8)
    a, b = pre({"image": nifti})["image"], pre({"image": nrrd})["image"]
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_nan_voxels_raise_naming_the_file(tmp_path: Path) -> None:
    image, _ = body((10, 10, 10))
    image[3, 3, 3] = np.nan
    path = write_nifti(tmp_path / "nan_case.nii.gz", image)
    pre = preprocess_transforms(min_size=8)
    with pytest.raises(InputError, match="non-finite") as e:
        pre({"image": path})
    assert "nan_case.nii.gz" in str(e.value)
    with pytest.raises(InputError, match="nan_case.nii.gz"):
        Dataset([{"image": path}], transform=pre)[0]
    # Nested in another Compose, MONAI wraps it in RuntimeError; input_error_from finds it.
    with pytest.raises(RuntimeError) as wrapped:
        Compose([pre])({"image": path})
    found = input_error_from(wrapped.value)
    assert found is not None and "nan_case.nii.gz: 1 non-finite" in str(found)
    with pytest.raises(InputError, match="given_name: 1 non-finite"):
        check_finite(np.array([0.0, np.inf]), "given_name")


def test_label_values_outside_the_classes_are_refused_naming_the_file(tmp_path: Path) -> None:
    """The check runs inside the preprocessing, so it also guards data that no datalist builder saw
    (MONAI Label hands its own datalist to the train config)."""
    image, label = body()
    img = write_nifti(tmp_path / "im.nii.gz", image)
    good = write_nifti(tmp_path / "good.nii.gz", label * 7)  # classes 0 and 7 of 8
    out = preprocess_transforms(label_key="label", num_classes=8)({"image": img, "label": good})
    assert set(np.unique(out["label"].numpy())) == {0.0, 7.0}
    for name, bad, shown in (("nine.nii.gz", label * 9, "9"), ("half.nii.gz", label * 2.5, "2.5"),
                             ("neg.nii.gz", label.astype(np.int16) * -1, "-1")):
        path = write_nifti(tmp_path / name, bad)
        with pytest.raises(Exception) as err:
            preprocess_transforms(label_key="label", num_classes=8)({"image": img, "label": path})
        found = input_error_from(err.value) or err.value
        assert name in str(found) and f"label values {shown} are not classes 0..7" in str(found), str(found)


def test_meduet_seg_intensity_aug_switch_adds_the_benchmarks_augmentation() -> None:
    """meduet_seg's ``intensity_aug`` appends the four MONAI intensity transforms of the benchmark's
    unet_aug / latent_meduet_aug to the training chain (on by default); off (false, or a word such as
    "no"), the chain has none of them. The transforms leave the label alone and keep images finite."""
    from monai.bundle import ConfigParser
    from monai.transforms import RandAdjustContrastd, RandBiasFieldd, RandGaussianNoised, RandHistogramShiftd

    from custom_nets.data.transforms import intensity_augmentation

    root = Path(__file__).resolve().parents[2]
    kinds = (RandBiasFieldd, RandAdjustContrastd, RandGaussianNoised, RandHistogramShiftd)

    def chain(value: object) -> list:
        parser = ConfigParser()
        parser.read_config(str(root / "bundles/meduet_seg/configs/train.json"))
        parser["bundle_root"] = str(root / "bundles/meduet_seg")
        parser["labels"] = '{"0": "background", "1": "body", "2": "liver"}'
        if value is not None:
            parser["intensity_aug"] = value
        return list(parser.get_parsed_content("train#preprocessing").transforms)

    for on in (chain(None), chain("true")):
        assert [type(t) for t in on[-4:]] == list(kinds)
    for off in ("no", False):
        assert not any(isinstance(t, kinds) for t in chain(off))
    aug = intensity_augmentation("image", prob=1.0)
    g = torch.Generator().manual_seed(0)
    item = {"image": torch.rand(1, 16, 16, 16, generator=g), "label": torch.randint(0, 3, (1, 16, 16, 16), generator=g)}
    out = dict(item)
    for t in aug:
        t.set_random_state(0)
        out = t(out)
    assert torch.equal(out["label"], item["label"]) and torch.isfinite(torch.as_tensor(out["image"])).all()
    assert not torch.allclose(torch.as_tensor(out["image"]), item["image"])
