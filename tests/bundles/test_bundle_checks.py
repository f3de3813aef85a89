"""Every bundle under bundles/ passes the shared ecosystem checker (../shared/tools/check_bundles.py):
required files, metadata.json against the Model Zoo schema, and ConfigWorkflow.check_properties()
of inference.json ("infer") and train.json ("train"); plus the packaging facts of DESIGN.md section
4 that the checker does not look at (changelog, required packages, data formats, large files)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.bundle_runner import run_bundle
from tests.support.world import session_world

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
MODEL_ZOO_SECTIONS = ("Model Overview", "Data", "Training configuration", "Performance", "MONAI Bundle Commands",
                      "System Configuration", "Limitations", "References", "License")


def test_the_four_bundles_are_there() -> None:
    assert BUNDLES == ["meduet_ldm", "meduet_seg", "meduet_ssl", "meduet_vae"]


@pytest.fixture(scope="module")
def checker(shared_dir: Path):
    spec = importlib.util.spec_from_file_location("check_bundles", shared_dir / "tools" / "check_bundles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overrides(name: str, world: dict[str, Path], out: Path) -> dict[str, str]:
    """Config ids pointing each bundle at the fake world (strings, as on a command line; "$" values
    are expressions and arrive as numbers). Demo sizes keep the instantiated networks small."""
    common = {"bundle_root": str(world["root"] / name), "output_dir": str(out), "ckpt_dir": str(out / "ckpt")}
    return common | {
        "meduet_vae": {"dataset_dir": str(world["phantoms"]), "model_size": "demo", "min_size": "$32",
                       "num_workers": "$0"},
        "meduet_ssl": {"latent_datalist": str(world["latent_datalist"]), "model_size": "demo"},
        "meduet_seg": {"dataset_dir": str(world["phantoms"]), "vae_ckpt": str(world["vae_ckpt"]),
                       "ssl_ckpt": str(world["ssl_ckpt"]), "num_workers": "$0"},
        "meduet_ldm": {"latent_datalist": str(world["latent_datalist"]), "factor_bank": str(world["factor_bank"]),
                       "ssl_ckpt": str(world["ssl_ckpt"]), "vae_ckpt": str(world["vae_ckpt"]),
                       "model_path": str(world["ldm_model"]), "model_size": "demo", "latent_crop": "$[16, 16, 8]"},
    }[name]


@pytest.mark.parametrize("name", BUNDLES)
def test_check_bundles_reports_no_problem(name: str, checker, tmp_path_factory, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema + infer/train properties (the checker instantiates what the properties name)."""
    world = session_world(tmp_path_factory)
    monkeypatch.chdir(ROOT)  # the checker's paths are relative to the repository root
    assert checker.check(Path("bundles") / name, _overrides(name, world, tmp_path)) == []


def test_a_fresh_clone_passes_the_checker_with_no_data(checker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundles as a fresh clone has them (no models, no eval/, data paths at their placeholders):
    every inference and train config resolves (missing inputs resolve empty; a run stops later)."""
    for name in BUNDLES:
        shutil.copytree(ROOT / "bundles" / name, tmp_path / "bundles" / name,
                        ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    problems = [p for name in BUNDLES for p in checker.check(Path("bundles") / name, {})]
    assert problems == []


@pytest.mark.parametrize(("name", "config", "config_id"), [("meduet_vae", "train.json", "datalist"),
                                                            ("meduet_ssl", "train.json", "latent_datalist")])
def test_a_run_without_its_data_stops_naming_the_config_id(name: str, config: str, config_id: str,
                                                           tmp_path: Path) -> None:
    proc = run_bundle([ROOT / "bundles" / name / "configs" / config],
                      {"bundle_root": tmp_path / name, config_id: tmp_path / "nowhere"}, check=False)
    assert proc.returncode != 0
    assert f"InputError: {config_id}: {tmp_path / 'nowhere'} not found; set it with --{config_id} PATH" in proc.stderr


@pytest.mark.parametrize("name", BUNDLES)
def test_packaging_facts(name: str) -> None:
    """What Model Zoo asks beyond the schema (DESIGN.md section 4)."""
    bundle = ROOT / "bundles" / name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["schema"] == SCHEMA_URL
    assert meta["version"] in meta["changelog"]
    assert "optional_packages_version" not in meta
    req = meta["required_packages_version"]
    # the versions this repository is tested with (real releases, as installed here)
    for pkg in ("monai", "torch", "numpy"):
        installed = importlib.metadata.version(pkg).split("+")[0]
        assert req[pkg] == installed, f"{name}: required_packages_version[{pkg!r}] {req[pkg]} != installed {installed}"
    assert meta["monai_version"] == req["monai"] and meta["pytorch_version"] == req["torch"]
    assert meta["numpy_version"] == req["numpy"]
    # every required package is a registry distribution (Model Zoo's CI pip-installs them); the
    # configs' own code travels inside the zip (custom_nets), so the project itself is not listed
    assert "meduet" not in req
    for pkg, version in req.items():
        assert importlib.metadata.version(pkg).split("+")[0] == version, f"{name}: {pkg} {version} is not the tested one"
    fmt = meta["network_data_format"]
    assert "image" in fmt["inputs"] and "pred" in fmt["outputs"]
    for key, value in meta.items():  # secondary networks: <name>_data_format, same layout
        if key.endswith("_data_format") and key != "network_data_format":
            assert set(value) >= {"inputs", "outputs"}, key
    for f in ("LICENSE", "configs/logging.conf", "configs/train.json", "configs/inference.json",
              "configs/multi_gpu_train.json", "docs/README.md"):
        assert (bundle / f).is_file(), f"{name}: missing {f}"
    # weights are not in git; large_files.yml says where they come from (a list, maybe empty)
    large = yaml.safe_load((bundle / "large_files.yml").read_text())
    assert isinstance(large.get("large_files"), list)
    for item in large["large_files"]:
        assert {"path", "url"} <= set(item), f"{name}: large_files entry without path/url: {item}"
    readme = (bundle / "docs" / "README.md").read_text()
    headings = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("## ")}
    missing = [s for s in MODEL_ZOO_SECTIONS if s not in headings]
    assert not missing, f"{name}: docs/README.md lacks sections {missing}"
