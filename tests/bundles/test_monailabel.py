"""meduet_seg as a MONAI Label bundle model: BundleInferTask (labels from channel_def; inference
returns a mask) and BundleTrainTask (one epoch on a datastore's image/label pairs).

Runs only where ``monailabel`` is importable (it is not in requirements.txt: MONAI Label 0.8.5 pulls
~150 packages; the recipe for a separate environment is in bundles/meduet_seg/docs/README.md,
"MONAI Label"). The bundle comes from the export zip, placed as MONAI Label apps hold bundles:
``<app>/model/meduet_seg`` with its upstream bundles beside it.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel")

from tests.support.world import LABELS, SEG_ROI, session_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """<app>/model/{meduet_seg (from the zip, with a tiny model), meduet_vae, meduet_ssl} and a datastore."""
    from custom_nets.export_bundle import export_bundle

    world = session_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("monailabel_app")
    zip_path = export_bundle(ROOT / "bundles" / "meduet_seg", root / "dist", models_dir=world["seg_model"].parent)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(root / "app" / "model")
    for upstream in ("meduet_vae", "meduet_ssl"):  # the train config finds them as sibling bundles
        shutil.copytree(world["root"] / upstream, root / "app" / "model" / upstream)
    store = root / "datastore"
    (store / "labels" / "final").mkdir(parents=True)
    pairs = json.loads((world["phantoms"] / "datalist.json").read_text())
    for item in pairs["training"] + pairs["validation"]:  # MONAI Label: the label file has the image's name
        name = Path(item["image"]).name
        shutil.copy(world["phantoms"] / item["image"], store / name)
        shutil.copy(world["phantoms"] / item["label"], store / "labels" / "final" / name)
    return {"bundle": root / "app" / "model" / "meduet_seg", "datastore": store}


def test_bundle_infer_task_labels_and_mask(app: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(app["bundle"].parent.parent)  # a MONAI Label server runs in its app folder
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(app["bundle"]), {})
    assert task.is_valid()
    expected = {name: int(k) for k, name in LABELS.items() if name != "background"}
    assert task.labels == expected  # from network_data_format.outputs.pred.channel_def
    image = sorted(app["datastore"].glob("*.nii.gz"))[0]
    label_file, result = task({"image": str(image), "device": "cpu"})
    mask, img = nib.load(label_file), nib.load(image)
    assert mask.shape == img.shape
    np.testing.assert_allclose(mask.affine, img.affine, atol=1e-3)
    values = np.unique(np.asarray(mask.dataobj))
    assert values.min() >= 0 and values.max() <= max(expected.values())
    assert result["label_names"] == expected


def test_bundle_train_task_runs_an_epoch_on_the_datastore(app: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(app["bundle"].parent.parent)
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask

    class SmallSegTrain(BundleTrainTask):
        """MONAI Label's hook for app-specific overrides: the tiny test network's sizes, no workers."""

        def _update_overrides(self, overrides: dict) -> dict:
            overrides.update({"roi_size": [SEG_ROI] * 3, "feature_size": 4, "num_samples": 1, "num_workers": 0,
                              "cache_rate": 0.0})
            return overrides

    model = app["bundle"] / "models" / "model.pt"
    before = json.loads(model.with_suffix(".json").read_text())
    datastore = LocalDatastore(str(app["datastore"]), extensions=("*.nii.gz",), auto_reload=False)
    assert len(datastore.datalist()) == 3
    task = SmallSegTrain(str(app["bundle"]), {})
    assert task.is_valid()
    task({"model": "meduet_seg", "max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False,
          "pretrained": True}, datastore)
    after = json.loads(model.with_suffix(".json").read_text())
    assert after["stage"] == "meduet_seg" and after["epoch"] == 1 and after["sha256"] != before["sha256"]
    assert after["network"] == before["network"]  # fine-tuned the loaded model (CheckpointLoader), same network
