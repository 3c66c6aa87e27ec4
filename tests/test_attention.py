import math

import pytest
import torch

from lit_diffusion.models.attention import Attention, attend


def naive(q, k, v, key_padding_mask=None, causal=False):
    """softmax(q k^T / sqrt(d)) v written out, with the rule: a query that sees no key gives zeros."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, M]
    visible = torch.ones(scores.shape, dtype=torch.bool)
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, None, :]
    if causal:
        visible &= torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    weights = torch.where(visible, scores, -torch.inf).softmax(-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("causal", [False, True])
def test_attend_matches_written_out_softmax_with_padding_and_empty_rows(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = attend(q, k, v, mask, causal=causal)
    torch.testing.assert_close(out, naive(q, k, v, mask, causal))
    assert torch.isfinite(out).all()
    assert out[2].abs().max() == 0  # every key hidden: zeros, not NaN
    torch.testing.assert_close(attend(q, k, v, causal=causal), naive(q, k, v, causal=causal))


def test_attend_refuses_bad_shapes():
    q = torch.randn(1, 1, 3, 4)
    k = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        attend(q, k, k, causal=True)
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 3\), expected \[1, 5\]"):
        attend(q, k, k, torch.ones(1, 3, dtype=torch.bool))


def test_cross_attention_ignores_padded_context_and_matches_torch_multihead():
    torch.manual_seed(0)
    layer = Attention(8, context_dim=8, heads=2, qkv_bias=True).double().eval()
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([layer.to_q.bias, layer.to_k.bias, layer.to_v.bias]))
        ref.out_proj.weight.copy_(layer.to_out[0].weight)
        ref.out_proj.bias.copy_(layer.to_out[0].bias)
    x, ctx = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, ctx, mask)
    torch.testing.assert_close(out, ref(x, ctx, ctx, key_padding_mask=~mask, need_weights=False)[0])
    garbage = ctx.clone()
    garbage[0, 2:] = 1e3  # what sits under the padding does not matter
    torch.testing.assert_close(layer(x, garbage, mask), out)


def test_attention_over_padded_context_equals_attention_over_its_real_tokens():
    torch.manual_seed(0)
    attn = Attention(16, context_dim=8, heads=2)
    x = torch.randn(2, 10, 16)
    ctx = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = attn(x, ctx, mask)
    assert torch.allclose(out[0], attn(x[:1], ctx[:1, :3])[0], atol=1e-5)
    assert torch.allclose(out[1], attn(x[1:], ctx[1:, :5])[0], atol=1e-5)


def test_a_query_with_no_real_key_gets_the_output_bias():
    torch.manual_seed(0)
    attn = Attention(16, context_dim=8, heads=2)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    out = attn(torch.randn(2, 4, 16), torch.randn(2, 3, 8), mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], attn.to_out[0].bias.expand(4, 16))  # attends to nothing
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        attn(torch.randn(2, 4, 16), torch.randn(2, 3, 8), mask[:, :2])
