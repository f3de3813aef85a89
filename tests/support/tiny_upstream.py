"""Tiny inputs for running each bundle's train.json in tests: phantom images, demo-size upstream
checkpoints (VAE, MeDUET), a latent cache and a factor bank, plus the overrides that shrink each
bundle's demo overlay further (same code path, smaller numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUNDLES = ("meduet_vae", "meduet_ssl", "meduet_ldm", "meduet_seg")
DOMAINS = ["site_a", "site_b"]


def write_phantoms(root: Path) -> Path:
    """Four 32^3 phantoms with labels in two domains (2 training, 2 validation: one per rank); returns the folder."""
    from meduet_demo.phantoms import write_phantom_collection

    return write_phantom_collection(root, subjects=4, styles=["ct_sharp", "ct_lowdose"], shape=(32, 32, 32),
                                    spacing=1.5, val_fraction=0.5).parent


def write_vae(path: Path) -> Path:
    """A randomly initialised demo-size VAE as a meduet_vae stage checkpoint."""
    from custom_nets.nets.vae import maisi_vae, network_args
    from custom_nets.utils.checkpoint import save_stage_checkpoint

    torch.manual_seed(0)
    vae = maisi_vae("demo")
    save_stage_checkpoint(vae.state_dict(), path, "meduet_vae", network=network_args(vae), latent_channels=4)
    return path


def write_meduet(path: Path, domains: list[str] = DOMAINS) -> dict[str, Any]:
    """A randomly initialised demo-size MeDUET as a meduet_ssl stage checkpoint; returns its metadata."""
    from custom_nets.nets.meduet import MeDUET, meduet_config
    from custom_nets.utils.checkpoint import save_stage_checkpoint

    torch.manual_seed(0)
    args = {**meduet_config("demo"), "n_domains": len(domains)}
    net = MeDUET(**args)
    return save_stage_checkpoint(net.state_dict(), path, "meduet_ssl", network=args, content_dim=net.content_dim,
                                 style_dim=net.style_dim, domains=domains, latent_channels=4)


def write_latent_cache(root: Path, vae_ckpt: Path, n: int = 6, n_val: int = 2) -> Path:
    """``n`` random float16 latents (4, 16, 16, 12) in two domains and their latent datalist."""
    from custom_nets.data.latent_cache import write_latent
    from custom_nets.nets.vae import maisi_vae, network_args
    from custom_nets.utils.checkpoint import file_sha256

    rng = np.random.default_rng(0)
    items = []
    eye = np.diag([1.5, 1.5, 1.5, 1.0]).tolist()
    for i in range(n):
        shape = (4, 16, 16, 12)
        write_latent(root / f"vol{i}.npy", (rng.standard_normal(shape) * (1 + i % 2) + i % 2).astype(np.float32))
        items.append({"latent": f"vol{i}.npy", "domain": DOMAINS[i % 2], "domain_index": i % 2,
                      "image": f"/src/vol{i}.nii.gz", "modality": "CT", "spacing": [1.5] * 3,
                      "original_affine": eye, "affine": eye, "latent_affine": eye, "shape": list(shape)})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({
        "training": items[: n - n_val], "validation": items[n - n_val:], "domains": DOMAINS,
        "vae": {"ckpt": str(vae_ckpt), "sha256": file_sha256(vae_ckpt), "latent_channels": 4,
                "network": network_args(maisi_vae("demo"))},
    }))
    return datalist


def write_factor_bank(root: Path, latent_datalist: Path, ssl_meta: dict[str, Any]) -> Path:
    """A random factor bank with one row per cached latent (as meduet_ssl inference writes it)."""
    from custom_nets.engines.ssl.factor_bank import FactorBank

    lists = json.loads(latent_datalist.read_text())
    items = lists["training"] + lists["validation"]
    rows = [{"latent": str(latent_datalist.parent / it["latent"]), "image": it["image"], "domain": it["domain"]}
            for it in items]
    g = torch.Generator().manual_seed(1)
    FactorBank(torch.randn(len(items), ssl_meta["content_dim"], generator=g),
               torch.randn(len(items), ssl_meta["style_dim"], generator=g),
               torch.tensor([it["domain_index"] for it in items]), rows, DOMAINS,
               {"ssl_sha256": ssl_meta["sha256"], "patch_size": 8, "overlap": 0.25}).save(root)
    return root / "factor_bank.pt"


def build_upstream(root: Path) -> dict[str, Path]:
    """Everything the four train configs read, under ``root``."""
    vae_ckpt = write_vae(root / "vae" / "model.pt")
    ssl_ckpt = root / "ssl" / "model.pt"
    ssl_meta = write_meduet(ssl_ckpt)
    latents = write_latent_cache(root / "latents", vae_ckpt)
    return {"phantoms": write_phantoms(root / "phantoms"), "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt,
            "latent_datalist": latents, "factor_bank": write_factor_bank(root / "factors", latents, ssl_meta)}


def train_overrides(bundle: str, up: dict[str, Path], out: Path, epochs: int = 3) -> dict[str, Any]:
    """Command-line overrides (on top of configs/demo.json) for a few-second training of ``bundle``.

    Checkpoints are saved after every epoch into ``out/ckpt``; every run writes under ``out`` only.
    """
    common = {"bundle_root": f"bundles/{bundle}", "output_dir": out / "eval", "ckpt_dir": out / "ckpt",
              "model_path": out / "models" / "model.pt", "max_epochs": epochs, "val_interval": 1}
    if bundle == "meduet_vae":
        return {**common, "dataset_dir": up["phantoms"], "min_size": 32, "patch_size": "[16,16,16]",
                "val_patch_size": "[32,32,32]", "adv_start_epoch": 1}
    if bundle == "meduet_ssl":
        return {**common, "latent_datalist": up["latent_datalist"], "save_interval": 1, "batch_size": 2,
                "val_batch_size": 2, "mftd_start_epoch": 1, "warmup_epochs": 1}
    if bundle == "meduet_ldm":
        del common["max_epochs"]
        return {**common, "latent_datalist": up["latent_datalist"], "factor_bank": up["factor_bank"],
                "ssl_ckpt": up["ssl_ckpt"], "max_steps": 3 * epochs, "steps_per_epoch": 3, "batch_size": 2,
                "latent_crop": "[8,8,8]", "val_timesteps": "[500]", "scale_volumes": 2}
    if bundle == "meduet_seg":
        return {**common, "dataset_dir": up["phantoms"], "vae_ckpt": up["vae_ckpt"], "ssl_ckpt": up["ssl_ckpt"],
                "roi_size": "[32,32,32]", "min_size": 32, "num_samples": 1, "sw_batch_size": 1, "style_aug": True,
                "style_prob": 0.5, "style_bank_size": 2}
    raise ValueError(f"unknown bundle {bundle!r}")


def config_files(bundle: str, *extra: str) -> list[str]:
    """train.json, the given overlays (e.g. multi_gpu_train.json), then demo.json."""
    configs = f"bundles/{bundle}/configs"
    return [f"{configs}/train.json", *(f"{configs}/{e}" for e in extra), f"{configs}/demo.json"]
