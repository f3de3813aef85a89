"""The one stage exporter: its policies ("best", "final", "every N") on a real MONAI trainer and evaluator."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler

from custom_nets.engines.common.export import StageExporter, lower_is_better, parse_policy
from custom_nets.utils.checkpoint import read_stage_meta


def test_parse_policy():
    assert parse_policy("best") == ("best", 0) and parse_policy(" Final ") == ("final", 0)
    assert parse_policy("every 3") == ("every", 3) and parse_policy("every 0") == ("every", 0)
    for bad in ("improved", "every", "every -1", "every two", "best 2"):
        with pytest.raises(ValueError, match="'best', 'final' or 'every N'"):
            parse_policy(bad)


class _Net(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(1, 1)
        self.network_args = {"in_features": 1}


def _run(tmp_path, policy: str, val_losses: list[float], epochs: int = 4):
    """Train for ``epochs`` epochs (one iteration each), validating every epoch with the given losses;
    record (epoch, export reason) of every write."""
    net = _Net()
    losses = iter(val_losses)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[0], network=net, decollate=False,
        iteration_update=lambda engine, batch: {"loss": next(losses)},
        key_val_metric={"val_loss": _LastLoss()}, metric_cmp_fn=lower_is_better,
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=[0], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), iteration_update=lambda engine, batch: {"loss": 0.0},
        decollate=False, train_handlers=[ValidationHandler(validator=evaluator, interval=1)],
    )
    exporter = StageExporter(net, tmp_path / "model.pt", "meduet_vae", policy, evaluator, extra={"note": "x"})
    writes = []
    original = exporter.export

    def record(reason):
        info = original(reason)
        writes.append((info["epoch"], info["export"]))
        return info

    exporter.export = record
    exporter.attach(trainer)
    trainer.run()
    return writes, read_stage_meta(tmp_path / "model.pt", "meduet_vae")


def test_best_exports_on_improvement_only(tmp_path):
    writes, meta = _run(tmp_path, "best", [0.5, 0.7, 0.3, 0.4])
    assert writes == [(1, "best"), (3, "best")]  # no final export: a best one exists
    assert meta["epoch"] == 3 and meta["export"] == "best" and meta["note"] == "x"
    assert meta["network"] == {"in_features": 1} and meta["iteration"] == 3


def test_final_and_every_n(tmp_path):
    assert _run(tmp_path, "final", [0.5, 0.7, 0.3, 0.4])[0] == [(4, "final")]
    assert _run(tmp_path, "every 2", [0.5, 0.7, 0.3, 0.4])[0] == [(2, "epoch 2"), (4, "epoch 4"), (4, "final")]
    assert _run(tmp_path, "every 0", [0.5, 0.7, 0.3, 0.4])[0] == [(4, "final")]


def test_best_without_evaluator_exports_at_the_end(tmp_path):
    net = _Net()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=[0], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(), iteration_update=lambda engine, batch: {"loss": 0.0},
        decollate=False,
    )
    StageExporter(net, tmp_path / "model.pt", "meduet_seg", "best").attach(trainer)
    trainer.run()
    assert read_stage_meta(tmp_path / "model.pt", "meduet_seg")["export"] == "final"


class _LastLoss:
    """ignite metric giving the step's loss (one batch per run)."""

    def attach(self, engine, name):
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.state.metrics.__setitem__(name, e.state.output["loss"]))
