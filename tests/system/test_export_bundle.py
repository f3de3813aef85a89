"""``python -m custom_nets.export_bundle`` writes self-contained zips, and an extracted zip runs
inference in a fresh process that cannot see this repository (as after a Model Zoo download or in a
MONAI Label app).

The venv has ``custom_nets`` installed editable (a ``.pth`` file adds a finder that maps it to this
repository). The isolated process therefore starts with ``python -S`` (no site module: no ``.pth``
processing, no user site) and gets the venv's site-packages through ``PYTHONPATH`` only, with the
current directory (the extracted bundle) first on ``sys.path``. Two control runs prove the isolation:
outside the extracted folder ``import custom_nets`` fails, inside it resolves to the extracted copy.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.support.world import SEG_ROI, session_world

ROOT = Path(__file__).resolve().parents[2]


def isolated_env() -> dict[str, str]:
    """Environment of a process that sees the venv's packages but not this repository."""
    paths = [p for p in site.getsitepackages() if not Path(p).resolve().is_relative_to(ROOT / "custom_nets")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONNOUSERSITE="1",
               OMP_NUM_THREADS=os.environ.get("MEDUET_TEST_THREADS", "2"))
    return env


def isolated_python(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=isolated_env(), capture_output=True,
                          text=True, timeout=timeout)


def extract(zip_path: Path, dest: Path) -> Path:
    """Extract a bundle zip; returns its single top folder (the bundle name, without ``_v<version>``)."""
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
        (top,) = {n.split("/")[0] for n in zf.namelist()}
    assert zip_path.name.startswith(f"{top}_v") and zip_path.suffix == ".zip"
    return dest / top


def one_image(world: dict[str, Path], dest: Path) -> Path:
    """A folder holding one phantom image (one volume keeps inference short)."""
    dest.mkdir(parents=True)
    first = sorted((world["phantoms"] / "images").glob("*.nii.gz"))[0]
    shutil.copy(first, dest / first.name)
    return dest


def run_in_bundle(bundle: Path, config: str, overrides: dict[str, object]) -> subprocess.CompletedProcess:
    """``python -S -m monai.bundle run --config_file configs/<config> ...`` with cwd = the extracted bundle."""
    cmd = ["-m", "monai.bundle", "run", "--config_file", f"configs/{config}"]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    proc = isolated_python(cmd, cwd=bundle)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_the_isolated_process_cannot_import_the_repository(tmp_path: Path) -> None:
    proc = isolated_python(["-c", "import custom_nets"], cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'custom_nets'" in proc.stderr, proc.stderr


def test_zip_layout(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from custom_nets.export_bundle import main

    world = session_world(tmp_path_factory)
    assert main(["bundles/meduet_vae", "bundles/meduet_seg", "--out", str(tmp_path / "dist")]) == 0
    for name in ("meduet_vae", "meduet_seg"):
        with zipfile.ZipFile(tmp_path / "dist" / f"{name}_v0.1.0.zip") as zf:
            names = zf.namelist()
            assert all(n.startswith(f"{name}/") for n in names)
            for f in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/logging.conf",
                      "docs/README.md", "large_files.yml", "custom_nets/__init__.py",
                      "custom_nets/nets/latent_segmenter.py"):
                assert f"{name}/{f}" in names, f"{name}_v0.1.0.zip lacks {f}"
            assert not [n for n in names if "__pycache__" in n or "/checkpoints/" in n or "/eval/" in n]
            zipped = json.loads(zf.read(f"{name}/configs/inference.json"))
            assert zipped["bundle_root"] == "."
            # initialize moved to the front of run (see export_bundle's docstring), nothing lost
            repo = json.loads((ROOT / "bundles" / name / "configs" / "inference.json").read_text())
            assert "initialize" not in zipped and zipped["run"] == repo.get("initialize", []) + repo["run"]
            assert json.loads(zf.read(f"{name}/configs/metadata.json")) == json.loads(
                (ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
    # --models-dir packs weights trained elsewhere; --no-models leaves them out
    models = world["seg_model"].parent
    assert main(["bundles/meduet_seg", "--out", str(tmp_path / "m"), "--models-dir", str(models)]) == 0
    with zipfile.ZipFile(tmp_path / "m" / "meduet_seg_v0.1.0.zip") as zf:
        assert zf.read("meduet_seg/models/model.pt") == world["seg_model"].read_bytes()
        assert "meduet_seg/models/model.json" in zf.namelist()
    assert main(["bundles/meduet_seg", "--out", str(tmp_path / "n"), "--no-models"]) == 0
    with zipfile.ZipFile(tmp_path / "n" / "meduet_seg_v0.1.0.zip") as zf:
        assert not [n for n in zf.namelist() if n.startswith("meduet_seg/models/")]
    assert main(["bundles/meduet_seg", "--out", str(tmp_path / "e"), "--models-dir", str(tmp_path)]) == 1
    assert not (tmp_path / "e" / "meduet_seg_v0.1.0.zip").exists()


def test_extracted_seg_bundle_segments_without_the_repository(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    from custom_nets.export_bundle import export_bundle

    world = session_world(tmp_path_factory)
    zip_path = export_bundle(ROOT / "bundles" / "meduet_seg", tmp_path / "dist", models_dir=world["seg_model"].parent)
    # fetched as a user would, into an empty folder, by the isolated interpreter
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    proc = isolated_python(["-m", "monai.bundle", "download", "--name", "meduet_seg", "--url", zip_path.as_uri(),
                            "--bundle_dir", str(fetched)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = fetched / "meduet_seg"
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "models" / "model.pt").is_file()
    origin = isolated_python(["-c", "import custom_nets; print(custom_nets.__file__)"], cwd=bundle)
    assert Path(origin.stdout.strip()).resolve() == (bundle / "custom_nets" / "__init__.py").resolve(), origin.stderr

    images = one_image(world, tmp_path / "images")
    # one VAE tile over the whole (padded 96^3) volume and no window overlap keep it quick; same code path.
    # No output_dir: the masks go under the bundle, $@bundle_root/eval/segmentation
    run_in_bundle(bundle, "inference.json", {"dataset_dir": images, "overlap": 0, "inferer#vae_roi_size": 96})
    out = bundle / "eval" / "segmentation"
    # and from another folder, naming the bundle: the same masks
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = ["-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(images), "--output_dir", str(tmp_path / "outside"),
           "--overlap", "0", "--inferer#vae_roi_size", "96"]
    proc = isolated_python(cmd, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for mask in out.glob("*_seg.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(mask).dataobj),
                                      np.asarray(nib.load(tmp_path / "outside" / mask.name).dataobj))
    assert list(out.glob("*_seg.nii.gz")) and not list(elsewhere.iterdir())  # nothing written where it ran
    src = next(images.glob("*.nii.gz"))
    mask = nib.load(out / src.name.replace(".nii.gz", "_seg.nii.gz"))
    img = nib.load(src)
    assert mask.shape == img.shape
    np.testing.assert_allclose(mask.affine, img.affine, atol=1e-4)
    values = np.unique(np.asarray(mask.dataobj))
    assert values.min() >= 0 and values.max() < 8
    assert json.loads((world["seg_model"].with_suffix(".json")).read_text())["network"]["roi_size"] == [SEG_ROI] * 3


# The other bundles' inference in one isolated process (one interpreter start instead of three): for
# each extracted bundle the driver makes it the current directory and the first sys.path entry, forgets
# every custom_nets module imported before, runs monai.bundle's `run` and records where custom_nets came
# from, so each bundle proves that its own copy is used.
DRIVER = """
import json, os, sys
jobs = json.loads(open(sys.argv[1]).read())
from monai.bundle import run
origins = {}
for job in jobs:
    os.chdir(job["bundle"])
    sys.path.insert(0, job["bundle"])
    for name in [m for m in sys.modules if m == "custom_nets" or m.startswith("custom_nets.")]:
        del sys.modules[name]
    run(config_file="configs/inference.json", **job["overrides"])
    origins[job["bundle"]] = sys.modules["custom_nets"].__file__
    sys.path.remove(job["bundle"])
print("ORIGINS " + json.dumps(origins))
"""


def test_extracted_vae_ssl_ldm_bundles_run_inference_without_the_repository(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    import torch

    from custom_nets.export_bundle import export_bundle

    world = session_world(tmp_path_factory)
    models = {"meduet_vae": world["vae_ckpt"], "meduet_ssl": world["ssl_ckpt"], "meduet_ldm": world["ldm_model"]}
    bundles = {name: extract(export_bundle(ROOT / "bundles" / name, tmp_path / "dist", models_dir=ckpt.parent),
                             tmp_path / "extracted") for name, ckpt in models.items()}
    out = {name: tmp_path / f"out_{name}" for name in models}
    overrides = {
        "meduet_vae": {"dataset_dir": str(world["phantoms"]), "splits": ["validation"], "encode_roi": 64,
                       "min_size": 32},
        "meduet_ssl": {"latent_datalist": str(world["latent_datalist"]), "crop": 16, "save_token_maps": False},
        "meduet_ldm": {"factor_bank": str(world["factor_bank"]), "vae_ckpt": str(world["vae_ckpt"]),
                       "ssl_ckpt": str(world["ssl_ckpt"]), "content_sources": 1, "style_sources": 1, "num_steps": 2,
                       "decode_roi": 8},
    }
    jobs = [{"bundle": str(bundles[n]), "overrides": {**overrides[n], "output_dir": str(out[n])}} for n in models]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = isolated_python([str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    origins = json.loads(proc.stdout.split("ORIGINS ", 1)[1].splitlines()[0])
    for name, bundle in bundles.items():
        assert Path(origins[str(bundle)]).resolve() == (bundle / "custom_nets" / "__init__.py").resolve(), name

    latents = json.loads((out["meduet_vae"] / "datalist.json").read_text())  # VAE: the latent cache
    assert len(latents["validation"]) == len(json.loads((world["phantoms"] / "datalist.json").read_text())["validation"])
    z = np.load(out["meduet_vae"] / latents["validation"][0]["latent"])
    assert z.shape[0] == 4 and np.isfinite(z).all()
    bank = torch.load(out["meduet_ssl"] / "factor_bank.pt", weights_only=True)  # SSL: the factor bank
    assert bank["content"].shape[0] == 6 and torch.isfinite(bank["style"]).all()
    samples = sorted(out["meduet_ldm"].glob("sample_*.nii.gz"))  # LDM: one sample and the grid
    assert len(samples) == 1 and np.isfinite(np.asarray(nib.load(samples[0]).dataobj)).all()
    assert (out["meduet_ldm"] / "samples_grid.png").is_file()


def test_segmenter_exports_to_onnx_matching_eager(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """ONNX (TorchScript-based exporter, opset 18) run by ONNX Runtime vs the eager network: max |diff|
    <= 1e-4 on logits of order 1 (measured ~5e-6). TorchScript (ckpt_export) is checked in test_seg_bundle."""
    pytest.importorskip("onnxruntime")
    from custom_nets.export_bundle import main

    world = session_world(tmp_path_factory)
    out = tmp_path / "model.onnx"
    assert main(["onnx", "--model", str(world["seg_model"]), "--out", str(out), "--atol", "1e-4"]) == 0
    import onnx
    import onnxruntime
    import torch

    from custom_nets.engines.seg.model import build_segmenter, load_segmenter_weights

    onnx.checker.check_model(str(out))
    net = build_segmenter({}, model_ckpt=world["seg_model"])
    load_segmenter_weights(net, world["seg_model"])
    net.eval()
    x = torch.rand(1, 1, SEG_ROI, SEG_ROI, SEG_ROI, generator=torch.Generator().manual_seed(3))  # not the export input
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    assert got.shape == (1, 8, SEG_ROI, SEG_ROI, SEG_ROI)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_seg_zip_passes_model_zoo_bundle_checks_offline(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                       shared_dir: Path) -> None:
    """The checks of Model Zoo's ci/verify_bundle.py (full mode) on the extracted seg zip, run with
    MONAI's own functions and without the network: required files (metadata, LICENSE), preferred
    files (models/model.pt, configs/inference.json), version listed in the changelog, metadata
    against the schema (the copy in ../shared instead of a download), and verify_net_in_out of
    inference.json's network_def. Model Zoo's TorchScript step is skipped for this bundle, as for
    swin_unetr_btcv_segmentation: the segmenter is traced (test_seg_bundle), not scripted."""
    from monai.bundle import verify_metadata, verify_net_in_out

    from custom_nets.export_bundle import export_bundle

    world = session_world(tmp_path_factory)
    zip_path = export_bundle(ROOT / "bundles" / "meduet_seg", tmp_path / "dist", models_dir=world["seg_model"].parent)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "models")
    bundle = tmp_path / "models" / "meduet_seg"
    for f in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / f).is_file(), f"{zip_path.name} lacks {f}"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                    filepath=str(shared_dir / "schema" / "meta_schema_20240725.json"))
    # the packed model's crop size is the metadata's shape, the shape verify_net_in_out feeds it
    for section, key in (("inputs", "image"), ("outputs", "pred")):
        assert meta["network_data_format"][section][key]["spatial_shape"] == [SEG_ROI] * 3
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle))


def test_extracted_bundle_trains_with_its_multi_gpu_config_from_another_folder(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """``train.json`` + ``multi_gpu_train.json`` of an extracted zip, run from another folder with
    ``--bundle_root`` by the isolated interpreter, as one gloo rank: the overlay's initialize steps
    (process group, ``custom_nets`` imports, upstream weights) run after the bundle folder is on
    ``sys.path``, so the bundle's own ``custom_nets`` copy is found."""
    from custom_nets.export_bundle import export_bundle
    from tests.support.ddp_utils import free_port
    from tests.support.world import train_overrides

    world = session_world(tmp_path_factory)
    bundle = extract(export_bundle(ROOT / "bundles" / "meduet_seg", tmp_path / "dist", models_dir=world["seg_model"].parent),
                     tmp_path / "fetched")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    files = [str(bundle / "configs" / f) for f in ("train.json", "multi_gpu_train.json", "demo.json")]
    overrides = {**train_overrides("meduet_seg", world, tmp_path / "run", epochs=1), "bundle_root": bundle,
                 "style_aug": False}
    cmd = ["-m", "monai.bundle", "run", "--config_file", str(files)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {**isolated_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-S", *cmd], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert (tmp_path / "run" / "models" / "model.pt").is_file() and not list(elsewhere.iterdir())
