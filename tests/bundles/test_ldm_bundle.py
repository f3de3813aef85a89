"""The meduet_ldm bundle end to end: demo-overlay training and sampling through
``python -m monai.bundle run``, on fake upstream outputs (VAE checkpoint, latent cache, MeDUET
checkpoint, factor bank) built here with the builders of tests/support/world.py; and the ecosystem's bundle checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets.utils.checkpoint import file_sha256, read_stage_meta
from tests.support.bundle_runner import run_bundle
from tests.support.world import DOMAINS, write_factor_bank, write_latent_cache, write_meduet, write_vae

pytestmark = pytest.mark.slow

BUNDLE = Path("bundles/meduet_ldm")
CONFIGS = BUNDLE / "configs"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, Path]:
    """A demo-size VAE and MeDUET checkpoint, a latent cache of 5 volumes and its factor bank."""
    root = tmp_path_factory.mktemp("ldm_upstream")
    vae_ckpt = write_vae(root / "vae" / "model.pt")
    ssl_ckpt = root / "ssl" / "model.pt"
    info, _ = write_meduet(ssl_ckpt)
    latents = root / "latents"
    datalist = write_latent_cache(latents, vae_ckpt, [(4, 20 + 4 * (i % 2), 20, 12) for i in range(5)], n_val=1,
                                  values=lambda i, d, z: z * (1 + i % 2) + 0.5 * i, affine=lambda i: np.eye(4))
    write_factor_bank(root / "factors", datalist, info)
    return {"root": root, "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt, "latent_datalist": datalist,
            "factor_bank": root / "factors" / "factor_bank.pt", "latents": latents}


@pytest.fixture(scope="module")
def trained(upstream) -> Path:
    out = upstream["root"] / "ldm"
    proc = run_bundle(
        [CONFIGS / "train.json", CONFIGS / "demo.json"],
        {"bundle_root": BUNDLE, "latent_datalist": upstream["latent_datalist"], "factor_bank": upstream["factor_bank"],
         "ssl_ckpt": upstream["ssl_ckpt"], "output_dir": out, "ckpt_dir": out / "models" / "checkpoints",
         "model_path": out / "models" / "model.pt", "max_steps": 8,
         "steps_per_epoch": 4, "val_interval": 1},
    )
    assert "initialised" in proc.stdout + proc.stderr  # the MeDUET initialisation was logged
    return out / "models" / "model.pt"


def test_demo_training_exports_the_ema_generator(upstream, trained):
    meta = read_stage_meta(trained, "meduet_ldm")
    assert meta["network"]["hidden_size"] == 48 and meta["network"]["input_size"] == [16, 16, 8]
    assert meta["content_dim"] == 48 and meta["style_dim"] == 12 and meta["domains"] == DOMAINS
    assert meta["scale_factor"] > 0 and meta["scheduler"]["objective"] == "flow"
    assert meta["vae_sha256"] == file_sha256(upstream["vae_ckpt"])
    assert meta["init_ssl_sha256"] == meta["factor_ssl_sha256"] == file_sha256(upstream["ssl_ckpt"])
    assert meta["ema_updates"] == 8
    sd = torch.load(trained, weights_only=True)
    assert "blocks.0.adaLN_content.1.weight" in sd
    assert (trained.parent / "checkpoints" / "train_state_final.pt").is_file()  # resumable state
    events = list((trained.parent.parent / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from custom_nets.utils.report import read_scalars

    scalars = read_scalars(trained.parent.parent / "tensorboard")
    assert len(scalars["train_loss"]) == 8 and len(scalars["val_loss"]) == 2


def test_demo_sampling_writes_nifti_and_grid(upstream, trained):
    out = upstream["root"] / "samples"
    run_bundle(
        [CONFIGS / "inference.json", CONFIGS / "demo.json"],
        {"bundle_root": BUNDLE, "model_path": trained, "factor_bank": upstream["factor_bank"],
         "ssl_ckpt": upstream["ssl_ckpt"], "vae_ckpt": upstream["vae_ckpt"], "output_dir": out, "num_steps": 2,
         "sampler": "heun", "dataset_dir": upstream["latents"],
         # content: a reference latent (factors computed on the fly); style: 2 bank rows spread over the domains
         "content_sources": "['vol3.npy']", "style_sources": 2},
    )
    files = sorted(out.glob("sample_*.nii.gz"))
    assert [f.name for f in files] == ["sample_c0-vol3_s0-bank0_0.nii.gz", "sample_c0-vol3_s1-bank1_0.nii.gz"]
    img = nib.load(files[0])
    assert img.shape == (64, 64, 32)
    assert np.allclose(np.diag(img.affine)[:3], 1.5) and np.allclose(img.affine[:3, 3], -(np.array([64, 64, 32]) - 1) / 2 * 1.5)
    data = img.get_fdata()
    assert data.min() >= -175 - 1e-3 and data.max() <= 250 + 1e-3  # decoded and mapped back to HU
    assert (out / "samples_grid.png").is_file()
    assert len(list(out.glob("sample_*_latent.npy"))) == 2


def test_content_map_generator_trains_and_samples_on_the_ssl_token_maps(upstream):
    """``content_conditioning: "map"`` through the chain a user runs: meduet_ssl inference writes the
    factor bank with its content token maps, meduet_ldm trains on windows of latents and maps (the
    map projection leaves zero), records it in model.json, and samples from a bank row's map and
    from a reference latent's map computed on the fly."""
    root = upstream["root"] / "map"
    run_bundle(["bundles/meduet_ssl/configs/inference.json", "bundles/meduet_ssl/configs/demo.json"],
               {"bundle_root": "bundles/meduet_ssl", "latent_datalist": upstream["latent_datalist"],
                "ssl_ckpt": upstream["ssl_ckpt"], "output_dir": root / "factors"})
    bank = root / "factors" / "factor_bank.pt"
    model = root / "ldm" / "models" / "model.pt"
    run_bundle([CONFIGS / "train.json", CONFIGS / "demo.json"],
               {"bundle_root": BUNDLE, "latent_datalist": upstream["latent_datalist"], "factor_bank": bank,
                "ssl_ckpt": upstream["ssl_ckpt"], "output_dir": root / "ldm", "ckpt_dir": root / "ldm" / "models" / "checkpoints",
                "model_path": model, "max_steps": 4, "steps_per_epoch": 2, "val_interval": 1,
                "content_conditioning": "map"})
    meta = read_stage_meta(model, "meduet_ldm")
    assert meta["network"]["content_map"] is True
    sd = torch.load(model, weights_only=True)
    assert sd["content_map_embed.1.weight"].abs().sum() > 0  # it learned from its zero start
    out = root / "samples"
    run_bundle([CONFIGS / "inference.json", CONFIGS / "demo.json"],
               {"bundle_root": BUNDLE, "model_path": model, "factor_bank": bank, "ssl_ckpt": upstream["ssl_ckpt"],
                "vae_ckpt": upstream["vae_ckpt"], "output_dir": out, "num_steps": 2, "dataset_dir": upstream["latents"],
                "content_sources": "['vol3.npy', 1]", "style_sources": 1})
    assert sorted(f.name for f in out.glob("sample_*.nii.gz")) == ["sample_c0-vol3_s0-bank0_0.nii.gz",
                                                                  "sample_c1-bank1_s0-bank0_0.nii.gz"]
    bad = run_bundle([CONFIGS / "train.json", CONFIGS / "demo.json"],
                     {"bundle_root": BUNDLE, "latent_datalist": upstream["latent_datalist"], "factor_bank": bank,
                      "ssl_ckpt": upstream["ssl_ckpt"], "output_dir": root / "bad", "model_path": root / "bad" / "m.pt",
                      "content_conditioning": "maps"}, check=False)
    assert bad.returncode != 0 and "content_conditioning must be one of" in bad.stdout + bad.stderr


def test_check_bundles(upstream, trained, shared_dir, tmp_path, repo_root):
    sets = {
        "latent_datalist": upstream["latent_datalist"], "factor_bank": upstream["factor_bank"],
        "ssl_ckpt": upstream["ssl_ckpt"], "vae_ckpt": upstream["vae_ckpt"], "model_path": trained,
        "ckpt_dir": tmp_path / "ckpt", "output_dir": tmp_path / "out",
        # train.json alone builds the paper-scale generator; the demo sizes ("$" values are expressions,
        # so they arrive as numbers) keep the check quick and fit the demo MeDUET checkpoint
        "model_size": "demo", "latent_crop": "$[16, 16, 8]",
    }
    cmd = [sys.executable, str(shared_dir / "tools" / "check_bundles.py"), str(BUNDLE)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 problem(s)" in proc.stdout
