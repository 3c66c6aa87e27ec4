"""DiT: adaLN-Zero's zero start, patches, permutation equivariance without positions, the caption's padding,
gradient checkpointing, the DiT paper's parameter count, and one DDP step on 2 gloo processes."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_diffusion.models.conditions import Conditioning as C
from lit_diffusion.models.dit import DiT, DiTConfig, JointBlock, patchify, unpatchify

TINY = dict(in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=8,
            pooled_dim=6)
MODES = {"cross": dict(joint_attention=False), "joint": dict(joint_attention=True)}


def tiny_dit(mode: str = "cross", randomise: bool = True, **overrides) -> DiT:
    torch.manual_seed(0)
    net = DiT(DiTConfig(**{**TINY, **MODES[mode], **overrides}))
    if randomise:  # a trained-looking DiT: at initialisation its output is 0 whatever the input
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    nn.init.normal_(p, std=0.1)
    return net


def inputs(batch=2, height=8, width=8, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.tensor([3, 700, 250, 999][:batch])
    ctx = torch.randn(batch, length, 8, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, :3] = True
    mask[1:, :1] = True
    pooled = torch.randn(batch, 6, generator=g)
    return x, t, ctx, mask, pooled


@pytest.mark.parametrize("mode", MODES)
def test_output_is_exactly_zero_and_every_block_the_identity_at_initialisation(mode):
    net = tiny_dit(mode, randomise=False)
    seen = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    x, t, ctx, mask, pooled = inputs()
    out = net(x, t, C(context=ctx, mask=mask, pooled=pooled))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert len(seen) == net.config.depth
    for args, block_out in seen:
        if mode == "joint":  # (image, text) in, (image, text) out; the last block's text stream ends there
            assert torch.equal(block_out[0], args[0])
            assert block_out[1] is None or torch.equal(block_out[1], args[1])
        else:
            assert torch.equal(block_out, args[0])
    # ... and yet training can start: the final layer gets a gradient
    F.mse_loss(out, x).backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_matches_unfold_and_unpatchify_inverts_it(p):
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, p)  # [B, N, p*p*C] with features ordered (row, column, channel)
    # torch's unfold orders each patch (channel, row, column): reorder it to compare
    unfolded = F.unfold(x, p, stride=p).transpose(1, 2)  # [B, N, C*p*p]
    expected = unfolded.unflatten(-1, (3, p, p)).permute(0, 1, 3, 4, 2).flatten(2)
    assert torch.equal(tokens, expected)
    assert torch.equal(unpatchify(tokens, p, 8 // p, 12 // p), x)


@pytest.mark.parametrize("mode", MODES)
def test_without_positions_permuting_the_patches_permutes_the_output(mode):
    p, h, w = 2, 3, 4  # a 6 x 8 latent, 12 patches
    x, t, ctx, mask, pooled = inputs(height=h * p, width=w * p)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))

    def shuffle(img):
        return unpatchify(patchify(img, p)[:, perm], p, h, w)

    for pos_embed in (False, True):
        net = tiny_dit(mode, pos_embed=pos_embed).eval()
        with torch.no_grad():
            out, out_of_shuffled = net(x, t, C(context=ctx, mask=mask, pooled=pooled)), net(shuffle(x), t, C(context=ctx, mask=mask, pooled=pooled))
        equivariant = torch.allclose(out_of_shuffled, shuffle(out), atol=1e-5)
        assert equivariant == (not pos_embed)  # the positions are what tells the patches apart


@pytest.mark.parametrize("mode", MODES)
def test_padding_tokens_of_the_caption_do_not_change_the_output(mode):
    net = tiny_dit(mode).eval()
    x, t, ctx, mask, pooled = inputs()
    garbage = ctx.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    changed = ctx.clone()
    changed[0, 0] += 1.0  # a real token of the first caption
    with torch.no_grad():
        out = net(x, t, C(context=ctx, mask=mask, pooled=pooled))
        torch.testing.assert_close(net(x, t, C(context=garbage, mask=mask, pooled=pooled)), out, rtol=0, atol=1e-5)
        # the caption does reach the image
        assert (net(x, t, C(context=changed, mask=mask, pooled=pooled))[0] - out[0]).abs().max() > 1e-3
        # and so does the pooled embedding
        assert (net(x, t, C(context=ctx, mask=mask, pooled=pooled.flip(0))) - out).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(mode):
    x, t, ctx, mask, pooled = inputs()
    grads, calls = {}, {}
    for use_checkpoint in (False, True):
        net = tiny_dit(mode, use_checkpoint=use_checkpoint).train()
        calls[use_checkpoint] = 0

        def count(*_):
            calls[use_checkpoint] += 1

        net.blocks[0].register_forward_pre_hook(count)  # a pre-hook: the recomputation stops early, before the end
        F.mse_loss(net(x, t, C(context=ctx, mask=mask, pooled=pooled)), x).backward()
        grads[use_checkpoint] = {n: p.grad for n, p in net.named_parameters()}
    assert calls == {False: 1, True: 2}  # checkpointing runs the block's forward again in backward
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert g is not None, f"{name} got no gradient"
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_dit_xl2_parameter_count_matches_the_paper():
    # DiT-XL/2 (Peebles & Xie 2023, Table 4: 675M) has 675,129,632 parameters as its repository prints them,
    # class-conditional on ImageNet: it includes a 1001 x 1152 label table and a fixed 256 x 1152 position
    # parameter, and predicts 8 channels (eps and the variance). Ours keeps positions out of the parameters and
    # has no label table: unconditional with 8 output channels, the rest must match to the parameter.
    with torch.device("meta"):  # shapes only: no 2.7 GB of weights
        net = DiT(DiTConfig.from_preset("XL/2", in_channels=4, out_channels=8, context_dim=None))
    assert sum(p.numel() for p in net.parameters()) == 675_129_632 - 1001 * 1152 - 256 * 1152
    # the blocks' self-attention + MLP + adaLN: 28 x (4 d^2 + 4 d + 8 d^2 + 5 d + 6 d^2 + 6 d) for d = 1152
    d = 1152
    assert sum(p.numel() for p in net.blocks.parameters()) == 28 * (18 * d * d + 15 * d)


def test_presets_and_config_from_dict():
    xl = DiTConfig.from_preset("DiT-XL/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.patch_size) == (1152, 28, 16, 2)
    sizes = {name: DiTConfig.from_preset(f"{name}/4") for name in ("S", "B", "L")}
    assert [(c.hidden_size, c.depth, c.num_heads, c.patch_size) for c in sizes.values()] == [
        (384, 12, 6, 4), (768, 12, 12, 4), (1024, 24, 16, 4)]
    # a config file names the preset; command-line overrides arrive as strings; explicit keys win
    cfg = DiTConfig.from_dict({"preset": "B/2", "depth": "6", "context_dim": "768", "joint_attention": "true"})
    assert (cfg.hidden_size, cfg.depth, cfg.context_dim, cfg.joint_attention) == (768, 6, 768, True)
    assert DiT({**TINY, "use_checkpoint": True}).config.use_checkpoint
    with pytest.raises(ValueError, match=r"unknown DiTConfig keys \['widht'\]"):
        DiTConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="unknown DiT preset 'M/2'"):
        DiTConfig.from_preset("M/2")
    with pytest.raises(ValueError, match=r"patch_size must be one of \(1, 2, 4\), got 8"):
        DiTConfig.from_preset("S/8")
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        DiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="joint_attention needs a context_dim"):
        DiTConfig(context_dim=None, joint_attention=True)


def test_bad_inputs_are_refused_by_name():
    net = tiny_dit(patch_size=4)
    x, t, ctx, mask, pooled = inputs(height=8, width=8)
    with pytest.raises(ValueError, match="DiT input 8x6: height and width must be multiples of patch_size 4"):
        net(x[..., :6], t, C(context=ctx, mask=mask, pooled=pooled))
    with pytest.raises(ValueError, match="expects 4 input channels, got 3"):
        net(x[:, :3], t, C(context=ctx, mask=mask, pooled=pooled))
    with pytest.raises(ValueError, match=r"context_dim=8 needs context \[2, L, 8\], got None"):
        net(x, t, C(context=None, mask=None, pooled=pooled))
    with pytest.raises(ValueError, match=r"pooled_dim=6 needs cond.pooled \[2, 6\], got None"):
        net(x, t, C(context=ctx, mask=mask))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        net(x, t, C(context=ctx, mask=mask[:, :2], pooled=pooled))
    with pytest.raises(ValueError, match="no pooled_dim"):
        tiny_dit(pooled_dim=None)(x, t, C(context=ctx, mask=mask, pooled=pooled))


def test_joint_blocks_leave_no_parameter_unused():
    # the last block's text stream computes only keys and values: every parameter gets a gradient (DDP needs it)
    net = tiny_dit("joint")
    assert isinstance(net.blocks[-1], JointBlock) and net.blocks[-1].text.pre_only
    assert not hasattr(net.blocks[-1].text, "to_q") and hasattr(net.blocks[0].text, "to_q")
    x, t, ctx, mask, pooled = inputs()
    F.mse_loss(net(x, t, C(context=ctx, mask=mask, pooled=pooled)), x).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()] == []


WORLD, LOCAL = 2, 2
DDP_MODES = {"cross": dict(use_checkpoint=True), "joint": dict(joint_attention=True)}


def _batch():
    x, t, ctx, mask, pooled = inputs(batch=WORLD * LOCAL)
    return x, t, ctx, mask, pooled, torch.randn(x.shape, generator=torch.Generator().manual_seed(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        x, t, ctx, mask, pooled, target = (a[rows] for a in _batch())
        grads = {}
        for name, overrides in DDP_MODES.items():
            model = DistributedDataParallel(tiny_dit(**overrides).train())
            F.mse_loss(model(x, t, C(context=ctx, mask=mask, pooled=pooled)), target).backward()
            grads[name] = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_step_gives_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch afresh
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x, t, ctx, mask, pooled, target = _batch()
    for name, overrides in DDP_MODES.items():
        model = tiny_dit(**overrides).train()
        # equal local batches: the mean of the ranks' mean losses is the whole batch's mean loss, and DDP
        # averages the ranks' gradients
        F.mse_loss(model(x, t, C(context=ctx, mask=mask, pooled=pooled)), target).backward()
        for n, p in model.named_parameters():
            for r in range(WORLD):
                torch.testing.assert_close(results[r][name][n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {n}")
