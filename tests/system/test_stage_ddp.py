"""Two-process gloo DistributedDataParallel runs of the VAE, LDM and segmentation training steps.

Each stage's real step (the config's ``iteration_update`` or MONAI's default iteration) runs one
iteration inside a MONAI ``SupervisedTrainer`` on a DDP-wrapped network, each rank on its half of
a fixed global batch with its own seed. The DDP objective is the mean of the per-rank losses; the
gradient every rank applies (recorded by the optimizer, after the all-reduce and any clipping)
must equal the gradient of that mean computed in one process. For the per-sample-mean losses (VAE
terms, flow matching) that is the gradient on the global batch. The meduet_ssl step has its own
test (test_ssl_ddp.py). All three stages run in one pair of processes (one interpreter start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from tests.support.ddp_utils import WORLD, GradientRecorder, assert_same_gradients, mean_gradients, rank_slice, run_ranks
from monai.engines import SupervisedTrainer

from custom_nets.utils.parallel import unwrap

GLOBAL_BATCH = 4
LDM_CLIP = 0.05  # small enough that clipping is active, so the test covers "clip the averaged gradient"


def _ddp(net: torch.nn.Module, ddp: bool) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(net) if ddp else net


def _one_iteration(network: torch.nn.Module, batch: Mapping[str, torch.Tensor], seed: int, **trainer_args: Any) -> GradientRecorder:
    """Run one iteration of a SupervisedTrainer; returns the (recording) optimizer."""
    optimizer = GradientRecorder(unwrap(network))
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=1, train_data_loader=[batch],
                                network=network, optimizer=optimizer, **trainer_args)
    torch.manual_seed(seed)
    trainer.run()
    return optimizer


# ------------------------------------------------------------------------------------------ VAE
def vae_nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    from custom_nets.engines.vae.train import patch_discriminator
    from custom_nets.nets.vae import maisi_vae

    torch.manual_seed(0)
    return maisi_vae("demo"), patch_discriminator(8, 2)


def vae_grads(rank: int, ddp: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Generator and discriminator gradients of one VAETrainStep (adversarial terms on) on rank ``rank``'s half."""
    from custom_nets.engines.vae.train import VAETrainStep
    from custom_nets.losses.vae import VAELoss

    vae, disc = vae_nets()
    vae, disc = _ddp(vae, ddp), _ddp(disc, ddp)
    disc_opt = GradientRecorder(unwrap(disc))
    images = rank_slice(torch.rand(GLOBAL_BATCH, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)), rank)
    loss = VAELoss(kl_weight=1e-3)
    step = VAETrainStep(loss, discriminator=disc, disc_optimizer=disc_opt, adv_weight=0.1, adv_start_epoch=1)
    gen_opt = _one_iteration(vae, {"image": images}, 100 + rank, loss_function=loss, iteration_update=step)
    return {"gen": gen_opt.grads, "disc": disc_opt.grads}


# ------------------------------------------------------------------------------------------ LDM
def ldm_net() -> torch.nn.Module:
    from custom_nets.nets.latent_dit import LatentDiT

    torch.manual_seed(0)
    return LatentDiT(in_channels=4, input_size=[8, 8, 8], patch_size=4, hidden_size=48, depth=2, num_heads=4,
                     mlp_ratio=4.0, content_dim=48, style_dim=12, condition_dropout=0.2, init_temperature=0.1)


def ldm_grads(rank: int, ddp: bool, clip: float | None) -> dict[str, torch.Tensor]:
    """Gradient of one FlowMatchingStep (rectified flow, condition dropout, EMA) on rank ``rank``'s half."""
    from monai.inferers import SimpleInferer

    from custom_nets.engines.common.ema import EMAModel
    from custom_nets.engines.ldm.objective import make_scheduler
    from custom_nets.engines.ldm.train import FlowMatchingStep

    net = ldm_net()
    g = torch.Generator().manual_seed(2)
    batch = {"latent": torch.randn(GLOBAL_BATCH, 4, 8, 8, 8, generator=g), "content": torch.randn(GLOBAL_BATCH, 48, generator=g),
             "style": torch.randn(GLOBAL_BATCH, 12, generator=g)}
    batch = {k: rank_slice(v, rank) for k, v in batch.items()}
    step = FlowMatchingStep(make_scheduler("flow", 1000), scale_factor=0.7, ema=EMAModel(net, decay=0.99), grad_clip=clip)
    return _one_iteration(_ddp(net, ddp), batch, 200 + rank, loss_function=torch.nn.MSELoss(), inferer=SimpleInferer(),
                          iteration_update=step, decollate=False).grads


def clipped(grads: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``clip_grad_norm_`` applied to a gradient dict (total 2-norm over all tensors)."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {k: g * coef for k, g in grads.items()}


# ------------------------------------------------------------------------------------------ seg
SEG_ARGS = {"encoder": {"in_channels": 4, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0},
            "num_classes": 3, "roi_size": [32, 32, 32], "feature_size": 8, "refine_channels": 0, "freeze_vae": True}


def seg_net() -> torch.nn.Module:
    from custom_nets.engines.seg.model import build_segmenter
    from custom_nets.nets.vae import vae_config

    torch.manual_seed(0)
    return build_segmenter({**SEG_ARGS, "vae": vae_config("demo")})


def seg_grads(rank: int, ddp: bool) -> dict[str, torch.Tensor]:
    """Gradient of MONAI's default supervised iteration with the bundle's DiceCE loss on rank ``rank``'s half."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(3)
    image = torch.rand(GLOBAL_BATCH, 1, 32, 32, 32, generator=g)
    label = torch.randint(0, 3, (GLOBAL_BATCH, 1, 32, 32, 32), generator=g).float()
    batch = {"image": rank_slice(image, rank), "label": rank_slice(label, rank)}
    loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, batch=True)
    return _one_iteration(_ddp(seg_net(), ddp), batch, 300 + rank, loss_function=loss).grads


# ------------------------------------------------------------------------------------------ tests
def worker(rank: int, world: int) -> dict[str, Any]:
    return {"vae": vae_grads(rank, ddp=True), "ldm": ldm_grads(rank, ddp=True, clip=LDM_CLIP),
            "seg": seg_grads(rank, ddp=True)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(worker, tmp_path_factory.mktemp("stage_ddp"), world=WORLD)


def test_vae_ddp_gradients_match_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = [vae_grads(r, ddp=False) for r in range(WORLD)]
    for part in ("gen", "disc"):
        want = mean_gradients([g[part] for g in ref])
        for r in range(WORLD):
            assert_same_gradients(ranks[r]["vae"][part], want, rtol=1e-4, atol=1e-6)


def test_ldm_ddp_gradients_match_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = [ldm_grads(r, ddp=False, clip=None) for r in range(WORLD)]
    unclipped = mean_gradients(ref)
    want = clipped(unclipped, LDM_CLIP)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped.values()]))
    assert total > LDM_CLIP  # clipping was active
    for r in range(WORLD):
        assert_same_gradients(ranks[r]["ldm"], want, rtol=1e-4, atol=1e-7)


def test_seg_ddp_gradients_match_single_process(ranks: list[dict[str, Any]]) -> None:
    ref = [seg_grads(r, ddp=False) for r in range(WORLD)]
    want = mean_gradients(ref)
    assert not any(k.startswith("vae.") for k in want)  # the frozen VAE gets no gradient
    for r in range(WORLD):
        assert_same_gradients(ranks[r]["seg"], want, rtol=1e-4, atol=1e-6)
