"""MeDUET losses, EMA, schedules, optimizer groups and the training step (demo network)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from custom_nets.engines.common.ema import cosine_momentum, ema_update, make_teacher
from custom_nets.engines.common.schedule import warmup_cosine_lr, warmup_cosine_scheduler
from custom_nets.engines.common.step import resolve_precision
from custom_nets.engines.ssl.step import MeDUETTrainStep, param_groups_no_decay
from custom_nets.losses.demix import demix_prediction, demix_reconstruction_loss
from custom_nets.losses.domain import domain_loss, grad_reverse
from custom_nets.losses.mftd import masked_token_mse, mftd_loss
from custom_nets.losses.siqc import quadruplet_ids, siqc_loss, supcon_qk_loss
from custom_nets.nets.meduet import MeDUET, meduet_config, random_mix_mask

CROP = 16


def demo_net(seed: int = 0) -> MeDUET:
    torch.manual_seed(seed)
    return MeDUET(**{**meduet_config("demo"), "n_domains": 3})


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, CROP, CROP, CROP, generator=g), torch.tensor([0, 1, 2, 1])


# ------------------------------------------------------------------------------------ losses
def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(3, 5)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * w)


def test_domain_loss_labels_the_partner_source() -> None:
    d = torch.tensor([0, 1, 2, 2])
    labels = torch.cat([d, d.flip(0)])
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 50
    total, ce_c, ce_s = domain_loss(perfect, perfect, d)
    assert total.item() < 1e-6
    wrong = torch.nn.functional.one_hot(torch.cat([d, d]), 3).float() * 50  # source 2 labelled as source 1
    assert domain_loss(wrong, perfect, d)[1].item() > 1.0


def test_demix_pairing() -> None:
    """x_i is predicted by stream A of i where M_i = 1 and by stream B of the partner where M_i = 0."""
    b, n, p = 4, 10, 3
    x = torch.randn(b, n, p)
    mask = random_mix_mask(b, n, 0.5, torch.Generator().manual_seed(0))
    m = mask.unsqueeze(-1)
    garbage = lambda: 100 * torch.randn(b, n, p)  # noqa: E731
    stream_a = x * m + garbage() * (1 - m)  # right only where M_i = 1
    # stream B of sample j must hold x_{B-1-j} where M_{B-1-j} = 0
    stream_b = (x * (1 - m) + garbage() * m).flip(0)
    pred = torch.cat([stream_a, stream_b])
    torch.testing.assert_close(demix_prediction(pred, mask), x)
    assert demix_reconstruction_loss(pred, x, mask).item() < 1e-10
    # the pairing matters: without the partner flip, or with the streams exchanged, the loss is large
    assert demix_reconstruction_loss(torch.cat([stream_a, stream_b.flip(0)]), x, mask).item() > 100
    assert demix_reconstruction_loss(torch.cat([stream_b.flip(0), stream_a.flip(0)]), x, mask).item() > 100


def test_mftd_counts_only_tokens_absent_from_the_mixture() -> None:
    b, n = 4, 12
    mask = random_mix_mask(b, n, 0.5, torch.Generator().manual_seed(1))
    tc, ts = torch.randn(b, n, 6), torch.randn(b, n, 2)
    # student matches the teacher exactly on absent tokens and is wrong on present ones
    absent = torch.cat([mask, 1 - mask]).unsqueeze(-1)
    target_c, target_s = torch.cat([tc, tc.flip(0)]), torch.cat([ts, ts.flip(0)])
    rec_c = target_c * absent + (target_c + 7) * (1 - absent)
    rec_s = target_s * absent + (target_s - 3) * (1 - absent)
    loss, lc, ls = mftd_loss(rec_c, rec_s, tc, ts, mask)
    assert loss.item() < 1e-10
    # and an error on absent tokens counts, content at weight 0.5
    rec_c2 = rec_c + 1.0 * absent
    loss2, lc2, ls2 = mftd_loss(rec_c2, rec_s, tc, ts, mask)
    torch.testing.assert_close(lc2, torch.tensor(2.0))  # two sources, each mean squared error 1
    torch.testing.assert_close(loss2, torch.tensor(1.0))
    # the mean is over selected tokens only
    w = torch.zeros(b, n)
    w[0, 0] = 1
    assert masked_token_mse(torch.ones(b, n, 2), torch.zeros(b, n, 2), w).item() == pytest.approx(1.0)


def test_siqc_ids() -> None:
    cid, sid = quadruplet_ids(2)
    assert cid.tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert sid.tolist() == [0, 1, 1, 0, 1, 0, 0, 1]


def test_siqc_lower_for_correct_pairs_than_shuffled_keys() -> None:
    torch.manual_seed(0)
    b = 4
    protos_c, protos_s = torch.randn(b, 16), torch.randn(b, 8)
    cid, sid = quadruplet_ids(b)
    qc = protos_c[cid] + 0.1 * torch.randn(4 * b, 16)
    qs = protos_s[sid] + 0.1 * torch.randn(4 * b, 8)
    kc = protos_c[cid] + 0.1 * torch.randn(4 * b, 16)
    ks = protos_s[sid] + 0.1 * torch.randn(4 * b, 8)
    paired = supcon_qk_loss(qc, kc, cid) + supcon_qk_loss(qs, ks, sid)
    perm = torch.randperm(4 * b, generator=torch.Generator().manual_seed(5))
    shuffled = supcon_qk_loss(qc, kc[perm], cid) + supcon_qk_loss(qs, ks[perm], sid)
    assert paired.item() < shuffled.item() - 1.0
    # siqc_loss on token groups: (B, n) groups and a (2B, N) swap group pool to the same 4B rows
    tok = lambda v: v.unsqueeze(1).repeat(1, 3, 1)  # noqa: E731
    total, l_c, l_s = siqc_loss(
        (tok(qc[:b]), tok(qc[b : 2 * b]), tok(qc[2 * b :])), (tok(qs[:b]), tok(qs[b : 2 * b]), tok(qs[2 * b :])),
        (tok(kc[:b]), tok(kc[b : 2 * b]), tok(kc[2 * b :])), (tok(ks[:b]), tok(ks[b : 2 * b]), tok(ks[2 * b :])),
    )
    assert total.item() == pytest.approx(l_c.item() + l_s.item())
    # self pair removed: one item per id gives no positive and the loss 0
    assert supcon_qk_loss(torch.randn(3, 4), torch.randn(3, 4), torch.arange(3)).item() == 0.0


# ------------------------------------------------------------------------------ schedules / EMA
def test_ema_formula_and_momentum_schedule() -> None:
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t_old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t_old + 0.1 * s.detach())
    assert cosine_momentum(0, 100) == pytest.approx(0.997)
    assert cosine_momentum(100, 100) == pytest.approx(0.9997)
    assert cosine_momentum(50, 100) == pytest.approx((0.997 + 0.9997) / 2)
    assert cosine_momentum(500, 100) == pytest.approx(0.9997)
    frozen = make_teacher(student)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training


def test_lr_schedule_endpoints() -> None:
    assert warmup_cosine_lr(0, 100, 10) == pytest.approx(1e-6)
    assert warmup_cosine_lr(10, 100, 10) == pytest.approx(1e-4)
    assert warmup_cosine_lr(55, 100, 10) == pytest.approx((1e-4 + 2e-5) / 2)
    assert warmup_cosine_lr(100, 100, 10) == pytest.approx(2e-5)
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-4)
    sched = warmup_cosine_scheduler(opt, 20, 5)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[5] == pytest.approx(1e-4) and lrs[20] == pytest.approx(2e-5)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6])) and all(a >= b for a, b in zip(lrs[5:20], lrs[6:21]))


def test_no_weight_decay_on_biases_norms_and_tokens() -> None:
    net = demo_net()
    decay, no_decay = param_groups_no_decay(net, 0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(skipped) == len(names)
    assert "encoder.blocks.0.attn.qkv.bias" in skipped and "encoder.norm.weight" in skipped
    assert "decoder_norm.bias" in skipped and "mask_token" in skipped and "encoder.cls_token" in skipped
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "style_smooth.weight" in decayed
    assert not any(n.endswith(".bias") for n in decayed)


# ------------------------------------------------------------------------------------ the step
def make_step(seed: int = 0, **cfg) -> MeDUETTrainStep:
    base = dict(total_steps=50, warmup_steps=0, mftd_start_step=0, lr=1e-3, checkpointing=())
    return MeDUETTrainStep(demo_net(seed), {**base, **cfg})


def test_train_step_lowers_the_loss_on_a_fixed_batch() -> None:
    step = make_step(checkpointing=("mixture", "decoder"), reencode_chunk=1)
    x, d = batch()
    mask = step.model.random_mix_mask(4, 64, torch.Generator().manual_seed(0))
    first = step(x, d, mask)
    for _ in range(5):
        last = step(x, d, mask)
    assert last["loss"] < first["loss"] - 0.1, (first, last)
    assert first["mftd"] > 0 and first["siqc"] > 0 and first["momentum"] == pytest.approx(0.997)


def plain_graph_loss(step: MeDUETTrainStep, x: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The step's objective written directly: every re-encoding in one autograd graph."""
    net, grid = step.model, (4, 4, 4)
    t = step.teacher.forward_teacher(x, 1 - mask)
    s = net(x, mask)
    rec_c, rec_s = net.reencode(s["pred"], grid)
    swap_c, swap_s = net.reencode(s["swap_pred"], grid)
    l_rec = demix_reconstruction_loss(s["pred"], net.patchify(x), mask)
    l_dom = domain_loss(s["domain_content"], s["domain_style"], d)[0]
    l_mftd = mftd_loss(rec_c, rec_s, t["content"], t["style"], mask)[0]
    l_siqc = siqc_loss(
        (s["content1"], s["content2"], swap_c), (s["style1"], s["style2"], swap_s),
        (t["content1"], t["content2"], t["swap_content"]), (t["style1"], t["style2"], t["swap_style"]),
    )[0]
    return l_rec + 0.2 * l_dom + 0.5 * l_mftd + 0.3 * l_siqc


@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_streamed_reencoding_equals_one_graph(chunk: int) -> None:
    """Chunked re-encoding (chunks straddling the MFTD / SiQC rows too) gives the loss and the
    gradients of the plain single-graph objective."""
    step = make_step(reencode_chunk=chunk)
    x, d = batch()
    x, d = x[:2], d[:2]
    mask = step.model.random_mix_mask(2, 64, torch.Generator().manual_seed(4))
    ref = plain_graph_loss(step, x, d, mask)
    ref.backward()
    ref_grads = [p.grad.clone() for p in step.model.parameters()]
    step.model.zero_grad(set_to_none=True)
    total, parts = step.compute_losses(x, d, mask)
    total.backward()
    torch.testing.assert_close(total, ref)
    assert parts["mftd"] > 0 and parts["siqc"] > 0
    for (name, p), g in zip(step.model.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_mftd_starts_at_its_step() -> None:
    step = make_step(mftd_start_step=1)
    x, d = batch()
    assert step(x, d)["mftd"] == 0.0
    assert step(x, d)["mftd"] > 0.0


def test_teacher_follows_the_ema_formula_in_the_step() -> None:
    step = make_step()
    x, d = batch()
    t_before = [p.clone() for p in step.teacher.parameters()]
    out = step(x, d)
    m = out["momentum"]
    for t, t_old, s in zip(step.teacher.parameters(), t_before, step.model.parameters()):
        torch.testing.assert_close(t, m * t_old + (1 - m) * s.detach())


def test_resume_gives_the_identical_next_step() -> None:
    x, d = batch()
    step = make_step(seed=0)
    step(x, d)
    step(x, d)
    buf = io.BytesIO()
    torch.save(step.state_dict(), buf)
    expected = step(x, d)
    resumed = make_step(seed=7)  # different initial weights, overwritten by the checkpoint
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = resumed(x, d)
    assert got == expected
    for a, b in zip(step.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(step.teacher.state_dict().values(), resumed.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_precision_options() -> None:
    with pytest.raises(ValueError):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_precision("half", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.warns(UserWarning) if resolve_precision("auto", torch.device("cpu")) == "fp32" else _no_warning():
        step = make_step(precision="bf16")
    x, d = batch()
    out = step(x[:2], d[:2])
    assert math.isfinite(out["loss"])
    with pytest.raises(ValueError):
        step(x[:3], d[:3])  # odd batch cannot be paired


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
