"""Re-running an inference never silently mixes old and new outputs (issue 7 item 4).

For segmentation (SaveImaged), meduet_ldm sampling, the meduet_ssl factor bank and swaps:

- a second run with ``overwrite=false`` skips what is complete (files untouched);
- a run with other settings or ``overwrite=true`` replaces the outputs;
- an ``output_dir`` that is an input folder is refused before anything is written;
- outputs are written whole (temporary name, then rename): a writer that dies leaves no file.

Runs the bundles' own configs in-process on the tiny random "trained world" of tests/support/world.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.support.bundle_runner import ROOT

from custom_nets.engines.common.outputs import LEDGER_NAME

BUNDLES = ROOT / "bundles"


def run_config(bundle: str, configs: Sequence[str], **overrides: Any) -> None:
    """initialize / run / finalize a bundle config in this process, as ``monai.bundle run`` does."""
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    wf = ConfigWorkflow(config_file=files, workflow_type="infer", bundle_root=str(BUNDLES / bundle),
                        **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


def stamps(folder: Path, pattern: str) -> dict[str, int]:
    """{file name: mtime_ns} of the files matching ``pattern`` (not the hidden temporary ones)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")}


def assert_refused(fn: Any, folder: Path) -> None:
    """``fn()`` fails naming ``folder`` as an input folder, and writes nothing into it."""
    before = sorted(folder.rglob("*"))
    with pytest.raises(Exception) as info:
        fn()
    messages, exc = [], info.value
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert f"{folder.resolve()}: output_dir is an input folder" in "\n".join(messages)
    assert sorted(folder.rglob("*")) == before


# ------------------------------------------------------------------------------------ segmentation


def test_seg_inference_skips_redoes_and_refuses(world: Mapping[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    src = json.loads((world["phantoms"] / "datalist.json").read_text())["validation"][0]["image"]
    shutil.copy(world["phantoms"] / src, images / "case.nii.gz")
    out = tmp_path / "seg"
    args = dict(dataset_dir=images, output_dir=out, model_path=world["seg_model"], overlap=0.0, sw_batch_size=1)

    def infer(**more: Any) -> dict[str, int]:
        run_config("meduet_seg", ["inference.json"], **{**args, **more})
        return stamps(out, "*.nii.gz")

    first = infer()
    assert list(first) == ["case_seg.nii.gz"] and (out / LEDGER_NAME).is_file()
    assert infer() == first  # complete with this model and settings: skipped
    assert infer(overlap=0.25)["case_seg.nii.gz"] > first["case_seg.nii.gz"]  # other settings: replaced
    again = stamps(out, "*.nii.gz")
    assert infer(overlap=0.25, overwrite=True)["case_seg.nii.gz"] > again["case_seg.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files or folders left
    assert_refused(lambda: run_config("meduet_seg", ["inference.json"], **{**args, "output_dir": images}), images)


def test_atomic_save_imaged_leaves_nothing_when_the_writer_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monai.data import MetaTensor, NibabelWriter

    from custom_nets.engines.common.outputs import AtomicSaveImaged, OutputLedger

    def dies_halfway(self: Any, filename: str, **kwargs: Any) -> None:
        Path(filename).write_bytes(b"half a NIfTI")
        raise OSError("disk full")

    monkeypatch.setattr(NibabelWriter, "write", dies_halfway)
    out = tmp_path / "out"
    ledger = OutputLedger(out, {"k": 1})
    saver = AtomicSaveImaged(keys="pred", output_dir=str(out), output_postfix="seg", separate_folder=False,
                             resample=False, writer=NibabelWriter, ledger=ledger)
    pred = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": str(tmp_path / "case.nii.gz")})
    with pytest.raises(RuntimeError):
        saver({"pred": pred})
    assert sorted(out.iterdir()) == []  # neither the half file nor the staging folder nor a ledger entry


# ------------------------------------------------------------------------------------ LDM sampling


def test_ldm_sampling_skips_redoes_and_refuses(world: Mapping[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples"
    args = dict(model_path=world["ldm_model"], factor_bank=world["factor_bank"], vae_ckpt=world["vae_ckpt"],
                ssl_ckpt=world["ssl_ckpt"], output_dir=out, content_sources=1, style_sources=2, num_steps=2)

    def sample(**more: Any) -> dict[str, int]:
        run_config("meduet_ldm", ["inference.json", "demo.json"], **{**args, **more})
        return stamps(out, "sample_*")

    first = sample()
    assert len(first) == 4 and (out / "samples_grid.png").is_file()  # 2 samples: image + latent each
    assert sample() == first
    (out / "samples_grid.png").unlink()
    partial = dict(first)
    (out / sorted(first)[0]).unlink()  # one sample's image lost: only that sample is redone
    redone = sample()
    assert {k for k in redone if redone[k] != partial.get(k)} == {k for k in first if k.startswith(sorted(first)[0][:-7])}
    assert (out / "samples_grid.png").is_file()  # the grid shows the skipped sample too
    reseeded = sample(seed=1)
    assert all(reseeded[k] > redone[k] for k in redone)  # other noise: every sample replaced
    assert all(v > reseeded[k] for k, v in sample(seed=1, overwrite=True).items())
    assert_refused(lambda: sample(output_dir=world["factor_bank"].parent), world["factor_bank"].parent)


# ------------------------------------------------------------------------------------ SSL


def test_factor_bank_skips_redoes_and_refuses(world: Mapping[str, Path], tmp_path: Path) -> None:
    from custom_nets.engines.ssl.factor_bank import FactorBank

    out = tmp_path / "factors"
    args = dict(latent_datalist=world["latent_datalist"], ssl_ckpt=world["ssl_ckpt"], output_dir=out)

    def bank(**more: Any) -> dict[str, int]:
        run_config("meduet_ssl", ["inference.json", "demo.json"], **{**args, **more})
        return stamps(out, "factor_bank.*")

    first = bank()
    first_bank = FactorBank.load(out)
    maps = sorted((out / "token_maps").rglob("*.npy"))
    assert len(maps) == 2 * len(first_bank) and all(p.parent.name == first_bank.meta["settings_key"] for p in maps)
    assert bank() == first  # complete with this checkpoint and settings
    replaced = bank(overwrite=True)
    assert all(replaced[k] > first[k] for k in first)
    torch.testing.assert_close(FactorBank.load(out).content, first_bank.content)
    bank(save_token_maps=False)  # other settings: recomputed whole, the old token maps removed
    assert not list((out / "token_maps").rglob("*.npy")) and "content_map" not in FactorBank.load(out).items[0]
    latents = world["latent_datalist"].parent
    assert_refused(lambda: bank(output_dir=latents), latents)


def test_swap_skips_redoes_and_refuses(world: Mapping[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "swaps"
    args = dict(latent_datalist=world["latent_datalist"], ssl_ckpt=world["ssl_ckpt"], vae_ckpt=world["vae_ckpt"],
                output_dir=out, num_pairs=1)

    def swap(**more: Any) -> dict[str, int]:
        run_config("meduet_ssl", ["swap.json", "demo.json"], **{**args, **more})
        return stamps(out, "*__*")

    first = swap()
    assert len(first) == 3  # two swapped volumes and the montage
    assert swap() == first
    assert json.loads((out / "swaps.json").read_text())["pairs"][0]["montage"] in first  # still listed when skipped
    assert all(v > first[k] for k, v in swap(overwrite=True).items())
    latents = world["latent_datalist"].parent
    assert_refused(lambda: swap(output_dir=latents), latents)
