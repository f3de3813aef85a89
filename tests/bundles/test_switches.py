"""Switches given on the command line as words ('false', 'False', '0', 'no') turn the feature off.

``python -m monai.bundle run ... --overwrite false`` hands the config the string 'false'; each test
below passes such a word through a real bundle run and checks that the feature did not happen.
(fire itself turns ``False`` and ``0`` into Python values; the lower-case words are the ones that
used to arrive as truthy strings.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from custom_nets.utils.checkpoint import read_stage_meta
from custom_nets.utils.errors import InputError
from custom_nets.utils.flags import as_bool
from tests.support.bundle_runner import run_bundle
from tests.support.world import config_files, session_world, train_overrides


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> dict[str, Path]:
    return session_world(tmp_path_factory)


def test_as_bool_reads_words_and_refuses_others() -> None:
    for word in ("true", "True", "TRUE", " yes ", "1", "on", "Y"):
        assert as_bool(word) is True, word
    for word in ("false", "False", "0", "no", "off", "", "None", "null"):
        assert as_bool(word) is False, word
    assert as_bool(True) and not as_bool(False) and as_bool(1) and not as_bool(0) and not as_bool(None)
    with pytest.raises(InputError, match="freeze_vae: expected true/false"):
        as_bool("maybe", "freeze_vae")


def _latent_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.npy")}


def test_overwrite_no_keeps_the_latents_already_encoded(up, tmp_path: Path) -> None:
    configs = ["bundles/meduet_vae/configs/inference.json", "bundles/meduet_vae/configs/demo.json"]
    args = {"bundle_root": "bundles/meduet_vae", "dataset_dir": up["phantoms"], "vae_ckpt": up["vae_ckpt"],
            "output_dir": tmp_path / "latents", "min_size": 32, "latent_previews": "false"}
    run_bundle(configs, args)
    first = _latent_times(tmp_path / "latents")
    assert first and not list((tmp_path / "latents").rglob("*.png"))  # latent_previews false: no previews
    run_bundle(configs, {**args, "overwrite": "no"})
    assert _latent_times(tmp_path / "latents") == first  # nothing re-encoded
    run_bundle(configs, {**args, "overwrite": "yes"})
    again = _latent_times(tmp_path / "latents")
    assert set(again) == set(first) and all(again[k] != first[k] for k in first)  # the control: re-encoded


def test_freeze_vae_false_and_style_aug_no_switch_both_off(up, tmp_path: Path) -> None:
    args = train_overrides("meduet_seg", up, tmp_path, epochs=1)
    assert args["style_aug"] is True  # the overrides switch it on; the word below must switch it off
    proc = run_bundle(config_files("meduet_seg"), {**args, "freeze_vae": "false", "style_aug": "no"})
    log = proc.stdout + proc.stderr
    assert "style augmentation off" in log and "style augmentation on" not in log
    model = tmp_path / "models" / "model.pt"
    assert read_stage_meta(model, "meduet_seg")["network"]["freeze_vae"] is False
    trained = torch.load(model, weights_only=True)
    upstream = torch.load(up["vae_ckpt"], weights_only=True)
    vae_keys = [k for k in trained if k.startswith("vae.") and k[4:] in upstream and trained[k].is_floating_point()]
    assert vae_keys
    assert any(not torch.equal(trained[k], upstream[k[4:]]) for k in vae_keys)  # the VAE was fine-tuned


def test_init_from_ssl_false_starts_the_generator_at_random(up, tmp_path: Path) -> None:
    proc = run_bundle(config_files("meduet_ldm"), {**train_overrides("meduet_ldm", up, tmp_path, epochs=1),
                                                    "init_from_ssl": "false"})
    assert "generator initialised at random" in proc.stdout + proc.stderr
    meta = read_stage_meta(tmp_path / "models" / "model.pt", "meduet_ldm")
    assert meta["init_ssl_sha256"] is None
