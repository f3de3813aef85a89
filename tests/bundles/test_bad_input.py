"""Bad input refused before any long work, with the file and the problem named (issue 7 item 1):

- segmentation training: a label value above the configured classes;
- meduet_ssl factor bank and swap: a latent cache encoded by another VAE than the one whose latents
  trained the SSL checkpoint (model.json ``vae_sha256``).

The label case also runs through ``python -m monai.bundle run`` as a user would: non-zero exit, the
file named in the output, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom_nets.utils.checkpoint import read_stage_meta
from tests.support.bundle_runner import ROOT, run_bundle
from tests.support.world import config_files, train_overrides, write_meduet

SEG = ROOT / "bundles" / "meduet_seg" / "configs"
SSL = ROOT / "bundles" / "meduet_ssl" / "configs"


@pytest.fixture(scope="module")
def upstream(world: dict[str, Path]) -> dict[str, Path]:
    return world


@pytest.fixture
def bad_label_phantoms(upstream: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the phantoms whose first training label has one voxel of value 9 (classes 0..7)."""
    folder = tmp_path / "phantoms"
    shutil.copytree(upstream["phantoms"], folder)
    item = json.loads((folder / "datalist.json").read_text())["training"][0]
    label = folder / item["label"]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[tuple(s // 2 for s in data.shape)] = 9
    nib.save(nib.Nifti1Image(data, img.affine, img.header), label)
    return folder, label


def _causes(exc: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_seg_training_refuses_a_label_above_the_largest_class(bad_label_phantoms: tuple[Path, Path]) -> None:
    from monai.bundle import ConfigParser

    folder, label = bad_label_phantoms
    parser = ConfigParser()
    parser.read_config([str(SEG / "train.json"), str(SEG / "demo.json")])
    parser.read_meta(str(SEG / "metadata.json"))  # the labels' default (monai.bundle run reads it too)
    parser["dataset_dir"] = str(folder)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("splits")
    assert f"{label}: label value 9 above the largest class 7" in _causes(info.value)


def test_bundle_run_exits_non_zero_naming_the_label_and_writes_nothing(
    upstream: dict[str, Path], bad_label_phantoms: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, label = bad_label_phantoms
    out = tmp_path / "out"
    args = train_overrides("meduet_seg", upstream, out)
    args.update(dataset_dir=folder, bundle_root=tmp_path / "bundle")
    proc = run_bundle(config_files("meduet_seg"), args, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{label}: label value 9 above the largest class 7" in output, output[-3000:]
    written = sorted(p for p in [*out.rglob("*"), *(tmp_path / "bundle").rglob("*")] if p.is_file())
    assert not written, written


def _ssl_ckpt_of_another_vae(upstream: dict[str, Path], path: Path) -> str:
    """A tiny MeDUET whose model.json says it was trained on latents of another VAE than the world's."""
    other = "ab" * 32
    write_meduet(path, domains=read_stage_meta(upstream["ssl_ckpt"], "meduet_ssl")["domains"], vae_sha256=other)
    return other


@pytest.mark.parametrize("config", ["inference.json", "swap.json"])
def test_ssl_inference_refuses_latents_of_another_vae(config: str, upstream: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    from custom_nets.utils.checkpoint import file_sha256

    ssl_ckpt = tmp_path / "ssl" / "model.pt"
    other = _ssl_ckpt_of_another_vae(upstream, ssl_ckpt)
    out = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=[str(SSL / config), str(SSL / "demo.json")], workflow_type="infer",
        bundle_root=str(ROOT / "bundles" / "meduet_ssl"), latent_datalist=str(upstream["latent_datalist"]),
        ssl_ckpt=str(ssl_ckpt), vae_ckpt=str(upstream["vae_ckpt"]), output_dir=str(out), save_token_maps=False,
    )
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    message = _causes(info.value)
    have = file_sha256(upstream["vae_ckpt"])
    assert (f"{upstream['latent_datalist']}: the latent cache was made with the meduet_vae checkpoint of sha256 "
            f"{have[:12]}") in message, message
    assert f"the VAE of the latents ssl_ckpt {ssl_ckpt} was trained on has sha256 {other[:12]}" in message
    assert not out.exists() or not any(out.rglob("*"))
