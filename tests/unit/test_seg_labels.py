"""Label names live in one place per state: the bundle's metadata channel_def (shipped) and a trained
model's model.json (trained); the zip's metadata gets the trained ones."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from custom_nets.engines.seg.labels import as_channel_def, bundle_labels, metadata_labels, with_labels
from custom_nets.utils.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = json.loads((ROOT / "bundles" / "meduet_seg" / "configs" / "metadata.json").read_text())
TRAINED = {"0": "background", "1": "tumour", "2": "cyst"}


def write_model(folder: Path, labels: dict | None = TRAINED) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "model.json").write_text(json.dumps({"stage": "meduet_seg", **({"labels": labels} if labels else {})}))
    return folder / "model.pt"


def test_channel_defs_are_0_to_n_minus_1() -> None:
    assert as_channel_def({2: "b", 0: "bg", 1: "a"}) == {"0": "bg", "1": "a", "2": "b"}
    for bad in ({"1": "a", "2": "b"}, {"0": "bg", "2": "b"}, {"0": "bg"}, {"x": "bg", "1": "a"}):
        with pytest.raises(InputError):
            as_channel_def(bad)


def test_a_trained_model_s_labels_win_over_the_shipped_ones(tmp_path: Path) -> None:
    shipped = metadata_labels(SHIPPED)
    assert shipped is not None and shipped["2"] == "liver" and len(shipped) == 8
    model = write_model(tmp_path / "models")
    assert bundle_labels(model, SHIPPED) == TRAINED
    assert bundle_labels(None, SHIPPED) == shipped  # training from scratch: the metadata's
    assert bundle_labels(tmp_path / "missing.pt", ROOT / "bundles" / "meduet_seg") == shipped  # folder form
    assert bundle_labels(write_model(tmp_path / "old", labels=None), SHIPPED) == shipped  # no labels recorded
    with pytest.raises(InputError, match="^labels: no trained model.json"):
        bundle_labels(None, tmp_path / "not_a_bundle")


def test_the_zip_s_metadata_says_what_its_model_predicts(tmp_path: Path) -> None:
    from custom_nets.export_bundle import export_bundle

    meta = with_labels(SHIPPED, TRAINED)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == TRAINED and pred["num_channels"] == 3
    assert SHIPPED["network_data_format"]["outputs"]["pred"]["num_channels"] == 8  # a copy, not changed
    models = write_model(tmp_path / "trained").parent
    zipped = export_bundle(ROOT / "bundles" / "meduet_seg", tmp_path / "dist", models_dir=models)
    with zipfile.ZipFile(zipped) as zf:
        inside = json.loads(zf.read("meduet_seg/configs/metadata.json"))
    assert inside["network_data_format"]["outputs"]["pred"]["channel_def"] == TRAINED
    plain = export_bundle(ROOT / "bundles" / "meduet_seg", tmp_path / "plain", include_models=False)
    with zipfile.ZipFile(plain) as zf:
        assert json.loads(zf.read("meduet_seg/configs/metadata.json")) == SHIPPED


def test_record_bundle_labels_rewrites_only_a_differing_metadata(tmp_path: Path) -> None:
    from custom_nets.engines.seg.labels import record_bundle_labels

    meta = tmp_path / "configs" / "metadata.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps(SHIPPED, indent=4) + "\n")
    shipped = metadata_labels(SHIPPED)
    assert record_bundle_labels(meta, shipped) is False and json.loads(meta.read_text()) == SHIPPED
    assert record_bundle_labels(meta, TRAINED) is True
    written = json.loads(meta.read_text())
    assert metadata_labels(written) == TRAINED
    assert written["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert written["label_classes"] == "0 background, 1 tumour, 2 cyst"
    assert [p.name for p in meta.parent.iterdir()] == ["metadata.json"]  # replaced in place, no temporary left
    assert record_bundle_labels(tmp_path / "elsewhere" / "metadata.json", TRAINED) is False  # no bundle metadata there
    meta.write_text(json.dumps({"version": "0.1.0"}))
    with pytest.raises(InputError, match="no network_data_format.outputs.pred"):
        record_bundle_labels(meta, TRAINED)
