"""The conditioned latent DiT: shapes, adaLN-Zero, condition dropout, guidance, init from MeDUET."""

from __future__ import annotations

import pytest
import torch

from custom_nets.nets.latent_dit import (
    LDM_MODELS,
    LatentDiT,
    ldm_size_config,
    init_from_meduet,
    interpolate_pos_embed,
    ldm_config,
    objective_of,
)
from custom_nets.nets.vit import LatentViTEncoder, sincos_pos_embed_3d
from custom_nets.utils.checkpoint import save_stage_checkpoint
from custom_nets.utils.errors import CheckpointError

TINY = dict(in_channels=4, input_size=(16, 16, 8), patch_size=4, hidden_size=48, depth=2, num_heads=4,
            content_dim=24, style_dim=6)


def tiny_dit(**kw) -> LatentDiT:
    torch.manual_seed(0)
    return LatentDiT(**{**TINY, **kw})


def conditions(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 24, generator=g), torch.randn(b, 6, generator=g)


@pytest.mark.parametrize("spatial", [(16, 16, 8), (8, 8, 8), (12, 8, 4)])
def test_output_shape_for_several_crops(spatial):
    net = tiny_dit().eval()
    x = torch.randn(2, 4, *spatial)
    c, s = conditions(2)
    out = net(x, torch.tensor([5.0, 900.0]), c, s)
    assert out.shape == x.shape
    # positions follow the crop: the default grid uses the stored table, others fresh sin-cos
    grid = net.grid_of(spatial)
    assert torch.equal(net.pos_embed_for(grid)[0], sincos_pos_embed_3d(48, grid))


def test_bad_shapes_raise():
    net = tiny_dit()
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 4, 10, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="factor"):
        net(torch.randn(1, 4, 8, 8, 8), torch.tensor([1.0]), torch.randn(1, 5), None)
    with pytest.raises(ValueError, match="divisible by 6"):
        LatentDiT(**{**TINY, "hidden_size": 40, "num_heads": 4})


def test_untrained_model_ignores_conditions_through_zero_modulation():
    net = tiny_dit().eval()
    # a non-zero output layer, so that the output is not trivially zero
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.5)
    x = torch.randn(2, 4, 16, 16, 8)
    t = torch.tensor([300.0, 600.0])
    c1, s1 = conditions(2, 1)
    c2, s2 = conditions(2, 2)
    out1, out2 = net(x, t, c1, s1), net(x, t, c2, s2)
    assert out1.abs().max() > 0
    assert torch.allclose(out1, out2)
    assert torch.allclose(out1, net(x, t, None, None))
    assert not torch.allclose(out1, net(x + 1, t, c1, s1))
    # once content modulation is non-zero, the content matters (the check above can fail)
    torch.nn.init.normal_(net.blocks[0].adaLN_content[-1].weight, std=0.5)
    torch.nn.init.normal_(net.final_layer.adaLN_modulation[-1].weight, std=0.5)
    assert not torch.allclose(net(x, t, c1, s1), net(x, t, c2, s1))


def test_zero_init_of_every_modulation_and_output_layer():
    net = tiny_dit()
    for blk in net.blocks:
        for mod in (blk.adaLN_content, blk.adaLN_style, blk.adaLN_gate):
            assert mod[-1].weight.abs().sum() == 0 and mod[-1].bias.abs().sum() == 0
    assert net.final_layer.linear.weight.abs().sum() == 0
    assert torch.isclose(net.content_embedder.temperature, torch.tensor(0.1))


def test_condition_dropout_to_learned_null():
    net = tiny_dit()
    emb = net.content_embedder
    c = torch.randn(4, 24)
    forced = emb(c, 4, force_drop=torch.tensor([True, False, True, False]))
    assert torch.equal(forced[0], emb.null_embedding) and torch.equal(forced[2], emb.null_embedding)
    assert not torch.equal(forced[1], emb.null_embedding)
    assert torch.equal(emb(None, 3), emb.null_embedding.expand(3, -1))
    emb.eval()
    assert not (emb(c, 4) == emb.null_embedding).all(dim=1).any()  # no dropout in eval mode
    emb.train()
    torch.manual_seed(0)
    many = emb(torch.randn(4000, 24), 4000)
    rate = (many == emb.null_embedding).all(dim=1).float().mean().item()
    assert 0.17 < rate < 0.23  # 0.2 +- 4.7 sigma
    # content and style drop independently
    torch.manual_seed(0)
    dc = (net.content_embedder(torch.randn(4000, 24), 4000) == net.content_embedder.null_embedding).all(1)
    ds = (net.style_embedder(torch.randn(4000, 6), 4000) == net.style_embedder.null_embedding).all(1)
    both = (dc & ds).float().mean().item()
    assert 0.025 < both < 0.06  # 0.2 * 0.2 = 0.04


def test_guidance_combines_three_condition_variants():
    net = tiny_dit().eval()
    for p in net.parameters():  # random weights everywhere so every branch matters
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x = torch.randn(2, 4, 8, 8, 8)
    t = torch.tensor([250.0, 250.0])
    c, s = conditions(2)
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    v_nn = net(x, t, c, s, content_drop=yes, style_drop=yes)
    v_ns = net(x, t, c, s, content_drop=yes, style_drop=no)
    v_cn = net(x, t, c, s, content_drop=no, style_drop=yes)
    expect = v_nn + 2.0 * (v_ns - v_nn) + 3.0 * (v_cn - v_nn)
    got = net.forward_with_guidance(x, t, c, s, content_scale=3.0, style_scale=2.0)
    assert torch.allclose(got, expect, atol=1e-5)
    assert not torch.allclose(v_ns, v_nn)


def fake_ssl_checkpoint(path, embed_dim=48, depth=2, heads=4, extra_pos=False):
    torch.manual_seed(3)
    enc = LatentViTEncoder(embed_dim=embed_dim, depth=depth, num_heads=heads)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd["content_head.weight"] = torch.randn(embed_dim, embed_dim)
    if extra_pos:
        sd["encoder.pos_embed"] = torch.randn(1, 216, embed_dim)
    enc_args = dict(in_channels=4, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=heads, grid=[6, 6, 6])
    save_stage_checkpoint(sd, path, "meduet_ssl", network={"encoder": enc_args}, content_dim=embed_dim,
                          style_dim=embed_dim // 4, domains=["a", "b"], latent_channels=4)
    return enc


def test_init_from_meduet_loads_patch_embedding_and_blocks(tmp_path):
    ckpt = tmp_path / "model.pt"
    enc = fake_ssl_checkpoint(ckpt)
    net = tiny_dit()
    loaded = init_from_meduet(net, ckpt)
    assert "patch_embed.weight" in loaded and "blocks.1.mlp.fc2.weight" in loaded
    assert not any("adaLN" in k for k in loaded)
    esd, dsd = enc.state_dict(), net.state_dict()
    expected = [k for k in esd if k.startswith(("patch_embed.", "blocks."))]
    assert sorted(loaded) == sorted(expected)
    for k in expected:
        assert torch.equal(dsd[k], esd[k]), k
    # modulation stays zero: the initialised generator still ignores its conditions
    assert all(b.adaLN_gate[-1].weight.abs().sum() == 0 for b in net.blocks)
    # the positions are the fixed sin-cos table of the generator's grid (4x4x2), not the encoder's 6^3
    assert torch.equal(net.pos_embed[0], sincos_pos_embed_3d(48, (4, 4, 2)))


def test_init_from_meduet_refuses_other_width_depth_and_stage(tmp_path):
    ckpt = tmp_path / "wide" / "model.pt"
    fake_ssl_checkpoint(ckpt, embed_dim=96, heads=4)
    with pytest.raises(CheckpointError, match=r"width 96 .* generator width 48"):
        init_from_meduet(tiny_dit(), ckpt)
    deep = tmp_path / "deep" / "model.pt"
    fake_ssl_checkpoint(deep, depth=3)
    with pytest.raises(CheckpointError, match=r"depth 3.*depth 2"):
        init_from_meduet(tiny_dit(), deep)
    other = tmp_path / "other" / "model.pt"
    save_stage_checkpoint({"w": torch.zeros(1)}, other, "meduet_vae")
    with pytest.raises(CheckpointError, match="meduet_ssl"):
        init_from_meduet(tiny_dit(), other)


def test_learned_position_table_is_resampled_for_the_generator(tmp_path):
    ckpt = tmp_path / "model.pt"
    fake_ssl_checkpoint(ckpt, extra_pos=True)
    with pytest.raises(CheckpointError, match="learned_pos"):
        init_from_meduet(tiny_dit(), ckpt)
    net = tiny_dit(learned_pos=True)
    loaded = init_from_meduet(net, ckpt)
    assert "pos_embed" in loaded and net.pos_embed.shape == (1, 32, 48)


def test_interpolate_pos_embed():
    pos = sincos_pos_embed_3d(12, (6, 6, 6))
    assert torch.equal(interpolate_pos_embed(pos, (6, 6, 6), (6, 6, 6))[0], pos)
    const = torch.ones(1, 8, 12) * 3
    out = interpolate_pos_embed(const, (2, 2, 2), (4, 6, 2))
    assert out.shape == (1, 48, 12) and torch.allclose(out, torch.full_like(out, 3.0))
    # a table varying along x only keeps varying along x only
    ramp = torch.arange(4.0)[:, None, None, None].expand(4, 2, 2, 1).reshape(1, 16, 1)
    res = interpolate_pos_embed(ramp, (4, 2, 2), (8, 2, 2)).reshape(8, 2, 2)
    assert torch.allclose(res[:, 0, 0], res[:, 1, 1]) and (res[1:, 0, 0] >= res[:-1, 0, 0]).all()
    with pytest.raises(ValueError, match="rows"):
        interpolate_pos_embed(torch.zeros(1, 7, 12), (2, 2, 2), (4, 4, 4))


def test_size_factories():
    assert ldm_config("SiT-B/4") == dict(patch_size=4, hidden_size=768, depth=12, num_heads=12)
    assert ldm_config("DiT-S/4")["hidden_size"] == 384
    assert ldm_config("DiT-L/4")["depth"] == 24
    assert objective_of("SiT-L/4") == "flow" and objective_of("DiT-B/4") == "ddpm"
    assert set(LDM_MODELS) == {f"{f}-{s}/4" for f in ("DiT", "SiT") for s in "SBL"}
    with pytest.raises(ValueError, match="unknown generator"):
        ldm_config("DiT-XL/2")
    # the bundles' model_size id: "paper" is the B network, "demo" the tiny one of configs/demo.json
    assert ldm_size_config("paper") == dict(hidden_size=768, depth=12, num_heads=12) == ldm_size_config("B")
    assert ldm_size_config("demo") == dict(hidden_size=48, depth=2, num_heads=4)
    with pytest.raises(ValueError, match="unknown generator size"):
        ldm_size_config("XL")
    net = LDM_MODELS["SiT-S/4"](depth=1, input_size=(8, 8, 8), content_dim=8, style_dim=2)
    assert net.hidden_size == 384 and len(net.blocks) == 1 and net.network_args["hidden_size"] == 384


# ------------------------------------------------------------------------------ content token maps
def test_content_map_starts_without_effect_and_is_dropped_with_the_content():
    """``content_map``: the zero-initialised projection leaves the network's output as without a map;
    once trained (here: set) the map changes it, a finer map is averaged over whole cells, and dropping
    the content removes the map's effect too (the null of both content inputs)."""
    vec = tiny_dit().eval()
    net = tiny_dit(content_map=True).eval()
    assert net.network_args["content_map"] is True and "content_map" not in vec.network_args
    torch.nn.init.normal_(vec.final_layer.linear.weight, std=0.5)
    for blk in vec.blocks:
        torch.nn.init.normal_(blk.adaLN_gate[-1].bias, std=1.0)  # open the gates: tokens reach the output
    missing = net.load_state_dict(vec.state_dict(), strict=False).missing_keys
    assert set(missing) == {"content_map_embed.1.weight", "content_map_embed.1.bias"}
    x, t = torch.randn(2, 4, 16, 16, 8), torch.tensor([5.0, 900.0])
    c, s = conditions(2)
    cmap = torch.randn(2, 24, 4, 4, 2)
    torch.testing.assert_close(net(x, t, c, s, content_map=cmap), vec(x, t, c, s))  # zero projection: no effect
    torch.nn.init.normal_(net.content_map_embed[-1].weight, std=0.5)
    with_map = net(x, t, c, s, content_map=cmap)
    assert (with_map - net(x, t, c, s, content_map=torch.randn(2, 24, 4, 4, 2))).abs().mean() > 1e-3
    fine = cmap.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)  # same map, 2x finer grid
    torch.testing.assert_close(net(x, t, c, s, content_map=fine), with_map)
    drop = torch.tensor([True, False])
    dropped = net(x, t, c, s, content_drop=drop, content_map=cmap)
    torch.testing.assert_close(dropped[0], net(x, t, None, s)[0])  # sample 0: no content at all
    torch.testing.assert_close(dropped[1], with_map[1])
    guided = net.forward_with_guidance(x, t, c, s, 2.0, 1.5, content_map=cmap)
    assert guided.shape == x.shape
    with pytest.raises(ValueError, match="content map"):
        net(x, t, c, s, content_map=torch.randn(2, 23, 4, 4, 2))
    with pytest.raises(ValueError, match="without content_map"):
        vec(x, t, c, s, content_map=cmap)


def test_content_map_projection_learns_in_training_mode():
    net = tiny_dit(content_map=True, condition_dropout=0.0).train()
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.5)
    x = torch.randn(2, 4, 16, 16, 8)
    c, s = conditions(2)
    net(x, torch.tensor([5.0, 900.0]), c, s, content_map=torch.randn(2, 24, 4, 4, 2)).pow(2).mean().backward()
    assert net.content_map_embed[-1].weight.grad.abs().sum() > 0
