"""Experiment tracking of the train configs: MONAI's MLflow tracking (``--tracking mlflow``) with a
local file store, beside the default TensorBoard logs.

MONAI's default settings (monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS) append an MLFlowHandler to
``train#handlers`` (engine ``train#trainer``) and to ``validate#handlers`` (engine
``validate#evaluator``) and log the executed config as an artifact from ``output_dir``. The cheap test
checks that every train config offers those ids; the run test trains meduet_seg for one tiny epoch
and reads the run back from the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle_fakes import SEG_ROI, fake_world
from bundle_runner import run_bundle

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "bundles").glob("*/configs/train.json"))


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=lambda p: p.parent.parent.name)
def test_train_configs_offer_the_ids_mlflow_tracking_patches(config: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser, ConfigWorkflow
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["output_dir"] = str(tmp_path)  # the executed config is written there
    ConfigWorkflow.patch_bundle_tracking(parser, DEFAULT_MLFLOW_SETTINGS)
    for engine, handlers, key in (("train#trainer", "train#handlers", "train_handlers"),
                                  ("validate#evaluator", "validate#handlers", "val_handlers")):
        assert engine in parser and isinstance(parser[handlers], list), f"{config}: no list {handlers}"
        assert parser[handlers][-1]["_target_"] == "MLFlowHandler", f"{config}: {handlers} not patched"
        # the engine must use that list (monai spells "#" as "::" once parsed)
        assert f"@{handlers}" in str(parser[f"{engine}#{key}"]).replace("::", "#"), f"{config}: {engine} ignores {handlers}"
    assert list(tmp_path.glob("config_*.json"))
    # TensorBoard stays on by default
    assert any(h["_target_"].endswith("TensorBoardStatsHandler") for h in parser["train#handlers"])


def _metric(run: Path, name: str) -> list[tuple[float, int]]:
    """(value, step) rows of a metric in MLflow's file store (lines "timestamp value step")."""
    rows = (run / "metrics" / name).read_text().split()
    return [(float(rows[i + 1]), int(rows[i + 2])) for i in range(0, len(rows), 3)]


def test_seg_training_logs_to_a_local_mlflow_store(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    world = fake_world(tmp_path_factory)
    store = tmp_path / "mlruns"
    bundle_root = tmp_path / "meduet_seg"
    configs = ROOT / "bundles" / "meduet_seg" / "configs"
    # val_interval > max_epochs: validating one whole 96^3 volume costs ~30 s on a CPU; the train side is enough
    run_bundle([configs / "train.json", configs / "demo.json"],
               {"bundle_root": bundle_root, "dataset_dir": world["phantoms"], "vae_ckpt": world["vae_ckpt"],
                "ssl_ckpt": world["ssl_ckpt"], "roi_size": f"[{SEG_ROI},{SEG_ROI},{SEG_ROI}]", "feature_size": 4,
                "max_epochs": 1, "val_interval": 2, "num_samples": 1, "num_workers": 0},
               extra_args=["--tracking", "mlflow", "--tracking_uri", store.as_uri(), "--experiment_name", "meduet_seg"])
    experiments = [p for p in store.iterdir() if (p / "meta.yaml").is_file() and "name: meduet_seg" in
                   (p / "meta.yaml").read_text()]
    assert len(experiments) == 1
    runs = [p for p in experiments[0].iterdir() if (p / "metrics").is_dir()]
    assert len(runs) == 1
    run = runs[0]
    losses = _metric(run, "train_loss")
    n_train = len(json.loads((world["phantoms"] / "datalist.json").read_text())["training"])
    assert [step for _, step in losses] == list(range(1, n_train + 1))  # one row per iteration
    assert all(v == v and v > 0 for v, _ in losses)  # finite Dice-CE values
    assert _metric(run, "train_mean_dice")[0][1] == 1  # epoch-level key metric
    assert (run / "params" / "max_epochs").read_text().strip() == "1"
    assert [p.name for p in (run / "artifacts").iterdir() if p.name.startswith("config_")]  # the executed config
    assert list((bundle_root / "eval").glob("events.out.tfevents.*"))  # TensorBoard as well
