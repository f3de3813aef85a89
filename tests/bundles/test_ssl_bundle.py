"""The meduet_ssl bundle end to end through ``python -m monai.bundle run`` with the demo overlay, on
a small latent cache built here (tests/support/world.py builders): training (TensorBoard, resumable checkpoints, resume, teacher
export), factor-bank inference, content/style swap, torchrun with the multi-GPU overlay on CPU
(gloo), bad input, and the ecosystem's bundle checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets.engines.ssl.factor_bank import FactorBank, meduet_factor_fn, volume_factors
from custom_nets.engines.ssl.model import build_meduet, meduet_network_args
from custom_nets.nets.meduet import load_meduet
from custom_nets.utils.checkpoint import file_sha256, read_stage_meta, save_stage_checkpoint
from custom_nets.utils.errors import CheckpointError
from tests.support.bundle_runner import ROOT, run_bundle
from tests.support.world import write_latent_cache, write_vae

pytestmark = pytest.mark.slow

BUNDLE = Path("bundles/meduet_ssl")
CONFIGS = BUNDLE / "configs"
DOMAINS = ["site_a", "site_b", "site_c"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, Path]:
    """A demo-size VAE checkpoint and a latent cache of 8 volumes (3 domains, 6 training, 2 validation)."""
    root = tmp_path_factory.mktemp("ssl_cache")
    vae_ckpt = write_vae(root / "vae" / "model.pt")

    def affine(i: int) -> np.ndarray:
        a = np.diag([1.5, 1.5, 1.5, 1.0])
        a[:3, 3] = [-30.0 + i, -20.0, 10.0 * i]
        return a

    # some volumes smaller than the demo crop of 16
    shapes = [(4, 16 + 4 * (i % 2), 16, 12 + 4 * (i % 3)) for i in range(8)]
    datalist = write_latent_cache(root / "latents", vae_ckpt, shapes, DOMAINS, n_val=2, affine=affine)
    lists = json.loads(datalist.read_text())
    items = lists["training"] + lists["validation"]
    return {"root": root, "vae_ckpt": vae_ckpt, "latent_datalist": datalist, "items": items}


def _train(cache: dict, out: Path, **overrides: object):
    return run_bundle(
        [CONFIGS / "train.json", CONFIGS / "demo.json"],
        {"bundle_root": BUNDLE, "latent_datalist": cache["latent_datalist"], "output_dir": out,
         "ckpt_dir": out / "checkpoints", "model_path": out / "models" / "model.pt", "val_interval": 1, "save_interval": 1, **overrides},
    )


@pytest.fixture(scope="module")
def trained(cache) -> Path:
    out = cache["root"] / "train"
    _train(cache, out, max_epochs=2, mftd_start_epoch=1)
    return out


def test_training_exports_the_teacher_with_its_metadata(cache, trained):
    model = trained / "models" / "model.pt"
    meta = read_stage_meta(model, "meduet_ssl")
    assert meta["domains"] == DOMAINS and meta["content_dim"] == 48 and meta["style_dim"] == 12
    assert meta["vae_sha256"] == file_sha256(cache["vae_ckpt"]) and meta["latent_channels"] == 4
    assert meta["weights"] == "teacher" and meta["pair_sampling"] == "cross_domain"
    assert meta["network"]["n_domains"] == 3 and meta["network"]["encoder"]["grid"] == [4, 4, 4]
    sd = torch.load(model, weights_only=True)
    assert "encoder.patch_embed.weight" in sd and "content_domain_head.0.weight" in sd
    # the export is the EMA teacher of the final resumable state, not the student
    final = sorted((trained / "checkpoints").glob("checkpoint_final_iteration=*.pt"))[-1]
    state = torch.load(final, weights_only=True)
    for k, v in state["step"]["teacher"].items():
        assert torch.equal(sd[k], v), k
    assert any(not torch.equal(sd[k], v) for k, v in state["step"]["network"].items())
    net, _ = load_meduet(model)  # downstream path: network from model.json, strict load
    assert net.content_dim == 48


def test_tensorboard_has_every_loss_term_and_the_validation_loss(trained):
    from custom_nets.utils.report import read_scalars

    scalars = read_scalars(trained / "tensorboard")
    for tag in ("loss/loss", "loss/rec", "loss/domain_content", "loss/domain_style", "loss/mftd", "loss/siqc_content",
                "loss/siqc_style", "optim/lr", "val_rec"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(scalars["val_rec"]) == 2
    assert any(v > 0 for _, v in scalars["loss/mftd"])  # MFTD switched on from epoch 1


def test_resume_continues_from_the_latest_checkpoint(cache, trained, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    proc = _train(cache, out, max_epochs=3, resume="true", mftd_start_epoch=1)
    assert "resume: loading" in proc.stdout + proc.stderr
    final = sorted((out / "checkpoints").glob("checkpoint_final_iteration=*.pt"), key=os.path.getmtime)[-1]
    state = torch.load(final, weights_only=True)
    first = torch.load(sorted((trained / "checkpoints").glob("checkpoint_final_iteration=*.pt"))[-1], weights_only=True)
    steps_per_epoch = first["trainer"]["iteration"] // 2
    assert state["trainer"]["max_epochs"] == 3 and state["trainer"]["iteration"] == 3 * steps_per_epoch
    assert state["step"]["step"] == 3 * steps_per_epoch  # one more epoch, not three


def test_inference_writes_the_factor_bank(cache, trained):
    out = cache["root"] / "factors"
    model = trained / "models" / "model.pt"
    run_bundle([CONFIGS / "inference.json", CONFIGS / "demo.json"],
               {"bundle_root": BUNDLE, "latent_datalist": cache["latent_datalist"], "ssl_ckpt": model, "output_dir": out})
    bank = FactorBank.load(out)
    tensors = {"content": bank.content, "style": bank.style, "domain_index": bank.domain_index}
    meta = {**bank.meta, "items": bank.items, "domains": bank.domains}
    assert tensors["content"].shape == (8, 48) and tensors["style"].shape == (8, 12)
    assert tensors["domain_index"].tolist() == [i % 3 for i in range(8)]
    assert meta["ssl_sha256"] == file_sha256(model) and meta["domains"] == DOMAINS
    assert meta["patch_size"] == 16 and meta["overlap"] == 0.25
    assert [it["split"] for it in meta["items"]] == ["training"] * 6 + ["validation"] * 2
    assert (out / "factor_bank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the picture of the bank
    cmap = np.load(out / meta["items"][1]["content_map"])
    assert cmap.shape == (48, 5, 4, 4)  # latent (20, 16, 16) -> 5 x 4 x 4 tokens
    # the bank holds what the teacher computes for that volume
    net, _ = load_meduet(model)
    z = torch.from_numpy(np.load(cache["root"] / "latents" / "vol1.npy").astype(np.float32))
    ref = volume_factors(meduet_factor_fn(net), z, patch=16, overlap=0.25, token=4)
    torch.testing.assert_close(tensors["content"][1], ref["content"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tensors["style"][1], ref["style"], rtol=1e-4, atol=1e-5)


def test_swap_writes_nifti_on_the_grid_of_a_and_a_montage(cache, trained):
    out = cache["root"] / "swaps"
    run_bundle([CONFIGS / "swap.json", CONFIGS / "demo.json"],
               {"bundle_root": BUNDLE, "latent_datalist": cache["latent_datalist"], "ssl_ckpt": trained / "models" / "model.pt",
                "vae_ckpt": cache["vae_ckpt"], "output_dir": out})
    record = json.loads((out / "swaps.json").read_text())["pairs"][0]
    a = cache["items"][6]  # first validation volume; B comes from another domain
    assert record["a"]["domain"] == a["domain"] and record["b"]["domain"] != a["domain"]
    for key in ("a_content_b_style", "b_content_a_style"):
        img = nib.load(out / record[key])
        assert img.shape == tuple(4 * s for s in a["shape"][1:])
        np.testing.assert_allclose(img.affine, np.asarray(a["affine"]), atol=1e-5)
    assert (out / record["montage"]).stat().st_size > 1000


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_the_multi_gpu_overlay_trains_on_cpu(cache, tmp_path):
    out = tmp_path / "ddp"
    files = [str(CONFIGS / c) for c in ("train.json", "multi_gpu_train.json", "demo.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "monai.bundle",
           "run", "--config_file", str(files), "--bundle_root", str(BUNDLE), "--latent_datalist", str(cache["latent_datalist"]),
           "--output_dir", str(out), "--ckpt_dir", str(out / "checkpoints"), "--model_path", str(out / "models" / "model.pt"),
           "--max_epochs", "2",
           "--batch_size", "2", "--val_interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = read_stage_meta(out / "models" / "model.pt", "meduet_ssl")
    assert meta["epoch"] == 2
    state = torch.load(sorted((out / "checkpoints").glob("checkpoint_final_iteration=*.pt"))[-1], weights_only=True)
    # 6 items -> 3 cross-domain pairs -> 3 batches of 2, padded to 4 -> 2 per rank and epoch
    assert state["step"]["step"] == 2 * 2


def test_a_missing_latent_datalist_is_refused_naming_it(tmp_path):
    from monai.bundle import ConfigWorkflow

    missing = tmp_path / "nowhere" / "datalist.json"
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")], logging_file=None,
                        meta_file=str(CONFIGS / "metadata.json"), workflow_type="train", init_id="__none__",
                        bundle_root=str(BUNDLE), latent_datalist=str(missing), output_dir=str(tmp_path / "out"))
    wf.initialize()
    wf.parser.get_parsed_content("train#dataset")  # resolves (empty), as on a fresh clone
    with pytest.raises(Exception) as info:
        wf.run()  # the run stops before any work, naming the config id and the file
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any(f"latent_datalist: {missing} not found" in m for m in chain), chain
    assert not (tmp_path / "out").exists()  # nothing written


def test_cube_blending_of_the_identity_returns_the_volume():
    from custom_nets.engines.ssl.swap import blend_cubes

    x = torch.randn(1, 3, 24, 20, 16)
    torch.testing.assert_close(blend_cubes(lambda t: t, x, patch=16, overlap=0.25, token=4, cube_batch=3), x)


def test_complementary_decoding_takes_each_token_from_the_pass_where_it_was_hidden():
    from custom_nets.engines.ssl.swap import decode_factors, random_half_mask
    from custom_nets.nets.meduet import gather_tokens, split_ids

    torch.manual_seed(0)
    net = build_meduet(meduet_network_args("demo", 2)).eval()
    x = torch.randn(2, 4, 16, 16, 16)
    grid = net.encoder.grid_of(x.shape[2:])
    with torch.no_grad():
        c, s = net.encode_factors(x)
        out = decode_factors(net, c, s, grid, "complementary", 1, torch.Generator().manual_seed(3))
        mask = random_half_mask(2, 64, torch.Generator().manual_seed(3), x.device)
        ids0, ids1 = split_ids(mask)
        fused = net.fuse(c, s)
        first = net.decode(gather_tokens(fused, ids0), ids0, grid)  # sees M = 0, predicts M = 1
        token = int(ids1[0, 0])  # a token hidden in the first pass
        torch.testing.assert_close(net.patchify(out)[0, token], first[0, token])
        again = decode_factors(net, c, s, grid, "complementary", 1, torch.Generator().manual_seed(3))
        torch.testing.assert_close(out, again)
        assert decode_factors(net, c, s, grid, "all_visible").shape == x.shape
    with pytest.raises(ValueError, match="decode mode"):
        decode_factors(net, c, s, grid, "half")


def test_network_arguments_and_strict_loading(tmp_path):
    args = meduet_network_args("demo", 4, {"encoder": {"depth": 1}})
    assert args["n_domains"] == 4 and args["encoder"]["depth"] == 1 and args["encoder"]["embed_dim"] == 48
    net = build_meduet(args)
    wrong = build_meduet(meduet_network_args("demo", 5))
    save_stage_checkpoint(wrong.state_dict(), tmp_path / "model.pt", "meduet_ssl", network=args)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_meduet(tmp_path / "model.pt")
    assert net.content_dim == 48


def test_check_bundles_passes(cache, shared_dir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_bundles", shared_dir / "tools" / "check_bundles.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    # in-process (one interpreter start less); demo size: the check instantiates train.json's
    # network, teacher and optimizer
    overrides = {"latent_datalist": str(cache["latent_datalist"]), "model_size": "demo", "output_dir": str(tmp_path)}
    problems = tool.check(ROOT / BUNDLE, overrides)
    assert problems == []
