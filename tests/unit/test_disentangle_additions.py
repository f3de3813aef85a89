"""The additions to MeDUET's objective (config switches whose off setting is the paper) and the probes
of the disentanglement benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from custom_nets.engines.ssl.disentangle import (
    between_group_variance_share,
    domain_fisher,
    group_kfold,
    probe_scores,
    token_map_retrieval,
)
from custom_nets.engines.ssl.step import MeDUETStepConfig, MeDUETTrainStep
from custom_nets.losses.clean_domain import CleanDomainAdversary, dann_lambda
from custom_nets.losses.decorrelation import cross_correlation_loss
from custom_nets.losses.domain_variance import DomainMeanBank, between_domain_share_loss
from custom_nets.losses.swap_cycle import swap_cycle_targets, swap_cycle_terms
from custom_nets.nets.meduet import MeDUET, meduet_config, random_mix_mask

ROOT = Path(__file__).resolve().parents[2]
CROP = 16
PAPER_KEYS = {"loss", "rec", "domain", "domain_content", "domain_style", "mftd", "mftd_content", "mftd_style", "siqc",
              "siqc_content", "siqc_style", "lr", "momentum", "grad_norm", "step"}


def demo_net(seed: int = 0, **kw) -> MeDUET:
    torch.manual_seed(seed)
    return MeDUET(**{**meduet_config("demo"), "n_domains": 3, **kw})


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, CROP, CROP, CROP, generator=g), torch.tensor([0, 1, 2, 1])


# ------------------------------------------------------------------------------------ clean-pass adversary
def test_dann_lambda_ramps_from_zero_to_the_maximum() -> None:
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [dann_lambda(p / 10, lambda_max=0.5) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] < 0.5
    assert dann_lambda(2.0) == dann_lambda(1.0)  # clipped progress


def test_clean_adversary_reverses_the_gradient_to_content_only() -> None:
    torch.manual_seed(0)
    adv = CleanDomainAdversary(content_dim=6, n_domains=3)
    content = torch.randn(4, 5, 6, requires_grad=True)
    d = torch.tensor([0, 1, 2, 0])
    ce_tok, ce_pool = adv(content, d, reversal=0.0 + 1e-12)
    assert ce_tok.shape == ce_pool.shape == ()
    # reference gradient: same heads, no reversal
    plain = torch.autograd.grad(adv(content, d, reversal=-1.0)[0] + adv(content, d, reversal=-1.0)[1], content)[0]
    rev = torch.autograd.grad(sum(adv(content, d, reversal=0.3)), content)[0]
    torch.testing.assert_close(rev, -0.3 * plain)
    # the heads themselves descend the cross-entropy (no reversal on their parameters)
    head_grad = torch.autograd.grad(sum(adv(content, d, reversal=0.3)), adv.pooled_head[0].weight)[0]
    ref_grad = torch.autograd.grad(sum(adv(content.detach(), d, reversal=0.0)), adv.pooled_head[0].weight)[0]
    torch.testing.assert_close(head_grad, ref_grad)


def test_clean_adversary_rejects_bad_shapes() -> None:
    adv = CleanDomainAdversary(6, 3)
    with pytest.raises(ValueError, match="B, N, Dc"):
        adv(torch.randn(4, 6), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="domain indices"):
        adv(torch.randn(4, 5, 6), torch.zeros(3), 1.0)


# ------------------------------------------------------------------------------------ decorrelation
def test_decorrelation_zero_for_uncorrelated_and_high_for_shared_factors() -> None:
    torch.manual_seed(0)
    n = 64
    c = torch.randn(n, 5)
    s_shared = c[:, :3] * 2 + 1  # style a linear copy of content
    assert cross_correlation_loss(c, s_shared) > 0.15
    # exactly uncorrelated over the batch: orthogonalise style against content
    s = torch.randn(n, 3)
    cz, sz = c - c.mean(0), s - s.mean(0)
    s_orth = sz - cz @ torch.linalg.lstsq(cz, sz).solution
    assert cross_correlation_loss(c, s_orth) < 1e-8
    # token inputs are pooled; gradient descent lowers the loss
    c_tok = torch.randn(8, 4, 5, requires_grad=True)
    s_tok = (c_tok.detach()[..., :3] + 0.1 * torch.randn(8, 4, 3)).requires_grad_()
    before = cross_correlation_loss(c_tok, s_tok)
    g_c, g_s = torch.autograd.grad(before, [c_tok, s_tok])
    after = cross_correlation_loss(c_tok - 0.5 * g_c, s_tok - 0.5 * g_s)
    assert after < before
    with pytest.raises(ValueError, match="at least 2"):
        cross_correlation_loss(torch.randn(1, 3), torch.randn(1, 2))


# ------------------------------------------------------------------------------------ swap cycle
def test_swap_cycle_targets_pair_content_source_and_style_source() -> None:
    b, n = 4, 3
    content = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, n, 2)
    style = 10 + torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, n, 1)
    tc, ts = swap_cycle_targets(content, style)
    assert tc.shape == (2 * b, n, 2) and ts.shape == (2 * b, 1)
    # x12 of sample i: content of i, style of B-1-i; x21 of sample i: content of B-1-i, style of i
    assert tc[:b, 0, 0].tolist() == [0, 1, 2, 3] and ts[:b, 0].tolist() == [13, 12, 11, 10]
    assert tc[b:, 0, 0].tolist() == [3, 2, 1, 0] and ts[b:, 0].tolist() == [10, 11, 12, 13]


def test_swap_cycle_terms_zero_at_target_and_additive_over_chunks() -> None:
    torch.manual_seed(0)
    c, s = torch.randn(6, 5, 4), torch.randn(6, 5, 2)
    tc, ts = torch.randn(6, 5, 4), torch.randn(6, 2)
    lc, ls = swap_cycle_terms(tc, ts[:, None].expand(6, 5, 2), tc, ts, 6)
    assert lc.item() == 0 and ls.item() == pytest.approx(0, abs=1e-12)
    whole = swap_cycle_terms(c, s, tc, ts, 6)
    parts = [swap_cycle_terms(c[a:b], s[a:b], tc[a:b], ts[a:b], 6) for a, b in ((0, 2), (2, 5), (5, 6))]
    torch.testing.assert_close(whole[0], sum(p[0] for p in parts))
    torch.testing.assert_close(whole[1], sum(p[1] for p in parts))
    torch.testing.assert_close(whole[0], (c - tc).pow(2).mean())


# ------------------------------------------------------------------------------------ global style
def test_global_style_is_one_vector_per_volume_and_per_source() -> None:
    net = demo_net(style_mode="global").eval()
    x, _ = batch()
    content, style = net.encode_factors(x)
    assert style.shape == (4, 64, net.style_dim)
    torch.testing.assert_close(style, style[:, :1].expand_as(style))
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(1))
    out = net.encode_mixture(x, mask)
    for key in ("style1", "style2"):
        torch.testing.assert_close(out[key], out[key][:, :1].expand_as(out[key]))
    assert not torch.allclose(out["style1"][:, 0], out["style2"][:, 0])


def test_token_style_is_the_default_and_unchanged() -> None:
    x, _ = batch()
    a = demo_net().eval()
    b = demo_net(style_mode="token").eval()
    torch.testing.assert_close(a.encode_factors(x), b.encode_factors(x))
    assert a.style_mode == "token"
    with pytest.raises(ValueError, match="style_mode"):
        demo_net(style_mode="volume")


# ------------------------------------------------------------------------------------ the training step
def step_config(**kw) -> dict:
    return dict(total_steps=10, warmup_steps=1, mftd_start_step=0, checkpointing=[], reencode_chunk=2, **kw)


def test_off_equals_the_paper() -> None:
    """Defaults are the paper: no adversary, the paper's outputs; train.json's switches default off."""
    cfg = MeDUETStepConfig()
    assert (cfg.clean_domain_weight, cfg.decorrelation_weight, cfg.swap_cycle_weight, cfg.weight_domain) == (0, 0, 0, 0.2)
    x, d = batch()
    step = MeDUETTrainStep(demo_net(), step_config())
    assert step.adversary is None and "adversary" not in step.state_dict()
    assert set(step(x, d)) == PAPER_KEYS
    train = json.loads((ROOT / "bundles/meduet_ssl/configs/train.json").read_text())
    assert train["style_mode"] == "token" and train["domain_weight"] == 0.2
    assert train["clean_domain_weight"] == train["decorrelation_weight"] == train["swap_cycle_weight"] == 0.0
    assert train["domain_share_weight"] == 0.0 and cfg.domain_share_weight == 0
    assert train["domain_mean_weight"] == train["self_rec_weight"] == 0.0 == cfg.domain_mean_weight == cfg.self_rec_weight
    assert step.domain_bank is None and "domain_bank" not in step.state_dict()
    assert train["domain_window_weight"] == 0.0 == cfg.domain_window_weight and train["domain_window"] == 0
    assert train["domain_mean_shrinkage"] == 0.1 == cfg.domain_mean_shrinkage
    assert step.window_bank is None and "window_bank" not in step.state_dict()
    assert train["domain_token_weight"] == 0.0 == cfg.domain_token_weight
    assert train["paired_content_weight"] == 0.0 == cfg.paired_content_weight
    assert train["pair_sampling"] in ("random", "cross_domain")


@pytest.mark.parametrize(
    "switch, parts",
    [("decorrelation_weight", ("decorrelation",)), ("swap_cycle_weight", ("swap_cycle_content", "swap_cycle_style")),
     ("clean_domain_weight", ("clean_domain_token", "clean_domain_pooled")), ("domain_share_weight", ("domain_share",)),
     ("domain_mean_weight", ("domain_mean",)), ("self_rec_weight", ("self_rec",)),
     ("domain_window_weight", ("domain_window",)), ("domain_token_weight", ("domain_token",))],
)
def test_each_addition_adds_exactly_its_weighted_term(switch: str, parts: tuple[str, ...]) -> None:
    x, d = batch()
    windows = torch.randn(4, 4, 32, 32, 16, generator=torch.Generator().manual_seed(9))  # 4 crop-size cubes each
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3))
    off = MeDUETTrainStep(demo_net(), step_config())
    total_off, _ = off.compute_losses(x, d, mask, windows)  # windows that no loss reads change nothing
    torch.manual_seed(5)  # adversary initialisation
    on = MeDUETTrainStep(demo_net(), step_config(**{switch: 0.7}))
    total_on, out = on.compute_losses(x, d, mask, windows)
    extra = sum(out[p] for p in parts)
    torch.testing.assert_close(total_on.detach() - total_off.detach(), 0.7 * extra, rtol=1e-4, atol=1e-5)
    assert extra.item() > 0


def test_all_additions_train_resume_and_the_adversary_learns() -> None:
    x, d = batch()
    cfg = step_config(clean_domain_weight=1.0, clean_domain_lr=1e-2, decorrelation_weight=1.0, swap_cycle_weight=1.0)
    step = MeDUETTrainStep(demo_net(style_mode="global"), cfg)
    first = step(x, d)
    assert first["clean_domain_reversal"] == 0.0  # DANN ramp starts at 0
    for _ in range(3):
        out = step(x, d)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 < out["clean_domain_reversal"] < 1
    assert out["clean_domain_pooled"] < first["clean_domain_pooled"]  # the adversary's own descent
    state = step.state_dict()
    again = MeDUETTrainStep(demo_net(seed=1, style_mode="global"), cfg)
    again.load_state_dict(state)
    for a, b in zip(step.adversary.parameters(), again.adversary.parameters()):
        torch.testing.assert_close(a, b)


def test_swap_cycle_needs_siqc() -> None:
    with pytest.raises(ValueError, match="siqc"):
        MeDUETStepConfig(swap_cycle_weight=1.0, siqc=False)
    with pytest.raises(ValueError, match="decorrelation_weight"):
        MeDUETStepConfig(decorrelation_weight=-1.0)


# ------------------------------------------------------------------------------------ probes
def test_probe_scores_separable_vs_noise() -> None:
    torch.manual_seed(0)
    labels = [i % 4 for i in range(80)]
    groups = [i // 4 for i in range(80)]
    folds = group_kfold(groups, 4)
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 4).float() * 3 + 0.1 * torch.randn(80, 4)
    good = probe_scores(onehot, labels, folds, 4)
    noise = probe_scores(torch.randn(80, 4), labels, folds, 4)
    assert good["accuracy"] == 1.0 and good["cross_entropy"] < 0.3
    assert noise["accuracy"] < 0.5 and noise["cross_entropy"] > 1.2
    assert good["chance_cross_entropy"] == pytest.approx(math.log(4))


def test_between_group_variance_share_extremes() -> None:
    groups = [0, 0, 1, 1, 2, 2]
    assert between_group_variance_share(torch.tensor([[1.0], [1.0], [2.0], [2.0], [5.0], [5.0]]), groups) == pytest.approx(1.0)
    assert between_group_variance_share(torch.tensor([[1.0], [2.0], [1.0], [2.0], [1.0], [2.0]]), groups) == pytest.approx(0.0)


def test_token_map_retrieval_finds_the_anatomy_across_styles() -> None:
    torch.manual_seed(0)
    anatomies = {a: torch.randn(3, 4, 4, 4) for a in range(16)}
    maps, anat, sty = [], [], []
    for a, m in anatomies.items():
        for s in range(3):
            maps.append(m * (1 + s) + 5 * s + 0.1 * torch.randn_like(m))  # style: scale and offset per channel
            anat.append(a)
            sty.append(s)
    res = token_map_retrieval(torch.stack(maps), anat, sty, candidates=8)
    assert res["accuracy"] == 1.0 and res["queries"] == 16 * 3 * 2 and res["chance"] == 0.125
    shuffled = token_map_retrieval(torch.randn(48, 3, 4, 4, 4), anat, sty, candidates=8)
    assert shuffled["accuracy"] < 0.5


def test_global_style_leaves_no_trainable_parameter_without_gradient() -> None:
    """DistributedDataParallel fails on trainable parameters that get no gradient."""
    x, d = batch()
    step = MeDUETTrainStep(demo_net(style_mode="global"), step_config())
    total, _ = step.compute_losses(x, d)
    total.backward()
    missing = [n for n, p in step.model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_between_domain_share_loss_extremes_and_descent() -> None:
    d = torch.tensor([0, 0, 1, 1, 2, 2])
    by_domain = torch.tensor([[0.0], [0.0], [1.0], [1.0], [3.0], [3.0]])
    assert between_domain_share_loss(by_domain, d).item() == pytest.approx(1.0, abs=1e-4)
    within = torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0], [1.0]])
    assert between_domain_share_loss(within, d).item() == pytest.approx(0.0, abs=1e-6)
    assert between_domain_share_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    z = (torch.randn(6, 2, 4) + 2 * d.view(6, 1, 1).float()).requires_grad_()  # tokens, pooled inside
    before = between_domain_share_loss(z, d)
    (g,) = torch.autograd.grad(before, z)
    assert between_domain_share_loss(z - 0.5 * g, d) < before
    with pytest.raises(ValueError, match="disagree"):
        between_domain_share_loss(torch.randn(5, 3), d)


# ------------------------------------------------------------------------------------ banked domain means
def fisher(z: torch.Tensor, d: torch.Tensor, within: torch.Tensor, k: int, shrinkage: float = 0.1) -> torch.Tensor:
    """The criterion written out: (1/D) sum_k pi_k (mu_k - mu)^T W_s^-1 (mu_k - mu), means from z."""
    dim = z.shape[1]
    means = torch.stack([z[d == i].mean(0) for i in range(k)])
    offsets = means - means.mean(0)
    w = (1 - shrinkage) * within + shrinkage * within.diagonal().mean() * torch.eye(dim, dtype=z.dtype)
    return sum((offsets[i] @ torch.linalg.solve(w, offsets[i])) / k for i in range(k)) / dim


def test_domain_mean_bank_is_the_fisher_criterion_with_its_gradient() -> None:
    """With momentum 0 the bank holds this batch: value and gradient equal the written-out criterion's
    (the within-domain covariance held constant)."""
    torch.manual_seed(0)
    d = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    z = (torch.randn(8, 5) + torch.nn.functional.one_hot(d, 5).float()).requires_grad_(True)
    bank = DomainMeanBank(5, 3, momentum=0.0)
    value = bank(z, d)
    (grad,) = torch.autograd.grad(value, z)
    zz = z.detach().clone().requires_grad_(True)
    unit = zz / zz.var(0, unbiased=False).mean().sqrt()  # the bank's units: the batch's spread
    means = torch.stack([unit.detach()[d == i].mean(0) for i in range(3)])
    centred = unit.detach() - means[d]
    ref = fisher(unit, d, centred.T @ centred / 8, 3)
    (ref_grad,) = torch.autograd.grad(ref, zz)
    torch.testing.assert_close(value.detach(), ref.detach())
    torch.testing.assert_close(grad, ref_grad)
    assert value.item() > 0
    assert bank(z - 0.5 * grad, d).item() < value.item()  # a gradient step shrinks it
    # shrinking the content does not: the criterion has no scale (a bank in absolute units would
    # still hold the larger covariance and report less)
    slow = DomainMeanBank(5, 3, momentum=0.9)
    for _ in range(20):
        slow(z.detach(), d)
    assert slow(0.1 * z.detach(), d).item() == pytest.approx(slow(z.detach(), d).item(), rel=1e-4)


def test_the_benchmark_measures_the_banks_criterion() -> None:
    """domain_fisher on given features equals a one-batch bank's value, has no scale, and is ~0 when
    the domains share their mean."""
    torch.manual_seed(0)
    d = torch.tensor([0, 1, 2, 3] * 6)
    z = torch.randn(24, 5) + 2 * torch.nn.functional.one_hot(d, 5).float()
    assert domain_fisher(z, d.tolist()) == pytest.approx(DomainMeanBank(5, 4, momentum=0.0)(z, d).item(), rel=1e-5)
    assert domain_fisher(3 * z, d.tolist()) == pytest.approx(domain_fisher(z, d.tolist()), rel=1e-6)
    same = z - torch.stack([z[d == k].mean(0) for k in range(4)])[d]
    assert domain_fisher(same, d.tolist()) < 1e-12 < domain_fisher(z, d.tolist())


def test_domain_mean_bank_has_no_batch_sampling_floor() -> None:
    """On domain-free features the banked criterion falls towards 0 while the batch share stays near
    its floor (K - 1) / (n - 1); with a real domain shift the bank keeps it large."""
    torch.manual_seed(0)
    d = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    bank, shifted_bank = DomainMeanBank(6, 4, momentum=0.95), DomainMeanBank(6, 4, momentum=0.95)
    shares = []
    for _ in range(300):
        z = torch.randn(8, 6)
        value = bank(z, d)
        shifted = shifted_bank(z + 2.0 * torch.nn.functional.one_hot(d, 6).float(), d)
        shares.append(between_domain_share_loss(z, d).item())
    assert value.item() < 0.1 and sum(shares[-50:]) / 50 > 0.3
    assert shifted.item() > 5 * value.item()
    with pytest.raises(ValueError, match="domain index"):
        bank(torch.randn(2, 6), torch.tensor([0, 4]))


def test_self_reconstruction_decodes_every_token_from_its_own_factors() -> None:
    """The all-visible decode equals decoding fused clean factors at every position (no mask token)."""
    net = demo_net().eval()
    x, _ = batch()
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x, mask, swap_styles=False, self_reconstruct=True)
        content, style = net.encode_factors(x)
        ids = torch.arange(64).expand(4, 64)
        ref = net.decode(net.fuse(content, style), ids, net.encoder.grid_of(x.shape[2:]))
    assert out["self_pred"].shape == (4, 64, net.patch_size**3 * 4)
    torch.testing.assert_close(out["self_pred"], ref, rtol=1e-4, atol=1e-5)
    assert "self_pred" not in net(x, mask, swap_styles=False)


def test_domain_bank_resumes() -> None:
    x, d = batch()
    cfg = step_config(domain_mean_weight=1.0, self_rec_weight=1.0)
    step = MeDUETTrainStep(demo_net(), cfg)
    for _ in range(2):
        out = step(x, d)
    assert out["domain_mean"] > 0 and out["self_rec"] > 0
    again = MeDUETTrainStep(demo_net(seed=1), cfg)
    again.load_state_dict(step.state_dict())
    for a, b in zip(step.domain_bank.buffers(), again.domain_bank.buffers()):
        torch.testing.assert_close(a, b)


def test_window_content_is_the_plain_content_of_the_window() -> None:
    """The student's pass returns the plain content of the fixed windows (any size the patch divides)."""
    net = demo_net().eval()
    x, _ = batch()
    windows = torch.randn(4, 4, 24, 24, 24, generator=torch.Generator().manual_seed(9))
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x, mask, swap_styles=False, windows=windows)
        ref, _ = net.encode_factors(windows)
    assert out["window_content"].shape == (4, (24 // net.patch_size) ** 3, net.content_dim)
    torch.testing.assert_close(out["window_content"], ref, rtol=1e-4, atol=1e-5)
    assert "window_content" not in net(x, mask, swap_styles=False)


def test_windows_are_encoded_as_crop_size_cubes() -> None:
    """window_cubes cuts each window into the training crop's cubes, window by window, and refuses a
    window that is not a multiple of the crop, naming the switch."""
    from custom_nets.engines.ssl.step import window_cubes

    w = torch.randn(2, 3, 8, 12, 4)
    cubes, k = window_cubes(w, (4, 4, 4))
    assert k == 6 and cubes.shape == (12, 3, 4, 4, 4)
    assert torch.equal(cubes[0], w[0, :, :4, :4, :4]) and torch.equal(cubes[1], w[0, :, :4, 4:8, :4])
    assert torch.equal(cubes[5], w[0, :, 4:, 8:, :]) and torch.equal(cubes[6], w[1, :, :4, :4, :4])
    with pytest.raises(ValueError, match="domain_window"):
        window_cubes(torch.randn(1, 3, 6, 8, 8), (4, 4, 4))


def test_window_criterion_reads_the_mean_content_of_the_windows_cubes() -> None:
    """The criterion's input is each window's content averaged over the tokens of its cubes, each cube
    encoded on its own (as the factor bank and the benchmark pool a volume)."""
    from custom_nets.engines.ssl.step import window_cubes

    x, d = batch()
    windows = torch.randn(4, 4, 32, 16, 16, generator=torch.Generator().manual_seed(4))
    step = MeDUETTrainStep(demo_net(), step_config(domain_window_weight=1.0))
    seen = {}
    original = step.window_bank.forward

    def recording(content: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        seen["c"] = content.detach()
        return original(content, dom)

    step.window_bank.forward = recording
    step.compute_losses(x, d, random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3)), windows)
    with torch.no_grad():
        cubes, k = window_cubes(windows, (CROP,) * 3)
        content, _ = step.model.encode_factors(cubes)
    expected = content.reshape(4, k, -1, content.shape[-1]).mean(dim=(1, 2))
    torch.testing.assert_close(seen["c"].mean(dim=1), expected, rtol=1e-4, atol=1e-5)


def test_window_criterion_lowers_the_windows_domain_separation_and_resumes() -> None:
    """The window criterion's gradient moves the windows' content towards equal domain means (its
    value falls over steps on a fixed batch with the other losses off), a batch without windows is
    refused with the switch's name, and the bank resumes."""
    torch.manual_seed(0)
    x, d = batch()
    # windows whose domain is a plain offset: separable before training
    windows = torch.randn(4, 4, 16, 16, 16, generator=torch.Generator().manual_seed(2)) + 2.0 * d.view(-1, 1, 1, 1, 1)
    cfg = {**step_config(domain_window_weight=1.0, weight_rec=0.0, weight_domain=0.0, weight_mftd=0.0, weight_siqc=0.0,
                         lr=1e-3, start_lr=1e-3), "warmup_steps": 0, "total_steps": 40}
    step = MeDUETTrainStep(demo_net(), cfg)
    values = [step(x, d, windows=windows)["domain_window"] for _ in range(25)]
    assert values[-1] < 0.2 * max(values[:3]), values
    with pytest.raises(ValueError, match="domain_window"):
        step(x, d)
    again = MeDUETTrainStep(demo_net(seed=1), cfg)
    again.load_state_dict(step.state_dict())
    for a, b in zip(step.window_bank.buffers(), again.window_bank.buffers()):
        torch.testing.assert_close(a, b)
    shrunk = MeDUETTrainStep(demo_net(), step_config(domain_window_weight=1.0, domain_mean_weight=1.0,
                                                     domain_mean_shrinkage=0.01))
    assert shrunk.window_bank.shrinkage == shrunk.domain_bank.shrinkage == 0.01
    with pytest.raises(ValueError, match="domain_mean_shrinkage"):
        MeDUETStepConfig(domain_mean_shrinkage=0.0)


def test_token_criterion_is_zero_for_equal_distributions_and_scale_free() -> None:
    """Two domains whose volumes hold the same tokens in another order score 0; a domain offset scores
    more; rescaling the tokens changes nothing; a single domain scores 0 (with a graph)."""
    from custom_nets.losses.domain_quantiles import random_directions, sliced_domain_quantile_loss

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 50, 6, generator=g)
    tokens = torch.cat([base, base[:, torch.randperm(50, generator=g)]])  # volumes 0, 1: domain 0; 2, 3: domain 1
    d = torch.tensor([0, 0, 1, 1])
    w = random_directions(6, 16, seed=3)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(16))
    torch.testing.assert_close(random_directions(6, 16, seed=3), w)  # reproducible from the seed
    assert sliced_domain_quantile_loss(tokens, d, w).item() < 1e-10
    # the same mean in both domains, but a bimodal spread in domain 1: the pooled criteria see nothing
    split = tokens.clone()
    split[2:, :, 0] = split[2:, :, 0] + torch.where(torch.arange(50) % 2 == 0, 3.0, -3.0)
    split[2:, :, 0] -= split[2:, :, 0].mean() - tokens[:2, :, 0].mean()
    torch.testing.assert_close(split[2:].mean(dim=(0, 1)), tokens[:2].mean(dim=(0, 1)), rtol=0, atol=1e-5)
    shifted = sliced_domain_quantile_loss(split, d, w)
    assert shifted.item() > 0.01 and between_domain_share_loss(split, d).item() < 1e-6
    torch.testing.assert_close(sliced_domain_quantile_loss(7.0 * split, d, w), shifted, rtol=1e-4, atol=1e-6)
    alone = sliced_domain_quantile_loss(split.requires_grad_(), torch.zeros(4), w)
    assert alone.item() == 0.0 and alone.requires_grad
    with pytest.raises(ValueError, match="directions"):
        sliced_domain_quantile_loss(tokens, d, torch.randn(5, 3))


def test_token_criterion_gradient_makes_the_domains_token_distributions_agree() -> None:
    """Descending the criterion on free tokens pulls the domains' token distributions together (a
    fresh set of directions, not the trained ones, measures it) without collapsing their spread."""
    from custom_nets.losses.domain_quantiles import random_directions, sliced_domain_quantile_loss

    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(4, 64, 5, generator=g)
    tokens[2:] = tokens[2:] * 2.0 + 1.0  # domain 1: shifted and wider
    tokens.requires_grad_()
    d = torch.tensor([0, 0, 1, 1])
    held = random_directions(5, 32, seed=999)
    before = sliced_domain_quantile_loss(tokens, d, held).item()
    opt = torch.optim.Adam([tokens], lr=0.05)
    for step in range(150):
        opt.zero_grad()
        sliced_domain_quantile_loss(tokens, d, random_directions(5, 32, seed=step)).backward()
        opt.step()
    after = sliced_domain_quantile_loss(tokens, d, held).item()
    assert after < 0.1 * before, (before, after)
    assert tokens.detach().std() > 0.5


def test_token_criterion_needs_the_windows_and_resumes_with_the_same_directions() -> None:
    """The step refuses a batch without windows naming the switch, and its directions depend only on
    the seed and the step, so a resumed step gives the same value."""
    x, d = batch()
    windows = torch.randn(4, 4, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3))
    step = MeDUETTrainStep(demo_net(), step_config(domain_token_weight=1.0))
    with pytest.raises(ValueError, match="domain_token_weight"):
        step.compute_losses(x, d, mask)
    step(x, d, mask, windows)
    again = MeDUETTrainStep(demo_net(seed=1), step_config(domain_token_weight=1.0))
    again.load_state_dict(step.state_dict())
    _, a = step.compute_losses(x, d, mask, windows)
    _, b = again.compute_losses(x, d, mask, windows)
    torch.testing.assert_close(a["domain_token"], b["domain_token"])
    with pytest.raises(ValueError, match="domain_token_projections"):
        MeDUETStepConfig(domain_token_projections=0)


def test_the_bundle_reads_windows_only_when_the_criterion_is_on(tmp_path: Path) -> None:
    """train.json gives the training dataset its window only with domain_window_weight > 0."""
    from monai.bundle import ConfigParser

    for weight, token, window, expected in ((0.0, 0.0, 16, 0), (1.0, 0.0, 16, 16), (0.0, 1.0, 16, 16), (0.0, 0.0, 0, 0)):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles/meduet_ssl/configs/train.json"))
        parser.update({"bundle_root": str(ROOT / "bundles/meduet_ssl"), "latent_datalist": str(tmp_path / "none.json"),
                       "domain_window_weight": weight, "domain_token_weight": token, "domain_window": window})
        assert parser.get_parsed_content("train#dataset").window == expected


def test_benchmark_arms_write_and_resume_only_inside_their_own_folder(tmp_path: Path) -> None:
    """Each arm's run resolves its checkpoint, output and model paths inside its own folder (the
    bundle default ckpt_dir made every arm resume from the previous arm's final checkpoint)."""
    import sys

    from monai.bundle import ConfigParser

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench

    runs = []
    for arm in ("paper", "combined"):
        run_dir = tmp_path / arm
        overlay = bench.arm_overlay(run_dir, 0, bench.ARMS[arm], tmp_path / "latents.json", 8, 30)
        parser = ConfigParser()
        parser.read_config([str(ROOT / "bundles/meduet_ssl/configs/train.json"),
                            str(ROOT / "bundles/meduet_ssl/configs/demo.json")])
        parser.update(overlay)
        parser["bundle_root"] = str(ROOT / "bundles/meduet_ssl")
        paths = {k: Path(parser.get_parsed_content(k)) for k in ("ckpt_dir", "output_dir", "model_path")}
        assert all(p.is_relative_to(run_dir) for p in paths.values()), paths
        runs.append(paths["ckpt_dir"])
    assert runs[0] != runs[1]


def test_the_disentangle_overlay_is_the_benchmarks_final_combination() -> None:
    """configs/disentangle.json switches on exactly the arm the disentanglement benchmark measures as
    ``combined+domain_mean+self_rec``, and every key is a train.json switch (a typo would be ignored)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench

    overlay = json.loads((ROOT / "bundles/meduet_ssl/configs/disentangle.json").read_text())
    train = json.loads((ROOT / "bundles/meduet_ssl/configs/train.json").read_text())
    arm = bench.ARMS["combined+domain_mean+self_rec"]
    assert overlay == arm and set(overlay) <= set(train)


def test_within_anatomy_permutations_keep_each_anatomys_domains_and_reach_the_floor() -> None:
    """The Fisher floor's labels: each anatomy keeps its multiset of domains; on features that carry
    the domain the permuted criterion is far below the true one."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench

    domain = [d for _ in range(12) for d in range(4)]
    anatomy = [a for a in range(12) for _ in range(4)]
    perms = bench.permute_within_groups(domain, anatomy, 5)
    assert len(perms) == 5 and any(p != domain for p in perms)
    for p in perms:
        assert all(sorted(p[4 * a:4 * a + 4]) == [0, 1, 2, 3] for a in range(12))
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(48, 6, generator=g) + 3.0 * torch.tensor(domain, dtype=torch.float32)[:, None]
    floor = sum(domain_fisher(feats, p) for p in perms) / len(perms)
    assert domain_fisher(feats, domain) > 20 * floor


def test_more_training_anatomies_keep_the_default_runs_test_set() -> None:
    """--test-start keeps the default run's test anatomies while --train-anatomies grows; the
    training anatomies never include a test one; a start that leaves no room is refused."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench

    default = bench.test_anatomy_indices(24, 24, 24)
    grown = bench.test_anatomy_indices(96, 24, 24)
    assert default == grown == list(range(24, 48))
    train = [i for i in range(96 + 24) if i not in set(grown)]
    assert len(train) == 96 and not set(train) & set(grown)
    for bad in (1, 97):
        with pytest.raises(SystemExit, match="--test-start"):
            bench.test_anatomy_indices(96, 24, bad)


def test_only_seeds_splits_the_plan_between_processes() -> None:
    """--only-seeds keeps the plan's order and its arms, restricted to the named seeds, so that two
    processes (one seed each) run disjoint halves of the same plan."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench

    common = ["--longer-epochs", "300", "--longer-arms", "paper", "--long-seeds", "2", "--arms", "raw,paper_longer"]
    full = bench.arm_plan(bench.parse_args(common))
    halves = [bench.arm_plan(bench.parse_args([*common, "--only-seeds", s])) for s in ("0", "1")]
    assert full == [("raw", 0), ("paper_longer", 0), ("paper_longer", 1)]
    assert halves == [[("raw", 0), ("paper_longer", 0)], [("paper_longer", 1)]]


def test_swap_oracle_restyler_starts_as_identity_and_learns_a_domain_map(tmp_path: Path) -> None:
    """The fitted swap oracle (benchmarks/swap_oracles.py) is the identity before training, learns a
    per-domain intensity map from paired volumes well enough to beat the identity on held-out ones,
    and its training pairs are every ordered pair of two styles of one anatomy."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import swap_oracles as oracles

    from custom_nets.data.latent_cache import write_latent

    g = torch.Generator().manual_seed(0)
    styles = ["a", "b"]
    restyle = lambda z, k: z * (1.0 + k) + 2.0 * k  # noqa: E731  (domain k: scale and offset)
    anatomies = [torch.randn(2, 4, 4, 4, generator=g) for _ in range(5)]
    items = []
    for i, z in enumerate(anatomies[:4]):
        for k, st in enumerate(styles):
            name = f"a{i}_{st}.npy"
            write_latent(tmp_path / name, restyle(z, k))
            items.append({"latent": name, "domain": st, "content_id": f"a{i}"})
    pairs = oracles.training_pairs({"training": items}, tmp_path, styles)
    assert len(pairs) == 8 and {p[1] for p in pairs} == {0, 1}
    net = oracles.Restyler(2, 2, width=8, kernel=1)
    z = anatomies[4][None]
    torch.testing.assert_close(net(z, torch.tensor([1])), z)
    net = oracles.fit_restyler(pairs, 2, kernel=1, seed=0, steps=300, batch=8, lr=1e-2)
    with torch.no_grad():
        err = (net(restyle(z, 0), torch.tensor([1])) - restyle(z, 1)).pow(2).mean()
    identity = (restyle(z, 0) - restyle(z, 1)).pow(2).mean()
    assert err < 0.1 * identity, (err, identity)


def test_domain_token_reference_tokens_and_levels() -> None:
    """benchmarks/domain_token_reference.py: a token holds one 2^3 block of every channel, and the
    criterion reads domains that differ by an offset far above one domain split four ways."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import domain_token_reference as ref

    z = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    tokens = ref.volume_tokens(z)
    assert tokens.shape == (8, 16)
    first = tokens[0].reshape(2, 2, 2, 2)  # (patch d, patch h, patch w, channel)
    torch.testing.assert_close(first.permute(3, 0, 1, 2), z[:, :2, :2, :2])
    g = torch.Generator().manual_seed(0)
    by_domain = {f"d{k}": [torch.randn(2, 8, 8, 8, generator=g) + k for _ in range(8)] for k in range(4)}
    levels = ref.reference_levels(by_domain, draws=4, projections=8, seed=0)
    assert levels["raw"] > 10 * levels["single_style"] > 0


def test_swap_decomposition_blames_the_factor_that_carries_the_style(tmp_path: Path) -> None:
    """The swap test's decomposition (benchmarks/disentanglement.py): with content that leaks its
    own style and a decoder that rebuilds every volume exactly, the swap with the truth's content
    is exact and beats both rebuilds everywhere, the swap with the truth's style errs as much as the
    swap itself; without the leak the swap itself is exact."""
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as dis

    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 4, 4)
    anatomy = {f"a{i}": torch.randn(shape, generator=g) for i in range(3)}
    style = {s: torch.full(shape, 2.0 * k) for k, s in enumerate(("s0", "s1", "s2"))}

    class Identity:
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z

    def run(leak: float) -> dict:
        class Factors:  # content = anatomy + leak x style; decode(c, s) = c + (1 - leak) s rebuilds exactly
            def decode(self, content: torch.Tensor, style_: torch.Tensor, spatial: object) -> torch.Tensor:
                return content + (1.0 - leak) * style_

        items, tokens, latents, images, gt = [], {}, {}, {}, {}
        for a, z in anatomy.items():
            for s, v in style.items():
                name = f"{a}_{s}"
                items.append({"name": name, "content_id": a, "style": s})
                tokens[name] = (z + leak * v, v)
                latents[name] = images[name] = (z + v).numpy()
                gt[(a, s)] = ((z + v)[0].numpy(), z + v)
        latents = {k: torch.from_numpy(v) for k, v in latents.items()}
        data = {"tokenizer": Identity(), "gt": gt, "eval": items, "images": {k: v[0] for k, v in images.items()}}
        return dis.swap_test(data, Factors(), latents, tokens, (4, 4, 4), argparse.Namespace(max_pairs=12), f"leak{leak}", tmp_path)

    leaky = run(0.5)
    image = leaky["mean"]["image"]
    assert image["truth_content_b_style"] == pytest.approx(0.0, abs=1e-10)
    assert image["a_content_truth_style"] == pytest.approx(image["swap"]) and image["swap"] > 0.1
    assert leaky["beats_both_decoded_with_truth_factor"]["truth_content_b_style"] == 1.0
    clean = run(0.0)
    assert clean["mean"]["image"]["swap"] == pytest.approx(0.0, abs=1e-10) and clean["swap_beats_both_decoded"] == 1.0


# ------------------------------------------------------------------------------------ paired content
def test_paired_content_loss_zero_for_equal_scale_free_and_pulls_pairs_together() -> None:
    from custom_nets.losses.paired_content import paired_content_loss

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32, 6, generator=g)
    assert paired_content_loss(a, a).item() == 0.0
    b = torch.randn(4, 32, 6, generator=g)
    independent = paired_content_loss(a, b).item()
    assert 1.5 < independent < 2.5  # two draws of one distribution: about 2
    assert paired_content_loss(10 * a, 10 * b).item() == pytest.approx(independent, rel=1e-4)  # no gain by shrinking
    with pytest.raises(ValueError, match="B, N, D"):
        paired_content_loss(a, b[:, :16])
    x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        paired_content_loss(x, y).backward()
        opt.step()
    assert paired_content_loss(x, y).item() < 0.05 * independent and x.detach().std() > 0.5


def test_paired_content_adds_its_weighted_term_and_needs_the_paired_windows() -> None:
    """With paired windows equal to the windows the term is 0; with other ones it adds exactly its
    weight times its value; without them the step names the switch and pair_key."""
    x, d = batch()
    g = torch.Generator().manual_seed(9)
    windows = torch.randn(4, 4, 32, 32, 16, generator=g)
    other = torch.randn(4, 4, 32, 32, 16, generator=g)
    mask = random_mix_mask(4, 64, 0.5, torch.Generator().manual_seed(3))
    off = MeDUETTrainStep(demo_net(), step_config())
    total_off, _ = off.compute_losses(x, d, mask, windows, other)
    on = MeDUETTrainStep(demo_net(), step_config(paired_content_weight=0.7))
    total_on, out = on.compute_losses(x, d, mask, windows, other)
    assert out["paired_content"].item() > 0
    torch.testing.assert_close(total_on.detach() - total_off.detach(), 0.7 * out["paired_content"], rtol=1e-4, atol=1e-5)
    _, same = on.compute_losses(x, d, mask, windows, windows)
    assert same["paired_content"].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="pair_key"):
        on.compute_losses(x, d, mask, windows)
    with pytest.raises(ValueError, match="paired_content_weight"):
        on.compute_losses(x, d, mask)
    with pytest.raises(ValueError, match="differ"):
        on.compute_losses(x, d, mask, windows, other[:, :, :16])
    out = on(x, d, mask, windows, other)  # a full step with its backward
    assert math.isfinite(out["paired_content"])


def test_paired_windows_come_from_the_same_subject_in_another_domain(tmp_path: Path) -> None:
    from custom_nets.data.latent_cache import write_latent
    from custom_nets.data.latent_datasets import LatentCropDataset
    from custom_nets.utils.errors import InputError

    items = []
    for subject in ("s0", "s1"):
        for domain in (0, 1):
            path = tmp_path / f"{subject}_{domain}.npy"
            write_latent(path, torch.full((2, 8, 8, 8), 10.0 * int(subject[1]) + domain))
            items.append({"latent": str(path), "domain_index": domain, "subject": subject})
    ds = LatentCropDataset(items, crop=4, window=8, pair_key="subject")
    for i, it in enumerate(items):
        sample = ds[i]
        value = sample["paired_window"].flatten()[0].item()
        assert value == 10.0 * int(it["subject"][1]) + (1 - it["domain_index"])  # same subject, the other domain
        assert sample["paired_window"].shape == sample["window"].shape
    with pytest.raises(ValueError, match="window"):
        LatentCropDataset(items, crop=4, window=0, pair_key="subject")
    with pytest.raises(InputError, match="s1_0.npy: subject 's1' has no volume in another domain"):
        LatentCropDataset(items[:3], crop=4, window=8, pair_key="subject")
    with pytest.raises(InputError, match="s0_0.npy: no 'patient' key"):
        LatentCropDataset(items, crop=4, window=8, pair_key="patient")
    write_latent(tmp_path / "s0_1_other_grid.npy", torch.zeros(2, 8, 8, 12))
    other_grid = [items[0], {**items[1], "latent": str(tmp_path / "s0_1_other_grid.npy")}]
    with pytest.raises(InputError, match="s0_1_other_grid.npy: grid"):
        LatentCropDataset(other_grid, crop=4, window=8, pair_key="subject")[0]
    assert "paired_window" not in LatentCropDataset(items, crop=4, window=8)[0]


def test_the_bundle_pairs_windows_only_when_the_criterion_is_on(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    for weight, window, pair_key in ((0.0, 16, ""), (1.0, 16, "subject")):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles/meduet_ssl/configs/train.json"))
        parser.update({"bundle_root": str(ROOT / "bundles/meduet_ssl"), "latent_datalist": str(tmp_path / "none.json"),
                       "paired_content_weight": weight, "domain_window": window})
        dataset = parser.get_parsed_content("train#dataset")
        assert (dataset.window, dataset.pair_key) == ((16, pair_key) if weight else (0, ""))
        assert parser.get_parsed_content("train#step").config.paired_content_weight == weight


def test_ldm_control_phantoms_scores_tell_the_truth_from_either_source() -> None:
    """benchmarks/ldm_control_phantoms.py: the truth (X in the requested style) beats both sources
    and is retrieved by anatomy and style; copying either source passes neither its own test nor the
    criterion; pairs never ask for the content source's own style."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ldm_control_phantoms as control

    g = torch.Generator().manual_seed(0)
    styles = ["s0", "s1", "s2"]
    shift = {st: 3.0 * k for k, st in enumerate(styles)}  # style: an offset, far above the anatomy's scale
    anatomy = {f"a{i}": torch.randn(2, 4, 4, 4, generator=g) for i in range(4)}
    latents = {a: {st: z + shift[st] for st in styles} for a, z in anatomy.items()}
    pairs = control.control_pairs(sorted(latents), styles, 3)
    assert len(pairs) == 3 * 2 and all(a != b and x != y for x, a, y, b in pairs)
    truth = torch.stack([latents[x][b] for x, _, _, b in pairs])
    content_copy = torch.stack([latents[x][a] for x, a, _, _ in pairs])
    style_copy = torch.stack([latents[y][b] for _, _, y, b in pairs])
    perfect = control.control_scores(truth, pairs, latents)
    assert (perfect["beats_both_sources"], perfect["anatomy_retrieval"], perfect["style_retrieval"]) == (1.0, 1.0, 1.0)
    by_content = control.control_scores(content_copy, pairs, latents)
    assert by_content["beats_both_sources"] == 0.0 and by_content["style_retrieval"] == 0.0
    assert by_content["style_of_content_source"] == 1.0 and perfect["style_of_content_source"] == 0.0
    by_style = control.control_scores(style_copy, pairs, latents)
    assert by_style["beats_both_sources"] == 0.0 and by_style["anatomy_retrieval"] == 0.0
    assert perfect["anatomy_chance"] == 0.25 and perfect["style_chance"] == pytest.approx(1 / 3)
    # the report table: a header, a rule and one row per set, every row as wide as the header
    entry = {"arm": "a", "seed": 0, "val_flow_loss": None,
             **{w: {**by_content, "truth_factors": perfect} for w in ("training", "held_out")}}
    table = control.markdown_table([entry]).splitlines()
    assert len(table) == 4 and len({row.count("|") for row in table}) == 1
    assert "| 0.00 (1.00) |" in table[2] and "| n/a |" in table[2]


def test_ldm_control_phantoms_reads_the_last_validation_loss(tmp_path) -> None:
    """The generator's validation loss comes from the last epoch line its StatsHandler wrote, not the
    best-value summary or a training loss; a missing log gives None."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ldm_control_phantoms as control

    log = tmp_path / "chain.log"
    log.write_text("Epoch: 1/4, Iter: 1/2 -- train_loss: 1.2000\n"
                   "Epoch[2] Metrics -- val_loss: 0.9000\n"
                   "Key metric: val_loss best value: 0.9 at epoch: 2\n"
                   "Epoch[4] Metrics -- val_loss: 0.5300\n"
                   "Epoch: 4/4, Iter: 2/2 -- train_loss: 0.4000\n")
    assert control.last_val_loss(log) == pytest.approx(0.53)
    assert control.last_val_loss(tmp_path / "missing.log") is None


def test_unpaired_route_trains_each_anatomy_in_one_style_with_copies_as_partners(tmp_path: Path) -> None:
    """disentanglement.py --unpaired-copies: every training anatomy appears in one real style only, plus
    its random-intensity copies (domain 'intensity_copy', the same content_id, distinct latents); the
    held-out set is unchanged; the paired dataset finds each volume's partner among them."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import disentanglement as bench
    import numpy as np

    from custom_nets.data.latent_cache import load_latent_datalist
    from custom_nets.data.latent_datasets import LatentCropDataset

    args = bench.parse_args(["--train-anatomies", "4", "--test-anatomies", "2", "--swap-anatomies", "0",
                             "--unpaired-copies", "2"])
    data = bench.build_data(tmp_path, args)
    lists = load_latent_datalist(data["latent_datalist"], keys=("training",))
    assert lists["domains"] == [*data["styles"], "intensity_copy"] and len(data["styles"]) == 4
    train = lists["training"]
    real = [it for it in train if it["domain"] != "intensity_copy"]
    assert [(it["content_id"], it["domain_index"]) for it in real] == [("a000", 0), ("a001", 1), ("a002", 2), ("a003", 3)]
    copies = [it for it in train if it["domain"] == "intensity_copy"]
    assert len(copies) == 8 and all(it["domain_index"] == 4 for it in copies)
    assert sorted(it["content_id"] for it in copies) == sorted(["a000", "a001", "a002", "a003"] * 2)
    assert len({it["latent"] for it in train}) == 12
    z = {Path(it["latent"]).name: np.load(it["latent"]).astype(np.float32) for it in train}
    assert np.abs(z["a000_ct_sharp_nobias_n0_copy0.npy"] - z["a000_ct_sharp_nobias_n0.npy"]).mean() > 0.05
    assert {(it["content_id"], it["style"]) for it in data["eval"]} == {
        (f"a00{i}", s) for i in (4, 5) for s in data["styles"]}  # held out: every style, as before
    ds = LatentCropDataset(train, crop=8, window=16, pair_key="content_id")
    for i, it in enumerate(train):
        partners = {train[j]["content_id"] for j in ds.partners[i]}
        assert partners == {it["content_id"]} and all(train[j]["domain_index"] != it["domain_index"] for j in ds.partners[i])
