"""Experiment tracking of the train configs: MONAI's MLflow tracking (``--tracking mlflow``) with a
local file store, beside the default TensorBoard logs.

MONAI's default settings (monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS) append an MLFlowHandler to
``train#handlers`` (engine ``train#trainer``) and to ``validate#handlers`` (engine
``validate#evaluator``) and log the executed config as an artifact from ``output_dir``. The trainer's
handler reads the loss with ``from_engine(["loss"], first=True)``, so every trainer's output must
be the decollated ``[dict, ...]`` form (custom_nets.engines.common.step). The cheap test checks
that every train config offers those ids; the run test trains every bundle for one tiny epoch on
one shared set of tiny inputs (the session world of tests/support/world.py) and reads the run back from the store.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support.bundle_runner import run_bundle
from tests.support.world import BUNDLES, config_files, train_overrides

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted((ROOT / "bundles").glob("*/configs/train.json"))


@pytest.fixture(scope="module")
def upstream(world: dict[str, Path]) -> dict[str, Path]:
    return world


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


# the validation key metric each bundle's evaluator reports (logged by the validator's MLFlowHandler)
VAL_METRIC = {"meduet_vae": "val_psnr", "meduet_ssl": "val_rec", "meduet_ldm": "val_loss", "meduet_seg": "val_mean_dice"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_logs_to_a_local_mlflow_store(bundle: str, upstream: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = tmp_path / "mlruns"
    args = train_overrides(bundle, upstream, out, epochs=1)
    # MONAI writes the executed config (the MLflow artifact) to the output_dir expression of the
    # config as read, before command-line overrides: keep the config's own output_dir, moved with
    # bundle_root (as bundles/meduet_seg/docs/README.md advises)
    del args["output_dir"]
    args["bundle_root"] = tmp_path / bundle
    proc = run_bundle(config_files(bundle), args,
                      extra_args=["--tracking", "mlflow", "--tracking_uri", store.as_uri(), "--experiment_name", bundle])
    experiments = [p for p in store.iterdir() if (p / "meta.yaml").is_file() and f"name: {bundle}" in
                   (p / "meta.yaml").read_text()]
    assert len(experiments) == 1
    runs = [p for p in experiments[0].iterdir() if (p / "metrics").is_dir()]
    assert len(runs) == 1
    run = runs[0]
    state = torch.load(sorted((out / "ckpt").glob("*final*.pt"))[-1], weights_only=True)
    iterations = int(state["trainer"]["iteration"])
    losses = _metric(run, "train_loss")
    assert iterations > 0 and [step for _, step in losses] == list(range(1, iterations + 1))  # one row per iteration
    assert all(math.isfinite(v) for v, _ in losses)
    val = _metric(run, VAL_METRIC[bundle])
    assert len(val) == 1 and math.isfinite(val[0][0])  # the validator's handler: one validation, epoch 1
    assert [p.name for p in (run / "artifacts").iterdir() if p.name.startswith("config_")]  # the executed config
    # TensorBoard and the StatsHandler lines still get the per-iteration loss; long loops show a progress bar
    assert max(_tensorboard_lengths(tmp_path).values()) == iterations
    assert f"Iter: {iterations}/{iterations}" in proc.stdout + proc.stderr
    assert f"Iteration: [1/{iterations}]" in proc.stderr  # the progress bar (ignite's, via tqdm) over the epoch


def _tensorboard_lengths(folder: Path) -> dict[str, int]:
    """Number of points of every scalar tag in the TensorBoard event files under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lengths: dict[str, int] = {}
    for f in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            lengths[tag] = lengths.get(tag, 0) + len(acc.Scalars(tag))
    assert lengths, f"no TensorBoard scalars under {folder}"
    return lengths
