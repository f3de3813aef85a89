"""The meduet_seg bundle end to end on tiny data: train (demo overlay, style augmentation) -> inference
masks on the input grid + PNG overlays; verify_net_in_out; TorchScript export; the ecosystem checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.support.bundle_runner import run_bundle
from tests.support.world import write_meduet, write_phantoms, write_vae

BUNDLE = "bundles/meduet_seg"
CONFIGS = f"{BUNDLE}/configs"
ROI = 64  # image crops -> 16^3 latents -> 4^3 tokens (volumes are padded to 96^3: 8 windows each)
SHIPPED_META = json.loads(Path(BUNDLE, "configs", "metadata.json").read_text())
# the training labels: the shipped ones with label 7 renamed, so that training must update the metadata
TRAIN_LABELS = {**SHIPPED_META["network_data_format"]["outputs"]["pred"]["channel_def"], "7": "tumour"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict[str, Path]:
    """Fake upstream checkpoints (demo-size VAE, demo-size MeDUET), three phantoms, a 2-epoch training."""
    root = tmp_path_factory.mktemp("seg")
    vae_ckpt = write_vae(root / "meduet_vae" / "models" / "model.pt")
    ssl_ckpt = root / "meduet_ssl" / "models" / "model.pt"
    write_meduet(ssl_ckpt, domains=["ct_sharp"])
    data = write_phantoms(root / "phantoms", subjects=3, styles=["ct_sharp"], shape=(40, 40, 40), val_fraction=0.34)
    bundle_root = root / "meduet_seg"
    (bundle_root / "configs").mkdir(parents=True)  # the bundle's metadata, which training keeps in step
    (bundle_root / "configs" / "metadata.json").write_text(json.dumps(SHIPPED_META, indent=4) + "\n")
    proc = run_bundle(
        [f"{CONFIGS}/train.json", f"{CONFIGS}/demo.json"],
        {"bundle_root": bundle_root, "dataset_dir": data, "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt,
         "roi_size": f"[{ROI},{ROI},{ROI}]", "max_epochs": 2, "val_interval": 2, "num_samples": 1,
         "style_aug": True, "style_prob": 1.0, "output_dir": root / "eval", "labels": json.dumps(TRAIN_LABELS)},
        cwd=repo_root,
    )
    return {"root": root, "data": data, "bundle_root": bundle_root, "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt,
            "log": proc.stdout + proc.stderr}


def test_training_exports_stage_checkpoint(trained: dict) -> None:
    log = trained["log"]
    assert "position embedding: fixed sin-cos, recomputed for grid (4, 4, 4)" in log
    assert "epoch 2: 2 restyled training crops" in log  # the bank exists from epoch 2 on; prob 1.0
    meta = json.loads((trained["bundle_root"] / "models" / "model.json").read_text())
    assert meta["stage"] == "meduet_seg" and meta["export"] == "best" and meta["epoch"] == 2
    assert meta["network"]["encoder"]["embed_dim"] == 48 and meta["network"]["roi_size"] == [ROI] * 3
    assert meta["labels"] == TRAIN_LABELS and meta["num_classes"] == 8
    vae_meta = json.loads(trained["vae_ckpt"].with_suffix(".json").read_text())
    assert meta["vae_sha256"] == vae_meta["sha256"] and meta["ssl_sha256"]
    assert (trained["bundle_root"] / "models" / "checkpoints" / "checkpoint_final.pt").is_file()
    assert list((trained["root"] / "eval" / "val_overlays").glob("*.png"))


def test_training_writes_its_labels_into_the_bundle_metadata(trained: dict) -> None:
    """The run's labels differ from the shipped metadata's: the bundle's configs/metadata.json now
    names what models/model.pt predicts (MONAI Label and Model Zoo read it), and nothing else changed."""
    meta = json.loads((trained["bundle_root"] / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == TRAIN_LABELS
    assert "7 tumour" in meta["label_classes"]
    unchanged = {k: v for k, v in meta.items() if k not in ("network_data_format", "label_classes")}
    assert unchanged == {k: v for k, v in SHIPPED_META.items() if k not in ("network_data_format", "label_classes")}
    assert meta["network_data_format"]["inputs"] == SHIPPED_META["network_data_format"]["inputs"]
    assert not list((trained["bundle_root"] / "configs").glob(".*"))  # no temporary file left behind


def test_inference_writes_masks_on_the_input_grid(trained: dict, repo_root: Path) -> None:
    out = trained["root"] / "inference"
    images = trained["root"] / "one_image"  # one volume is enough (and keeps the test short)
    images.mkdir()
    first = sorted((trained["data"] / "images").glob("*.nii.gz"))[0]
    (images / first.name).write_bytes(first.read_bytes())
    run_bundle([f"{CONFIGS}/inference.json"],
               {"bundle_root": trained["bundle_root"], "dataset_dir": images, "output_dir": out, "save_overlays": "true"},
               cwd=repo_root)
    for img_path in sorted(images.glob("*.nii.gz")):
        stem = img_path.name[: -len(".nii.gz")]
        img, mask = nib.load(img_path), nib.load(out / f"{stem}_seg.nii.gz")
        assert mask.shape == img.shape
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-4)
        values = np.unique(np.asarray(mask.dataobj))
        assert values.min() >= 0 and values.max() < 8
        assert (out / f"{stem}_overlay.png").stat().st_size > 1000


def test_inference_without_model_names_the_bundle_to_train(trained: dict, repo_root: Path, tmp_path: Path) -> None:
    from monai.bundle import run

    with pytest.raises(Exception) as err:  # monai.bundle wraps the CheckpointError of the config expression
        run(config_file=str(repo_root / CONFIGS / "inference.json"), bundle_root=str(tmp_path / "empty"),
            dataset_dir=str(trained["data"] / "images"), output_dir=str(tmp_path / "out"))
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("trained segmenter not found" in m and "meduet_seg" in m for m in chain), chain
    assert not (tmp_path / "out").exists()


def test_verify_net_in_out_and_torchscript_export(trained: dict, repo_root: Path, tmp_path: Path) -> None:
    from monai.bundle import ckpt_export, verify_net_in_out

    from custom_nets.engines.seg.model import build_segmenter, load_segmenter_weights

    model = trained["bundle_root"] / "models" / "model.pt"
    common = dict(meta_file=str(repo_root / CONFIGS / "metadata.json"),
                  config_file=str(repo_root / CONFIGS / "inference.json"), bundle_root=str(trained["bundle_root"]))
    verify_net_in_out(net_id="network_def", **common)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(model), use_trace=True,
                input_shape=[1, 1, ROI, ROI, ROI], **common)
    eager = build_segmenter({}, model_ckpt=model)
    load_segmenter_weights(eager, model)
    eager.eval()
    scripted = torch.jit.load(str(ts))
    x = torch.rand(1, 1, ROI, ROI, ROI)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-4)


def test_check_bundles(trained: dict, repo_root: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared checker (schema, infer/train properties), in this process to save a start-up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_bundles", shared_dir / "tools" / "check_bundles.py")
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    monkeypatch.chdir(repo_root)
    overrides = {"dataset_dir": str(trained["data"]), "vae_ckpt": str(trained["vae_ckpt"]),
                 "ssl_ckpt": str(trained["ssl_ckpt"]),
                 # the trained tiny model's model.json sizes the inference network (no paper-scale build)
                 "bundle_root": str(trained["bundle_root"])}
    assert checker.check(Path(BUNDLE), overrides) == []


def test_the_bundle_alone_fine_tunes_its_own_model(trained: dict, tmp_path: Path, repo_root: Path) -> None:
    """As MONAI Label trains an exported bundle: nothing beside it, a trained models/model.pt inside.
    Training fine-tunes that model and keeps its upstream provenance; with no model either, the
    error says what training from scratch and fine-tuning need."""
    alone = tmp_path / "meduet_seg"
    (alone / "models").mkdir(parents=True)
    for name in ("model.pt", "model.json"):
        (alone / "models" / name).write_bytes((trained["bundle_root"] / "models" / name).read_bytes())
    before = json.loads((alone / "models" / "model.json").read_text())
    args = {"bundle_root": alone, "dataset_dir": trained["data"], "max_epochs": 1, "val_interval": 1,
            "num_samples": 1, "output_dir": tmp_path / "eval"}
    proc = run_bundle([f"{CONFIGS}/train.json", f"{CONFIGS}/demo.json"], args, cwd=repo_root)
    assert f"fine-tuning from {alone / 'models' / 'model.pt'}" in proc.stdout + proc.stderr
    after = json.loads((alone / "models" / "model.json").read_text())
    assert after["network"] == before["network"]  # the trained architecture, not the config's size
    assert after["vae_sha256"] == before["vae_sha256"] and after["finetuned_from_sha256"] == before["sha256"]
    assert after["sha256"] != before["sha256"] and after["epoch"] == 1
    empty = tmp_path / "empty" / "meduet_seg"
    proc = run_bundle([f"{CONFIGS}/train.json", f"{CONFIGS}/demo.json"], {**args, "bundle_root": empty},
                      cwd=repo_root, check=False)
    assert proc.returncode != 0
    assert "Training from scratch needs the upstream bundles" in proc.stderr and "fine-tuning needs" in proc.stderr
