import pytest
import torch

from lit_diffusion.diffusion.guidance import cfg_model_fn, drop_conditioning, rescale_guidance
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.conditions import Conditioning


class SpyDenoiser:
    """Records every call; output depends on x, t and the masked mean of the context, so halves can be told apart."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        context, mask = cond.context, cond.mask
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(), "mask": mask.clone()})
        m = mask.float().unsqueeze(-1)
        pooled = (context * m).sum((1, 2)) / (m.sum((1, 2)).clamp(min=1) * context.shape[2])  # [B]
        return 0.5 * x + pooled.view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1).float()


def cond_of(value, batch=2, length=4, dim=3, valid=3):
    context = torch.full((batch, length, dim), float(value))
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :valid] = True
    return Conditioning(context=context, mask=mask)


X = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
T = torch.tensor([5, 9])


def test_scale_one_is_the_conditional_forward_only():
    spy = SpyDenoiser()
    cond = cond_of(2.0)
    out = cfg_model_fn(spy, cond, cond_of(-1.0), scale=1.0)(X, T)
    assert len(spy.calls) == 1 and spy.calls[0]["x"].shape[0] == 2
    assert torch.equal(out, SpyDenoiser()(X, T, cond))


def test_guidance_is_one_batched_forward():
    spy = SpyDenoiser()
    cond, uncond = cond_of(2.0), cond_of(-1.0)
    out = cfg_model_fn(spy, cond, uncond, scale=4.0)(X, T)
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert call["x"].shape[0] == 4
    assert torch.equal(call["x"][:2], X) and torch.equal(call["x"][2:], X)
    assert torch.equal(call["t"], torch.cat([T, T]))
    assert torch.equal(call["context"][:2], uncond.context) and torch.equal(call["context"][2:], cond.context)
    ref = SpyDenoiser()
    u, c = ref(X, T, uncond), ref(X, T, cond)
    assert torch.allclose(out, u + 4.0 * (c - u))


def test_negative_prompt_changes_only_the_unconditional_branch():
    cond = cond_of(2.0)
    spy_a, spy_b = SpyDenoiser(), SpyDenoiser()
    out_a = cfg_model_fn(spy_a, cond, cond_of(0.0), scale=3.0)(X, T)
    out_b = cfg_model_fn(spy_b, cond, cond_of(-5.0), scale=3.0)(X, T)  # a "negative prompt" encoding
    a, b = spy_a.calls[0], spy_b.calls[0]
    assert torch.equal(a["context"][2:], b["context"][2:])  # conditional half identical
    assert not torch.equal(a["context"][:2], b["context"][:2])
    # guided = (1 - s) u + s c: moving u by -5 moves the output by (1 - 3) * -5 = +10
    assert torch.allclose(out_b - out_a, torch.full_like(out_a, 10.0), atol=1e-5)


def test_single_uncond_is_broadcast_and_lengths_are_padded():
    spy = SpyDenoiser()
    cond = cond_of(1.0, batch=2, length=6, valid=5)
    uncond = cond_of(-1.0, batch=1, length=4, valid=2)
    out = cfg_model_fn(spy, cond, uncond, scale=2.0)(X, T)
    call = spy.calls[0]
    assert call["context"].shape == (4, 6, 3) and call["mask"].shape == (4, 6)
    assert call["mask"][:2].sum(1).tolist() == [2, 2] and call["mask"][2:].sum(1).tolist() == [5, 5]
    assert torch.equal(call["context"][:2, 4:], torch.zeros(2, 2, 3))  # padding is masked zeros
    ref = SpyDenoiser()
    u = ref(X, T, uncond.expand(2))
    assert torch.allclose(out, u + 2.0 * (ref(X, T, cond) - u))


def test_guiding_v_equals_guiding_eps():
    """The eps/x0 conversions are affine in the raw output and the CFG weights sum to one."""
    sch = NoiseSchedule(1000, "cosine")
    g = torch.Generator().manual_seed(1)
    x_t, v_u, v_c = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    s = 5.0
    guided_v = sch.to_eps_x0(v_u + s * (v_c - v_u), x_t, t, "v")
    e_u, e_c = sch.predict_eps_from_v(x_t, t, v_u), sch.predict_eps_from_v(x_t, t, v_c)
    assert torch.allclose(guided_v.eps, e_u + s * (e_c - e_u), atol=1e-4)


def test_rescale_matches_conditional_std():
    g = torch.Generator().manual_seed(2)
    guided, cond = 3 * torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)


def test_errors():
    with pytest.raises(ValueError, match="needs an unconditional"):
        cfg_model_fn(SpyDenoiser(), cond_of(1.0), None, scale=3.0)
    with pytest.raises(TypeError, match="cond must be a Conditioning"):
        cfg_model_fn(SpyDenoiser(), torch.zeros(2, 4, 3), cond_of(1.0), scale=3.0)


def test_drop_conditioning_replaces_whole_samples():
    cond = cond_of(2.0, batch=2000, length=4, valid=3)
    empty = cond_of(0.0, batch=1, length=4, valid=2)
    out = drop_conditioning(cond, empty, 0.25, torch.Generator().manual_seed(0))
    dropped = out.context[:, 0, 0] == 0.0
    assert 0.2 < dropped.float().mean().item() < 0.3
    assert torch.equal(out.mask[dropped].sum(1), torch.full((int(dropped.sum()),), 2))
    assert torch.equal(out.context[~dropped], cond.context[~dropped])
    assert torch.equal(out.mask[~dropped], cond.mask[~dropped])
    kept = drop_conditioning(cond, empty, 0.0)
    assert torch.equal(kept.context, cond.context) and torch.equal(kept.mask, cond.mask)


class PooledSpy(SpyDenoiser):
    """A denoiser that also takes the pooled text embedding (a U-Net with pooled_dim)."""

    def __call__(self, x, t, cond):
        self.calls.append({"pooled": cond.pooled.clone()})
        return super().__call__(x, t, cond) + cond.pooled.sum(1).view(-1, 1, 1, 1)


def test_pooled_embedding_travels_with_its_prompt_through_guidance_and_dropout():
    cond = cond_of(2.0).replace(pooled=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    uncond = cond_of(0.0, batch=1).replace(pooled=torch.tensor([[-1.0, 0.5]]))
    spy = PooledSpy()
    out = cfg_model_fn(spy, cond, uncond, scale=3.0)(X, T)
    assert len(spy.calls) == 2  # the parent's record and ours: one forward
    assert torch.equal(spy.calls[0]["pooled"], torch.tensor([[-1.0, 0.5], [-1.0, 0.5], [1.0, 2.0], [3.0, 4.0]]))
    ref = PooledSpy()
    u = ref(X, T, uncond.expand(2))
    c = ref(X, T, cond)
    assert torch.allclose(out, u + 3.0 * (c - u))
    assert torch.equal(cfg_model_fn(PooledSpy(), cond, uncond, scale=1.0)(X, T), c)
    with pytest.raises(ValueError, match="both have a pooled"):
        cfg_model_fn(spy, cond, cond_of(0.0), scale=3.0)(X, T)

    many = Conditioning(context=torch.full((500, 4, 3), 2.0), mask=torch.ones(500, 4, dtype=torch.bool),
                        pooled=torch.arange(500.0)[:, None].expand(500, 2))
    out = drop_conditioning(many, uncond, 0.3, torch.Generator().manual_seed(1))
    dropped = out.context[:, 0, 0] == 0.0
    assert 0.2 < dropped.float().mean() < 0.4
    assert torch.equal(out.pooled[dropped], uncond.pooled.expand(int(dropped.sum()), -1))  # same rows as the context
    assert torch.equal(out.pooled[~dropped], many.pooled[~dropped])


class SizeSpy(SpyDenoiser):
    """Records the size condition of each call (a denoiser with size_conditioning)."""

    def __call__(self, x, t, cond):
        self.calls.append({"size": cond.size.clone()})
        return super().__call__(x, t, cond) + cond.size.sum(1).view(-1, 1, 1, 1)


def test_size_and_crop_conditions_go_to_both_branches_and_survive_dropout():
    """A negative prompt or the empty prompt replaces the text only: both halves of the guided batch carry the
    sample's size condition, and condition dropout keeps it (SDXL trains and samples the unconditional branch with
    the same size and crop)."""
    size = torch.tensor([[48.0, 32.0, 0.0, 4.0, 32.0, 32.0], [16.0, 64.0, 8.0, 0.0, 32.0, 32.0]])
    cond, uncond = cond_of(2.0).replace(size=size), cond_of(-1.0, batch=1)
    spy = SizeSpy()
    out = cfg_model_fn(spy, cond, uncond, scale=3.0)(X, T)
    assert torch.equal(spy.calls[0]["size"], torch.cat([size, size]))
    ref = SizeSpy()
    u, c = ref(X, T, uncond.expand(2).replace(size=size)), ref(X, T, cond)
    assert torch.allclose(out, u + 3.0 * (c - u))
    dropped = drop_conditioning(cond, uncond, 0.99, torch.Generator().manual_seed(0))
    assert torch.equal(dropped.context, uncond.context.expand(2, -1, -1)) and torch.equal(dropped.size, size)


class ImageSpy(SpyDenoiser):
    """A denoiser that also takes an image embedding (unCLIP's decoder): its output depends on it nonlinearly, so
    the three-branch formula is checked against separate forwards, not against an identity of linear maps."""

    def __call__(self, x, t, cond):
        self.calls.append({"image_embedding": cond.image_embedding.clone()})
        e = cond.image_embedding
        return super().__call__(x, t, cond) * (1 + e.pow(2).sum(1)).view(-1, 1, 1, 1) + e.sum(1).view(-1, 1, 1, 1)


def test_image_scale_guides_the_image_embedding_and_the_caption_apart():
    """InstructPix2Pix's two-condition guidance (Brooks et al. 2023, eq. 3): u + s_I (i - u) + s_T (c - i), with
    i = the image embedding beside the unconditional caption; one batched forward of three; s_I = s_T is the
    one-scale guidance."""
    embedding = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    cond = cond_of(2.0).replace(image_embedding=embedding)
    uncond = cond_of(-1.0, batch=1, length=2, valid=2).replace(image_embedding=torch.zeros(1, 2))
    spy = ImageSpy()
    out = cfg_model_fn(spy, cond, uncond, scale=5.0, image_scale=1.5)(X, T)
    assert len(spy.calls) == 2 and spy.calls[0]["image_embedding"].shape[0] == 6  # ours and the parent's: one forward
    assert torch.equal(spy.calls[0]["image_embedding"], torch.cat([torch.zeros(2, 2), embedding, embedding]))
    ref = ImageSpy()
    u = ref(X, T, uncond.expand(2))
    i = ref(X, T, uncond.expand(2).replace(image_embedding=embedding))
    c = ref(X, T, cond)
    torch.testing.assert_close(out, u + 1.5 * (i - u) + 5.0 * (c - i))
    one_scale = cfg_model_fn(ImageSpy(), cond, uncond, scale=3.0)(X, T)
    torch.testing.assert_close(cfg_model_fn(ImageSpy(), cond, uncond, scale=3.0, image_scale=3.0)(X, T), one_scale)
    torch.testing.assert_close(one_scale, u + 3.0 * (c - u))
    with pytest.raises(ValueError, match="image_scale guides an image embedding apart from the caption"):
        cfg_model_fn(SpyDenoiser(), cond_of(2.0), cond_of(-1.0), scale=3.0, image_scale=1.0)
