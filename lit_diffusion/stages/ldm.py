"""Stage 3: a denoiser (U-Net or DiT) learns to denoise VAE latents, conditioned on the frozen CLIP text encoder,
with DDPM's objective (eps / v / x0 on a noise schedule) or rectified flow's (velocity on a straight path).

The backbone and the objective are independent choices of the config (`unet:` or `dit:`; `objective: ddpm | flow`):
both networks have one call, `(x_t, t, cond) -> output` with `cond` a `Conditioning` (text tokens and mask,
pooled text, size and crop), and the objective only decides what the output means, so everything else here (conditioning, CFG dropout, EMA, sampling, checkpoints) is shared.

Condition dropout (`p_uncond`) replaces a caption's encoding by the empty caption's, so one network learns the
conditional and the unconditional prediction that classifier-free guidance and negative prompts combine at
sampling time. The frozen CLIP and VAE are submodules: their weights and configs travel inside ldm.ckpt, so a
finished checkpoint samples on its own even after the stage-1/2 files are gone.

Training runs them on each image batch, or on none: batches of latent shards (`data encode`, `LatentDataModule`)
already hold the VAE latents and CLIP's text features, and `setup` refuses shards whose manifest names other
encoder weights than the frozen ones here.
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import torch
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import wrap
from torchmetrics import MeanMetric

from lit_diffusion.data.latents import check_hashes, check_text_mask, require_image_embeddings, state_dict_hash
from lit_diffusion.diffusion import samplers
from lit_diffusion.diffusion.flow import FlowSchedule
from lit_diffusion.diffusion.guidance import cfg_model_fn, drop_conditioning, drop_image_embedding
from lit_diffusion.diffusion.schedule import LOSS_WEIGHTINGS, PREDICTIONS, NoiseSchedule, randn_per_sample
from lit_diffusion.models.conditions import Conditioning, size_condition
from lit_diffusion.models.dit import DiT, DiTConfig
from lit_diffusion.models.repa import (
    Projector,
    RepaConfig,
    capture_hidden,
    clip_patch_features,
    hidden_block,
    repa_loss,
)
from lit_diffusion.models.unet import UNet, UNetConfig
from lit_diffusion.runtime.rng import key_seed
from lit_diffusion.stages.base import CheckpointError, Stage, stage_block
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.common import adamw_with_warmup, eval_mode
from lit_diffusion.stages.vae import VAEModule

log = logging.getLogger("lit_diffusion")

CONDITIONS = ("text", "text+image_embedding", "image_embedding")


def _no_patch_features(what: str, also: str = "") -> str:
    """REPA from latent shards that lack its targets: what to do (the same words at setup and per batch)."""
    return (f"model.init_args.repa needs the CLIP patch features of every image, but {what} have none: encode the "
            f"data again with `lit-diffusion data encode --patch-features`, or {also}set repa: null")


class LatentDiffusionModule(Stage):
    stage_kind = "ldm"

    def __init__(
        self,
        clip_ckpt: str | None = None,
        vae_ckpt: str | None = None,
        init_from: str | None = None,
        image_size: int = 32,
        frames: int = 1,
        frame_stride: int = 1,
        unet: dict | None = None,
        dit: dict | None = None,
        pooled_text: bool = False,
        condition: str = "text",
        objective: str = "ddpm",
        schedule: dict | None = None,
        flow: dict | None = None,
        prediction: str | None = None,
        loss_weighting: str = "plain",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        sample_posterior: bool = False,
        p_uncond: float = 0.1,
        p_uncond_image: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance: float = 3.0,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        image_guidance: float | None = None,
        clip_x0: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        frozen: dict | None = None,
        repa: dict | None = None,
    ):
        """
        Args:
            clip_ckpt, vae_ckpt: the stage-1 and stage-2 checkpoints (frozen here).
            init_from: an earlier ldm checkpoint (e.g. a phase at a lower resolution) whose denoiser weights start
                this run; its frozen CLIP and VAE must be these. Not a hyper-parameter (see `load_denoiser`).
            image_size: pixel size of the training images; latents are image_size // VAE factor.
            frames: a video model's clip length (frames it samples; 1: an image model). Clips (batches with
                "video" [B, T, 3, H, W], `data.video.VideoDataModule`) go through the frozen VAE frame by frame, to
                latents [B, T, C, h, w], which the DiT takes as spatio-temporal patches (`dit.temporal_patch` and
                `dit.attention`) and the U-Net frame by frame with attention across the frames
                (`unet.temporal_attention`, `unet.space_time_attention`); image batches still train either as
                one-frame videos.
            frame_stride: a video model's time between frames, in frames of the source clips (the data module's
                `frame_stride`, which must equal it; latent clips are encoded at 1): `evaluate` reads the real
                clips at it, so they move as fast as the model's.
            unet: UNetConfig fields; in/out channels and context width default to the VAE's and CLIP's.
            dit: DiTConfig fields (or `preset: B/2` and overrides) instead of `unet`: a transformer over latent
                patches (models/dit.py). Give one of the two; neither means a default U-Net.
            pooled_text: also add CLIP's pooled text embedding to the denoiser's timestep embedding (unCLIP's
                decoder): colour, shape and size reach every block directly, which speeds up learning them.
            condition: what the denoiser is conditioned on: `text` (the caption's token features, Stable
                Diffusion's way), `text+image_embedding` (also the CLIP image embedding: unCLIP's decoder, DALL-E 2
                sec. 2.1; at sampling it comes from the prior, an image or an interpolation) or `image_embedding`
                (the caption is never shown: the empty caption's encoding stands in for it). The image embedding is
                added to the timestep embedding and projected into `image_tokens` extra context tokens.
            objective: ddpm (a noise schedule; the network predicts `prediction`) or flow (rectified flow: the
                network predicts the velocity eps - x0; diffusion/flow.py).
            schedule: ddpm only: NoiseSchedule arguments (num_timesteps, schedule=linear|cosine|scaled_linear,
                zero_terminal_snr).
            flow: flow only: FlowSchedule arguments (timesteps=uniform|logit_normal, logit_mean, logit_std, shift).
            prediction: ddpm only: what the network predicts, eps (default), v or x0.
            loss_weighting: plain, min_snr (min-SNR-gamma with `min_snr_gamma`) or min_snr_plus_one (v or x0 only:
                also weights the high noise levels that place objects; see `NoiseSchedule.loss_weight`).
            offset_noise: strength of per-channel offset noise (0 = off).
            sample_posterior: train on a draw from the VAE's posterior, mean + std * noise (as Stable Diffusion's
                LDM does), instead of its mean: online through the VAE, or from latent shards encoded with `--std`.
            p_uncond: probability that a caption is replaced by the empty caption during training (DALL-E 2's
                decoder: 0.5).
            p_uncond_image: with an image-embedding condition, probability that the embedding is dropped (zeroed:
                the learned null embedding stands in), independently of the caption (DALL-E 2: 0.1).
            sampler, sample_steps, guidance, eta: defaults for `sample` (grids, evaluation).
            guidance_rescale: default for `sample`: blend weight of the guided output rescaled to the conditional
                output's std (Lin et al. 2024, sec. 3.4; they use 0.7), against over-exposure at high guidance
                scales. 0 = plain classifier-free guidance.
            image_guidance: default for `sample` (unCLIP's decoder): a guidance scale for the image embedding of its
                own; `guidance` then guides the caption on top of it (InstructPix2Pix's two-condition guidance, a
                third forward per step; see `diffusion.guidance.cfg_model_fn`). None: one scale for both, as
                DALL-E 2 guides.
            clip_x0: default for `sample`: clamp each step's predicted x0 (scaled latents) to [-clip_x0, clip_x0]
                and recompute eps from it (ADM's clipped sampling). 0 = no clipping.
            channels_last, compile: GPU speed switches for the U-Net.
            frozen: filled in by `from_checkpoint`: the embedded CLIP/VAE checkpoints (not for configs).
            repa: REPA (models/repa.py): {layer: K, weight: 0.5, projector: mlp|conv, features: clip_patches,
                until_step: null, hidden: null}: align block K's output (1-based) with the frozen CLIP image tower's
                patch tokens of the clean image through a training-only projector; null (default) = off. Images
                only (frames 1), not under FSDP; from latent shards the features must be in them
                (`data encode --patch-features`).
        """
        super().__init__()
        # parsed before save_hyperparameters, so checkpoints keep the parsed values
        unet, dit = UNetConfig.parse_strings(unet), DiTConfig.parse_strings(dit)
        if unet and dit:
            raise ValueError("model.init_args.unet and model.init_args.dit are both set: give one denoiser")
        _check_objective(objective, schedule, flow, prediction)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.init_args.loss_weighting: {loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        if loss_weighting == "min_snr_plus_one" and objective == "ddpm" and prediction in (None, "eps"):
            raise ValueError("model.init_args.loss_weighting: min_snr_plus_one needs model.init_args.prediction v or x0 "
                             "(on an eps loss its weight is unbounded at high noise)")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.init_args.p_uncond must be in [0, 1), got {p_uncond}")
        if condition not in CONDITIONS:
            raise ValueError(f"model.init_args.condition: {condition!r} is not one of {CONDITIONS}")
        if not 0.0 <= p_uncond_image < 1.0:
            raise ValueError(f"model.init_args.p_uncond_image must be in [0, 1), got {p_uncond_image}")
        if frames < 1:
            raise ValueError(f"model.init_args.frames must be >= 1, got {frames}")
        if frame_stride < 1:
            raise ValueError(f"model.init_args.frame_stride must be >= 1, got {frame_stride}")
        if frames > 1 and not dit and not UNetConfig.from_dict(unet or {}).takes_clips:
            raise ValueError(f"model.init_args.frames = {frames}: a video model is the DiT over spatio-temporal "
                             f"patches (model.init_args.dit) or the U-Net with temporal layers "
                             f"(model.init_args.unet.temporal_attention or space_time_attention: true)")
        if frames > 1 and condition != "text":
            raise ValueError(f"model.init_args.frames = {frames} with condition {condition!r}: video models are "
                             f"conditioned on text only")
        try:
            samplers.check_sampler(sampler, objective)
        except ValueError as err:
            raise ValueError(f"model.init_args.sampler: {err}") from None
        _check_guidance_rescale_and_clip_x0(guidance_rescale, clip_x0, "model.init_args.")
        if clip_x0 and objective == "flow":  # refused at the first grid or evaluation, well into the run, before
            raise ValueError(f"model.init_args.clip_x0 = {clip_x0} clips the DDPM samplers' predicted x0; the flow "
                             f"samplers (euler, heun) do not take it: leave it 0 for objective flow")
        if image_guidance is not None and condition != "text+image_embedding":
            raise ValueError(f"model.init_args.image_guidance guides the image embedding apart from the caption: it "
                             f"needs condition text+image_embedding (unCLIP's decoder), not {condition!r}")
        if repa:
            try:
                repa = vars(RepaConfig.from_dict(dict(repa)))  # parsed and checked before save_hyperparameters
            except (TypeError, ValueError) as err:
                raise ValueError(f"model.init_args.{err}" if str(err).startswith("repa") else
                                 f"model.init_args.repa: {err}") from None
            if frames > 1:
                raise ValueError("model.init_args.repa aligns image models' features (model.init_args.frames 1)")
        self.save_hyperparameters(ignore=["frozen", "init_from"])  # init_from: this run's checkpoints hold them

        # each stage file is read once: the same dict rebuilds the frozen stage and travels inside ldm.ckpt
        frozen = frozen or {}
        clip = frozen.get("clip") or CLIPModule.read_checkpoint(_required(clip_ckpt, "clip_ckpt", "clip"))
        vae = frozen.get("vae") or VAEModule.read_checkpoint(_required(vae_ckpt, "vae_ckpt", "vae"))
        self.clip = _frozen(CLIPModule, clip, None if "clip" in frozen else clip_ckpt)
        self.vae = _frozen(VAEModule, vae, None if "vae" in frozen else vae_ckpt)
        self._frozen_blocks = {"clip": _embedded(clip), "vae": _embedded(vae)}

        self.latent_channels = int(self.vae.latent_channels)
        factor = int(self.vae.downsample_factor)
        if image_size % factor:
            raise ValueError(f"model.init_args.image_size {image_size} is not divisible by the VAE's factor {factor}")
        self.latent_size = image_size // factor

        name, cfg = ("dit", dict(dit)) if dit else ("unet", dict(unet or {}))
        context_dim = int(self.clip.text_width)
        checks = [("in_channels", self.latent_channels, f"the VAE's latent channels ({vae_ckpt})"),
                  ("out_channels", self.latent_channels, f"the VAE's latent channels ({vae_ckpt})"),
                  ("context_dim", context_dim, f"the CLIP text width ({clip_ckpt})")]
        if pooled_text:
            checks.append(("pooled_dim", int(self.clip.embed_dim), f"the CLIP embedding width ({clip_ckpt})"))
        elif cfg.get("pooled_dim"):
            raise ValueError(f"model.init_args.{name}.pooled_dim is set by model.init_args.pooled_text: true, not by hand")
        if condition != "text":
            checks.append(("image_embedding_dim", int(self.clip.embed_dim), f"the CLIP embedding width ({clip_ckpt})"))
        elif cfg.get("image_embedding_dim"):
            raise ValueError(f"model.init_args.{name}.image_embedding_dim is set by model.init_args.condition: "
                             f"text+image_embedding, not by hand")
        for key, want, what in checks:
            if cfg.get(key) is not None and int(cfg[key]) != want:
                raise ValueError(f"model.init_args.{name}.{key} = {cfg[key]} does not match {what} = {want}")
            cfg[key] = want
        # the attribute is the backbone's name, so U-Net checkpoints keep their `unet.*` keys
        self._net_name = name
        net = DiT(DiTConfig.from_dict(cfg)) if dit else UNet(UNetConfig.from_dict(cfg))
        setattr(self, name, net.to(memory_format=torch.channels_last) if channels_last else net)
        self.objective = objective
        self.prediction = (prediction or "eps") if objective == "ddpm" else None  # flow: always the velocity
        self.schedule = FlowSchedule(**(flow or {})) if objective == "flow" else NoiseSchedule(**(schedule or {}))
        self._compiled_net = None
        self._bucketed = False  # set in `setup` from the data module: batches of several sizes are expected
        self._joint: bool | None = None  # set in `setup`: does the data hold images beside clips (None: unknown)
        self._null_cond: Conditioning | None = None
        self._encoder_hashes: dict[str, str] | None = None
        self.repa_config = RepaConfig(**repa) if repa else None
        projector = self._build_repa_projector() if repa else None
        if projector is not None:  # else no attribute at all: a non-REPA stage's module tree is as it was
            self.repa_projector = projector
        if init_from:  # in __init__, so a resumed run's checkpoint (restored after it) wins
            self.load_denoiser(init_from)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def init_args_from_checkpoint(cls, ckpt: dict, source: str) -> dict:
        """The saved hyper-parameters, and the frozen CLIP and VAE from inside ldm.ckpt (their files may be gone)."""
        block, state = ckpt["lit_diffusion"], ckpt.get("state_dict") or {}
        if not isinstance(block.get("frozen"), dict) or not {"clip", "vae"} <= set(block["frozen"]):
            raise CheckpointError(f"{source}: the ldm checkpoint holds no embedded clip and vae")
        frozen = {}
        for name in ("clip", "vae"):
            weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            frozen[name] = {**block["frozen"][name], "state_dict": weights}
        return {**cls.accepted_args(ckpt.get("hyper_parameters") or {}), "frozen": frozen}

    def load_denoiser(self, path: str) -> None:
        """`init_from`: start from the denoiser of an earlier ldm checkpoint, as SD, SD3 and PixArt continue a
        base-resolution run at a higher one. Only its `unet.*` / `dit.*` weights, strictly (same keys and shapes):
        those it samples with (its EMA copy where it kept one); no optimizer, schedule, EMA or step (a new phase).
        Its frozen CLIP and VAE must be this stage's (same `state_dict_hash`, or the same weights as rounded by an EMA
        copy: `_ema_rounded`), or the denoiser would meet other features than it learned on."""
        try:
            ckpt = self.read_checkpoint(path)  # torch.load(weights_only=True), kind checked
        except CheckpointError as err:
            raise CheckpointError(f"model.init_args.init_from: {err}") from None
        state = ckpt.get("state_dict") or {}
        raw = ckpt.get("current_model_state") or state  # WeightAveraging's: the weights beside its EMA copy
        ours = self.encoder_hashes()
        for name, given in (("clip", self.hparams.clip_ckpt), ("vae", self.hparams.vae_ckpt)):
            embedded = {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}
            theirs = state_dict_hash(embedded)
            if theirs != ours[name] and not _ema_rounded(embedded, getattr(self, name).state_dict()):
                raise CheckpointError(
                    f"model.init_args.init_from: {path} was trained with another frozen {name} (state_dict_hash "
                    f"{theirs[:16]}) than this stage's {given} ({ours[name][:16]}): continue it with the {name} "
                    f"checkpoint it was trained with (model.init_args.{name}_ckpt)")
        prefix = self._net_name + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            nets = sorted({k.split(".")[0] for k in state} & {"unet", "dit"})
            raise CheckpointError(f"model.init_args.init_from: {path} holds no {prefix}* weights (its denoiser: "
                                  f"{', '.join(nets) or 'none'}), and this stage trains a {self._net_name}")
        own = self.network.state_dict()
        missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
        wrong = [f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})" for k, v in weights.items()
                 if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(f"model.init_args.init_from: {path}: its {self._net_name} weights do not match this "
                                  f"stage's config (missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes "
                                  f"{wrong[:5]})")
        self.network.load_state_dict(weights, strict=True)
        log.info("ldm: the %s starts from %s", self._net_name, path)

    def load_weights(self, state: dict, source: str) -> None:
        """As `Stage.load_weights`; a REPA checkpoint's projector (training-only) is left out when this stage has
        none: rebuilt around a CLIP without its image tower, which sampling does not need."""
        if self._projector() is None:
            state = {k: v for k, v in state.items() if not k.startswith("repa_projector.")}
        super().load_weights(state, source)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_diffusion"] = stage_block(
            "ldm", frozen=self._frozen_blocks, latent_size=self.latent_size, latent_channels=self.latent_channels,
            objective=self.objective, schedule=self.schedule.config, prediction=self.prediction)

    # ------------------------------------------------------------------------------------------- conditioning
    @property
    def network(self) -> torch.nn.Module:
        """The trained denoiser: `self.unet` or `self.dit`."""
        return getattr(self, self._net_name)

    @property
    def sharded(self) -> bool:
        """True when FSDP shards the denoiser: each of its calls then all-gathers the weights, a collective, so every
        rank must sample in step with the others (sample grids, in-loop evaluation)."""
        return isinstance(self.network, FullyShardedDataParallel)

    def configure_model(self) -> None:
        # Under Lightning's FSDPStrategy this hook runs inside its `enable_wrap` context: `wrap` shards the denoiser
        # alone (blocks split by the strategy's auto_wrap_policy), and the strategy, finding an FSDP module, leaves
        # the rest unwrapped. The frozen CLIP and VAE stay whole on every rank: they are small next to a denoiser
        # worth sharding, and FSDP refuses their scalar parameters (CLIP's logit_scale). Elsewhere `wrap` is a no-op.
        if not isinstance(self.network, FullyShardedDataParallel):
            # which weights decay, while their shapes show it (sharded, each is a flat 1-d view of its shard)
            self._decay_ids = {id(p) for p in self.network.parameters() if p.ndim >= 2}
            setattr(self, self._net_name, wrap(self.network, use_orig_params=True))  # the groups need them
        if self.hparams.compile and self._compiled_net is None:
            self._compiled_net = torch.compile(self.network)
        if self.repa_config is not None and self.sharded:
            raise ValueError("model.init_args.repa is not supported under FSDP yet (its projector would not be "
                             "sharded nor its gradients reduced): train it with DDP, or set repa: null")

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        net = self._compiled_net if self._compiled_net is not None else self.network
        if self.hparams.channels_last:  # a clip [B, T, C, h, w]: each frame channels-last, as the U-Net folds them
            x_t = (x_t.contiguous(memory_format=torch.channels_last) if x_t.ndim == 4 else
                   x_t.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x_t.shape[:2]))
        return net(x_t, t, cond)

    @property
    def size_conditioning(self) -> bool:
        return bool(self.network_config.size_conditioning)

    @property
    def network_config(self):
        net = self.network
        return getattr(net, "module", net).config  # FSDP wraps the denoiser

    def schedule_for(self, latent_height: int, latent_width: int):
        """The objective's schedule for latents of this size: rectified flow shifts its times with the resolution
        (`flow.base_latent`), per bucket at training and per request at sampling; DDPM's is the same for all."""
        if self.objective != "flow":
            return self.schedule
        return self.schedule.at_resolution(latent_height, latent_width)

    @property
    def vae_factor(self) -> int:
        return int(self.vae.downsample_factor)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The latent (h, w) of an image of height x width pixels (default: the square `image_size`); a size the
        VAE and the denoiser cannot take is refused, naming the multiples they need."""
        height = self.hparams.image_size if height is None else int(height)
        width = self.hparams.image_size if width is None else int(width)
        cfg = self.network_config
        inner = getattr(cfg, "patch_size", None) or 2 ** (len(getattr(cfg, "channel_mult", (1,))) - 1)
        multiple = self.vae_factor * inner
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"{height}x{width} px: this model samples heights and widths that are multiples of "
                             f"{multiple} (VAE factor {self.vae_factor} x the {self._net_name}'s {inner}), such as "
                             f"{max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)}")
        return height // self.vae_factor, width // self.vae_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        cond = self.clip.caption_conditions(list(prompts))
        return cond if self.hparams.pooled_text else cond.replace(pooled=None)

    def null_cond(self, batch: int) -> Conditioning:
        """The empty caption's encoding: the unconditional branch of classifier-free guidance."""
        if self._null_cond is None or self._null_cond.context.device != self.device:
            self._null_cond = self.encode_prompts([""])
        return self._null_cond.expand(batch)

    @property
    def image_conditioned(self) -> bool:
        """unCLIP's decoder: conditioned on a CLIP image embedding (`condition`)."""
        return self.hparams.condition != "text"

    @torch.no_grad()
    def encode_image_embeddings(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> the frozen CLIP's image embeddings [B, E], L2-normalised (the centre
        square at CLIP's size, as `data encode --image-embeddings` computes them)."""
        return self.clip.encode_image(images.to(self.device) * 2 - 1).float()

    def _image_embedding(self, embeddings: Tensor | None, batch: int, what: str) -> Tensor | None:
        if not self.image_conditioned:
            if embeddings is not None:
                raise ValueError(f"{what}: image embeddings given, but this model is conditioned on text only "
                                 f"(model.init_args.condition: text)")
            return None
        if embeddings is None:
            raise ValueError(f"{what}: this model is unCLIP's decoder (condition: {self.hparams.condition}) and needs "
                             f"CLIP image embeddings: from a prior (`sample --prior`), an image (`--image`) or "
                             f"latent shards encoded with `data encode --image-embeddings`")
        e = torch.as_tensor(embeddings, device=self.device).float()
        if e.ndim == 1:
            e = e[None]
        if e.shape[0] == 1 and batch > 1:
            e = e.expand(batch, -1)
        if e.shape != (batch, int(self.clip.embed_dim)):
            raise ValueError(f"{what}: image embeddings of shape {tuple(e.shape)}, expected [{batch}, "
                             f"{int(self.clip.embed_dim)}]")
        return e

    @torch.no_grad()
    def encode_images(self, images: Tensor, sample: bool = False) -> Tensor:
        return self.vae.encode(images, sample=sample)  # scaled latents [B, C, h, w]: the posterior's mean or a draw

    # ----------------------------------------------------------------------------------------------- training
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # only the tensors move: Lightning's generic walk would visit every caption and per-sample attribute dict on
        # every step (~0.4 ms a step on the CPU, a tenth of a small DiT's step), and they stay on the host anyway
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def setup(self, stage: str) -> None:
        # here, after the data module's setup and before the strategy moves or casts the weights (16-true would
        # change the frozen encoders' dtypes, and so their hashes)
        datamodule = getattr(self.trainer, "datamodule", None)
        self._bucketed = getattr(datamodule, "buckets", None) is not None
        base = getattr(getattr(datamodule, "bucket_config", None), "base_size", None)  # image data with buckets
        if base is not None and datamodule.bucket_config.sizes is None and int(base) != int(self.hparams.image_size):
            raise ValueError(f"the data module's buckets are of {base} px images' area (data.init_args.buckets."
                             f"base_size, default its image_size), but model.init_args.image_size is "
                             f"{self.hparams.image_size}: sampling and evaluation would be at another area than "
                             f"training; set them equal")
        decoder = getattr(datamodule, "decoder", None)  # a VideoDataModule's
        self._joint = bool(getattr(decoder, "images", False)) if decoder is not None else None
        manifests = getattr(datamodule, "manifests", None) or {}
        for manifest in manifests.values():
            self.check_latents(manifest)
        stride = 1 if manifests else getattr(datamodule, "frame_stride", None)  # latent clips: encoded at stride 1
        if self.hparams.frames > 1 and stride is not None and stride != self.frame_stride:
            raise ValueError(f"the data's clips are read at frame_stride {stride}, but model.init_args.frame_stride is "
                             f"{self.frame_stride}: set them equal (evaluation reads the real clips at the model's)")

    @property
    def frame_stride(self) -> int:
        return int(self.hparams.get("frame_stride", 1))  # checkpoints from before it: 1

    def encoder_hashes(self) -> dict[str, str]:
        """`state_dict_hash` of the frozen CLIP and VAE, as `data encode` computes it for the manifest."""
        if self._encoder_hashes is None:
            self._encoder_hashes = {"clip": state_dict_hash(self.clip.state_dict()),
                                    "vae": state_dict_hash(self.vae.state_dict())}
        return self._encoder_hashes

    def check_latents(self, manifest: dict) -> None:
        """Refuse latent shards that this stage's encoders would not have made: other CLIP or VAE weights (both
        hashes named), another latent scale, latent shape, text width or image size, or caption features without
        the end-of-text token (`check_text_mask`)."""
        check_hashes(manifest, self.encoder_hashes())
        check_text_mask(manifest, self.clip.tokenizer)
        where = manifest.get("path", "the latent manifest")
        if self.image_conditioned:
            stats = require_image_embeddings(manifest, f"the decoder (model.init_args.condition: "
                                                       f"{self.hparams.condition})")
            if int(stats["dim"]) != int(self.clip.embed_dim):
                raise ValueError(f"{where}: image embeddings of width {stats['dim']}, the stage's CLIP gives "
                                 f"{int(self.clip.embed_dim)}")
        scale = {"scale_factor": float(self.vae.scale_factor), "latent_mean": float(self.vae.latent_mean)}
        if manifest.get("latent_scale") != scale:
            raise ValueError(f"{where}: latent scale {manifest.get('latent_scale')}, the stage's VAE has {scale}")
        # encoded at aspect buckets: latents of several sizes, of this base size's area, channels as the VAE's
        latent = ([self.latent_channels, None, None] if manifest.get("buckets")
                  else [self.latent_channels, self.latent_size, self.latent_size])
        if self.hparams.frames > 1 or manifest.get("frames"):  # clips: [T, C, h, w], T the model's
            latent = [self.hparams.frames, *latent]
        if list(manifest["shapes"]["latent"]) != latent or manifest.get("image_size") != self.hparams.image_size:
            raise ValueError(f"{where}: latents {manifest['shapes']['latent']} of {manifest.get('image_size')} px "
                             f"images, but model.init_args.image_size={self.hparams.image_size} and the VAE give "
                             f"{latent}")
        if self.repa_config is not None:
            self._check_patch_features(manifest)
        text = [int(self.clip.text_width), int(self.clip.embed_dim)]
        have = [manifest["shapes"]["context"][1], manifest["shapes"]["pooled"][0]]
        if have != text:
            raise ValueError(f"{where}: text features of width {have[0]} and pooled dim {have[1]}, the stage's CLIP "
                             f"gives {text[0]} and {text[1]}")

    def _check_latent_shape(self, z: Tensor, what: str) -> None:
        """Square data: the latents must be the size `image_size` says. Bucketed data (a data module with
        `buckets`): any size the denoiser takes, which it checks itself, naming the sizes it can take."""
        if z.shape[-3] != self.latent_channels:
            raise ValueError(f"{what}: latents with {z.shape[-3]} channels, the stage's VAE has {self.latent_channels}")
        frames = int(self.hparams.frames)
        # one-frame videos are the images of joint training (a data module with images: true), nothing else
        if z.ndim == 5 and z.shape[1] != frames and (z.shape[1] != 1 or self._joint is False):
            raise ValueError(f"{what}: clips of {z.shape[1]} frames, but model.init_args.frames is {frames}: the data "
                             f"module's num_frames (or `data encode --frames`) must be the model's")
        if not self._bucketed and tuple(z.shape[-2:]) != (self.latent_size, self.latent_size):
            raise ValueError(f"{what} gives {z.shape[-2]}x{z.shape[-1]} latents, but model.init_args.image_size="
                             f"{self.hparams.image_size} expects {self.latent_size}x{self.latent_size} (for several "
                             f"sizes, give the data module `buckets`)")

    def _size_condition(self, batch: dict) -> Tensor | None:
        """[B, 6] original size, crop and target size of each sample, when the denoiser is conditioned on them."""
        if not self.size_conditioning:
            return None
        if "video" in batch:
            raise ValueError("the denoiser has size_conditioning, which clips do not carry: video models are trained "
                             "at one size (set size_conditioning false)")
        if batch.get("size") is None:
            raise ValueError("the denoiser has size_conditioning, but the batches carry no sample sizes ('size'): "
                             "latent shards must be encoded again by this version (`lit-diffusion data encode`)")
        return torch.as_tensor(batch["size"], device=self.device).float()  # train workers hand it over as numpy

    def _encode_batch(self, batch: dict, sample: bool = False) -> tuple[Tensor, Conditioning]:
        """An image batch through the frozen VAE and CLIP: latents and caption encodings; a clip batch ("video"
        [B, T, 3, H, W]) through the VAE frame by frame, to [B, T, C, h, w]."""
        if "video" in batch:
            video = batch["video"]
            if self.hparams.frames == 1:
                raise ValueError("a batch of clips ('video'), but model.init_args.frames is 1: an image model")
            z = self.encode_images(video.flatten(0, 1), sample=sample).unflatten(0, video.shape[:2])
            self._check_latent_shape(z, f"data clips of {video.shape[-2]}x{video.shape[-1]} px")
            return z, self.encode_prompts(list(batch["caption"])).replace(size=self._size_condition(batch))
        images = batch["image"]
        z = self.encode_images(images, sample=sample)
        self._check_latent_shape(z, f"data images of {images.shape[-2]}x{images.shape[-1]} px")
        embedding = self.clip.encode_image(images).float() if self.image_conditioned else None  # [B, E]
        return z, self.encode_prompts(list(batch["caption"])).replace(size=self._size_condition(batch),
                                                                      image_embedding=embedding)

    def _from_latents(self, batch: dict, sample: bool = False) -> tuple[Tensor, Conditioning]:
        """A latent-shard batch (`LatentDataModule`): the encoders' outputs are in it, so neither runs."""
        z = batch["latent"]  # [B, C, h, w] (clips: [B, T, C, h, w]), scaled as `encode_images` gives
        if sample:
            if batch.get("latent_std") is None:
                raise ValueError("model.init_args.sample_posterior: true needs the posterior's std in the latent "
                                 "shards: encode them with `lit-diffusion data encode --std`, or set it false")
            z = z + batch["latent_std"] * torch.randn_like(z)  # the std is scaled as the mean is
        self._check_latent_shape(z, f"a latent batch of shape {list(z.shape[1:])}")
        pooled = None
        if self.hparams.pooled_text:
            if batch.get("pooled") is None:
                raise ValueError("model.init_args.pooled_text: true needs CLIP's pooled text embeddings, but the "
                                 "latent batches have none (.pooled.npy): encode the data again, or set it false")
            pooled = batch["pooled"]  # [B, E]
        embedding = None
        if self.image_conditioned:
            embedding = self._image_embedding(batch.get("image_embedding"), z.shape[0], "a latent batch")
        return z, Conditioning(context=batch["context"], mask=batch["mask"], pooled=pooled,  # [B, L, W], [B, L]
                               size=self._size_condition(batch), image_embedding=embedding)

    def _text_condition(self, cond: Conditioning) -> Conditioning:
        """`condition: image_embedding`: the caption is never shown, the empty caption's encoding stands in."""
        if self.hparams.condition != "image_embedding":
            return cond
        null = self.null_cond(cond.batch_size)
        return cond.replace(context=null.context, mask=null.mask, pooled=null.pooled)

    def model_step(self, batch: dict, train: bool, generator: torch.Generator | None = None,
                   per_key: bool = False) -> Tensor:
        """The batch's mean loss. `per_key`: each sample's t and noise from its key's own seed (validation: a
        sample's loss then depends on neither its batch nor its rank)."""
        sample = train and self.hparams.sample_posterior
        z, cond = self._from_latents(batch, sample) if "latent" in batch else self._encode_batch(batch, sample)
        cond = self._text_condition(cond)
        if train:  # condition dropout: the same network learns the unconditional branch of CFG
            cond = drop_conditioning(cond, self.null_cond(1), self.hparams.p_uncond)
            cond = drop_image_embedding(cond, self.hparams.p_uncond_image)
        h = self.hparams
        objective = {"prediction": self.prediction} if self.objective == "ddpm" else {}  # flow: always velocity
        schedule = self.schedule_for(*z.shape[-2:])
        t = noise = None
        if per_key:
            gens = [torch.Generator().manual_seed(key_seed(f"{key}/val_loss")) for key in batch["key"]]
            t = torch.cat([schedule.sample_timesteps(1, device="cpu", generator=g) for g in gens]).to(self.device)
            noise = torch.cat([torch.randn(1, *z.shape[1:], generator=g) for g in gens]).to(z)
        losses = schedule.p_losses(
            lambda x_t, t: self.denoiser(x_t, t, cond), z, t=t, noise=noise, weighting=h.loss_weighting,
            gamma=h.min_snr_gamma, offset_noise=h.offset_noise if train else 0.0, generator=generator, **objective)
        return losses.mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if self.repa_config is not None:
            return self._repa_training_step(batch)
        loss = self.model_step(batch, train=True)  # a NaN/inf loss is stopped or skipped by safety.NonFiniteGuard
        # not on the progress bar: Lightning turns bar values into Python numbers after every step, whether or not a
        # bar is drawn, and on a GPU that `.item()` waits for the step to finish instead of queueing the next one.
        # The loggers still get it every `log_every_n_steps`.
        self.log("train/loss", loss, batch_size=len(batch["caption"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        # held in a dict, not as a submodule: no state in checkpoints, nothing for FSDP to wrap
        self._val_metrics = {"loss": MeanMetric(nan_strategy="disable").to(self.device)}  # a NaN batch shows

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        # each sample's t and noise from its key, so val/loss moves only with the weights, and is the same whatever
        # the batching or the number of ranks (a batch-index seed gave batch k of every rank the same draws)
        loss = self.model_step(batch, train=False, per_key=True)
        # accumulated here and logged at the epoch's end: a per-step `sync_dist` collective would be missed by a
        # rank without val batches (more ranks than batches), and the others would wait for it forever
        self._val_metrics["loss"].update(loss.detach().float(), weight=len(batch["caption"]))
        return loss

    def on_validation_epoch_end(self) -> None:
        # every rank computes (the collective of the metric's sum states), whether or not it saw a batch
        self.log("val/loss", self._val_metrics["loss"].compute(), prog_bar=True, rank_zero_only=False)

    def configure_optimizers(self):
        h = self.hparams
        params = self.network.parameters()
        if self._projector() is not None:  # REPA's projector trains with the denoiser (training-only)
            params = itertools.chain(params, self._projector().parameters())
        return adamw_with_warmup(self, params, h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps,
                                 decay_ids=self._decay_ids if self.sharded else None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        self.vae.eval()  # frozen: dropout and norms stay in inference mode
        return self

    # ------------------------------------------------------------------------------------------------- REPA
    def _projector(self) -> Projector | None:
        """REPA's projector, when this stage trains one (a submodule only then)."""
        return self._modules.get("repa_projector")

    def _repa_target_dim(self) -> int | None:
        visual = self.clip.model.visual
        return None if visual is None else int(visual.cfg.width)

    def _build_repa_projector(self) -> Projector | None:
        """The projector from the hidden block's width to CLIP's token width; None when the frozen CLIP has no image
        tower (a checkpoint rebuilt to sample: the projector is training-only). Built with the global RNG forked,
        so a REPA run draws the same noise and timesteps as the same run without it."""
        cfg = self.repa_config
        _, width = hidden_block(getattr(self.network, "module", self.network), int(cfg.layer))
        target_dim = self._repa_target_dim()
        if target_dim is None:
            return None
        with torch.random.fork_rng(devices=[]):
            return Projector(cfg.projector, width, target_dim, cfg.hidden)

    def _check_patch_features(self, manifest: dict) -> None:
        where = manifest.get("path", "the latent manifest")
        stats = manifest.get("patch_features")
        if not stats:
            raise ValueError(_no_patch_features(f"the latent shards of {where}", "train from images, or "))
        if self._repa_target_dim() is not None and int(stats["dim"]) != self._repa_target_dim():
            raise ValueError(f"{where}: patch features of width {stats['dim']}, the stage's CLIP image tower gives "
                             f"{self._repa_target_dim()}")

    @torch.no_grad()
    def encode_patch_features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> the frozen CLIP's patch-token map [B, W, h_c, w_c] (models/repa.py)."""
        if self.clip.model.visual is None:
            raise ValueError("model.init_args.repa: the frozen CLIP has no image tower to give patch features")
        return clip_patch_features(self.clip.model.visual, images.to(self.device))

    def repa_targets(self, batch: dict) -> Tensor:
        """The batch's target map [B, W, h_c, w_c]: from latent shards (`--patch-features`, stored [h_c, w_c, W]) or
        from its clean images through the frozen CLIP."""
        if "latent" in batch:
            features = batch.get("patch_features")
            if features is None:
                raise ValueError(_no_patch_features("the latent batches"))
            return torch.as_tensor(features, device=self.device).float().permute(0, 3, 1, 2)
        return self.encode_patch_features(batch["image"])

    def _repa_training_step(self, batch: dict) -> Tensor:
        """The training step with REPA: the diffusion loss as without it, plus weight * the alignment loss of the
        same forward's hidden state while `repa.active(step)`. Logged: `train/loss` (the diffusion loss, comparable
        with runs without REPA) and `train/repa_loss` (the unweighted alignment loss)."""
        cfg, projector = self.repa_config, self._projector()
        if projector is None:
            raise ValueError("model.init_args.repa: the frozen CLIP has no image tower, so there is no projector "
                             "to train")
        batch_size = len(batch["caption"])
        if not cfg.active(self.global_step):
            loss = self.model_step(batch, train=True)
            self.log("train/loss", loss, batch_size=batch_size)
            # every projector weight still gets a (zero) gradient, so DDP's reducer, which expects one from every
            # parameter, needs no find_unused_parameters; x + 0.0 is x, bit for bit
            return loss + 0.0 * sum(p.sum() for p in projector.parameters())
        net = getattr(self.network, "module", self.network)
        block, _ = hidden_block(net, int(cfg.layer))
        with capture_hidden(net, block) as seen:
            loss = self.model_step(batch, train=True)
        hidden = seen["hidden"]
        if hidden.ndim == 4:  # the U-Net's map [B, C, h, w]
            grid = tuple(hidden.shape[-2:])
        else:  # the DiT's tokens [B, h*w, D] of x_t [B, C, H, W]
            p = int(net.config.patch_size)
            grid = (seen["input"].shape[-2] // p, seen["input"].shape[-1] // p)
        align = repa_loss(projector, hidden, grid, self.repa_targets(batch))
        self.log("train/loss", loss, batch_size=batch_size)
        self.log("train/repa_loss", align, batch_size=batch_size)
        return loss + float(cfg.weight) * align

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sampling_conditions(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                            image_embeddings: Tensor | None = None, height: int | None = None,
                            width: int | None = None) -> tuple[Conditioning, Conditioning, tuple[int, int]]:
        """What the samplers guide with: the prompts' conditions, the unconditional branch's (the empty caption, or
        the negative prompts: one or one per prompt; no image embedding), and the latent (h, w). Both get the size
        condition "original = target, nothing cropped" when the denoiser takes one."""
        b = len(prompts)
        cond = self.encode_prompts(prompts)
        if negative_prompts is None:
            uncond = self.null_cond(b)
        else:
            negative = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
            if len(negative) not in (1, b):
                raise ValueError(f"{len(negative)} negative prompts for {b} prompts: give one, or one per prompt")
            uncond = self.encode_prompts(negative)
        embedding = self._image_embedding(image_embeddings, b, "sample")
        if negative_prompts is not None and self.hparams.get("condition") == "image_embedding":
            log.warning("this decoder never sees a caption (condition: image_embedding): the negative prompt does "
                        "not steer it (with a prior, it steers the prior)")
        if embedding is not None:
            cond = self._text_condition(cond).replace(image_embedding=embedding)
            uncond = self._text_condition(uncond).replace(image_embedding=torch.zeros_like(embedding[:1]).expand(
                uncond.batch_size, -1))
        lh, lw = self.latent_shape(height, width)
        if self.size_conditioning:
            size = size_condition(b, lh * self.vae_factor, lw * self.vae_factor, self.device)
            cond, uncond = cond.replace(size=size), uncond.replace(size=size)
        return cond, uncond, (lh, lw)

    def image_guidance_scale(self, image_guidance: float | None = None) -> float | None:
        """The image embedding's own guidance scale a call samples with: `image_guidance`, or the stage's default
        (None: guided with the caption, one scale)."""
        if image_guidance is None:
            return self.hparams.get("image_guidance")
        condition = self.hparams.get("condition", "text")
        if condition == "text":
            raise ValueError("image_guidance guides an image embedding: this model is conditioned on text only")
        if condition != "text+image_embedding":
            raise ValueError(f"image_guidance guides the image embedding apart from the caption, and this decoder "
                             f"(condition: {condition}) never sees a caption: `guidance` is its image embedding's "
                             f"scale")
        return float(image_guidance)

    def guidance_scales(self, prompts: Sequence[str], negative_prompts, guidance: float,
                        image_guidance: float | None = None) -> tuple[float, float | None]:
        """(the caption's scale, the image embedding's own scale or None) a call guides with. With no caption to
        guide apart (variations, interpolations: every prompt empty, no negative) the caption's branch is the image
        branch, so there is one scale (u + s (i - u)), in one forward of two: this call's image_guidance if it
        gives one, else `guidance` (the model's default image_guidance is for captions)."""
        image_scale = self.image_guidance_scale(image_guidance)
        if image_scale is not None and negative_prompts is None and any(p == "" for p in prompts):
            if not all(p == "" for p in prompts):  # a sample must not depend on the rest of its batch
                raise ValueError("empty and non-empty captions in one call with image guidance: an empty caption "
                                 "is guided with one scale among empty ones and with two beside captions; sample "
                                 "them in separate calls")
            return (image_scale if image_guidance is not None else guidance), None
        return guidance, image_scale

    def use_image_guidance(self, image_guidance: float | None) -> None:
        """Make `image_guidance` this module's default for every later `sample` (checked as `image_guidance_scale`
        checks it); None keeps the default it has."""
        if image_guidance is not None:
            self.hparams.image_guidance = self.image_guidance_scale(image_guidance)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | str | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int | Sequence[int] = 0,
        eta: float | None = None,
        guidance_rescale: float | None = None,
        clip_x0: float | None = None,
        progress: bool = False,
        return_latents: bool = False,
        height: int | None = None,
        width: int | None = None,
        image_embeddings: Tensor | None = None,
        x_T: Tensor | None = None,
        frames: int | None = None,
        image_guidance: float | None = None,
    ) -> Tensor:
        """Images [B, 3, height, width] in [0, 1] for `prompts` (default: the square `image_size`); a video model's
        clips [B, T, 3, height, width], T = `frames` (default: the model's `frames`; 1 gives images).

        `seed`: one int for the batch, or one per prompt; with per-prompt seeds a sample's starting noise, and a
        stochastic sampler's step noise (ddpm, ddim with eta > 0), come from its own generator, so every sampler
        gives the same image for a prompt whatever the batch or the rank it lands on.
        `guidance_rescale` (0 = plain CFG) and `clip_x0` (0 = off): see `__init__`. None takes the stage's default.
        `height`, `width`: pixels, multiples of the VAE's factor times the denoiser's own (downsamplings or patch);
        with size conditioning the model is told "original = target, nothing cropped" (SDXL's default).
        `image_embeddings` [B, E] (or one [E] for all): unCLIP's decoder's condition, CLIP image embeddings from a
        prior, an image or an interpolation (`condition` other than text); guidance's unconditional branch has none
        (the learned null embedding) beside the empty or negative caption.
        `x_T`: the starting latents [B, C, h, w] (a clip's [B, T, C, h, w]) instead of seeded noise (an inverted
        image, `invert`).
        `image_guidance`: the image embedding's own guidance scale (see `__init__`); None takes the stage's. With
        the empty caption and no negative prompt (variations, interpolations) it is the only scale: `guidance` then
        has no caption to guide.
        """
        h = self.hparams
        guidance = h.guidance if guidance is None else float(guidance)
        sampler = sampler or h.sampler
        steps = steps or h.sample_steps
        if eta is not None and eta != 0 and sampler != "ddim":  # the model's own eta is DDIM's default only
            raise ValueError(f"eta={eta} sets DDIM's step noise; sampler {sampler!r} does not take it (ddpm is eta 1)")
        eta = h.eta if eta is None else eta
        rescale = h.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        clip_x0 = h.clip_x0 if clip_x0 is None else float(clip_x0)
        _check_guidance_rescale_and_clip_x0(rescale, clip_x0)
        samplers.check_sampler(sampler, self.objective)
        if clip_x0 and self.objective == "flow":
            raise ValueError("clip_x0 clips the DDPM samplers' predicted x0; the flow samplers (euler, heun) do not "
                             "take it: leave it 0 for a flow model")
        b = len(prompts)
        cond, uncond, (lh, lw) = self.sampling_conditions(prompts, negative_prompts, image_embeddings, height, width)
        schedule = self.schedule_for(lh, lw)
        frames = h.frames if frames is None else int(frames)
        if frames < 1 or (frames > 1 and h.frames == 1):
            raise ValueError(f"frames={frames}: this is an image model (model.init_args.frames 1)" if frames > 1
                             else f"frames={frames} must be >= 1")
        shape = (b, self.latent_channels, lh, lw) if frames == 1 else (b, frames, self.latent_channels, lh, lw)
        if isinstance(seed, int):
            generator = torch.Generator(device=self.device).manual_seed(seed)
        else:
            if len(seed) != b:
                raise ValueError(f"{len(seed)} seeds for {b} prompts")
            # one generator per sample: its x_T, then (ddpm, ddim with eta > 0) its step noise, whatever its batch
            generator = [torch.Generator().manual_seed(int(s)) for s in seed]
        if x_T is not None:  # given (an inverted image): the generators draw only the step noise
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
            x_T = x_T.to(self.device, torch.float32)
        elif isinstance(seed, int):
            x_T = torch.randn(shape, generator=generator, device=self.device)
        else:
            x_T = randn_per_sample(shape, generator).to(self.device)
        guidance, image_scale = self.guidance_scales(prompts, negative_prompts, guidance, image_guidance)
        model_fn = cfg_model_fn(self.denoiser, cond, uncond, guidance, rescale=rescale, image_scale=image_scale)
        kwargs = dict(generator=generator, x_T=x_T, progress=progress, device=self.device, steps=steps)
        if self.objective == "ddpm":  # the flow samplers (euler, heun) integrate the velocity: nothing more to say
            kwargs.update(prediction=self.prediction, clip_x0=clip_x0 or None)
            if sampler == "ddim":
                kwargs.update(eta=eta)
            elif sampler == "ddpm" and steps >= schedule.num_timesteps:
                kwargs.update(steps=None)  # every timestep
        with eval_mode(self):
            z = samplers.sample(sampler, model_fn, schedule, shape, **kwargs)
            if return_latents:
                return z
            images = self.vae.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2]) if z.ndim == 5 else self.vae.decode(z)
        return ((images.float() + 1) / 2).clamp(0, 1)


def _required(path: str | None, key: str, kind: str) -> str:
    if not path:
        raise ValueError(f"model.init_args.{key} is required: the stage-{'1' if kind == 'clip' else '2'} "
                         f"{kind} checkpoint")
    return path


def _check_objective(objective: str, schedule: dict | None, flow: dict | None, prediction: str | None) -> None:
    if objective not in samplers.OBJECTIVES:
        raise ValueError(f"model.init_args.objective: {objective!r} is not one of {samplers.OBJECTIVES}")
    if objective == "flow":
        for key, value in (("schedule", schedule), ("prediction", prediction)):
            if value:
                raise ValueError(f"model.init_args.{key} is DDPM's; objective flow learns the velocity on a straight "
                                 f"path: set its options under model.init_args.flow")
    elif flow:
        raise ValueError("model.init_args.flow is set but model.init_args.objective is ddpm: set objective: flow")
    if objective == "ddpm" and prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"model.init_args.prediction: {prediction!r} is not one of {PREDICTIONS}")
    if objective == "ddpm" and (schedule or {}).get("zero_terminal_snr") and prediction in (None, "eps"):
        # alpha_bar(T-1) = 0: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is infinite at the first sampling step
        raise ValueError("model.init_args.schedule.zero_terminal_snr needs model.init_args.prediction v or x0: with "
                         "eps the first sampling step's x0 is inf / NaN (Lin et al. 2024, sec. 3.2)")


def _check_guidance_rescale_and_clip_x0(guidance_rescale: float, clip_x0: float, prefix: str = "") -> None:
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"{prefix}guidance_rescale must be in [0, 1] (0 = plain guidance), got {guidance_rescale}")
    if not clip_x0 >= 0.0:
        raise ValueError(f"{prefix}clip_x0 must be >= 0 (0 = no clipping), got {clip_x0}")


def _frozen(cls: type[Stage], ckpt: dict, source: str | None) -> Stage:
    module = cls.from_checkpoint_dict(ckpt, source=source)  # eval mode, which LatentDiffusionModule.train keeps
    module.requires_grad_(False)
    return module


def _ema_rounded(embedded: dict, own: dict) -> bool:
    """`init_from`: are an earlier checkpoint's frozen weights these, as an EMA copy holds them? WeightAveraging
    averages the frozen CLIP and VAE too. Our `callbacks.ema.EMAWeightAveraging` keeps them bit-identical, but
    Lightning's own class (a user's config may name it) computes decay * w + (1 - decay) * w, which is w only up to
    rounding, within about ulp / (1 - decay) (measured: 1e-6 relative at decay 0.995, 2e-4 at 0.9999), so their hash
    differs; other weights (another seed, other steps) differ far more."""
    own = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
    embedded = {k: v for k, v in embedded.items() if isinstance(v, torch.Tensor)}
    return embedded.keys() == own.keys() and all(
        v.shape == own[k].shape and v.dtype == own[k].dtype
        and torch.allclose(v.float(), own[k].detach().cpu().float(), rtol=2e-3, atol=1e-8)
        for k, v in embedded.items())


def _embedded(ckpt: dict) -> dict:
    """What `from_checkpoint` needs to rebuild a frozen stage without its file: its non-tensor checkpoint parts."""
    return {k: v for k, v in ckpt.items() if k in ("hyper_parameters", "lit_diffusion")}
