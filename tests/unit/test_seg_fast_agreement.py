"""benchmarks/seg_fast_agreement.py: masks of two settings matched by volume and scored label by label."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import seg_fast_agreement as sfa  # noqa: E402


def _mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), str(path))


def test_agreement_is_dice_per_label_of_the_same_volume(tmp_path: Path) -> None:
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[:4] = 1
    ref[4:6] = 2
    other = ref.copy()
    other[5] = 0  # half of label 2 lost
    _mask(tmp_path / "default" / "ct_a" / "ct_a_seg.nii.gz", ref)
    _mask(tmp_path / "fast" / "ct_a" / "ct_a_seg.nii.gz", other)
    per_volume = sfa.agreement(tmp_path / "default", tmp_path / "fast", [1, 2])
    assert per_volume["ct_a"][1] == pytest.approx(1.0)
    assert per_volume["ct_a"][2] == pytest.approx(2 * 64 / (128 + 64))
    assert sfa.mean_over_volumes(per_volume | {"ct_b": "unscored"}, [1, 2])[2] == pytest.approx(2 / 3)


def test_agreement_refuses_different_volume_sets(tmp_path: Path) -> None:
    _mask(tmp_path / "default" / "a_seg.nii.gz", np.zeros((4, 4, 4)))
    _mask(tmp_path / "fast" / "b_seg.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(RuntimeError, match="holds masks of"):
        sfa.agreement(tmp_path / "default", tmp_path / "fast", [1])


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown settings"):
        sfa.main(["--model", "m.pt", "--datalist", "d.json", "--settings", "default,fastest"])
