"""meduet_seg as a MONAI Label bundle model, through MONAI Label 0.8.5's own task classes.

``BundleInferTask``: labels from the metadata's ``channel_def``, a mask on the input's grid whose values
are label values, no overlay PNG unless asked. ``BundleTrainTask`` on a datastore: with the upstream
bundles beside it; on the exported bundle alone (fine-tunes its own ``model.pt``); with neither (the
error says what training needs); and a datastore label outside the classes is refused, naming the file.

MONAI Label pulls ~150 packages, so it lives in its own environment: ``make test`` builds
``.venv-monailabel`` (``make venv-monailabel``) and runs this file there with
``MEDUET_REQUIRE_MONAILABEL=1``, under which a missing ``monailabel`` is a failure, not a skip. The
bundle comes from the export zip, placed as MONAI Label apps hold bundles: ``<app>/model/meduet_seg``.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.utils.flags import as_bool

REQUIRED = as_bool(os.environ.get("MEDUET_REQUIRE_MONAILABEL"), "MEDUET_REQUIRE_MONAILABEL")
try:
    import monailabel  # noqa: F401
except ImportError as error:  # torchvision of the wrong build also lands here (MONAI Label imports it)
    if REQUIRED:
        pytest.fail(f"MEDUET_REQUIRE_MONAILABEL is set but monailabel cannot be imported ({error}); build its "
                    "environment with `make venv-monailabel` and run this file with .venv-monailabel/bin/python",
                    pytrace=False)
    pytest.skip("monailabel is not installed here; `make test` runs this file in .venv-monailabel",
                allow_module_level=True)

from tests.support.world import LABELS, SEG_ROI, session_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAIN_REQUEST = {"model": "meduet_seg", "max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False,
                 "pretrained": True}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The exported seg zip (with the world's tiny trained model), the upstream bundles and a datastore."""
    from custom_nets.export_bundle import export_bundle

    world = session_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("monailabel")
    zip_path = export_bundle(ROOT / "bundles" / "meduet_seg", root / "dist", models_dir=world["seg_model"].parent)
    store = root / "datastore"
    (store / "labels" / "final").mkdir(parents=True)
    pairs = json.loads((world["phantoms"] / "datalist.json").read_text())
    for item in pairs["training"] + pairs["validation"]:  # MONAI Label: the label file has the image's name
        name = Path(item["image"]).name
        shutil.copy(world["phantoms"] / item["image"], store / name)
        shutil.copy(world["phantoms"] / item["label"], store / "labels" / "final" / name)
    return {"zip": zip_path, "world": world["root"], "datastore": store}


def make_app(parts: dict[str, Path], folder: Path, upstream: bool, model: bool = True) -> Path:
    """``folder/model/meduet_seg`` from the zip (its models/ dropped when ``model`` is False), with
    meduet_vae and meduet_ssl beside it when ``upstream``; returns the bundle folder."""
    with zipfile.ZipFile(parts["zip"]) as zf:
        zf.extractall(folder / "model")
    bundle = folder / "model" / "meduet_seg"
    if not model:
        shutil.rmtree(bundle / "models")
    for name in ("meduet_vae", "meduet_ssl") if upstream else ():
        shutil.copytree(parts["world"] / name, folder / "model" / name)
    return bundle


def error_chain(error: BaseException) -> str:
    """Every message of an exception and its causes (MONAI wraps a failing config expression)."""
    messages: list[str] = []
    visited: set[int] = set()
    seen: BaseException | None = error
    while seen is not None and id(seen) not in visited:  # a context chain can loop back on itself
        visited.add(id(seen))
        messages.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(messages)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


@pytest.fixture()
def in_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A MONAI Label server runs in its app folder."""
    app = tmp_path / "app"
    app.mkdir()
    monkeypatch.chdir(app)
    yield app


def datastore(folder: Path):  # noqa: ANN201 (monailabel's type, imported lazily)
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore(str(folder), extensions=("*.nii.gz",), auto_reload=False)


def test_bundle_infer_task_labels_mask_and_no_overlays(parts: dict[str, Path], in_app: Path) -> None:
    from monailabel.tasks.infer.bundle import BundleInferTask

    bundle = make_app(parts, in_app, upstream=False)
    task = BundleInferTask(str(bundle), {})
    assert task.is_valid()
    expected = {name: int(k) for k, name in LABELS.items() if name != "background"}
    assert task.labels == expected  # from network_data_format.outputs.pred.channel_def
    image = sorted(parts["datastore"].glob("*.nii.gz"))[0]
    label_file, result = task({"image": str(image), "device": "cpu"})
    mask, img = nib.load(label_file), nib.load(image)
    assert mask.shape == img.shape
    np.testing.assert_allclose(mask.affine, img.affine, atol=1e-3)
    voxels = np.asarray(mask.dataobj)
    assert np.issubdtype(voxels.dtype, np.integer)
    assert set(np.unique(voxels).tolist()) <= {0, *expected.values()}  # label values, nothing else
    assert result["label_names"] == expected
    # overlay PNGs are off unless asked (save_overlays), and MONAI Label writes the mask itself
    assert pngs(in_app) == [] and not (bundle / "eval").exists()


def test_bundle_train_task_with_upstream_beside(parts: dict[str, Path], in_app: Path) -> None:
    from monailabel.tasks.train.bundle import BundleTrainTask

    class SmallSegTrain(BundleTrainTask):
        """MONAI Label's hook for app-specific overrides: the tiny test network's sizes, no workers.
        (Built from the upstream bundles and the config, so the sizes must match the model.pt that
        MONAI Label's CheckpointLoader loads.)"""

        def _update_overrides(self, overrides: dict) -> dict:
            overrides.update({"roi_size": [SEG_ROI] * 3, "feature_size": 4, "num_samples": 1, "num_workers": 0,
                              "cache_rate": 0.0})
            return overrides

    bundle = make_app(parts, in_app, upstream=True)
    before = json.loads((bundle / "models" / "model.json").read_text())
    store = datastore(parts["datastore"])
    assert len(store.datalist()) == 4
    task = SmallSegTrain(str(bundle), {})
    assert task.is_valid()
    task(TRAIN_REQUEST, store)
    after = json.loads((bundle / "models" / "model.json").read_text())
    assert after["stage"] == "meduet_seg" and after["epoch"] == 1 and after["sha256"] != before["sha256"]
    assert after["network"] == before["network"]
    assert after["vae_sha256"] == before["vae_sha256"]  # initialised from the VAE beside it


class FastSegTrain:
    """Mixin: MONAI Label's override hook with only speed settings (no sizes: they must come from
    the bundle's own model.json)."""

    def _update_overrides(self, overrides: dict) -> dict:
        overrides.update({"num_samples": 1, "num_workers": 0, "cache_rate": 0.0})
        return overrides


def test_bundle_train_task_on_the_bundle_alone_fine_tunes_its_model(parts: dict[str, Path], in_app: Path) -> None:
    from monailabel.tasks.train.bundle import BundleTrainTask

    class Train(FastSegTrain, BundleTrainTask):
        pass

    bundle = make_app(parts, in_app, upstream=False)
    assert not (bundle.parent / "meduet_vae").exists()
    before = json.loads((bundle / "models" / "model.json").read_text())
    Train(str(bundle), {})(TRAIN_REQUEST, datastore(parts["datastore"]))
    after = json.loads((bundle / "models" / "model.json").read_text())
    assert after["network"] == before["network"]  # the trained architecture (32^3 crops), not paper scale
    assert after["finetuned_from_sha256"] == before["sha256"] and after["vae_sha256"] == before["vae_sha256"]
    assert after["sha256"] != before["sha256"] and after["epoch"] == 1
    assert after["labels"] == LABELS


def test_bundle_train_task_with_nothing_to_start_from_says_what_is_needed(parts: dict[str, Path],
                                                                           in_app: Path) -> None:
    from monailabel.tasks.train.bundle import BundleTrainTask

    class Train(FastSegTrain, BundleTrainTask):
        pass

    bundle = make_app(parts, in_app, upstream=False, model=False)
    with pytest.raises(Exception) as caught:
        Train(str(bundle), {})(TRAIN_REQUEST, datastore(parts["datastore"]))
    message = error_chain(caught.value)
    assert "Training from scratch needs the upstream bundles" in message and "fine-tuning needs" in message
    assert not (bundle / "models" / "model.pt").exists()


def test_bundle_train_task_refuses_a_datastore_label_outside_the_classes(parts: dict[str, Path], in_app: Path,
                                                                         tmp_path: Path) -> None:
    from monailabel.tasks.train.bundle import BundleTrainTask

    class Train(FastSegTrain, BundleTrainTask):
        pass

    store = tmp_path / "store"
    shutil.copytree(parts["datastore"], store)
    bad = sorted((store / "labels" / "final").glob("*.nii.gz"))[0]
    label = nib.load(bad)
    voxels = np.asarray(label.dataobj).copy()
    voxels[0, 0, 0] = len(LABELS) + 1  # not a class of this bundle
    nib.save(nib.Nifti1Image(voxels, label.affine, label.header), bad)
    bundle = make_app(parts, in_app, upstream=False)
    before = (bundle / "models" / "model.pt").read_bytes()
    with pytest.raises(Exception) as caught:
        Train(str(bundle), {})({**TRAIN_REQUEST, "val_split": 0.0}, datastore(store))
    message = error_chain(caught.value)
    assert bad.name in message and f"label values {len(LABELS) + 1} are not classes 0..{len(LABELS) - 1}" in message
    assert (bundle / "models" / "model.pt").read_bytes() == before  # nothing exported
