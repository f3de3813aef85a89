"""Generator training and sampling: objective conventions, a tiny run that learns, guided samplers,
EMA, factor bank lookup, scale factor and checkpoint export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.inferers import SimpleInferer
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from torch.utils.data import DataLoader

from custom_nets.data.latent_datasets import ConditionedLatentDataset, conditioned_dataset, random_crop
from custom_nets.engines.common.ema import EMAModel
from custom_nets.engines.common.export import lower_is_better
from custom_nets.engines.ldm.objective import (
    diffusion_loss,
    latent_scale_factor,
    make_scheduler,
    scheduler_args,
    scheduler_from_args,
    training_target,
)
from custom_nets.engines.ldm.sample import GuidedSampler, SamplingJobs, sample_latents
from custom_nets.engines.ldm.sources import default_rows, resolve_sources
from custom_nets.engines.ldm.train import FlowMatchingStep, FlowMatchingValidationStep, GeneratorExporter
from custom_nets.engines.ssl.factor_bank import FactorBank
from custom_nets.nets.latent_dit import LatentDiT
from custom_nets.utils.checkpoint import load_stage_checkpoint, read_stage_meta
from custom_nets.utils.errors import InputError, InputErrors

TINY = dict(in_channels=4, input_size=(8, 8, 8), patch_size=4, hidden_size=48, depth=2, num_heads=4,
            content_dim=12, style_dim=6)


def synthetic_volumes(folder, n: int = 8, seed: int = 0) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Cached float16 latents (4, 8, 8, 8) of two 'anatomies' (smooth patterns, noisy copies), with
    random content and style vectors per volume."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 3.14, 8)
    pattern_a = torch.sin(grid)[:, None, None] * torch.cos(grid)[None, :, None] * torch.ones(8)
    pattern_b = torch.cos(2 * grid)[None, None, :] * torch.ones(8, 8, 1)
    gains = torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None, None, None]
    items = []
    for i in range(n):
        z = (pattern_a if i % 2 else pattern_b)[None] * gains + 0.05 * torch.randn(4, 8, 8, 8, generator=g)
        path = folder / f"s{seed}_v{i}.npy"
        np.save(path, z.numpy().astype(np.float16))
        items.append({"latent": str(path), "domain_index": i % 2})
    return items, torch.randn(n, 12, generator=g), torch.randn(n, 6, generator=g)


def conditioned(folder, n=8, seed=0) -> ConditionedLatentDataset:
    items, content, style = synthetic_volumes(folder, n, seed)
    return ConditionedLatentDataset(items, content, style, crop=(8, 8, 8))


def test_random_crop_windows_and_conditioned_dataset(tmp_path):
    arr = np.arange(2 * 6 * 5 * 4, dtype=np.float16).reshape(2, 6, 5, 4)
    w = random_crop(arr, (4, 5, 2), torch.Generator().manual_seed(0))
    assert w.shape == (2, 4, 5, 2) and w.dtype == np.float32
    starts = [int(np.argwhere(arr[0] == w[0, 0, 0, 0])[0][k]) for k in range(3)]
    assert np.array_equal(w, arr[:, starts[0]:starts[0] + 4, :, starts[2]:starts[2] + 2])
    padded = random_crop(arr, (8, 5, 4))  # axis shorter than the window: edge padding at the far end
    assert padded.shape == (2, 8, 5, 4) and np.array_equal(padded[:, 6], padded[:, 5])
    items, content, style = synthetic_volumes(tmp_path, 3)
    bank = FactorBank(torch.arange(3.0)[:, None].repeat(1, 12), torch.zeros(3, 6), torch.zeros(3, dtype=torch.long),
                      [{"latent": it["latent"]} for it in reversed(items)], ["a"], {}, tmp_path / "factor_bank.pt")
    ds = conditioned_dataset(items, bank, crop=(8, 4, 8))
    # item i carries its own volume's bank row (the bank lists the volumes in reverse order)
    assert [float(ds[i]["content"][0]) for i in range(3)] == [2.0, 1.0, 0.0]
    assert ds[1]["latent"].shape == (4, 8, 4, 8) and ds[1]["domain_index"] == 1
    # training windows move from one access to the next; seeded (validation) windows do not
    moving = conditioned_dataset(items, bank, crop=(4, 4, 4))
    assert len({moving[0]["latent"].sum().item() for _ in range(10)}) > 1
    fixed = conditioned_dataset(items, bank, crop=(4, 4, 4), seed=3)
    assert len({fixed[0]["latent"].sum().item() for _ in range(10)}) == 1


def test_rectified_flow_convention_matches_monai():
    """x_t = (1 - t/T) x0 + (t/T) noise in MONAI's RFlowScheduler; the target is x0 - noise."""
    sched = make_scheduler("flow")
    x0, noise = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    t = torch.tensor([250.0, 1000.0])
    xt = sched.add_noise(x0, noise, t)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * noise[0], atol=1e-6)
    assert torch.allclose(xt[1], noise[1], atol=1e-6)
    assert torch.equal(training_target(sched, x0, noise, t), x0 - noise)
    ddpm = make_scheduler("ddpm")
    assert isinstance(ddpm, DDPMScheduler) and ddpm.num_train_timesteps == 1000 and not ddpm.clip_sample
    assert torch.equal(training_target(ddpm, x0, noise, t.long() - 1), noise)
    for s in (sched, ddpm):
        rebuilt = scheduler_from_args(scheduler_args(s))
        assert type(rebuilt) is type(s) and scheduler_args(rebuilt) == scheduler_args(s)
    with pytest.raises(ValueError, match="objective"):
        make_scheduler("score")


def test_zero_output_model_has_the_expected_flow_loss():
    """An untrained (zero-output) generator scores E|x0 - noise|^2 at every timestep."""
    net = LatentDiT(**TINY).eval()
    x0 = torch.zeros(2, 4, 8, 8, 8)
    noise = torch.randn(2, 4, 8, 8, 8)
    loss = diffusion_loss(net, x0, None, None, make_scheduler("flow"), noise=noise, timesteps=torch.tensor([10.0, 900.0]))
    assert torch.isclose(loss, noise.pow(2).mean())


def _trainer(net, scheduler, loader, ema, max_epochs, lr=2e-3):
    step = FlowMatchingStep(scheduler, scale_factor=1.0, ema=ema, grad_clip=1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(), iteration_update=step, inferer=SimpleInferer(), decollate=False,
    )
    return trainer, step


def _evaluator(net, scheduler, step, loader):
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=net, decollate=False,
        iteration_update=FlowMatchingValidationStep(scheduler, step, timesteps=(200, 500, 800), seed=5),
        key_val_metric={"val_loss": Average(output_transform=lambda o: o["loss"])}, metric_cmp_fn=lower_is_better,
    )


def test_tiny_training_run_lowers_the_validation_loss(tmp_path):
    torch.manual_seed(0)
    net = LatentDiT(**TINY)
    sched = make_scheduler("flow")
    ema = EMAModel(net, decay=0.9999)
    train_loader = DataLoader(conditioned(tmp_path, 8, 0), batch_size=4, shuffle=True)
    val_loader = DataLoader(conditioned(tmp_path, 4, 1), batch_size=4)
    trainer, step = _trainer(net, sched, train_loader, ema, max_epochs=40)
    evaluator = _evaluator(net, sched, step, val_loader)
    evaluator.run()
    before = evaluator.state.metrics["val_loss"]
    ValidationHandler(validator=evaluator, interval=40).attach(trainer)
    bank = FactorBank(torch.zeros(8, 12), torch.zeros(8, 6), torch.zeros(8, dtype=torch.long), [{"latent": "x"}] * 8,
                      ["a"], {"ssl_sha256": "abc"}, tmp_path / "factor_bank.pt")
    exporter = GeneratorExporter(ema, tmp_path / "models" / "model.pt", step, sched, bank, tmp_path / "none.json", policy="every 0")
    exporter.attach(trainer)
    trainer.run()
    after = evaluator.state.metrics["val_loss"]
    assert after < 0.75 * before, (before, after)
    assert evaluator.state.best_metric == pytest.approx(after)  # lower_is_better tracks the loss
    # the EMA moved away from the initialisation and is what was exported
    assert int(ema.num_updates) == 80
    meta = read_stage_meta(tmp_path / "models" / "model.pt", "meduet_ldm")
    assert meta["scale_factor"] == 1.0 and meta["content_dim"] == 12 and meta["scheduler"]["objective"] == "flow"
    assert meta["factor_ssl_sha256"] == "abc" and meta["ema_updates"] == 80
    loaded = LatentDiT(**meta["network"])
    load_stage_checkpoint(loaded, tmp_path / "models" / "model.pt", "meduet_ldm")
    for (k, a), b in zip(loaded.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(a, b), k
    # the step's state (scale factor) round-trips for resuming
    fresh = FlowMatchingStep(sched, scale_factor=3.0)
    fresh.load_state_dict(step.state_dict())
    assert fresh.scale_factor == 1.0


def test_ema_update_with_warmup():
    net = torch.nn.Linear(2, 2)
    ema = EMAModel(net, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        net.weight.add_(1.0)
    old = ema.module.weight.clone()
    ema.update(net)
    assert torch.allclose(ema.module.weight, 0.1 * old + 0.9 * net.weight)
    ema.num_updates.fill_(10**6)
    assert ema.current_decay() == 0.9999


class Oracle(torch.nn.Module):
    """Exact velocity / noise for data concentrated at one latent ``m`` (conditions ignored)."""

    def __init__(self, m: torch.Tensor, scheduler) -> None:
        super().__init__()
        self.m, self.scheduler, self.calls = m, scheduler, 0

    def forward_with_guidance(self, x, t, content, style, content_scale, style_scale):
        self.calls += 1
        if isinstance(self.scheduler, RFlowScheduler):
            s = (t / self.scheduler.num_train_timesteps).view(-1, 1, 1, 1, 1)
            return (self.m - x) / s  # = x0 - noise on the straight path through x
        a = self.scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1, 1).float()
        return (x - a.sqrt() * self.m) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler,calls", [("euler", 7), ("heun", 13)])
def test_flow_samplers_integrate_to_the_data(sampler, calls):
    sched = make_scheduler("flow")
    m = torch.randn(1, 4, 4, 4, 4)
    oracle = Oracle(m, sched)
    out = sample_latents(oracle, torch.randn(1, 4, 4, 4, 4), torch.zeros(1, 3), torch.zeros(1, 2), sched, num_steps=7,
                         sampler=sampler)
    assert torch.allclose(out, m, atol=1e-4)
    assert oracle.calls == calls  # Heun: two evaluations per step except the last one
    with pytest.raises(ValueError, match="sampler"):
        sample_latents(oracle, m, None, None, sched, num_steps=3, sampler="ddim")


def test_ddim_sampler_integrates_to_the_data():
    sched = make_scheduler("ddpm")
    m = torch.randn(1, 4, 4, 4, 4) * 0.5
    out = sample_latents(Oracle(m, sched), torch.randn(1, 4, 4, 4, 4), None, None, sched, num_steps=20, sampler="ddim")
    assert torch.allclose(out, m, atol=1e-3)
    with pytest.raises(ValueError, match="ddim"):
        sample_latents(Oracle(m, sched), m, None, None, sched, num_steps=20, sampler="ddpm")


def test_guided_sampling_with_a_generator_runs():
    torch.manual_seed(0)
    net = LatentDiT(**TINY).eval()
    for p in net.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.02)
    inferer = GuidedSampler(scheduler_args(make_scheduler("flow")), num_steps=3, sampler="heun", content_scale=3.0,
                            style_scale=2.0, progress=False)
    noise = torch.randn(2, 4, 8, 8, 4)
    out = inferer(noise, net, content=torch.randn(2, 12), style=torch.randn(2, 6))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sampler"):
        GuidedSampler(scheduler_args(make_scheduler("ddpm")), sampler="heun")


def test_factor_bank_rows_sources_and_jobs(tmp_path):
    items = [{"latent": str(tmp_path / f"v{i}.npy"), "image": f"v{i}.nii.gz", "domain": "ab"[i % 2]} for i in range(5)]
    FactorBank(torch.randn(5, 12), torch.randn(5, 6), torch.tensor([0, 1, 0, 1, 0]), items, ["a", "b"],
               {"ssl_sha256": "sha"}).save(tmp_path / "bank")
    bank = FactorBank.load(tmp_path / "bank" / "factor_bank.pt")
    assert (bank.content_dim, bank.style_dim, len(bank)) == (12, 6, 5)
    assert bank.rows_for([tmp_path / "v3.npy", tmp_path / "v0.npy"]) == [3, 0]
    with pytest.raises(InputErrors, match="v9.npy"):
        bank.rows_for([tmp_path / "v9.npy"])
    with pytest.raises(InputError, match="factor bank not found"):
        FactorBank.load(tmp_path / "missing" / "factor_bank.pt")
    assert default_rows(bank, 3) == [0, 1, 2]
    sources = resolve_sources([4, "#1"], bank)
    assert [s.name for s in sources] == ["bank4", "bank1"] and sources[1].domain == "b"
    assert torch.equal(sources[0].content, bank.content[4])
    with pytest.raises(InputError, match="rows"):
        resolve_sources([7], bank)
    assert [s.name for s in resolve_sources(["domain:b", "domain:a"], bank)] == ["bank1", "bank0"]
    with pytest.raises(InputError, match="no volume of domain 'c'.*domains: a, b"):
        resolve_sources(["domain:c"], bank)
    with pytest.raises(InputError, match="ssl_ckpt"):
        resolve_sources(["ref.npy"], bank, root=tmp_path)
    jobs = SamplingJobs(resolve_sources(2, bank), resolve_sources(3, bank), (4, 8, 8, 4), samples_per_pair=2, seed=1)
    assert len(jobs) == 12
    a, b = jobs[0], jobs[1]
    assert a["noise"].shape == (4, 8, 8, 4) and not torch.equal(a["noise"], b["noise"])
    assert torch.equal(jobs[0]["noise"], a["noise"])  # seeded: the same job gives the same noise
    assert (a["row"], a["col"], b["repeat"]) == (0, 0, 1)


def test_content_maps_follow_their_windows_from_the_bank_to_the_sampling_jobs(tmp_path):
    """``content_conditioning: "map"``: each training window comes with the content map's cells over
    the same region (windows start on cells), the bank finds its maps and token size, and sampling
    jobs carry the centre of the content source's map (edge-padded where the source is smaller)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (10, 8, 8)], indexing="ij")).astype(np.float16)
    latent = np.concatenate([idx, idx[:1]])  # (4, 10, 8, 8): channels 0-2 hold the voxel's x, y, z
    np.save(tmp_path / "v0.npy", latent)
    cells = np.stack(np.meshgrid(*[np.arange(n) for n in (3, 2, 2)], indexing="ij")).astype(np.float16)
    (tmp_path / "bank" / "token_maps").mkdir(parents=True)
    np.save(tmp_path / "bank" / "token_maps" / "v0_content.npy", np.concatenate([cells] * 4))  # (12, 3, 2, 2)
    items = [{"latent": str(tmp_path / "v0.npy"), "domain": "a", "content_map": "token_maps/v0_content.npy"}]
    FactorBank(torch.randn(1, 12), torch.randn(1, 6), torch.tensor([0]), items, ["a"], {"ssl_sha256": "sha"}).save(
        tmp_path / "bank")
    bank = FactorBank.load(tmp_path / "bank")
    assert bank.token_size() == 4  # read from the shapes: 10 -> 3 cells, 8 -> 2 cells
    ds = conditioned_dataset([{"latent": str(tmp_path / "v0.npy")}], bank, crop=(4, 4, 4), content_maps=True)
    starts = set()
    for _ in range(30):
        item = ds[0]
        x0 = item["latent"][:3, 0, 0, 0]
        assert item["content_map"].shape == (12, 1, 1, 1) and (x0 % 4 == 0).all()  # windows start on cells
        assert torch.equal(item["content_map"][:3, 0, 0, 0], x0 / 4)  # the map's cell under the window
        starts.add(tuple(x0.tolist()))
    assert {s[0] for s in starts} == {0.0, 4.0}  # both cells along x are reached
    with pytest.raises(ValueError, match="multiple of the content map's cell"):
        conditioned_dataset([{"latent": str(tmp_path / "v0.npy")}], bank, crop=(6, 4, 4), content_maps=True)
    plain = FactorBank(torch.randn(1, 12), torch.randn(1, 6), torch.tensor([0]), [{"latent": str(tmp_path / "v0.npy")}],
                       ["a"], {}, tmp_path / "plain" / "factor_bank.pt")
    with pytest.raises(InputError, match="no content token maps"):
        conditioned_dataset([{"latent": str(tmp_path / "v0.npy")}], plain, crop=(4, 4, 4), content_maps=True)
    sources = resolve_sources([0], bank, content_maps=True)
    assert sources[0].content_map.shape == (12, 3, 2, 2)
    jobs = SamplingJobs(sources, sources, (4, 8, 8, 12), content_map_cell=4)
    cmap = jobs[0]["content_map"]
    assert cmap.shape == (12, 2, 2, 3) and torch.equal(cmap[0, :, 0, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(cmap[2, 0, 0], torch.tensor([0.0, 1.0, 1.0]))  # z: 2 cells padded to 3 at the far end
    with pytest.raises(ValueError, match="no content token map"):
        SamplingJobs(resolve_sources([0], bank), sources, (4, 8, 8, 8), content_map_cell=4)


def test_latent_scale_factor(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        p = tmp_path / f"v{i}.npy"
        np.save(p, (rng.standard_normal((4, 6, 6, 6)) * 2.5 + 1).astype(np.float16))
        items.append({"latent": str(p)})
    assert latent_scale_factor(items) == pytest.approx(1 / 2.5, rel=0.05)
    np.save(tmp_path / "flat.npy", np.ones((4, 6, 6, 6), np.float16))
    with pytest.raises(InputError, match="constant"):
        latent_scale_factor([{"latent": str(tmp_path / "flat.npy")}])


def test_decoding_refuses_another_vae(tmp_path):
    from custom_nets.engines.ldm.sample import load_matching_vae
    from custom_nets.nets.vae import maisi_vae, network_args
    from custom_nets.utils.checkpoint import file_sha256, save_stage_checkpoint
    from custom_nets.utils.errors import CheckpointError

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vae = maisi_vae("demo")
        paths.append(tmp_path / f"vae{seed}" / "model.pt")
        save_stage_checkpoint(vae.state_dict(), paths[-1], "meduet_vae", network=network_args(vae), latent_channels=4)
    meta = {"vae_sha256": file_sha256(paths[0]), "vae_ckpt": str(paths[0])}
    assert load_matching_vae(paths[0], meta) is not None
    with pytest.raises(CheckpointError, match=f"{paths[1]}: the generator was made with the meduet_vae checkpoint of "
                                              f"sha256 {meta['vae_sha256'][:12]}.*{paths[0]}.*point vae_ckpt at"):
        load_matching_vae(paths[1], meta)


def test_grid_shows_the_sources_beside_the_samples(tmp_path):
    """The grid's margins hold each source's centred latent window decoded like the samples."""
    from custom_nets.data.latent_datasets import centre_window
    from custom_nets.engines.ldm.sample import DecodeLatentd, SampleGridHandler, SourcePreview
    from custom_nets.engines.ldm.sources import FactorSource
    from custom_nets.nets.vae import decode_latent, maisi_vae

    torch.manual_seed(0)
    vae = maisi_vae("demo").eval()
    decode = DecodeLatentd(vae, scale_factor=0.5, roi=16, modality="MR")
    latent = torch.randn(4, 10, 9, 6)
    np.save(tmp_path / "src.npy", latent.numpy().astype(np.float16))
    preview = SourcePreview(decode, (8, 8, 4))
    on_disk = FactorSource("bank0", torch.zeros(12), torch.zeros(6), "a", str(tmp_path / "src.npy"))
    img = preview(on_disk)
    window = torch.from_numpy(centre_window(np.load(tmp_path / "src.npy"), (8, 8, 4), pad=False))
    assert window.shape == (4, 8, 8, 4) and torch.equal(window, latent.half().float()[:, 1:9, 0:8, 1:5])
    # a source smaller than the sampled size is shown at its own size, not edge-padded
    assert centre_window(np.zeros((4, 6, 9, 6), np.float16), (8, 8, 4), pad=False).shape == (4, 6, 8, 4)
    assert centre_window(np.zeros((4, 6, 9, 6), np.float16), (8, 8, 4)).shape == (4, 8, 8, 4)
    with torch.no_grad():
        expected = np.clip(decode_latent(vae, window, roi=None).numpy()[0], 0, 1)  # MR: 0..1
    assert img.shape == (32, 32, 16) and np.allclose(img, expected, atol=1e-5)
    # an image reference keeps the latent it was encoded to; a missing cache file leaves a blank panel
    kept = FactorSource("ref", torch.zeros(12), torch.zeros(6), None, "ref.nii.gz", latent)
    assert preview(kept).shape == (32, 32, 16)
    assert preview(FactorSource("gone", torch.zeros(12), torch.zeros(6), None, str(tmp_path / "gone.npy"))) is None

    class CountingDecode(DecodeLatentd):
        calls = 0

        def __call__(self, data):
            self.calls += 1
            return super().__call__(data)

    counting = CountingDecode(vae, scale_factor=0.5, roi=16, modality="MR")
    once = SourcePreview(counting, (8, 8, 4))
    assert np.array_equal(once(on_disk), img) and np.array_equal(once(on_disk), img)
    assert counting.calls == 1  # a source named twice (as content and as style) is decoded once

    jobs = SamplingJobs([on_disk, kept], [on_disk], (4, 8, 8, 4))
    grid = SampleGridHandler(tmp_path / "grid.png", jobs, preview=preview)
    grid.panels[(0, 0)] = grid._panel(img)
    margins = grid._source_panels()
    assert sorted(margins) == [(-1, 0), (0, -1), (1, -1)]
    assert grid.write() == tmp_path / "grid.png" and (tmp_path / "grid.png").stat().st_size > 0
