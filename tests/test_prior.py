"""The unCLIP prior (models/prior.py, stages/prior.py): its loss is the written-out x0 formula of each objective, a
trained prior reproduces Gaussian data of known mean and covariance, the stage trains from latent shards with image
embeddings (and refuses shards without them), samples on its own from its checkpoint, keeps the best of its draws,
and evaluates the same on one process and two."""

import math
import shutil

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import retry_on_gloo_teardown_abort

from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.diffusion.flow import FlowSchedule
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.prior import DiffusionPrior
from lit_diffusion.runtime.rng import key_seed
from lit_diffusion.stages.prior import DiffusionPriorModule, prior_losses, sample_x0

TINY_PRIOR = dict(width=32, depth=2, heads=2)


class Probe(torch.nn.Module):
    """A stand-in network: records what it is called with and returns a fixed function of it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return 0.5 * x_t + 0.001 * t.float()[:, None] + cond.pooled


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_prior_loss_is_the_x0_error_at_the_objectives_noising(objective):
    torch.manual_seed(0)
    b, e = 6, 5
    x0, noise, pooled = torch.randn(b, e), torch.randn(b, e), torch.randn(b, e)
    cond = Conditioning(pooled=pooled)
    net = Probe()
    if objective == "ddpm":
        s = NoiseSchedule(schedule="cosine")
        t = torch.tensor([0, 10, 200, 500, 900, 999])
        abar = s.alphas_cumprod[t][:, None]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # DDPM eq. 4
        t_net = t
    else:
        s = FlowSchedule()
        t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 1.0])
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise  # the straight path
        t_net = t * 1000.0  # the network sees t * time_scale
    loss = prior_losses(net, s, x0, cond, t=t, noise=noise)
    x0_hat = 0.5 * x_t + 0.001 * t_net.float()[:, None] + pooled
    expected = ((x0_hat - x0) ** 2).sum(1) / e
    if objective == "flow":  # the velocity's error (x0 - x0_hat) / t, t floored at 0.05
        expected = expected / t.clamp_min(0.05) ** 2
    torch.testing.assert_close(loss, expected)
    seen_x, seen_t, _ = net.calls[0]
    torch.testing.assert_close(seen_x, x_t)
    torch.testing.assert_close(seen_t.float(), t_net.float())


MU = torch.tensor([1.0, -2.0, 0.5])
_L = torch.tensor([[1.2, 0.0, 0.0], [0.5, 0.6, 0.0], [-0.3, 0.4, 0.3]])
SIGMA = _L @ _L.T


@pytest.mark.parametrize("objective,sampler,steps", [pytest.param("ddpm", "ddim", 50, marks=pytest.mark.slow),
                                                     ("flow", "heun", 13)])  # ddpm: 24 s, slow
def test_a_trained_prior_reproduces_gaussian_data(objective, sampler, steps):
    """x0 ~ N(MU, SIGMA), one constant caption: the prior's samples have that mean and covariance, up to what
    600 steps of a 2-block prior learn (its error is several times the 4000 samples' Monte-Carlo error of ~0.02)."""
    torch.manual_seed(0)
    net = DiffusionPrior(dict(embed_dim=3, context_dim=None, width=64, depth=2, heads=4))
    schedule = FlowSchedule(timesteps="uniform") if objective == "flow" else NoiseSchedule(schedule="cosine")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    cond = Conditioning(pooled=torch.zeros(256, 3))
    total = 600
    for i in range(total):
        x0 = MU + torch.randn(256, 3) @ _L.T
        loss = prior_losses(net, schedule, x0, cond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - i / total)
    net.eval()
    n = 4000
    with torch.no_grad():
        x = sample_x0(net, schedule, Conditioning(pooled=torch.zeros(n, 3)), None, 1.0, sampler, steps,
                      torch.randn(n, 3, generator=torch.Generator().manual_seed(1)))
    assert (x.mean(0) - MU).abs().max() < 0.08, x.mean(0)
    assert (torch.cov(x.T) - SIGMA).abs().max() < 0.12, torch.cov(x.T)
    untrained = DiffusionPrior(dict(embed_dim=3, context_dim=None, width=64, depth=2, heads=4)).eval()
    with torch.no_grad():
        y = sample_x0(untrained, schedule, Conditioning(pooled=torch.zeros(n, 3)), None, 1.0, sampler, steps,
                      torch.randn(n, 3, generator=torch.Generator().manual_seed(1)))
    assert (y.mean(0) - MU).abs().max() > 0.5  # the bound above is one training meets, not one any network does


# ------------------------------------------------------------------------------------------------ the stage
def _data(latents, **kwargs):
    return LatentDataModule(train_urls=str(latents / "train" / "*.tar"), val_urls=str(latents / "val" / "*.tar"),
                            **{"batch_size": 16, "num_workers": 0, "train_batches_per_epoch": 5, **kwargs})


def _trainer(root, steps=10, devices=1, **kwargs):
    return L.Trainer(accelerator="cpu", devices=devices, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(root), **kwargs)


@pytest.fixture(scope="module")
def trained(tiny_ckpts, embedded_latents, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior_run")
    clip = root / "clip.ckpt"
    shutil.copy(tiny_ckpts["clip"], clip)
    torch.manual_seed(0)
    module = DiffusionPriorModule(clip_ckpt=str(clip), prior=TINY_PRIOR, sample_steps=5, warmup_steps=0, lr=1e-3)
    trainer = _trainer(root, steps=10, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(embedded_latents))
    trainer.save_checkpoint(root / "prior.ckpt")
    clip.unlink()  # the prior's checkpoint must sample without it
    return module, root / "prior.ckpt"


def test_the_stage_standardises_with_the_manifests_statistics_and_samples_alone(trained, embedded_latents):
    from lit_diffusion.data.latents import read_manifest

    module, path = trained
    stats = read_manifest(embedded_latents)["image_embedding"]
    torch.testing.assert_close(module.embedding_mean, torch.tensor(stats["mean"]))
    torch.testing.assert_close(module.embedding_std, torch.tensor(stats["std"]))
    loaded = DiffusionPriorModule.from_checkpoint(path)
    assert not (path.parent / "clip.ckpt").exists()
    torch.testing.assert_close(loaded.embedding_std, module.embedding_std)
    prompts = ["a red circle", "a small blue square above a green triangle"]
    ours = loaded.sample(prompts, seed=[3, 4])
    assert ours.shape == (2, 32)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2))  # back in CLIP's space
    torch.testing.assert_close(module.eval().sample(prompts, seed=[3, 4]), ours)
    # a caption's embedding does not depend on its batch: its own seed
    torch.testing.assert_close(loaded.sample(prompts[1:], seed=[4])[0], ours[1])
    # a negative caption replaces the empty one in guidance: another result at guidance != 1 only
    neg = loaded.sample(prompts, negative_prompts="a red circle", seed=[3, 4], guidance=3.0)
    assert not torch.allclose(neg, loaded.sample(prompts, seed=[3, 4], guidance=3.0))
    with pytest.raises(ValueError, match="negative prompts steer the prior only with guidance > 1, and its "
                                         "guidance is 1.0"):  # the unconditional branch is never evaluated
        loaded.sample(prompts, negative_prompts="a red circle", seed=[3, 4], guidance=1.0)


def test_of_two_draws_the_one_closer_to_the_caption_is_kept(trained):
    module, _ = trained
    module.eval()
    cond = module.encode_prompts(["a red circle", "a green square", "a blue triangle"])
    seeds = [11, 12, 13]
    best = module.sample_embeddings(cond, seeds=seeds, candidates=2)
    # the two draws, one by one: draw j of a caption comes from the j-th row of its generator, seeded by
    # key_seed(f"{seed}/x_T") (not by the seed itself, which the decoder's latent is drawn from)
    draws = []
    for j in range(2):
        noise = torch.stack([torch.randn(2, 32, generator=torch.Generator().manual_seed(key_seed(f"{s}/x_T")))[j]
                             for s in seeds])
        x0 = sample_x0(module.prior, module.schedule, cond, module.null_cond(3), module.hparams.guidance,
                       module.hparams.sampler, module.hparams.sample_steps, noise)
        draws.append(module.to_clip_space(x0))
    scores = torch.stack([(d * cond.pooled).sum(-1) for d in draws])  # [2, 3]
    expected = torch.stack([draws[int(scores[:, i].argmax())][i] for i in range(3)])
    torch.testing.assert_close(best, expected, atol=1e-5, rtol=1e-5)
    assert (best * cond.pooled).sum(-1).ge(torch.minimum(*[(d * cond.pooled).sum(-1) for d in draws]) - 1e-6).all()


def test_a_ddpm_priors_draws_do_not_depend_on_the_batch(tiny_ckpts):
    """Ancestral sampling draws noise at every step; each caption's draws take it from their own generators, so a
    caption sampled among others gets what it gets alone (and the step noise is not the batch's: seeds matter)."""
    torch.manual_seed(0)
    module = DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior=TINY_PRIOR, objective="ddpm",
                                  sampler="ddpm", sample_steps=5)
    captions = ["a red circle", "a blue square", "a green triangle"]
    batch = module.sample(captions, seed=[3, 4, 5], guidance=2.0)
    alone = module.sample(captions[1:2], seed=[4], guidance=2.0)
    torch.testing.assert_close(batch[1:2], alone)
    assert (module.sample(captions[1:2], seed=[40], guidance=2.0) - alone).abs().max() > 1e-3


def test_in_loop_evaluation_is_the_cosine_to_the_true_embedding_beside_its_baselines(trained, embedded_latents,
                                                                                       tmp_path):
    module, path = trained
    module = DiffusionPriorModule.from_checkpoint(path)
    data = _data(embedded_latents)
    trainer = _trainer(tmp_path)
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    # by hand over the whole val split: the same per-key seeds, no batching
    data.setup("validate")
    rows = [b for b in data.val_dataloader()]
    keys = [k for b in rows for k in b["key"]]
    true = F.normalize(torch.cat([b["image_embedding"] for b in rows]), dim=-1)
    pooled = F.normalize(torch.cat([b["pooled"] for b in rows]), dim=-1)
    cond = Conditioning(context=torch.cat([F.pad(b["context"], (0, 0, 0, 32 - b["context"].shape[1])) for b in rows]),
                        mask=torch.cat([F.pad(b["mask"], (0, 32 - b["mask"].shape[1])) for b in rows]),
                        pooled=torch.cat([b["pooled"] for b in rows]))
    sampled = module.sample_embeddings(cond, seeds=[key_seed(k) for k in keys])
    assert len(keys) == 64
    assert metrics["val/prior_cos"] == pytest.approx(float((sampled * true).sum(-1).mean()), abs=1e-5)
    assert metrics["val/prior_cos_text_baseline"] == pytest.approx(float((pooled * true).sum(-1).mean()), abs=1e-5)
    order = sorted(range(len(keys)), key=lambda i: key_seed(keys[i]))
    unrelated = [(true[i] * pooled[order[(n - 1) % len(order)]]).sum() for n, i in enumerate(order)]
    assert metrics["val/prior_cos_unrelated"] == pytest.approx(float(torch.stack(unrelated).mean()), abs=1e-5)
    assert not math.isclose(metrics["val/prior_cos"], metrics["val/prior_cos_text_baseline"])
    # keys order the gathered rows: after the module moves (torchmetrics resets a metric's dtype) they stay float64,
    # and 52-bit seeds one apart stay apart
    key = module.to("cpu")._metrics["key"]
    key.reset()
    key.update(torch.tensor([2.0 ** 52 - 1, 2.0 ** 52 - 2], dtype=torch.float64))
    assert key.compute().tolist() == [2 ** 52 - 1, 2 ** 52 - 2]


def test_validating_a_trained_prior_keeps_its_own_standardisation(trained, embedded_latents, tmp_path):
    """Validation on shards of other data (the same CLIP) must not swap in their statistics: the prior's outputs
    are in the space of the data it was trained on."""
    module = DiffusionPriorModule.from_checkpoint(trained[1])
    mean, std = module.embedding_mean + 0.25, module.embedding_std * 2  # as if trained on other data
    module.embedding_mean.copy_(mean)
    module.embedding_std.copy_(std)
    _trainer(tmp_path, limit_val_batches=1).validate(module, datamodule=_data(embedded_latents), verbose=False)
    assert torch.equal(module.embedding_mean, mean) and torch.equal(module.embedding_std, std)


def test_shards_without_image_embeddings_are_refused_naming_the_flag(tiny_ckpts, tmp_path):
    from lit_diffusion.cli import main

    out = tmp_path / "latents"
    data = tiny_ckpts["data"]
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--train", str(data / "train-*.tar"), "--val", str(data / "val-*.tar"), "--out", str(out),
          "--image-size", "16", "--batch-size", "64", "--device", "cpu"])
    module = DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior=TINY_PRIOR)
    with pytest.raises(ValueError, match=r"the prior needs CLIP image embeddings.*manifest.json.*data encode --image-embeddings"):
        _trainer(tmp_path).fit(module, datamodule=_data(out))


def test_bad_settings_are_named(tiny_ckpts):
    with pytest.raises(ValueError, match="model.init_args.prior.embed_dim = 16 does not match the CLIP's 32"):
        DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior={"embed_dim": 16})
    with pytest.raises(ValueError, match="model.init_args.sampler"):
        DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), objective="flow", sampler="ddim")
    with pytest.raises(ValueError, match="unknown prior option"):
        DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior={"layers": 3})


def test_the_figures_do_not_depend_on_the_batching(trained, embedded_latents, tmp_path):
    """Each val caption's loss noise and samples come from its key: batches of 16 and of 7 give the same figures."""
    module = DiffusionPriorModule.from_checkpoint(trained[1])
    by_16, by_7 = (_trainer(tmp_path).validate(module, datamodule=_data(embedded_latents, **kw), verbose=False)[0]
                   for kw in ({}, {"batch_size": 7}))
    assert set(by_16) == {"val/loss", "val/prior_cos", "val/prior_cos_text_baseline", "val/prior_cos_unrelated"}
    for key in by_16:
        assert by_7[key] == pytest.approx(by_16[key], abs=1e-5), key


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")  # the case of one val sample hung (a rank without samples missed a collective)
@pytest.mark.parametrize("val_max_samples", [None, 1])
def test_two_ranks_evaluate_as_one_process(trained, embedded_latents, tmp_path, val_max_samples):
    """Every val caption counted once across ranks, each drawn from its key's noise, gathered before the means: the
    prior's figures on 2 processes are the 1-process ones; also when one rank has no val sample at all."""
    _, path = trained
    module = DiffusionPriorModule.from_checkpoint(path)
    data = lambda: _data(embedded_latents, val_max_samples=val_max_samples)  # noqa: E731
    single = _trainer(tmp_path).validate(module, datamodule=data(), verbose=False)[0]
    ddp = retry_on_gloo_teardown_abort(lambda: _trainer(tmp_path, devices=2, strategy="ddp_spawn").validate(
        module, datamodule=data(), verbose=False)[0])
    assert set(ddp) == set(single) == {"val/loss", "val/prior_cos", "val/prior_cos_text_baseline",
                                       "val/prior_cos_unrelated"}
    for key in single:
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
