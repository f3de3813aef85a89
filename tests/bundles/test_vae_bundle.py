"""The meduet_vae bundle end to end on tiny volumes: demo training -> latent cache (inference) -> decode,
all through `python -m monai.bundle run`, plus the ecosystem checks (check_bundles)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.support.bundle_runner import run_bundle

BUNDLE = "bundles/meduet_vae"
CONFIGS = f"{BUNDLE}/configs"
SMALL = {"min_size": 32, "num_workers": 0}  # tiny volumes are not padded to 96^3


def write_volumes(root: Path) -> Path:
    """Three small CT-like volumes (HU, 1.2 x 1.2 x 2.0 mm, shifted origins) in two domains + a datalist."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        shape = (40, 36, 24)
        g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
        body = (g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 < 1
        organ = ((g[0] - 0.2) / 0.3) ** 2 + ((g[1] + 0.1) / 0.25) ** 2 + (g[2] / 0.6) ** 2 < 1
        hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0 + 20 * i, 0.0) + rng.normal(0, 10, shape)
        affine = np.diag([1.2, 1.2, 2.0, 1.0])
        affine[:3, 3] = [-20.0 + i, 10.0, -5.0]
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(root / "images" / f"case{i}.nii.gz"))
        items.append({"image": f"images/case{i}.nii.gz", "domain": "siteA" if i < 2 else "siteB", "modality": "CT",
                      **({"subject": "p0"} if i != 1 else {})})  # the cache carries it (meduet_ssl's pair_key)
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": items[:2], "validation": items[2:], "domains": ["siteA", "siteB"]}))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict:
    root = tmp_path_factory.mktemp("vae_bundle")
    data = write_volumes(root / "data")
    bundle_root = root / "meduet_vae"
    train = run_bundle([f"{CONFIGS}/train.json", f"{CONFIGS}/demo.json"],
                       {"bundle_root": bundle_root, "dataset_dir": data, "output_dir": root / "eval",
                        "max_epochs": 2, "val_interval": 2, "adv_start_epoch": 2, **SMALL}, cwd=repo_root)
    encode = run_bundle([f"{CONFIGS}/inference.json", f"{CONFIGS}/demo.json"],
                        {"bundle_root": bundle_root, "dataset_dir": data, "output_dir": root / "latents",
                         "encode_roi": 32, **SMALL}, cwd=repo_root)
    return {"root": root, "data": data, "bundle_root": bundle_root, "ckpt": bundle_root / "models" / "model.pt",
            "latents": root / "latents" / "datalist.json", "train_log": train.stdout + train.stderr,
            "encode_log": encode.stdout + encode.stderr}


def test_training_exports_the_vae(run: dict) -> None:
    meta = json.loads(run["ckpt"].with_suffix(".json").read_text())
    assert meta["stage"] == "meduet_vae" and meta["latent_channels"] == 4
    assert meta["network"]["num_channels"] == [8, 16, 16] and meta["epoch"] == 2 and meta["export"] == "best"
    assert set(meta["metrics"]) == {"val_psnr", "val_ssim"} and np.isfinite(meta["metrics"]["val_psnr"])
    sd = torch.load(run["ckpt"], weights_only=True)
    assert "encoder.blocks.0.conv.conv.weight" in sd
    assert (run["bundle_root"] / "models" / "checkpoints" / "checkpoint_final.pt").is_file()
    state = torch.load(run["bundle_root"] / "models" / "checkpoints" / "checkpoint_final.pt", weights_only=False)
    assert {"network", "optimizer", "discriminator", "disc_optimizer", "trainer"} <= set(state)
    assert (run["root"] / "eval" / "reconstructions" / "recon_epoch0002.png").stat().st_size > 5000
    assert list((run["root"] / "eval").glob("events.out.tfevents.*"))
    assert "disc_loss" in run["train_log"]  # the adversarial term ran from epoch 2


def test_latent_cache_matches_the_preprocessed_images(run: dict) -> None:
    from custom_nets.data.latent_cache import load_latent_datalist, open_latent
    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.nets.vae import encode_volume, latent_affine, load_vae

    vae, meta = load_vae(run["ckpt"])
    data = load_latent_datalist(run["latents"], keys=("training", "validation"), vae_sha256=meta["sha256"],
                                latent_channels=4)
    assert data["domains"] == ["siteA", "siteB"] and data["vae"]["network"] == meta["network"]
    items = data["training"] + data["validation"]
    assert [it["domain_index"] for it in items] == [0, 0, 1]
    assert [it.get("subject") for it in items] == ["p0", None, "p0"]
    pre = preprocess_transforms(keys=("image",), min_size=32)
    for it in items:
        img = pre({"image": it["image"], "modality": "CT"})["image"]
        z = open_latent(it["latent"])
        assert list(z.shape) == [4, *(s // 4 for s in img.shape[1:])] == it["shape"]
        np.testing.assert_allclose(it["affine"], img.affine.numpy(), atol=1e-5)
        np.testing.assert_allclose(it["latent_affine"], latent_affine(img.affine), atol=1e-5)
        np.testing.assert_allclose(it["spacing"], [1.2, 1.2, 2.0], atol=1e-5)
        np.testing.assert_allclose(it["original_affine"], nib.load(it["image"]).affine, atol=1e-5)
        latent = Path(it["latent"])
        preview = run["latents"].parent / "previews" / latent.parent.name / f"{latent.stem}.png"
        assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", preview
        untiled = encode_volume(vae, img.as_tensor(), roi=None).numpy()
        np.testing.assert_allclose(np.asarray(z, dtype=np.float32), untiled, atol=2e-3, rtol=2e-3)  # float16


def test_encoding_again_skips_cached_volumes(run: dict) -> None:
    """The inference config's encoder, in-process: a second run re-encodes nothing; the cache never goes
    into an input folder."""
    from monai.data import Dataset

    from custom_nets.data.transforms import preprocess_transforms
    from custom_nets.engines.vae.encode import LatentCacheEncoder, TiledVAEEncoder, datalist_items
    from custom_nets.nets.vae import load_vae
    from custom_nets.utils.errors import InputError

    vae, _ = load_vae(run["ckpt"])
    dataset = Dataset(datalist_items(run["data"] / "datalist.json"), transform=preprocess_transforms(min_size=32))
    latents = sorted((run["root"] / "latents").rglob("*.npy"))
    before = [p.stat().st_mtime_ns for p in latents]
    encoder = LatentCacheEncoder(dataset, vae, TiledVAEEncoder(roi=32), run["root"] / "latents", run["ckpt"],
                                 progress=False)
    assert encoder.run() == run["latents"]
    assert [p.stat().st_mtime_ns for p in latents] == before
    assert "3 of 3 volumes to encode" in run["encode_log"]
    with pytest.raises(InputError, match="output_dir is an input folder"):
        LatentCacheEncoder(dataset, vae, TiledVAEEncoder(roi=32), run["data"] / "images", run["ckpt"]).run()
    assert not list((run["data"] / "images").glob("**/*.npy"))


def test_intensity_copies_give_every_training_volume_a_partner(run: dict, repo_root: Path) -> None:
    """``intensity_copies`` 2: each training volume is also encoded twice restyled, in an extra domain and
    under its subject, so meduet_ssl's paired criterion finds a partner for every volume; the copies'
    latents differ from the original's and from each other."""
    from custom_nets.data.latent_cache import load_latent_datalist, open_latent
    from custom_nets.data.latent_datasets import LatentCropDataset

    out = run["root"] / "latents_copies"
    log = run_bundle([f"{CONFIGS}/inference.json", f"{CONFIGS}/demo.json"],
                     {"bundle_root": run["bundle_root"], "dataset_dir": run["data"], "output_dir": out,
                      "encode_roi": 32, "intensity_copies": 2, **SMALL}, cwd=repo_root)
    assert "7 of 7 volumes to encode" in log.stdout + log.stderr  # 3 volumes + 2 copies of the 2 training ones
    data = load_latent_datalist(out / "datalist.json", keys=("training", "validation"))
    assert data["domains"] == ["siteA", "siteB", "intensity_copy"]
    train = data["training"]
    assert [it["domain_index"] for it in train] == [0, 0, 2, 2, 2, 2] and len(data["validation"]) == 1
    assert [it.get("intensity_copy") for it in train] == [None, None, 0, 1, 0, 1]
    assert train[2]["subject"] == train[3]["subject"] == "p0" and train[4]["subject"] == train[1]["subject"]
    originals = {it["subject"]: np.asarray(open_latent(it["latent"]), np.float32) for it in train[:2]}
    for a, b in ((2, 3), (4, 5)):
        za, zb = (np.asarray(open_latent(train[k]["latent"]), np.float32) for k in (a, b))
        ref = originals[train[a]["subject"]]
        assert za.shape == ref.shape and np.abs(za - ref).mean() > 1e-3 and np.abs(za - zb).mean() > 1e-3
    ds = LatentCropDataset(train, crop=4, window=4, pair_key="subject")
    assert all(ds.partners) and ds[0]["paired_window"].shape == (4, 4, 4, 4)


def test_decode_writes_nifti_on_both_grids(run: dict, repo_root: Path) -> None:
    from custom_nets.data.latent_cache import load_latent_datalist

    out = run["root"] / "decoded"
    run_bundle([f"{CONFIGS}/decode.json", f"{CONFIGS}/demo.json"],
               {"bundle_root": run["bundle_root"], "latent_datalist": run["latents"], "output_dir": out,
                "decode_roi": 6, "splits": "['validation']"}, cwd=repo_root)
    item = load_latent_datalist(run["latents"], keys=("validation",))["validation"][0]
    stem = Path(item["latent"]).name[: -len(".npy")]
    dec = nib.load(out / "siteB" / f"{stem}_decoded.nii.gz")
    assert list(dec.shape) == item["image_shape"]
    np.testing.assert_allclose(dec.affine, item["affine"], atol=1e-5)
    values = np.asarray(dec.dataobj)
    assert values.min() >= -175 - 1e-3 and values.max() <= 250 + 1e-3  # CT window, in HU
    orig = nib.load(out / "siteB" / f"{stem}_decoded_original_grid.nii.gz")
    src = nib.load(item["image"])
    assert orig.shape == src.shape
    np.testing.assert_allclose(orig.affine, src.affine, atol=1e-5)


def test_bundle_passes_the_ecosystem_checks(run: dict, repo_root: Path, shared_dir: Path) -> None:
    # --set passes strings: only path/name ids here (the train config's datasets are instantiated)
    cmd = [sys.executable, str(shared_dir / "tools" / "check_bundles.py"), BUNDLE,
           "--set", f"dataset_dir={run['data']}", "--set", "model_size=demo"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 bundle(s) checked, 0 problem(s)" in proc.stdout
