"""Latent cache: float16 .npy round trip, memory-mapped random crops, latent-space augmentation, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets.data.latent_cache import check_cache_matches_vae, load_latent_datalist, open_latent, write_latent
from custom_nets.data.latent_datasets import LatentCropDataset, augment_latent, augment_view, random_crop
from custom_nets.utils.checkpoint import save_stage_checkpoint
from custom_nets.utils.errors import InputError, InputErrors


def make_cache(root: Path, shapes: list[tuple[int, ...]], sha: str = "a" * 64) -> Path:
    """Latents with distinct values per voxel, a latent datalist over them; returns the datalist path."""
    items = []
    for i, shape in enumerate(shapes):
        arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 2048 / 100.0 + i
        rel = f"latents/d{i % 2}/vol{i}.npy"
        write_latent(root / rel, arr)
        eye = np.eye(4).tolist()
        items.append({"latent": rel, "domain": f"d{i % 2}", "domain_index": i % 2, "image": f"/data/vol{i}.nii.gz",
                      "modality": "CT", "spacing": [1.0, 1.0, 2.5], "original_affine": eye, "affine": eye,
                      "latent_affine": eye, "shape": list(shape)})
    data = {"training": items[:-1], "validation": items[-1:], "domains": ["d0", "d1"],
            "vae": {"ckpt": "/x/model.pt", "sha256": sha, "latent_channels": shapes[0][0], "network": {}}}
    path = root / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def test_write_and_memory_map(tmp_path: Path) -> None:
    z = torch.randn(4, 10, 12, 8) * 3
    path = write_latent(tmp_path / "a" / "z.npy", z)
    arr = open_latent(path)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (4, 10, 12, 8)
    np.testing.assert_allclose(np.asarray(arr, dtype=np.float32), z.numpy(), rtol=1e-3, atol=1e-3)
    assert not list((tmp_path / "a").glob(".*tmp*"))  # atomic write leaves no temporary file
    with pytest.raises(ValueError, match="non-finite"):
        write_latent(tmp_path / "nan.npy", torch.full((4, 2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        write_latent(tmp_path / "flat.npy", torch.zeros(4, 4))
    np.save(tmp_path / "f32.npy", np.zeros((4, 2, 2, 2), np.float32))
    with pytest.raises(InputError, match="f32.npy: expected a .* float16"):
        open_latent(tmp_path / "f32.npy")
    with pytest.raises(InputError, match="missing.npy: latent file not found"):
        open_latent(tmp_path / "missing.npy")


def test_random_crops_are_windows_of_the_volume(tmp_path: Path) -> None:
    arr = open_latent(write_latent(tmp_path / "z.npy", np.random.default_rng(0).normal(size=(4, 30, 27, 25))))
    full = np.asarray(arr, dtype=np.float32)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        crop = random_crop(arr, 24, rng)
        assert crop.shape == (4, 24, 24, 24) and crop.dtype == np.float32
        hits = [(x, y, z) for x in range(7) for y in range(4) for z in range(2)
                if np.array_equal(full[:, x:x + 24, y:y + 24, z:z + 24], crop)]
        assert len(hits) == 1
        starts.add(hits[0])
    assert len(starts) > 5  # positions vary

    small = open_latent(write_latent(tmp_path / "small.npy", np.random.default_rng(1).normal(size=(4, 10, 30, 24))))
    crop = random_crop(small, 24, torch.Generator().manual_seed(0))
    assert crop.shape == (4, 24, 24, 24)
    np.testing.assert_array_equal(crop[:, 10:], np.repeat(crop[:, 9:10], 14, axis=1))  # edge padding


def test_augmentation_flips_and_rotations() -> None:
    x = torch.arange(2 * 6 * 6 * 6, dtype=torch.float32).reshape(2, 6, 6, 6)
    gen = np.random.default_rng(0)
    assert torch.equal(augment_latent(x, 0.0, 0.0, gen), x)
    assert torch.equal(augment_latent(x, 1.0, 0.0, gen), torch.flip(x, (1, 2, 3)))
    rotations = {tuple(torch.rot90(x, k, p).flatten()[:12].tolist())
                 for k in (1, 2, 3) for p in ((1, 2), (1, 3), (2, 3))}
    for _ in range(10):
        y = augment_latent(x, 0.0, 1.0, gen)
        assert tuple(y.flatten()[:12].tolist()) in rotations and y.is_contiguous()
    # each axis flips with probability 0.2, a rotation happens with probability 0.2
    n, flipped_x, changed = 2000, 0, 0
    for _ in range(n):
        y = augment_latent(x, 0.2, 0.0, gen)
        flipped_x += int(y[0, 0, 0, 0] in (x[0, 5, 0, 0], x[0, 5, 5, 0], x[0, 5, 0, 5], x[0, 5, 5, 5]))
        changed += int(not torch.equal(augment_latent(x, 0.0, 0.2, gen), x))
    assert abs(flipped_x / n - 0.2) < 0.04 and abs(changed / n - 0.2) < 0.04
    # the dataset's view-only numpy version draws and applies the same transforms
    for seed in range(20):
        a = augment_latent(x, 0.5, 0.5, np.random.default_rng(seed))
        b = augment_view(x.numpy(), 0.5, 0.5, np.random.default_rng(seed))
        assert np.array_equal(a.numpy(), b)


def test_crop_dataset_and_loader(tmp_path: Path) -> None:
    data = load_latent_datalist(make_cache(tmp_path, [(4, 30, 30, 26), (4, 24, 28, 40), (4, 20, 20, 20)]),
                                keys=("training", "validation"))
    items = data["training"] + data["validation"]
    assert all(Path(it["latent"]).is_absolute() for it in items)
    ds = LatentCropDataset(items, crop=24, samples_per_epoch=6)
    sample = ds[2]
    assert sample["latent"].shape == (4, 24, 24, 24) and sample["latent"].dtype == torch.float32
    assert sample["domain_index"] == 0 and len(ds) == 6
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert [b["latent"].shape for b in batches] == [(3, 4, 24, 24, 24)] * 2
    assert batches[0]["domain_index"].tolist() == [0, 1, 0]
    # the fixed centre window: the same at every call, unaugmented, edge-padded where the volume is short
    windowed = LatentCropDataset(items, crop=8, flip_prob=1.0, rot90_prob=1.0, window=24)
    vol = np.load(items[0]["latent"]).astype(np.float32)  # (4, 30, 30, 26)
    first, again = windowed[0]["window"], windowed[3]["window"]
    assert first.shape == (4, 24, 24, 24) and torch.equal(first, again)
    assert np.array_equal(first.numpy(), vol[:, 3:27, 3:27, 1:25])
    short = windowed[2]["window"].numpy()  # (4, 20, 20, 20): padded at the far end with the border
    vol2 = np.load(items[2]["latent"]).astype(np.float32)
    assert np.array_equal(short[:, :20, :20, :20], vol2) and np.array_equal(short[:, 23, 5, 5], vol2[:, 19, 5, 5])
    assert "window" not in ds[0]
    with pytest.raises(ValueError, match="window"):
        LatentCropDataset(items, window=-1)
    # no items: a config resolved before its cache exists (an existing cache's empty training split
    # is refused by load_latent_datalist, below)
    assert len(LatentCropDataset([])) == 0


def test_latent_datalist_validation(tmp_path: Path) -> None:
    path = make_cache(tmp_path, [(4, 24, 24, 24), (4, 24, 24, 24), (4, 24, 24, 24)], sha="b" * 64)
    data = load_latent_datalist(path, vae_sha256="b" * 64, latent_channels=4)
    assert len(data["training"]) == 2 and data["domains"] == ["d0", "d1"]

    with pytest.raises(InputError, match=r"datalist\.json: the latent cache was made with the meduet_vae checkpoint "
                                          r"of sha256 bbbbbbbbbbbb.*but the configured VAE has sha256 cccccccccccc"):
        load_latent_datalist(path, vae_sha256="c" * 64)
    with pytest.raises(InputError, match=r"datalist\.json: latents have 4 channels.*expects 8"):
        load_latent_datalist(path, latent_channels=8)

    # a missing cache: refused, or (missing_ok, a config resolved before the cache exists) empty
    with pytest.raises(InputError, match="file not found"):
        load_latent_datalist(tmp_path / "nowhere.json")
    empty = load_latent_datalist(tmp_path / "nowhere.json", keys=("training", "validation"), missing_ok="true")
    assert empty["training"] == empty["validation"] == empty["domains"] == [] and empty["missing"]
    # an existing cache with nothing to train on is refused, missing_ok or not
    no_training = tmp_path / "no_training.json"
    no_training.write_text(json.dumps({**json.loads(path.read_text()), "training": []}))
    with pytest.raises(InputErrors, match="split 'training' is missing or empty"):
        load_latent_datalist(no_training, missing_ok=True)

    raw = json.loads(path.read_text())
    raw["training"][0]["shape"] = [4, 24, 24, 25]
    raw["training"][1]["domain_index"] = 0
    raw["validation"][0]["latent"] = "latents/none.npy"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputErrors) as err:
        load_latent_datalist(path)
    msg = str(err.value)
    assert "3 problem(s)" in msg and "vol0.npy: shape [4, 24, 24, 24] differs" in msg
    assert "[training][1]: domain_index 0 does not match domain 'd1'" in msg
    assert "none.npy: latent file not found" in msg


def test_cache_checked_against_the_vae_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "vae" / "model.pt"
    info = save_stage_checkpoint({"w": torch.zeros(2)}, ckpt, "meduet_vae", network={}, latent_channels=4)
    path = make_cache(tmp_path, [(4, 24, 24, 24), (4, 24, 24, 24)], sha=info["sha256"])
    assert check_cache_matches_vae(path, ckpt)["vae"]["sha256"] == info["sha256"]
    save_stage_checkpoint({"w": torch.ones(2)}, ckpt, "meduet_vae", network={}, latent_channels=4)  # retrained
    with pytest.raises(InputError, match="re-run meduet_vae inference"):
        check_cache_matches_vae(path, ckpt)
