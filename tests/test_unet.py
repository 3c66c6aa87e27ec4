import dataclasses
import math

import pytest
import torch
from torch import nn

from lit_diffusion.models.conditions import Conditioning as C
from lit_diffusion.models.layers import SpatialTransformer, grid_embedding, timestep_embedding
from lit_diffusion.models.unet import UNet, UNetConfig

TINY = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(1, 2), num_heads=2, context_dim=8, norm_groups=8)


def tiny_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY, **overrides}))
    # residual branches and the output conv start at zero (the net is then x-independent of t and context):
    # randomise them, as training would, for behaviour tests
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                nn.init.normal_(p, std=0.1)
    return net


def inputs(batch=2, size=8, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([3, 700][:batch])
    ctx = torch.randn(batch, length, 8, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, :3] = True
    mask[1:, :1] = True
    return x, t, ctx, mask


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 5.0, 250.0])
    emb = timestep_embedding(t, 6)
    assert emb.shape == (3, 6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    for j in range(3):
        w = math.exp(-math.log(10000) * j / 3)
        assert emb[1, j].item() == pytest.approx(math.cos(5 * w), abs=1e-6)
        assert emb[1, 3 + j].item() == pytest.approx(math.sin(5 * w), abs=1e-6)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, -1], torch.zeros(3))
    assert torch.allclose(timestep_embedding(t, 6, max_period=100)[2, 1], torch.tensor(math.cos(250 * 100 ** (-1 / 3))))


def test_grid_embedding_encodes_row_then_column():
    emb = grid_embedding(2, 3, 8)  # rows then columns, 4 channels each: [cos(p), cos(p/100), sin(p), sin(p/100)]
    assert emb.shape == (6, 8)
    for index in range(6):
        row, col = divmod(index, 3)
        for offset, p in ((0, row), (4, col)):
            expected = [math.cos(p), math.cos(p / 100), math.sin(p), math.sin(p / 100)]
            assert emb[index, offset:offset + 4].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("pos_embed", [False, True])
def test_spatial_transformer_position_embedding_tells_positions_apart(pos_embed):
    torch.manual_seed(0)
    st = SpatialTransformer(16, heads=2, head_dim=8, context_dim=8, groups=8, pos_embed=pos_embed)
    nn.init.normal_(st.proj_out.weight, std=0.1)
    x = torch.randn(1, 16, 1, 1).expand(2, 16, 4, 4)  # every position holds the same features
    out = st(x, torch.randn(2, 3, 8))
    spread = (out - out[:, :, :1, :1]).abs().amax()
    # without positions, identical tokens attend identically and stay identical
    assert spread > 1e-3 if pos_embed else spread < 1e-5


def test_spatial_transformer_starts_as_identity():
    st = SpatialTransformer(16, heads=2, head_dim=8, context_dim=8, groups=8)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(st(x, torch.randn(2, 3, 8)), x)


@pytest.mark.parametrize("overrides,size", [({}, 8), ({"channel_mult": (1, 2, 2), "num_res_blocks": 2}, 16),
                                            ({"context_dim": None, "head_dim": 8, "scale_shift_norm": False}, 8)])
def test_unet_output_shape_and_zero_init(overrides, size):
    net = UNet(UNetConfig(**{**TINY, **overrides}))
    x, t, ctx, mask = inputs(size=size)
    if net.config.context_dim is None:
        ctx = mask = None
    out = net(x, t, C(context=ctx, mask=mask))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


@pytest.mark.parametrize("context_layers", [0, 1])
def test_unet_depends_on_time_and_context_but_not_on_padding(context_layers):
    net = tiny_unet(context_layers=context_layers, context_heads=2).eval()
    x, t, ctx, mask = inputs()
    out = net(x, t, C(context=ctx, mask=mask))
    assert not torch.allclose(net(x, torch.tensor([4, 700]), C(context=ctx, mask=mask))[0], out[0])
    ctx_real = ctx.clone()
    ctx_real[0, 0] += torch.linspace(-1, 1, 8)
    assert not torch.allclose(net(x, t, C(context=ctx_real, mask=mask))[0], out[0])
    ctx_pad = ctx.clone()
    ctx_pad[~mask] = 50.0
    assert torch.allclose(net(x, t, C(context=ctx_pad, mask=mask)), out, atol=1e-5)
    assert torch.allclose(net(x, 700, C(context=ctx, mask=mask))[1], out[1], atol=1e-6)  # a scalar t is broadcast


@pytest.mark.parametrize("context_layers", [0, 1])
def test_a_caption_without_real_tokens_conditions_on_nothing(context_layers):
    net = tiny_unet(context_layers=context_layers, context_heads=2).eval()
    x, t, ctx, mask = inputs()
    mask[1] = False  # caption 1 is all padding
    out = net(x, t, C(context=ctx, mask=mask))
    garbage = ctx.clone()
    garbage[1] = torch.randn(5, 8) * 100
    changed = net(x, t, C(context=garbage, mask=mask))
    assert torch.isfinite(out).all()
    assert torch.equal(changed[1], out[1]) and torch.equal(changed[0], out[0])
    # and it is not the unconditional path by accident: caption 0's real tokens still count
    garbage[0, 0] += 1.0
    assert not torch.allclose(net(x, t, C(context=garbage, mask=mask))[0], out[0])


def test_context_encoder_is_bidirectional_over_real_tokens_only():
    net = tiny_unet(context_layers=2, context_heads=2).eval()
    x, t, ctx, mask = inputs()

    def encoded(c):
        return net.encode_context(c, mask)

    base = encoded(ctx)
    later = ctx.clone()
    later[0, 2] += torch.linspace(-1, 1, 8)  # the last real token of caption 0 (not a constant: LayerNorms)
    moved = encoded(later)
    # the first token sees a later one (a causal encoder could not), and caption 1 is untouched
    assert (moved[0, 0] - base[0, 0]).abs().max() > 1e-3
    assert torch.equal(moved[1], base[1])
    padded = ctx.clone()
    padded[~mask] = 50.0
    torch.testing.assert_close(encoded(padded)[mask], base[mask])
    assert (net(x, t, C(context=later, mask=mask))[0] - net(x, t, C(context=ctx, mask=mask))[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="context_layers needs a context_dim"):
        UNet(UNetConfig(**{**TINY, "context_dim": None, "context_layers": 1}))


def test_pooled_embedding_is_added_to_the_timestep_embedding():
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY, "pooled_dim": 5})).eval()
    for p in net.parameters():  # the zero-initialised output would hide every input
        if p.ndim > 1 and not p.any():
            p.data.normal_(std=0.05)
    x, t, ctx, mask = inputs()
    pooled = torch.randn(2, 5)
    out = net(x, t, C(context=ctx, mask=mask, pooled=pooled))
    moved = pooled.clone()
    moved[0] += 1.0
    changed = net(x, t, C(context=ctx, mask=mask, pooled=moved))
    assert not torch.allclose(changed[0], out[0]) and torch.equal(changed[1], out[1])
    with pytest.raises(ValueError, match=r"pooled_dim=5 needs cond.pooled \[2, 5\], got None"):
        net(x, t, C(context=ctx, mask=mask))
    with pytest.raises(ValueError, match="no pooled_dim"):
        tiny_unet()(x, t, C(context=ctx, mask=mask, pooled=pooled))


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx, mask = inputs()
    grads = []
    for use_checkpoint in (False, True):
        net = tiny_unet(use_checkpoint=use_checkpoint).train()
        net(x, t, C(context=ctx, mask=mask)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(net.parameters()))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert grads[0]["input_blocks.0.0.weight"].abs().sum() > 0


def test_channels_last_gives_the_same_output():
    net = tiny_unet().eval()
    x, t, ctx, mask = inputs()
    ref = net(x, t, C(context=ctx, mask=mask))
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t, C(context=ctx, mask=mask))
    assert torch.allclose(out, ref, atol=1e-5)


def test_config_from_dict_reads_command_line_strings():
    cfg = UNetConfig.from_dict({"model_channels": "48", "channel_mult": "[1, 2]", "mid_attention": "false",
                                "head_dim": "null", "dropout": "0.1"})
    assert (cfg.model_channels, cfg.channel_mult, cfg.mid_attention, cfg.head_dim, cfg.dropout) == \
        (48, (1, 2), False, None, 0.1)


def test_config_from_dict_and_clear_errors():
    cfg = UNetConfig.from_dict({**TINY, "channel_mult": [1, 2], "attention_resolutions": [2]})
    assert cfg.channel_mult == (1, 2) and UNetConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys \\['channels'\\]"):
        UNet({"channels": 3})
    net = UNet(TINY)
    x, t, ctx, mask = inputs()
    with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
        net(x[:, :3], t, C(context=ctx, mask=mask))
    with pytest.raises(ValueError, match="height and width must be multiples of 2"):
        net(torch.randn(2, 4, 7, 7), t, C(context=ctx, mask=mask))
    with pytest.raises(ValueError, match="called without context"):
        net(x, t)
