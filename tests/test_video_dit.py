"""The DiT over spatio-temporal patches: tubelet patchify against an unfold reference and a strided Conv3d, a one-frame
video equals the image DiT on the same weights, full and factorised space-time attention mix frames (and a
factorised block with its temporal attention at zero does not), frames are told apart by their positions, and the
samplers and guidance run unchanged on clips."""

import pytest
import torch
import torch.nn.functional as F

from lit_diffusion.diffusion.flow import FlowSchedule, heun_sample
from lit_diffusion.diffusion.guidance import cfg_model_fn
from lit_diffusion.diffusion.samplers import ddim_sample
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.dit import DiT, DiTConfig, patchify_video, temporal_embedding, unpatchify_video

from conftest import retry_on_gloo_teardown_abort


def _unfold_reference(x, tp, p):
    """Tubelets by torch's unfold over frames, rows and columns: [B, T, C, H, W] -> [B, N, tp*p*p*C]."""
    b, t, c, h, w = x.shape
    u = x.permute(0, 2, 1, 3, 4).unfold(2, tp, tp).unfold(3, p, p).unfold(4, p, p)  # [B, C, f, h', w', tp, p, p]
    return u.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(b, -1, tp * p * p * c)


@pytest.mark.parametrize("tp,p", [(1, 1), (1, 2), (2, 2), (4, 1)])
def test_tubelet_patchify_equals_unfold_and_inverts(tp, p):
    x = torch.randn(2, 4, 3, 6, 8)
    tokens = patchify_video(x, tp, p)
    assert torch.equal(tokens, _unfold_reference(x, tp, p))
    assert torch.equal(unpatchify_video(tokens, tp, p, 4 // tp, 6 // p, 8 // p), x)


def test_tubelet_embedding_is_a_strided_conv3d():
    """The patch embedding (a linear map of each flattened tubelet) equals a Conv3d with kernel = stride =
    (tp, p, p) holding the same weights: ViViT's tubelet embedding."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(in_channels=3, out_channels=3, patch_size=2, temporal_patch=2, hidden_size=16, depth=1,
                        num_heads=2, context_dim=None))
    x = torch.randn(2, 4, 3, 6, 6)
    ours = net.x_embedder(patchify_video(x, 2, 2))  # [B, N, D]
    weight = net.x_embedder.weight.reshape(16, 2, 2, 2, 3).permute(0, 4, 1, 2, 3)  # [D, C, tp, p, p]
    conv = F.conv3d(x.permute(0, 2, 1, 3, 4), weight, net.x_embedder.bias, stride=(2, 2, 2))  # [B, D, f, h, w]
    assert torch.allclose(ours, conv.flatten(2).transpose(1, 2), atol=1e-5)


def _randomise(net, std=0.2):
    """Random values everywhere (adaLN-Zero would make every block the identity, hiding what is tested)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) * std)
    return net


def _cond(b=2, length=5, width=12):
    g = torch.Generator().manual_seed(3)
    return Conditioning(context=torch.randn(b, length, width, generator=g),
                        mask=torch.tensor([[True] * length, [True] * 3 + [False] * 2])[:b])


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_a_one_frame_video_is_the_image_model(attention):
    image = _randomise(DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=24, depth=2, num_heads=2,
                                     context_dim=12)))
    video = DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=24, depth=2, num_heads=2, context_dim=12,
                          attention=attention))
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and all("temporal" in k for k in missing)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = image(x, t, _cond())
        assert torch.allclose(video(x[:, None], t, _cond())[:, 0], expected, atol=1e-5)
        assert torch.allclose(video(x, t, _cond()), expected, atol=1e-5)  # an image stays an image


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_frames_see_each_other(attention):
    """Changing the last frame changes the first frame's output, under either attention; a factorised block
    whose temporal attention is at zero (as initialised) keeps the frames apart."""
    net = _randomise(DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=24, depth=2, num_heads=2,
                                   context_dim=12, attention=attention, temporal_patch=1)))
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([0.3, 0.8])
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(net(x, t, _cond())[:, 0], net(y, t, _cond())[:, 0], atol=1e-4)
        if attention == "factorised":
            for block in net.blocks:
                torch.nn.init.zeros_(block.temporal_attn.to_out[0].weight)
                torch.nn.init.zeros_(block.temporal_attn.to_out[0].bias)
            net.config.pos_embed = False  # positions are the only other thing that tells frames apart
            assert torch.allclose(net(x, t, _cond())[:, 0], net(y, t, _cond())[:, 0], atol=1e-5)


def test_frames_are_told_apart_by_their_positions():
    """With 3-D positions, reversing the input's frames does not just reverse the output (without positions,
    full attention over the clip is blind to the order and it does)."""
    net = _randomise(DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=24, depth=2, num_heads=2,
                                   context_dim=12)))
    x, t = torch.randn(1, 4, 4, 4, 4), torch.tensor([0.5])
    cond = _cond(1)
    with torch.no_grad():
        assert not torch.allclose(net(x.flip(1), t, cond), net(x, t, cond).flip(1), atol=1e-4)
        net.config.pos_embed = False
        assert torch.allclose(net(x.flip(1), t, cond), net(x, t, cond).flip(1), atol=1e-5)
    assert torch.equal(temporal_embedding(3, 8)[0], torch.zeros(8))


def test_sizes_it_cannot_take_are_refused():
    net = DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=16, depth=1, num_heads=2, context_dim=None,
                        temporal_patch=2))
    with pytest.raises(ValueError, match="3 frames: the frame count must be a multiple of temporal_patch 2"):
        net(torch.randn(1, 3, 4, 4, 4), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="attention must be 'full' or 'factorised'"):
        DiTConfig(attention="axial")


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_samplers_and_guidance_run_unchanged_on_clips(attention):
    """Heun (flow) and DDIM (eps) with classifier-free guidance on [B, T, C, H, W]: the shape comes back, and each
    clip of a batch is what it is when sampled alone from the same noise (the samplers broadcast per sample)."""
    net = _randomise(DiT(DiTConfig(in_channels=4, out_channels=4, hidden_size=24, depth=1, num_heads=2,
                                   context_dim=12, attention=attention, temporal_patch=2)), std=0.05).eval()
    cond = _cond()
    uncond = Conditioning(context=torch.zeros(1, 1, 12), mask=torch.ones(1, 1, dtype=torch.bool))
    x_T = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for run in (lambda fn, shape, x: heun_sample(fn, FlowSchedule(), shape, steps=3, x_T=x),
                lambda fn, shape, x: ddim_sample(fn, NoiseSchedule(100), shape, steps=3, x_T=x)):
        both = run(cfg_model_fn(net, cond, uncond, scale=3.0), x_T.shape, x_T)
        assert both.shape == x_T.shape and torch.isfinite(both).all()
        one = Conditioning(context=cond.context[1:], mask=cond.mask[1:])
        alone = run(cfg_model_fn(net, one, uncond, scale=3.0), x_T[1:].shape, x_T[1:])
        assert (both[1:] - alone).abs().max() <= 1e-5 * both.abs().max()


def _joint_net(kind):
    from lit_diffusion.models.unet import UNet

    if kind == "dit":
        net = DiT(DiTConfig(in_channels=4, out_channels=4, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                            context_dim=None, attention="factorised"))
    else:
        net = UNet(dict(in_channels=4, out_channels=4, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), head_dim=4, norm_groups=4, context_dim=None,
                        temporal_attention=True))
    return _randomise(net)  # zero-initialised outputs would give every gradient but the last layer's as zero


def _joint_batch(step, rank):
    """Step 0 clips on both ranks, step 1 an image batch on rank 0 and clips on rank 1, step 2 images on both."""
    frames = 1 if (step == 1 and rank == 0) or step == 2 else 4
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(2, frames, 4, 4, 4, generator=g), torch.rand(2, generator=g)


def _joint_worker(rank, port, kind, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ddp = DDP(_joint_net(kind))  # find_unused_parameters=False, as Lightning's "ddp" strategy
        grads = []
        for step in range(3):
            ddp.zero_grad(set_to_none=True)
            x, t = _joint_batch(step, rank)
            x = x[:, 0] if x.shape[1] == 1 and step == 2 else x  # an image as [B, C, H, W] too
            ddp(x, t, Conditioning()).pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in ddp.module.named_parameters()})
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_joint_image_and_video_batches_train_under_ddp(kind, tmp_path):
    """Images skip the temporal layers (a factorised DiT's, a U-Net's temporal attention), yet DDP, which reduces
    every parameter's gradient at every step, trains on steps where some or all ranks hold images: the temporal
    layers get zero gradients from images, and every gradient is the mean of the two ranks' single-process ones."""
    import torch.multiprocessing as mp
    from test_ddp_launch import free_port

    def run():
        mp.start_processes(_joint_worker, args=(free_port(), kind, str(tmp_path)), nprocs=2, join=True,
                           start_method="fork")

    retry_on_gloo_teardown_abort(run)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    net = _joint_net(kind)
    from lit_diffusion.models.layers import TemporalAttention

    temporal = [f"{m}.{n}" for m, mod in net.named_modules() for n, _ in mod.named_parameters()
                if isinstance(mod, TemporalAttention) or m.endswith(("temporal_attn", "norm_temporal"))]
    assert temporal
    for step in range(3):
        ref = {}
        for rank in range(2):
            net.zero_grad(set_to_none=True)
            x, t = _joint_batch(step, rank)
            x = x[:, 0] if x.shape[1] == 1 and step == 2 else x
            net(x, t, Conditioning()).pow(2).mean().backward()
            for n, p in net.named_parameters():
                g = torch.zeros_like(p) if p.grad is None else p.grad
                ref[n] = ref.get(n, 0) + g / 2
        for n in ref:
            assert torch.allclose(ranks[0][step][n], ref[n], atol=1e-6), (step, n)
            assert torch.equal(ranks[0][step][n], ranks[1][step][n])
        if step == 2:  # images on both ranks: nothing reaches the temporal layers
            assert all(ranks[0][step][n].abs().max() == 0 for n in temporal)
        else:
            assert any(ranks[0][step][n].abs().max() > 0 for n in temporal)
