"""The tiny world every bundle and system test runs on, built once per test run, and its builders.

Layout (under one temporary folder, the way Model Zoo places bundles side by side)::

    meduet_vae/models/model.pt(.json)   demo-size MAISI VAE, random weights
    meduet_ssl/models/model.pt(.json)   demo-size MeDUET (2 domains), trained on this VAE's latents
    meduet_seg/models/model.pt(.json)   tiny latent segmenter (32^3 crops, 8 labels)
    meduet_ldm/models/model.pt(.json)   tiny latent DiT (latent crops 8 x 8 x 8)
    phantoms/                           4 labelled 32^3 phantoms in 2 styles + datalist.json
                                        (2 training, 2 validation: one per rank in the DDP tests)
    latents/                            6 random latents (4 training, 2 validation) + latent datalist
    factors/                            factor bank of those latents

Packaging, checking, resuming and DDP tests need checkpoints in the right format with the right
metadata, not good weights: random ones keep the session cheap. Nothing is written into the
repository's bundles/*/models. Tests that need other sizes (a 3-domain cache, larger phantoms)
call the builders (:func:`write_vae`, :func:`write_meduet`, :func:`write_latent_cache`,
:func:`write_factor_bank`, :func:`write_phantoms`) with their own arguments.

Use the session fixture ``world`` (tests/conftest.py), or :func:`build_world` for one of your own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_nets.data.latent_cache import write_latent
from custom_nets.engines.ldm.objective import make_scheduler, scheduler_args
from custom_nets.engines.seg.model import build_segmenter
from custom_nets.engines.ssl.factor_bank import FactorBank
from custom_nets.nets.latent_dit import LatentDiT
from custom_nets.nets.meduet import MeDUET, meduet_config
from custom_nets.nets.vae import maisi_vae, network_args
from custom_nets.utils.checkpoint import file_sha256, save_stage_checkpoint
from meduet_demo.phantoms import write_phantom_collection

BUNDLES = ("meduet_vae", "meduet_ssl", "meduet_ldm", "meduet_seg")
DOMAINS = ["site_a", "site_b"]
SEG_ROI = 32  # image crop -> 8^3 latent -> 2^3 tokens
LABELS = {"0": "background", "1": "body", "2": "liver", "3": "kidney", "4": "spleen", "5": "vessel", "6": "bone",
          "7": "lesion"}

_WORLDS: dict[str, dict[str, Path]] = {}

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def write_phantoms(folder: Path, subjects: int = 4, styles: Sequence[str] = ("ct_sharp", "ct_lowdose"),
                   shape: Sequence[int] = (32, 32, 32), val_fraction: float = 0.5) -> Path:
    """Labelled phantoms (1.5 mm) and their image datalist; returns the folder."""
    return write_phantom_collection(folder, subjects=subjects, styles=list(styles), shape=tuple(shape), spacing=1.5,
                                    val_fraction=val_fraction).parent


def write_vae(path: Path, seed: int = 0) -> Path:
    """A randomly initialised demo-size VAE as a meduet_vae stage checkpoint."""
    torch.manual_seed(seed)
    vae = maisi_vae("demo")
    save_stage_checkpoint(vae.state_dict(), path, "meduet_vae", network=network_args(vae), latent_channels=4)
    return path


def write_meduet(path: Path, domains: Sequence[str] = DOMAINS, vae_ckpt: Path | None = None, seed: int = 0,
                 **meta: Any) -> tuple[dict[str, Any], MeDUET]:
    """A randomly initialised demo-size MeDUET as a meduet_ssl stage checkpoint.

    Args:
        path: destination ``model.pt``.
        domains: its domain names (size of the domain classifiers).
        vae_ckpt: the VAE whose latents it was "trained" on (its sha256 is recorded), if any.
        seed: weight initialisation.
        meta: more model.json facts (or replacements, e.g. another ``vae_sha256``).

    Returns:
        ``(metadata written, network)``.
    """
    torch.manual_seed(seed)
    args = {**meduet_config("demo"), "n_domains": len(domains)}
    net = MeDUET(**args)
    facts = dict(network=args, content_dim=net.content_dim, style_dim=net.style_dim, domains=list(domains),
                 latent_channels=4)
    if vae_ckpt is not None:
        facts["vae_sha256"] = file_sha256(vae_ckpt)
    return save_stage_checkpoint(net.state_dict(), path, "meduet_ssl", **{**facts, **meta}), net


def write_latent_cache(
    folder: Path,
    vae_ckpt: Path,
    shapes: Sequence[Sequence[int]],
    domains: Sequence[str] = DOMAINS,
    n_val: int = 2,
    values: Callable[[int, int, np.ndarray], np.ndarray] | None = None,
    affine: Callable[[int], np.ndarray] | None = None,
) -> Path:
    """Random float16 latents of the given shapes, in turn from each domain, and their latent datalist.

    Args:
        folder: destination of ``vol{i}.npy`` and ``datalist.json``.
        vae_ckpt: recorded as the VAE that encoded them.
        shapes: one (C, X, Y, Z) per volume.
        domains: volume i belongs to domain i % len(domains).
        n_val: the last ``n_val`` volumes form the validation split.
        values: (i, domain index, standard normal draw) -> latent (default: draw * (1 + d) + d).
        affine: i -> 4x4 affine of the latent grid (default: 1.5 mm, origin 0).

    Returns:
        The latent datalist path.
    """
    rng = np.random.default_rng(0)
    values = values or (lambda i, d, z: z * (1 + d) + d)
    items = []
    for i, shape in enumerate(shapes):
        d = i % len(domains)
        write_latent(folder / f"vol{i}.npy", values(i, d, rng.standard_normal(tuple(shape))).astype(np.float32))
        aff = (affine(i) if affine is not None else np.diag([1.5, 1.5, 1.5, 1.0])).tolist()
        items.append({"latent": f"vol{i}.npy", "domain": domains[d], "domain_index": d, "image": f"/src/vol{i}.nii.gz",
                      "modality": "CT", "spacing": [1.5] * 3, "original_affine": aff, "affine": aff,
                      "latent_affine": aff, "shape": list(shape)})
    datalist = folder / "datalist.json"
    vae_args = json.loads(vae_ckpt.with_suffix(".json").read_text())["network"]
    n_train = len(items) - n_val
    datalist.write_text(json.dumps({
        "training": items[:n_train], "validation": items[n_train:], "domains": list(domains),
        "vae": {"ckpt": str(vae_ckpt), "sha256": file_sha256(vae_ckpt), "latent_channels": 4, "network": vae_args},
    }))
    return datalist


def write_factor_bank(folder: Path, latent_datalist: Path, ssl_meta: dict[str, Any]) -> Path:
    """A random factor bank with one row per cached latent (as meduet_ssl inference writes it)."""
    lists = json.loads(latent_datalist.read_text())
    items = lists["training"] + lists.get("validation", [])
    rows = [{"latent": str(latent_datalist.parent / it["latent"]), "image": it["image"], "domain": it["domain"]}
            for it in items]
    g = torch.Generator().manual_seed(1)
    FactorBank(torch.randn(len(items), ssl_meta["content_dim"], generator=g),
               torch.randn(len(items), ssl_meta["style_dim"], generator=g),
               torch.tensor([it["domain_index"] for it in items]), rows, list(lists["domains"]),
               {"ssl_sha256": ssl_meta["sha256"], "patch_size": 8, "overlap": 0.25}).save(folder)
    return folder / "factor_bank.pt"


def write_segmenter(path: Path, vae_ckpt: Path, ssl_ckpt: Path) -> Path:
    """A randomly initialised tiny latent segmenter (``SEG_ROI`` crops, :data:`LABELS`) as a meduet_seg checkpoint."""
    net = build_segmenter({"num_classes": len(LABELS), "roi_size": [SEG_ROI] * 3, "feature_size": 4,
                           "refine_channels": 0}, vae_ckpt=vae_ckpt, ssl_ckpt=ssl_ckpt)
    save_stage_checkpoint(net.state_dict(), path, "meduet_seg", network=net.network_args, labels=LABELS,
                          num_classes=len(LABELS), epoch=0, export="random_init", vae_sha256=file_sha256(vae_ckpt),
                          ssl_sha256=file_sha256(ssl_ckpt))
    return path


def write_generator(path: Path, vae_ckpt: Path, ssl_ckpt: Path, ssl_meta: dict[str, Any], factor_bank: Path,
                    latent_datalist: Path) -> Path:
    """A randomly initialised tiny latent DiT (8^3 latent crops) as a meduet_ldm checkpoint."""
    net = LatentDiT(in_channels=4, input_size=(8, 8, 8), patch_size=4, hidden_size=48, depth=2, num_heads=4,
                    content_dim=ssl_meta["content_dim"], style_dim=ssl_meta["style_dim"])
    save_stage_checkpoint(
        net.state_dict(), path, "meduet_ldm", network=dict(net.network_args),
        scheduler=scheduler_args(make_scheduler("flow", 1000)), scale_factor=1.0, latent_channels=4,
        content_dim=ssl_meta["content_dim"], style_dim=ssl_meta["style_dim"], domains=ssl_meta["domains"],
        factor_bank=str(factor_bank), factor_ssl_sha256=file_sha256(ssl_ckpt), latent_datalist=str(latent_datalist),
        vae_ckpt=str(vae_ckpt), vae_sha256=file_sha256(vae_ckpt),
    )
    return path


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


def build_world(root: Path) -> dict[str, Path]:
    """Build the world of the module docstring under ``root``.

    Returns:
        {"root", "vae_ckpt", "ssl_ckpt", "seg_model", "ldm_model", "phantoms" (folder with
        datalist.json), "latent_datalist", "factor_bank"}.
    """
    vae_ckpt = write_vae(root / "meduet_vae" / "models" / "model.pt")
    ssl_ckpt = root / "meduet_ssl" / "models" / "model.pt"
    ssl_meta, _ = write_meduet(ssl_ckpt, vae_ckpt=vae_ckpt)
    latent_datalist = write_latent_cache(root / "latents", vae_ckpt, [(4, 16 + 4 * (i % 2), 16, 12) for i in range(6)])
    factor_bank = write_factor_bank(root / "factors", latent_datalist, ssl_meta)
    return {
        "root": root, "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt, "phantoms": write_phantoms(root / "phantoms"),
        "latent_datalist": latent_datalist, "factor_bank": factor_bank,
        "seg_model": write_segmenter(root / "meduet_seg" / "models" / "model.pt", vae_ckpt, ssl_ckpt),
        "ldm_model": write_generator(root / "meduet_ldm" / "models" / "model.pt", vae_ckpt, ssl_ckpt, ssl_meta,
                                     factor_bank, latent_datalist),
    }


def session_world(tmp_path_factory: Any) -> dict[str, Path]:
    """The world of this test run (built on first use; the ``world`` fixture of tests/conftest.py)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _WORLDS:
        _WORLDS[key] = build_world(tmp_path_factory.mktemp("world"))
    return _WORLDS[key]


# --------------------------------------------------------------------------------------------
# Running the train configs on the world
# --------------------------------------------------------------------------------------------


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
