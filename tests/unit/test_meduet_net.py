"""MeDUET network: shapes, parameter count, token mixing helpers, style smoothing, batching."""

from __future__ import annotations

import pytest
import torch

from custom_nets.nets.meduet import (
    MeDUET,
    gather_tokens,
    meduet_config,
    mix_tokens,
    random_mix_mask,
    split_ids,
)
from custom_nets.nets.vit import LatentViTEncoder

CROP = 16  # 4^3 = 64 tokens with patch 4


@pytest.fixture(scope="module")
def demo_net() -> MeDUET:
    torch.manual_seed(0)
    return MeDUET(**meduet_config("demo"))


def test_paper_scale_parameter_count_and_keys() -> None:
    with torch.device("meta"):  # construction only: shapes without allocating or initialising
        net = MeDUET(**meduet_config("B"))
    n = sum(p.numel() for p in net.parameters())
    assert 104e6 < n < 106e6, n  # "about 105 M"
    assert sum(p.numel() for p in net.encoder.parameters()) == pytest.approx(85.25e6, rel=1e-3)
    assert (net.content_dim, net.style_dim) == (768, 192)
    assert net.decoder_pred.out_features == 4 * 4**3
    assert len(net.decoder_blocks) == 8 and net.decoder_blocks[0].attn.num_heads == 12
    keys = net.state_dict().keys()
    assert {"encoder.patch_embed.weight", "encoder.cls_token", "encoder.blocks.11.mlp.fc2.weight", "encoder.norm.weight"} <= set(keys)
    assert not any("pos_embed" in k for k in keys)  # fixed positions are not saved
    # the encoder part loads strictly into a stand-alone LatentViTEncoder
    enc = {k[len("encoder."):]: v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    with torch.device("meta"):
        LatentViTEncoder(**meduet_config("B")["encoder"]).load_state_dict(enc, strict=True, assign=True)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        MeDUET(**{**meduet_config("demo"), "mix_ratio": 1.0})
    with pytest.raises(ValueError):
        MeDUET(**{**meduet_config("demo"), "style_kernel": 2})
    with pytest.raises(ValueError):
        meduet_config("XL")


def test_patchify_roundtrip(demo_net: MeDUET) -> None:
    x = torch.randn(2, 4, CROP, CROP, 8)
    tokens = demo_net.patchify(x)
    assert tokens.shape == (2, 4 * 4 * 2, 4**3 * 4)
    assert torch.equal(demo_net.unpatchify(tokens, (4, 4, 2)), x)


def test_mix_mask_and_split() -> None:
    g = torch.Generator().manual_seed(1)
    mask = random_mix_mask(3, 216, 0.5, g)
    assert mask.shape == (3, 216) and torch.all(mask.sum(1) == 108)
    ids1, ids2 = split_ids(mask)
    assert ids1.shape == ids2.shape == (3, 108)
    assert torch.all(mask.gather(1, ids1) == 0) and torch.all(mask.gather(1, ids2) == 1)
    assert torch.all(ids1.diff(dim=1) > 0) and torch.all(ids2.diff(dim=1) > 0)  # ascending token order
    tokens = torch.randn(3, 216, 5)
    mixed = mix_tokens(tokens, mask)
    assert torch.equal(gather_tokens(mixed, ids1), gather_tokens(tokens, ids1))
    assert torch.equal(gather_tokens(mixed, ids2), gather_tokens(tokens.flip(0), ids2))
    with pytest.raises(ValueError):
        split_ids(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


def test_encode_factors_shapes(demo_net: MeDUET) -> None:
    x = torch.randn(2, 4, CROP, CROP, CROP)
    content, style = demo_net(x)
    assert content.shape == (2, 64, 48) and style.shape == (2, 64, 12)


def test_pretrain_pass_shapes(demo_net: MeDUET) -> None:
    b, n = 4, 64
    x = torch.randn(b, 4, CROP, CROP, CROP)
    mask = demo_net.random_mix_mask(b, n, torch.Generator().manual_seed(0))
    out = demo_net(x, mask)
    assert out["content1"].shape == (b, 32, 48) and out["style2"].shape == (b, 32, 12)
    assert out["domain_content"].shape == (2 * b, 10) and out["domain_style"].shape == (2 * b, 10)
    assert out["pred"].shape == (2 * b, n, 256) and out["swap_pred"].shape == (2 * b, n, 256)
    content, style = demo_net.reencode(out["pred"], (4, 4, 4))
    assert content.shape == (2 * b, n, 48) and style.shape == (2 * b, n, 12)
    t = demo_net.forward_teacher(x, 1 - mask)
    assert t["content"].shape == (b, n, 48) and t["swap_content"].shape == (2 * b, n, 48)
    assert set(demo_net.forward_teacher(x, 1 - mask, swap=False)) == {"content", "style"}
    only_rec = demo_net(x, mask, swap_styles=False)
    assert "swap_pred" not in only_rec


def test_batched_passes_equal_separate_passes(demo_net: MeDUET) -> None:
    """The teacher's shared [clean, mixture] pass and the batched decoding of streams and swaps
    give what separate passes give."""
    demo_net.eval()
    b, n = 4, 64
    x = torch.randn(b, 4, CROP, CROP, CROP)
    mask = demo_net.random_mix_mask(b, n, torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = demo_net.forward_teacher(x, mask)
        content, style = demo_net.encode_factors(x)
        torch.testing.assert_close(t["content"], content, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t["style"], style, rtol=1e-4, atol=1e-5)
        # partner factors are the flipped factors: encoding x.flip(0) flips the result
        c_rev, _ = demo_net.encode_factors(x.flip(0))
        torch.testing.assert_close(c_rev, content.flip(0), rtol=1e-4, atol=1e-5)
        s = demo_net(x, mask)
        ids1 = s["ids1"]
        alone = demo_net.decode(demo_net.fuse(s["content1"], s["style2"]), ids1, (4, 4, 4))  # x12 by itself
        torch.testing.assert_close(s["swap_pred"][:b], alone, rtol=1e-4, atol=1e-5)
        stream_b = demo_net.decode(demo_net.fuse(s["content2"], s["style2"]), s["ids2"], (4, 4, 4))
        torch.testing.assert_close(s["pred"][b:], stream_b, rtol=1e-4, atol=1e-5)
    demo_net.train()


def test_style_smoothing_ignores_the_other_source(demo_net: MeDUET) -> None:
    """A source's style factors do not depend on the other source's tokens (zeros while smoothing)
    but do depend on their own neighbours along the token sequence."""
    b, n, d = 2, 64, 48
    z = torch.randn(b, n, d)
    mask = demo_net.random_mix_mask(b, n, torch.Generator().manual_seed(3))
    ids1, ids2 = split_ids(mask)
    _, s1, _, s2 = demo_net.factorize_mixture(z, mask, ids1, ids2)
    z_other = z + 5.0 * mask.unsqueeze(-1) * torch.randn_like(z)  # change only source 2's tokens
    _, s1_b, _, s2_b = demo_net.factorize_mixture(z_other, mask, ids1, ids2)
    torch.testing.assert_close(s1, s1_b)
    assert not torch.allclose(s2, s2_b)
    # same operator as the plain pass with source-2 tokens zeroed
    plain = demo_net.smooth_style(demo_net.style_head(z) * (1 - mask).unsqueeze(-1))
    torch.testing.assert_close(s1, gather_tokens(plain, ids1))


def test_activation_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    net = MeDUET(**meduet_config("demo"))
    x = torch.randn(2, 4, CROP, CROP, CROP)
    mask = net.random_mix_mask(2, 64, torch.Generator().manual_seed(0))

    def grads(parts: tuple[str, ...]) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        net.set_checkpointing(parts)
        out = net(x, mask)
        loss = out["pred"].square().mean() + out["swap_pred"].mean()
        (loss + out["domain_content"].square().mean() + out["domain_style"].square().mean()).backward()
        return [p.grad.clone() for p in net.parameters()]

    ref = grads(())
    for a, b in zip(ref, grads(("mixture", "decoder"))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        net.set_checkpointing(("encoder",))
