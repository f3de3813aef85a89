"""A small, randomly initialised "trained world" for all four bundles, built once per test session.

Layout (under one temporary folder, the way Model Zoo places bundles side by side)::

    meduet_vae/models/model.pt(.json)   demo-size MAISI VAE
    meduet_ssl/models/model.pt(.json)   demo-size MeDUET (3 domains)
    meduet_seg/models/model.pt(.json)   tiny latent segmenter (32^3 crops, 8 labels)
    meduet_ldm/models/model.pt(.json)   tiny latent DiT (latent crops 8 x 8 x 8)
    phantoms/                           3 labelled phantoms + datalist.json (image datalist)
    latents/                            6 random latents + latent datalist
    factors/                            factor bank of those latents

Packaging tests (exports, checks, docs, tracking) need weights in the right format with the right
metadata, not good weights; random ones keep the session cheap. Nothing is written into the
repository's bundles/*/models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

DOMAINS = ["site_a", "site_b", "site_c"]
SEG_ROI = 32  # image crop -> 8^3 latent -> 2^3 tokens
LABELS = {"0": "background", "1": "body", "2": "liver", "3": "kidney", "4": "spleen", "5": "vessel", "6": "bone",
          "7": "lesion"}

_WORLDS: dict[str, dict[str, Path]] = {}


def _vae(root: Path) -> Path:
    from custom_nets.nets.vae import maisi_vae, network_args
    from custom_nets.utils.checkpoint import save_stage_checkpoint

    vae = maisi_vae("demo")
    path = root / "meduet_vae" / "models" / "model.pt"
    save_stage_checkpoint(vae.state_dict(), path, "meduet_vae", network=network_args(vae), latent_channels=4)
    return path


def _ssl(root: Path, vae_ckpt: Path) -> tuple[Path, Any]:
    from custom_nets.nets.meduet import MeDUET, meduet_config
    from custom_nets.utils.checkpoint import file_sha256, save_stage_checkpoint

    args = meduet_config("demo")
    args["n_domains"] = len(DOMAINS)
    net = MeDUET(**args)
    path = root / "meduet_ssl" / "models" / "model.pt"
    save_stage_checkpoint(net.state_dict(), path, "meduet_ssl", network=args, content_dim=net.content_dim,
                          style_dim=net.style_dim, domains=DOMAINS, latent_channels=4,
                          vae_sha256=file_sha256(vae_ckpt))
    return path, net


def _latents(root: Path, vae_ckpt: Path) -> Path:
    from custom_nets.data.latent_cache import write_latent
    from custom_nets.nets.vae import vae_config
    from custom_nets.utils.checkpoint import file_sha256, read_stage_meta

    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        d = i % len(DOMAINS)
        shape = (4, 16 + 4 * (i % 2), 16, 12)
        write_latent(root / "latents" / f"vol{i}.npy", (rng.standard_normal(shape) * (1 + d) + d).astype(np.float32))
        affine = np.diag([1.5, 1.5, 1.5, 1.0]).tolist()
        items.append({"latent": f"vol{i}.npy", "domain": DOMAINS[d], "domain_index": d, "image": f"/src/vol{i}.nii.gz",
                      "modality": "CT", "spacing": [1.5] * 3, "original_affine": affine, "affine": affine,
                      "latent_affine": affine, "shape": list(shape)})
    datalist = root / "latents" / "datalist.json"
    network = read_stage_meta(vae_ckpt, "meduet_vae").get("network", vae_config("demo"))
    datalist.write_text(json.dumps({
        "training": items[:4], "validation": items[4:], "domains": DOMAINS,
        "vae": {"ckpt": str(vae_ckpt), "sha256": file_sha256(vae_ckpt), "latent_channels": 4, "network": network},
    }))
    return datalist


def _factor_bank(root: Path, latent_datalist: Path, ssl_ckpt: Path, ssl_net: Any) -> Path:
    from custom_nets.engines.ssl.factor_bank import FactorBank
    from custom_nets.utils.checkpoint import file_sha256

    items = json.loads(latent_datalist.read_text())
    items = items["training"] + items["validation"]
    g = torch.Generator().manual_seed(1)
    n = len(items)
    bank_items = [{"latent": str(latent_datalist.parent / it["latent"]), "image": it["image"], "domain": it["domain"]}
                  for it in items]
    FactorBank(torch.randn(n, ssl_net.content_dim, generator=g), torch.randn(n, ssl_net.style_dim, generator=g),
               torch.tensor([it["domain_index"] for it in items]), bank_items, DOMAINS,
               {"ssl_sha256": file_sha256(ssl_ckpt), "patch_size": 8, "overlap": 0.25}).save(root / "factors")
    return root / "factors" / "factor_bank.pt"


def _seg(root: Path, vae_ckpt: Path, ssl_ckpt: Path) -> Path:
    from custom_nets.engines.seg.model import build_segmenter
    from custom_nets.utils.checkpoint import file_sha256, save_stage_checkpoint

    net = build_segmenter({"num_classes": len(LABELS), "roi_size": [SEG_ROI] * 3, "feature_size": 4,
                           "refine_channels": 0}, vae_ckpt=vae_ckpt, ssl_ckpt=ssl_ckpt)
    path = root / "meduet_seg" / "models" / "model.pt"
    save_stage_checkpoint(net.state_dict(), path, "meduet_seg", network=net.network_args, labels=LABELS,
                          num_classes=len(LABELS), epoch=0, export="random_init", vae_sha256=file_sha256(vae_ckpt),
                          ssl_sha256=file_sha256(ssl_ckpt))
    return path


def _ldm(root: Path, vae_ckpt: Path, ssl_ckpt: Path, ssl_net: Any, factor_bank: Path, latent_datalist: Path) -> Path:
    from custom_nets.engines.ldm.objective import make_scheduler, scheduler_args
    from custom_nets.nets.latent_dit import LatentDiT
    from custom_nets.utils.checkpoint import file_sha256, save_stage_checkpoint

    net = LatentDiT(in_channels=4, input_size=(8, 8, 8), patch_size=4, hidden_size=48, depth=2, num_heads=4,
                    content_dim=ssl_net.content_dim, style_dim=ssl_net.style_dim)
    path = root / "meduet_ldm" / "models" / "model.pt"
    save_stage_checkpoint(
        net.state_dict(), path, "meduet_ldm", network=dict(net.network_args),
        scheduler=scheduler_args(make_scheduler("flow", 1000)), scale_factor=1.0, latent_channels=4,
        content_dim=ssl_net.content_dim, style_dim=ssl_net.style_dim, domains=DOMAINS, factor_bank=str(factor_bank),
        factor_ssl_sha256=file_sha256(ssl_ckpt), latent_datalist=str(latent_datalist), vae_ckpt=str(vae_ckpt),
        vae_sha256=file_sha256(vae_ckpt),
    )
    return path


def fake_world(tmp_path_factory: Any) -> dict[str, Path]:
    """Build (once per session) and return the paths of the world described in the module docstring.

    Args:
        tmp_path_factory: pytest's session-scoped ``tmp_path_factory``.

    Returns:
        {"root", "vae_ckpt", "ssl_ckpt", "seg_model", "ldm_model", "phantoms" (folder with
        datalist.json), "latent_datalist", "factor_bank"}.
    """
    key = str(tmp_path_factory.getbasetemp())
    if key in _WORLDS:
        return _WORLDS[key]
    from meduet_demo.phantoms import write_phantom_collection

    root = tmp_path_factory.mktemp("bundle_world")
    torch.manual_seed(0)
    vae_ckpt = _vae(root)
    ssl_ckpt, ssl_net = _ssl(root, vae_ckpt)
    latent_datalist = _latents(root, vae_ckpt)
    factor_bank = _factor_bank(root, latent_datalist, ssl_ckpt, ssl_net)
    phantoms = write_phantom_collection(root / "phantoms", subjects=3, styles=["ct_sharp"], shape=(40, 40, 40),
                                        spacing=1.5, val_fraction=0.34).parent
    world = {"root": root, "vae_ckpt": vae_ckpt, "ssl_ckpt": ssl_ckpt, "phantoms": phantoms,
             "latent_datalist": latent_datalist, "factor_bank": factor_bank,
             "seg_model": _seg(root, vae_ckpt, ssl_ckpt),
             "ldm_model": _ldm(root, vae_ckpt, ssl_ckpt, ssl_net, factor_bank, latent_datalist)}
    _WORLDS[key] = world
    return world
