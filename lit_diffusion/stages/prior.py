"""The unCLIP prior stage (DALL-E 2, Ramesh et al. 2022, sec. 2.1): from a caption to a CLIP image embedding.

`models.prior.DiffusionPrior` (a causal Transformer) is trained with DDPM or rectified flow from `diffusion/` (the
objective is a config choice, as for the diffusion stage), predicting the clean embedding x0 in both cases: the
loss is ||prior(x_t, t, caption) - x0||^2 with x_t the objective's noising of x0 (DDPM: sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps; flow: (1 - t) x0 + t eps). The samplers read that output as x0 (DDPM's `prediction: x0`) or
as the velocity (x_t - x0) / t (flow).

Scale: CLIP's image embeddings are L2-normalised, so each of their E entries is about 1 / sqrt(E) in size. The
prior works on standardised embeddings, (e - mean) / std per dimension, with the mean and std that `data encode
--image-embeddings` measured over the training split (karlo does the same with its clip_mean / clip_std); both are
buffers of this module, saved in its checkpoint. A sample is de-standardised and L2-normalised back into CLIP's
space.

The caption (token features, mask and pooled embedding, from the frozen CLIP as the latent shards hold them) is
replaced by the empty caption's 10% of the time, for classifier-free guidance; at sampling a negative caption
takes the empty one's place (guidance away from it). Of `candidates` draws per caption the one with the higher dot
product with the caption's embedding is kept (DALL-E 2: 2). The prior trains from latent shards only: no image is
decoded, no VAE runs.

In-loop evaluation (every validation): each val caption's sampled embedding against the image's true one, as the
mean cosine `val/prior_cos`, beside the caption embedding's own cosine to the image embedding
(`val/prior_cos_text_baseline`) and an unrelated caption's (`val/prior_cos_unrelated`: each image against the
previous sample's caption in key order). Every sample starts from its own noise (seeded by its key) and is counted
once across ranks; `sampler: ddpm` draws each sample's step noise from its own generator too, so the figures do not
depend on the batching or the number of processes with any sampler.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from lit_diffusion.data.latents import check_hashes, check_text_mask, require_image_embeddings, state_dict_hash
from lit_diffusion.diffusion import samplers
from lit_diffusion.diffusion.flow import FlowSchedule
from lit_diffusion.diffusion.guidance import cfg_model_fn, drop_conditioning
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.prior import DiffusionPrior, PriorConfig
from lit_diffusion.runtime.rng import key_seed
from lit_diffusion.stages.base import CheckpointError, Stage, stage_block
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.common import adamw_with_warmup, eval_mode

log = logging.getLogger("lit_diffusion")


FLOW_T_MIN = 0.05  # flow: the x0 error's weight 1 / t^2 stops growing below it


def prior_losses(net: torch.nn.Module, schedule: NoiseSchedule | FlowSchedule, x0: Tensor, cond: Conditioning,
                 t: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Per-sample loss [B]: ||net(x_t, t, cond) - x0||^2 / E, x_t the objective's noising of the (standardised)
    embedding x0 [B, E] at a random t (DDPM: a uniform step, the network sees it; flow: its training density, the
    network sees t * time_scale)."""
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    if isinstance(schedule, FlowSchedule):
        # the velocity's error, (x_t - x0_hat) / t - (x_t - x0) / t = (x0 - x0_hat) / t: what the sampler integrates
        err = (net(x_t, schedule.model_time(t), cond).float() - x0.float()) / t.float().clamp_min(FLOW_T_MIN)[:, None]
        return err.pow(2).mean(1)
    return (net(x_t, t, cond).float() - x0.float()).pow(2).mean(1)


def sample_x0(net: torch.nn.Module, schedule: NoiseSchedule | FlowSchedule, cond: Conditioning,
              uncond: Conditioning | None, guidance: float, sampler: str, steps: int, x_T: Tensor,
              generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Samples [B, E] from noise x_T with an x0-predicting `net(x_t, t, cond)`, classifier-free guided against
    `uncond` (guidance is affine in the output, so guiding x0 is guiding eps or the velocity). DDPM's samplers read
    the output as x0; rectified flow's get the velocity (x_t - x0) / t (they never evaluate t = 0)."""
    x0_fn = cfg_model_fn(net, cond, uncond, guidance)
    kwargs = dict(x_T=x_T, device=x_T.device, steps=steps, generator=generator)  # generator: ddpm's step noise
    if isinstance(schedule, FlowSchedule):
        def model_fn(x_t: Tensor, t_net: Tensor) -> Tensor:
            t = (t_net.to(x_t.dtype) / schedule.time_scale).clamp_min(1e-4)[:, None]
            return (x_t - x0_fn(x_t, t_net)) / t
    else:
        model_fn = x0_fn
        kwargs.update(prediction="x0", **({"eta": 0.0} if sampler == "ddim" else {}))
    return samplers.sample(sampler, model_fn, schedule, tuple(x_T.shape), **kwargs)


class DiffusionPriorModule(Stage):
    stage_kind = "prior"

    def __init__(
        self,
        clip_ckpt: str | None = None,
        prior: dict | None = None,
        objective: str = "ddpm",
        schedule: dict | None = None,
        flow: dict | None = None,
        p_uncond: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        sampler: str = "ddim",
        sample_steps: int = 25,
        guidance: float = 1.0,
        candidates: int = 2,
        frozen: dict | None = None,
    ):
        """
        Args:
            clip_ckpt: the stage-1 CLIP checkpoint (frozen; it encodes captions at sampling time).
            prior: PriorConfig fields; embed_dim, context_dim and max_tokens default to the CLIP's.
            objective: ddpm (a noise schedule, `schedule`) or flow (rectified flow, `flow`); the network predicts the
                clean embedding in both (DALL-E 2 sec. 2.1).
            p_uncond: probability that a caption is replaced by the empty caption during training.
            sampler, sample_steps, guidance: defaults for `sample` and the in-loop evaluation.
            candidates: draws per caption at sampling; the one whose embedding has the higher dot product with the
                caption's is kept (DALL-E 2: 2; 1 = no selection).
            frozen: filled in by `from_checkpoint`: the embedded CLIP checkpoint (not for configs).
        """
        super().__init__()
        if objective not in samplers.OBJECTIVES:
            raise ValueError(f"model.init_args.objective: {objective!r} is not one of {samplers.OBJECTIVES}")
        if objective == "flow" and schedule:
            raise ValueError("model.init_args.schedule is DDPM's; with objective flow set model.init_args.flow")
        if objective == "ddpm" and flow:
            raise ValueError("model.init_args.flow is set but model.init_args.objective is ddpm: set objective: flow")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.init_args.p_uncond must be in [0, 1), got {p_uncond}")
        if candidates < 1:
            raise ValueError(f"model.init_args.candidates must be >= 1, got {candidates}")
        try:
            samplers.check_sampler(sampler, objective)
        except ValueError as err:
            raise ValueError(f"model.init_args.sampler: {err}") from None
        self.save_hyperparameters(ignore=["frozen"])

        frozen = frozen or {}
        if "clip" in frozen:
            clip = frozen["clip"]
        elif not clip_ckpt:
            raise ValueError("model.init_args.clip_ckpt is required: the stage-1 clip checkpoint")
        else:
            clip = CLIPModule.read_checkpoint(clip_ckpt)
        self.clip = CLIPModule.from_checkpoint_dict(clip, source=None if "clip" in frozen else clip_ckpt)
        self.clip.requires_grad_(False)
        self._frozen_blocks = {"clip": {k: v for k, v in clip.items() if k in ("hyper_parameters", "lit_diffusion")}}

        cfg = dict(prior or {})
        embed_dim, text_width = int(self.clip.embed_dim), int(self.clip.text_width)
        context_length = int(self.clip.tokenizer.context_length)
        for key, want in (("embed_dim", embed_dim), ("context_dim", text_width)):
            if cfg.get(key) is not None and int(cfg[key]) != want:
                raise ValueError(f"model.init_args.prior.{key} = {cfg[key]} does not match the CLIP's {want} "
                                 f"({clip_ckpt})")
        cfg.setdefault("embed_dim", embed_dim)
        cfg.setdefault("context_dim", text_width)
        cfg.setdefault("max_tokens", context_length)
        self.prior = DiffusionPrior(PriorConfig.from_dict(cfg))
        self.objective = objective
        # flow: uniform training times by default; logit-normal's (the image default) rarely visits the ends, where
        # an x0-predicting prior's velocity (x_t - x0) / t is most sensitive (tests/test_prior.py: a Gaussian's
        # covariance off by 0.21 after 1500 steps, against 0.025 after 600 uniform ones)
        self.schedule = (FlowSchedule(**{"timesteps": "uniform", **(flow or {})}) if objective == "flow"
                         else NoiseSchedule(**(schedule or {})))
        # the standardisation of CLIP image embeddings (see the module docstring): set from the manifest in `setup`
        self.register_buffer("embedding_mean", torch.zeros(embed_dim))
        self.register_buffer("embedding_std", torch.ones(embed_dim))
        self._null_cond: Conditioning | None = None
        self._clip_hash: str | None = None
        # per-sample rows, gathered from every rank at the epoch's end. All 1-D ([N] or flattened [N * E]): a rank
        # with no val sample syncs torchmetrics' 1-D empty placeholder, and the tensors gathered must agree in rank
        self._metrics = {name: CatMetric(nan_strategy="disable")  # a NaN shows in the figures, not dropped
                         for name in ("key", "loss", "prior_cos", "text_cos", "image", "pooled")}
        self._metrics["key"].set_dtype(torch.float64)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def init_args_from_checkpoint(cls, ckpt: dict, source: str) -> dict:
        block, state = ckpt["lit_diffusion"], ckpt.get("state_dict") or {}
        if not isinstance(block.get("frozen"), dict) or "clip" not in block["frozen"]:
            raise CheckpointError(f"{source}: the prior checkpoint holds no embedded clip")
        weights = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        return {**cls.accepted_args(ckpt.get("hyper_parameters") or {}),
                "frozen": {"clip": {**block["frozen"]["clip"], "state_dict": weights}}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_diffusion"] = stage_block("prior", frozen=self._frozen_blocks, objective=self.objective,
                                                  schedule=self.schedule.config)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for metric in self._metrics.values():
            metric._apply(fn, *args, **kwargs)
        # torchmetrics resets a metric's dtype on every move: the keys' 52-bit seeds must stay exact in float64
        self._metrics["key"].set_dtype(torch.float64)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------------------------------------- data
    def clip_hash(self) -> str:
        if self._clip_hash is None:
            self._clip_hash = state_dict_hash(self.clip.state_dict())
        return self._clip_hash

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        manifests = getattr(datamodule, "manifests", None) or {}
        if not manifests:
            raise ValueError("the prior trains from latent shards with CLIP image embeddings: give it a "
                             "lit_diffusion.data.datamodule.LatentDataModule (`data encode --image-embeddings`)")
        for manifest in manifests.values():
            self.check_latents(manifest)
        if stage != "fit":  # a trained prior's outputs are in the space of its own training data's statistics
            return
        stats = require_image_embeddings(manifests.get("train") or next(iter(manifests.values())), "the prior")
        self.embedding_mean.copy_(torch.tensor(stats["mean"], dtype=torch.float32))
        self.embedding_std.copy_(torch.tensor(stats["std"], dtype=torch.float32).clamp_min(1e-6))

    def check_latents(self, manifest: dict) -> None:
        """Refuse shards without image embeddings (naming the flag), encoded by another CLIP, or whose caption
        features lack the end-of-text token (`check_text_mask`)."""
        stats = require_image_embeddings(manifest, "the prior")
        check_hashes(manifest, {"clip": self.clip_hash()})
        check_text_mask(manifest, self.clip.tokenizer)
        if int(stats["dim"]) != self.prior.config.embed_dim:
            raise ValueError(f"{manifest.get('path')}: image embeddings of width {stats['dim']}, the prior's CLIP "
                             f"gives {self.prior.config.embed_dim}")

    def standardise(self, embedding: Tensor) -> Tensor:
        return (embedding.float() - self.embedding_mean) / self.embedding_std

    def to_clip_space(self, x: Tensor) -> Tensor:
        """A standardised sample back into CLIP's space: de-standardised and L2-normalised."""
        return F.normalize(x.float() * self.embedding_std + self.embedding_mean, dim=-1)

    # ----------------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self.clip.caption_conditions(list(prompts))

    def null_cond(self, batch: int) -> Conditioning:
        """The empty caption's encoding: the unconditional branch of classifier-free guidance."""
        if self._null_cond is None or self._null_cond.context.device != self.device:
            self._null_cond = self.encode_prompts([""])
        return self._null_cond.expand(batch)

    @staticmethod
    def batch_cond(batch: dict) -> Conditioning:
        return Conditioning(context=batch["context"], mask=batch["mask"], pooled=batch["pooled"])

    # ----------------------------------------------------------------------------------------------- training
    def prior_losses(self, x0: Tensor, cond: Conditioning, t: Tensor | None = None, noise: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        return prior_losses(self.prior, self.schedule, x0, cond, t, noise, generator)

    def _embedding(self, batch: dict) -> Tensor:
        if batch.get("image_embedding") is None:
            raise ValueError("the prior needs CLIP image embeddings in its batches: encode the data with "
                             "`lit-diffusion data encode --image-embeddings`")
        return batch["image_embedding"]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        cond = drop_conditioning(self.batch_cond(batch), self.null_cond(1), self.hparams.p_uncond)
        loss = self.prior_losses(self.standardise(self._embedding(batch)), cond).mean()
        self.log("train/loss", loss, batch_size=len(batch["caption"]))
        return loss

    def configure_optimizers(self):
        h = self.hparams
        return adamw_with_warmup(self, self.prior.parameters(), h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps)

    # ------------------------------------------------------------------------------------------------ sampling
    def guidance_scale(self, guidance: float | None = None) -> float:
        """The guidance scale sampling uses: `guidance`, or the stage's default when None."""
        return self.hparams.guidance if guidance is None else float(guidance)

    @torch.no_grad()
    def sample_embeddings(self, cond: Conditioning, uncond: Conditioning | None = None, guidance: float | None = None,
                          sampler: str | None = None, steps: int | None = None, candidates: int | None = None,
                          seeds: Sequence[int] | int = 0) -> Tensor:
        """CLIP image embeddings [B, E] (L2-normalised) for the captions encoded in `cond` (`encode_prompts`, or a
        latent batch's features). `uncond`: the empty caption's encoding by default, or a negative caption's.
        Each caption's draws start from noise seeded by its seed (`seeds`: one per caption, or one int for the
        batch), so a caption's embedding does not depend on its batch; of `candidates` draws the one with the
        higher dot product with the caption's embedding is kept."""
        h = self.hparams
        guidance = self.guidance_scale(guidance)
        sampler, steps = sampler or h.sampler, steps or h.sample_steps
        candidates = h.candidates if candidates is None else int(candidates)
        samplers.check_sampler(sampler, self.objective)
        b, e = cond.batch_size, self.prior.config.embed_dim
        seeds = [seeds + i for i in range(b)] if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for {b} captions")
        uncond = self.null_cond(b) if uncond is None else uncond.expand(b)
        # draw j of caption i is row j * B + i: every caption's draws from its own generator, in a fixed order. Not
        # seeded by the seed itself: unCLIP gives the decoder the same seeds, and its starting latent, drawn from
        # manual_seed(seed), would begin with exactly this noise, tying the image's noise to its embedding
        noise = torch.stack([torch.randn(candidates, e, generator=torch.Generator().manual_seed(key_seed(f"{s}/x_T")))
                             for s in seeds])
        x_T = noise.transpose(0, 1).reshape(candidates * b, e).to(self.device)
        # ddpm's step noise: row j * B + i from its own generator, so a caption's draws do not depend on its batch
        step_noise = [torch.Generator().manual_seed(key_seed(f"{s}/{j}")) for j in range(candidates) for s in seeds]
        rep = lambda c: c.map(lambda t: t.repeat(candidates, *([1] * (t.ndim - 1))))  # noqa: E731
        with eval_mode(self):
            x0 = sample_x0(self.prior, self.schedule, rep(cond), rep(uncond), guidance, sampler, steps, x_T,
                           generator=step_noise if sampler == "ddpm" else None)
        draws = self.to_clip_space(x0).reshape(candidates, b, e)  # [K, B, E]
        score = (draws * cond.pooled.float()[None]).sum(-1)  # [K, B] dot product with the caption's embedding
        best = score.argmax(0)  # [B]
        return draws[best, torch.arange(b, device=draws.device)]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
               seed: int | Sequence[int] = 0, **kwargs) -> Tensor:
        """CLIP image embeddings [B, E] for `prompts`; `negative_prompts` (one, or one per prompt) replace the
        empty caption as guidance's unconditional branch. Keyword arguments as `sample_embeddings`."""
        cond = self.encode_prompts(prompts)
        uncond = None
        if negative_prompts is not None:
            # at guidance 1 the unconditional branch, where the negative caption goes, is not evaluated
            if self.guidance_scale(kwargs.get("guidance")) == 1.0:
                raise ValueError("negative prompts steer the prior only with guidance > 1, and its guidance is 1.0: "
                                 "give a prior guidance (`--prior-guidance`, `prior_guidance=`)")
            negative = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
            if len(negative) not in (1, len(prompts)):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one, or one per "
                                 f"prompt")
            uncond = self.encode_prompts(negative)
        return self.sample_embeddings(cond, uncond, seeds=seed, **kwargs)

    # ---------------------------------------------------------------------------------------------- evaluation
    def _val_losses(self, x0: Tensor, cond: Conditioning, keys: Sequence[str]) -> Tensor:
        """Per-sample losses [B] at each sample's own t and noise (seeded by its key), so a sample's loss does not
        depend on its batch or rank."""
        t, noise = [], []
        for key in keys:
            gen = torch.Generator().manual_seed(key_seed(f"{key}/val_loss"))
            t.append(self.schedule.sample_timesteps(1, device="cpu", generator=gen))
            noise.append(torch.randn(1, x0.shape[1], generator=gen))
        t, noise = torch.cat(t).to(self.device), torch.cat(noise).to(x0)
        return self.prior_losses(x0, cond, t=t, noise=noise)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Rows for the epoch's figures; nothing is logged per step, where a rank without val samples (more ranks
        than val batches) would miss a collective. Every figure is a mean over the gathered rows."""
        true = self._embedding(batch).float()
        cond = self.batch_cond(batch)
        loss = self._val_losses(self.standardise(true), cond, batch["key"])
        seeds = [key_seed(k) for k in batch["key"]]
        sampled = self.sample_embeddings(cond, seeds=seeds)
        true = F.normalize(true, dim=-1)
        pooled = F.normalize(cond.pooled.float(), dim=-1)
        m = self._metrics
        m["key"].update(torch.tensor(seeds, dtype=torch.float64, device=self.device))
        m["loss"].update(loss)
        m["prior_cos"].update((sampled * true).sum(-1))
        m["text_cos"].update((pooled * true).sum(-1))
        m["image"].update(true.flatten())
        m["pooled"].update(pooled.flatten())

    def on_validation_epoch_end(self) -> None:
        m = self._metrics
        values = {name: metric.compute() for name, metric in m.items()}  # gathered from every rank
        for metric in m.values():
            metric.reset()
        e = self.prior.config.embed_dim
        order = values["key"].argsort()  # key order: the same whatever rank a sample was on
        image, pooled = values["image"].view(-1, e)[order], values["pooled"].view(-1, e)[order]
        unrelated = (image * pooled.roll(1, dims=0)).sum(-1)  # each image against the previous sample's caption
        self.log("val/loss", values["loss"].mean(), prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log_dict({"val/prior_cos": values["prior_cos"].mean(),
                       "val/prior_cos_text_baseline": values["text_cos"].mean(),
                       "val/prior_cos_unrelated": unrelated.mean()}, sync_dist=False, rank_zero_only=False)
