"""The training-step protocol of engines/common/step.py: scaled backward, clipping, stepping, amp of a MONAI trainer."""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from custom_nets.engines.common.step import clip_and_step, engine_amp, optimizer_step, precision_autocast


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return net, lambda: torch.nn.functional.mse_loss(net(x), y) * 100.0  # large gradients: clipping is active


def _manual(clip: float | None):
    net, loss_fn = _problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn().backward()
    norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip else float("inf")))
    opt.step()
    return net, norm


@pytest.mark.parametrize("clip", [None, 0.5])
def test_optimizer_step_is_backward_clip_step(clip):
    expected, norm = _manual(clip)
    net, loss_fn = _problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    got = optimizer_step(loss_fn(), opt, net.parameters(), grad_clip=clip)
    for a, b in zip(net.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
    if clip:
        assert norm > clip and got == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    else:
        assert math.isnan(got)


def test_measured_norm_without_clipping_and_params_without_grad():
    net, loss_fn = _problem()
    frozen = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    opt = torch.optim.SGD(list(net.parameters()) + [frozen], lr=0.01)
    loss_fn().backward()
    expected = float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))
    assert clip_and_step(opt, list(net.parameters()) + [frozen], measure_norm=True) == pytest.approx(expected, rel=1e-5)


def test_gradient_scaler_gives_the_unscaled_update():
    """With an enabled GradScaler the clipped update equals the update without scaling."""
    expected, _ = _manual(0.5)
    net, loss_fn = _problem()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer_step(loss_fn(), opt, net.parameters(), scaler=scaler, grad_clip=0.5)
    for a, b in zip(net.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
    assert scaler.get_scale() == 1024.0 * scaler.get_growth_factor() ** 0  # no inf: scale kept (growth after 2000 steps)


def test_engine_amp_is_cuda_only_and_precision_autocast():
    cpu_engine = SimpleNamespace(amp=True, scaler=object(), amp_kwargs={}, state=SimpleNamespace(device=torch.device("cpu")))
    ctx, scaler = engine_amp(cpu_engine)
    assert isinstance(ctx, nullcontext) and scaler is None
    off = SimpleNamespace(amp=False, scaler=None, state=SimpleNamespace(device=torch.device("cuda")))
    assert engine_amp(off)[1] is None
    assert isinstance(precision_autocast(torch.device("cpu"), "fp32"), nullcontext)
    with precision_autocast(torch.device("cpu"), "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
