"""The demo's UNet baseline: it stops on its wall-time or step budget and writes masks on the input grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.data.datalist import load_datalist
from meduet_demo import unet_baseline as U
from meduet_demo.phantoms import PHANTOM_LABELS, write_phantom_collection


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 phantoms of 16^3 voxels: 2 training, 1 validation, 1 testing."""
    path = write_phantom_collection(tmp_path_factory.mktemp("ph"), subjects=4, styles=["ct_sharp", "ct_lowdose"],
                                    shape=(16, 16, 16), spacing=1.5, val_fraction=0.25, test_fraction=0.25)
    return {"path": path, **load_datalist(path, keys=("training", "testing"), require_labels=True)}


def recipe(roi: int | None = 16, num_samples: int | None = 1) -> U.SegRecipe:
    return U.seg_recipe({str(k): v for k, v in PHANTOM_LABELS.items()}, roi=roi, num_samples=num_samples)


def test_the_recipe_is_meduet_segs_own():
    """Crops, augmentation, spacing and loss come from meduet_seg's train.json + demo.json: a change
    there changes the baseline."""
    r = recipe(roi=None, num_samples=None)
    seg = json.loads((U.ROOT / "bundles/meduet_seg/configs/train.json").read_text())
    demo = json.loads((U.ROOT / "bundles/meduet_seg/configs/demo.json").read_text())
    assert (r.roi, r.num_samples, r.pixdim) == (64, demo["num_samples"], seg["pixdim"])
    crop = next(t for t in r.transform.transforms if type(t).__name__ == "RandCropByLabelClassesd")
    assert crop.cropper.num_samples == demo["num_samples"] and list(crop.cropper.ratios) == [1.0] * len(PHANTOM_LABELS)
    assert type(r.loss).__name__ == seg["loss"]["_target_"] and r.loss.dice.squared_pred and r.loss.dice.batch
    assert sum(type(t).__name__ == "RandFlipd" for t in r.transform.transforms) == 3


class FakeClock:
    """Advances ``tick`` seconds at every reading: the run's length depends only on how often it looks."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick, self.reads = 0.0, tick, 0

    def __call__(self) -> float:
        self.t += self.tick
        self.reads += 1
        return self.t


def test_training_stops_when_the_wall_time_is_spent(phantoms):
    clock = FakeClock(10.0)
    _, record = U.train_unet(phantoms["training"], recipe(), len(PHANTOM_LABELS), seconds=25.0, clock=clock)
    # read at the start (10), then after each step: step 1 (20: 10 s spent), step 2 (30: 20 s), step 3
    # (40: 30 s spent, past the 25 s budget: stop)
    assert record.steps == 3 and len(record.losses) == 3 and clock.reads == 4
    assert record.seconds == pytest.approx(30.0)  # the time really spent, past the budget by one step
    assert record.budget_seconds == 25.0 and record.params > 1_000_000


def test_training_stops_at_max_steps_and_the_loss_falls(phantoms):
    net, record = U.train_unet(phantoms["training"], recipe(), len(PHANTOM_LABELS), seconds=None, max_steps=6)
    assert record.steps == 6 and not net.training
    assert np.isfinite(record.losses).all() and record.losses[-1] < record.losses[0]
    with pytest.raises(ValueError, match="unbounded"):
        U.train_unet(phantoms["training"], recipe(), 8, seconds=None, max_steps=None)


def test_command_line_writes_masks_on_the_label_grid(phantoms, tmp_path):
    labels = {str(k): v for k, v in PHANTOM_LABELS.items()}
    assert U.main(["--datalist", str(phantoms["path"]), "--out", str(tmp_path), "--max-steps", "1", "--roi", "16",
                   "--num-samples", "1", "--labels", json.dumps(labels)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["labels"] == labels and len(summary["masks"]) == 1
    truth = nib.load(phantoms["testing"][0]["label"])
    mask = nib.load(summary["masks"][0])
    assert Path(summary["masks"][0]).name == Path(phantoms["testing"][0]["image"]).name.split(".")[0] + "_seg.nii.gz"
    assert mask.shape == truth.shape and np.allclose(mask.affine, truth.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= set(PHANTOM_LABELS)
