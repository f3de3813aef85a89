"""The small shared helpers: config paths, DDP unwrapping, rank, JSON arguments, the NIfTI writer, loss comparison,
the bundle command line."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_nets.engines.common.export import lower_is_better
from custom_nets.utils.io import jsonable, save_nifti
from custom_nets.utils.parallel import rank, unwrap
from custom_nets.utils.proc import bundle_run_command
from custom_nets.utils.values import as_path


@pytest.mark.parametrize("value", [None, "", " ", "none", "None", "NULL", " null "])
def test_as_path_reads_no_path(value):
    assert as_path(value) is None


def test_as_path_keeps_real_paths():
    assert as_path("models/model.pt") == Path("models/model.pt")
    assert as_path(Path("/x/none.pt")) == Path("/x/none.pt")


def test_bundle_run_command_words():
    one = bundle_run_command(["a/train.json"], **{"network_def#spatial_dims": 3})
    assert one[1:] == ["-m", "monai.bundle", "run", "--config_file", "a/train.json", "--network_def#spatial_dims", "3"]
    two = bundle_run_command(["a/train.json", "a/demo.json"], "bundles/x")
    assert two[5:] == ["['a/train.json', 'a/demo.json']", "--bundle_root", "bundles/x"]
    with pytest.raises(ValueError, match="config file"):
        bundle_run_command([])


def test_unwrap_opens_data_parallel_only():
    net = torch.nn.Linear(2, 2)
    assert unwrap(torch.nn.DataParallel(net)) is net
    assert unwrap(net) is net

    class Holder(torch.nn.Module):  # has a .module but is no parallel wrapper (like an EMA holder)
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(1, 1)

    holder = Holder()
    assert unwrap(holder) is holder


def test_rank_is_zero_outside_a_process_group():
    assert rank() == 0


def test_jsonable_turns_tuples_into_lists_and_keys_into_strings():
    assert jsonable({"a": (1, (2, 3)), 4: [(5,)]}) == {"a": [1, [2, 3]], "4": [[5]]}


def test_save_nifti_round_trip(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    image = torch.rand(1, 4, 5, 6)
    out = save_nifti(tmp_path / "sub" / "x.nii.gz", image, affine)
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32 and img.shape == (4, 5, 6)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), image[0].numpy())
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    labels = save_nifti(tmp_path / "y.nii.gz", np.ones((2, 2, 2), dtype=np.uint8), affine, dtype=None)
    assert nib.load(labels).get_data_dtype() == np.uint8
    with pytest.raises(ValueError, match="z.nii.gz.*3-D"):
        save_nifti(tmp_path / "z.nii.gz", np.zeros((2, 2)), affine)
    assert not (tmp_path / "z.nii.gz").exists()


def test_lower_is_better_with_monai_best_metric():
    """MONAI takes the first validation as best without comparing; after that a lower loss wins."""
    from monai.engines import SupervisedEvaluator

    losses = iter([0.5, 0.7, 0.3, 0.3])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[0], network=torch.nn.Identity(), decollate=False,
        iteration_update=lambda engine, batch: {"loss": next(losses)},
        key_val_metric={"val_loss": _LastLoss()}, metric_cmp_fn=lower_is_better,
    )
    bests = []
    for _ in range(4):
        evaluator.run()
        bests.append((evaluator.state.best_metric, evaluator.state.best_metric_epoch))
    assert [b for b, _ in bests] == [0.5, 0.5, 0.3, 0.3]
    assert lower_is_better(0.2, 0.3) and not lower_is_better(0.3, 0.3) and not lower_is_better(0.4, 0.3)


class _LastLoss:
    """ignite metric giving the step's loss (one batch per run)."""

    def attach(self, engine, name):
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.state.metrics.__setitem__(name, e.state.output["loss"]))


def test_check_upstream_one_message_format(caplog):
    from custom_nets.utils.checkpoint import check_upstream
    from custom_nets.utils.errors import CheckpointError, InputError

    args = ("cache/datalist.json", "the latent cache", "meduet_vae")
    assert check_upstream(*args, "a" * 64, "a" * 64, "vae_ckpt v.pt", "fix it")
    assert check_upstream(*args, None, "a" * 64, "vae_ckpt v.pt", "fix it")  # nothing recorded: not checked
    with pytest.raises(InputError) as info:
        check_upstream(*args, "a" * 64, "b" * 64, "vae_ckpt v.pt", "re-encode", recorded_from="old.pt", error=InputError)
    assert str(info.value) == ("cache/datalist.json: the latent cache was made with the meduet_vae checkpoint of sha256 "
                               "aaaaaaaaaaaa... (old.pt), but vae_ckpt v.pt has sha256 bbbbbbbbbbbb...; re-encode")
    with pytest.raises(CheckpointError, match="path not recorded"):
        check_upstream(*args, None, "b" * 64, "vae_ckpt v.pt", "fix it", required=True)
    assert not check_upstream(*args, "a" * 64, "b" * 64, "vae_ckpt v.pt", "fix it", warn=True)
    assert "cache/datalist.json: the latent cache was made with" in caplog.text
