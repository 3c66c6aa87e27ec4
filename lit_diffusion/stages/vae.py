"""Stage 2: the KL-regularised autoencoder whose latents the diffusion model learns.

Loss = l1_weight * |x - x'| + mse_weight * (x - x')^2 + perceptual_weight * LPIPS-like(x, x')   (means per pixel)
     + kl_weight * KL(q(z|x) || N(0, I))                                          (nats per latent element)
     + disc_weight * adaptive_weight * hinge generator loss                       (after disc_start batches)

The latent scale is measured on the validation data at every validation epoch end (mean and std of the
posterior means over all ranks, exactly), so `encode` hands the diffusion stage latents of unit variance.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lit_diffusion.models.discriminator import PatchGAN, hinge_d_loss, hinge_g_loss
from lit_diffusion.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from lit_diffusion.stages.base import CheckpointError, Stage, load_stage_checkpoint, stage_block
from lit_diffusion.stages.common import adamw_with_warmup

RFID_BACKENDS = (None, "clip", "inception")


class LatentStats(Metric):
    """Mean and std of every element seen, from running sums (float64) that reduce exactly across ranks."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().to(torch.float64)
        self.total += z.sum()
        self.total_sq += z.pow(2).sum()
        self.count += z.numel()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.pow(2)).clamp_min(0.0)
        return mean, var.sqrt()


class VAEModule(Stage):
    stage_kind = "vae"
    skip_on_load = ("discriminator.",)  # not needed to encode or decode; rebuilt without it

    def __init__(
        self,
        arch: VAEConfig | None = None,
        lr: float = 4.5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.5, 0.9),
        warmup_steps: int = 0,
        l1_weight: float = 1.0,
        mse_weight: float = 0.0,
        kl_weight: float = 1e-6,
        sample_posterior: bool = True,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        adaptive_disc_weight: bool = True,
        grad_clip: float | None = None,
        rfid_backend: str | None = None,
        clip_ckpt: str | None = None,
        inception_weights: str | None = None,
        init_from: str | None = None,
    ):
        """VAE training stage.

        arch: the network (`VAEConfig` fields); a plain dict is accepted too (how checkpoints store it).
        sample_posterior: decode a posterior sample in training (the VAE objective) rather than the mean.
        perceptual_weight / perceptual_weights: LPIPS-like term on VGG16 features from a local state-dict file;
            weight 0 or no file -> no perceptual term.
        disc_weight > 0 turns on the PatchGAN (hinge loss) from batch `disc_start` on, with manual optimisation
            of two AdamW optimizers (the discriminator's lr is `disc_lr` or `lr`). With DDP this needs
            `strategy: ddp_find_unused_parameters_true` (the discriminator is idle before disc_start).
        adaptive_disc_weight: scale the GAN term by |grad rec| / |grad gan| at the decoder's last layer (Esser
            et al. 2021), so it neither swamps nor vanishes next to the reconstruction loss.
        grad_clip: max gradient norm in the discriminator (manual) path, where Lightning cannot clip;
            without the discriminator use the Trainer's `gradient_clip_val`.
        rfid_backend: None (no val/rfid), "clip" (features of the CLIP checkpoint `clip_ckpt`) or
            "inception" (torch-fidelity InceptionV3 from the local file `inception_weights`).
        init_from: a VAE stage checkpoint (trained, or written by `lit-diffusion import vae`) to fine-tune: its
            architecture (replacing `arch`), weights and latent scale; validation then re-measures the scale. Not a
            hyper-parameter: this module's own checkpoints hold those weights, and rebuilding one needs no file.
        """
        super().__init__()
        init = None
        if init_from:
            init = load_stage_checkpoint(init_from, "vae")
            arch = init["lit_diffusion"].get("config") or (init.get("hyper_parameters") or {}).get("arch")
        if isinstance(arch, dict):
            arch = VAEConfig(**arch)
        self.config = arch or VAEConfig()
        if rfid_backend not in RFID_BACKENDS:
            raise ValueError(f"rfid_backend must be one of {RFID_BACKENDS}, got {rfid_backend!r}")
        if rfid_backend == "clip" and not clip_ckpt:
            raise ValueError("rfid_backend='clip' needs clip_ckpt (a CLIP stage checkpoint)")
        # plain python only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "arch": asdict(self.config), "lr": lr, "weight_decay": weight_decay, "betas": [float(b) for b in betas],
            "warmup_steps": warmup_steps, "l1_weight": l1_weight, "mse_weight": mse_weight, "kl_weight": kl_weight,
            "sample_posterior": sample_posterior, "perceptual_weight": perceptual_weight,
            "perceptual_weights": None if perceptual_weights is None else str(perceptual_weights),
            "disc_weight": disc_weight, "disc_start": disc_start, "disc_channels": disc_channels,
            "disc_layers": disc_layers, "disc_lr": disc_lr, "adaptive_disc_weight": adaptive_disc_weight,
            "grad_clip": grad_clip, "rfid_backend": rfid_backend,
            "clip_ckpt": None if clip_ckpt is None else str(clip_ckpt),
            "inception_weights": None if inception_weights is None else str(inception_weights),
        })
        self.vae = AutoencoderKL(self.config)
        self.latent_channels = self.config.z_channels
        self.downsample_factor = self.config.downsample_factor
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("latent_mean", torch.tensor(0.0))
        self.latent_scale_measured = False

        self.discriminator = None
        if disc_weight > 0:
            self.discriminator = PatchGAN(self.config.in_channels, disc_channels, disc_layers)
            self.automatic_optimization = False

        if perceptual_weight > 0 and perceptual_weights:
            from lit_diffusion.models.perceptual import PerceptualLoss

            self.add_helper("perceptual", PerceptualLoss(perceptual_weights))
        elif perceptual_weight > 0:
            rank_zero_info("VAE: perceptual_weight > 0 but no perceptual_weights file: no perceptual term")
        self._rfid_ready = False

        self.val_loss = MeanMetric()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.latent_stats = LatentStats()
        if init is not None:  # the VAE's weights and latent scale, every one of them, or an error naming them
            own = self.state_dict()
            # a discriminator the checkpoint lacks (or this module has none of) starts fresh
            state = {k: v for k, v in (init.get("state_dict") or {}).items() if k in own}
            missing = sorted(k for k in own if k not in state and not k.startswith("discriminator."))
            if missing:
                raise CheckpointError(f"{init_from}: VAE weights missing from the checkpoint: {missing[:5]}")
            for key, value in state.items():
                if value.shape != own[key].shape:
                    raise CheckpointError(f"{init_from}: VAE weights do not fit the architecture: {key} has shape "
                                          f"{tuple(value.shape)}, expected {tuple(own[key].shape)}")
            self.load_state_dict(state, strict=False)
            self.latent_scale_measured = bool(init["lit_diffusion"].get("latent_scale_measured", True))

    # ---- public API used by the diffusion stage ----
    def _to_weights(self, x: torch.Tensor) -> torch.Tensor:
        # the weights' device and dtype, not `self.device`: this module may sit frozen inside another stage
        weight = self.vae.encoder.conv_in.weight
        return x.to(weight.device, weight.dtype)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> scaled latents [B,z,H/f,W/f] ((z - latent_mean) * scale_factor), float32."""
        posterior = self.vae.encode(self._to_weights(images))
        z = posterior.sample(generator) if sample else posterior.mode()  # float32
        return (z - self.latent_mean.float()) * self.scale_factor.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B,3,H,W] clamped to [-1,1]."""
        z = latents.to(self.scale_factor.device).float() / self.scale_factor.float() + self.latent_mean.float()
        return self.vae.decode(self._to_weights(z)).clamp(-1, 1)

    @classmethod
    def init_args_from_checkpoint(cls, ckpt: dict, source: str) -> dict:
        """The saved network config, without discriminator, perceptual network or rFID: what encodes and decodes."""
        hparams = cls.accepted_args(ckpt.get("hyper_parameters") or {})
        block = ckpt["lit_diffusion"]
        if "config" in block:
            hparams["arch"] = block["config"]
        return {**hparams, "perceptual_weight": 0.0, "perceptual_weights": None, "disc_weight": 0.0,
                "rfid_backend": None}

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, source: str | None = None) -> "VAEModule":
        module = super().from_checkpoint_dict(ckpt, source)
        if not module.latent_scale_measured:
            rank_zero_warn(f"{source or 'embedded VAE checkpoint'}: the latent scale was never measured (no "
                           f"validation ran): scale 1, mean 0")
        return module

    # ---- losses ----
    def _losses(self, x: torch.Tensor, rec: torch.Tensor, posterior: DiagonalGaussian) -> dict[str, torch.Tensor]:
        hp = self.hparams
        rec_loss = x.new_zeros((), dtype=torch.float32)
        if hp.l1_weight:
            rec_loss = rec_loss + hp.l1_weight * (x - rec).abs().mean()
        if hp.mse_weight:
            rec_loss = rec_loss + hp.mse_weight * (x - rec).pow(2).mean()
        if "perceptual" in self._aux:
            rec_loss = rec_loss + hp.perceptual_weight * self._aux["perceptual"](x, rec).mean()
        kl = posterior.kl().float().mean()
        return {"rec_loss": rec_loss, "kl": kl, "loss": rec_loss + hp.kl_weight * kl}

    def _adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.vae.decoder.last_layer
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    # ---- training ----
    def training_step(self, batch: dict, batch_idx: int):
        x = batch["image"]  # [B, 3, H, W] in [-1, 1]
        if self.discriminator is not None:
            return self._adversarial_step(x)
        rec, posterior = self.vae(x, sample=self.hparams.sample_posterior)
        losses = self._losses(x, rec, posterior)
        self._log_train(losses, x.shape[0])
        return losses["loss"]

    def _log_train(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)

    def _adversarial_step(self, x: torch.Tensor) -> None:
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        # the discriminator is stepped below without LightningOptimizer.step, so global_step counts batches
        adversarial = self.global_step >= hp.disc_start

        self.toggle_optimizer(opt_g)
        rec, posterior = self.vae(x, sample=hp.sample_posterior)
        losses = self._losses(x, rec, posterior)
        loss = losses["loss"]
        if adversarial:
            g_loss = hinge_g_loss(self.discriminator(rec))
            weight = self._adaptive_weight(losses["rec_loss"], g_loss) if hp.adaptive_disc_weight else 1.0
            loss = loss + hp.disc_weight * weight * g_loss
            losses.update(g_loss=g_loss, disc_weight=torch.as_tensor(weight, dtype=torch.float32))
        losses["loss"] = loss
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)

        if adversarial:
            self.toggle_optimizer(opt_d)
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if hp.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            # LightningOptimizer.step would add a second global step per batch (Lightning issue #17958), which
            # would halve max_steps and desynchronise the LR schedule; the strategy call keeps precision handling
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
            sched_d.step()
            self.untoggle_optimizer(opt_d)
            losses["d_loss"] = d_loss
        self._log_train(losses, x.shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        gen = adamw_with_warmup(self, self.vae.parameters(), hp.lr, hp.weight_decay, tuple(hp.betas),
                                hp.warmup_steps)
        if self.discriminator is None:
            return gen
        disc = adamw_with_warmup(self, self.discriminator.parameters(), hp.disc_lr or hp.lr, hp.weight_decay,
                                 tuple(hp.betas), hp.warmup_steps)
        return [gen["optimizer"], disc["optimizer"]], [gen["lr_scheduler"], disc["lr_scheduler"]]

    # ---- validation ----
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and not self._rfid_ready:
            self._rfid_ready = True
            backend = self.hparams.rfid_backend
            if backend is None:
                rank_zero_info("VAE: val/rfid not computed (rfid_backend is None)")
                return
            from lit_diffusion.metrics.fid import FID, make_extractor

            if backend == "clip":
                from lit_diffusion.stages.clip import CLIPModule

                extractor = make_extractor("clip", clip=CLIPModule.from_checkpoint(self.hparams.clip_ckpt))
            else:
                extractor = make_extractor("inception", weights_path=self.hparams.inception_weights)
            self.add_helper("rfid", FID(extractor))

    def on_fit_start(self) -> None:
        # a `trainer.validate` before `fit` leaves metric states created under inference mode, which fit's
        # validation (run under no_grad, not inference mode) may not update in place: start from fresh states
        for metric in (self.val_loss, self.val_psnr, self.val_ssim, self.latent_stats, *self._aux.values()):
            if isinstance(metric, Metric):
                metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        x = batch["image"]  # [B, 3, H, W] in [-1, 1]
        posterior = self.vae.encode(x)
        rec = self.vae.decode(posterior.mode().to(x.dtype))
        self.val_loss.update(self._losses(x, rec, posterior)["loss"], weight=x.shape[0])
        real = ((x.float() + 1) / 2).clamp(0, 1)
        fake = ((rec.float() + 1) / 2).clamp(0, 1)
        self.val_psnr.update(fake, real)
        self.val_ssim.update(fake, real)
        self.latent_stats.update(posterior.mean)
        if "rfid" in self._aux:
            self._aux["rfid"].update(real, real=True)
            self._aux["rfid"].update(fake, real=False)
        return {"reconstruction": rec.detach()}

    def on_validation_epoch_end(self) -> None:
        # computed here on every rank, not logged as metric objects per step: Lightning would then all-reduce them
        # only on the ranks that logged, and a rank without val batches (more ranks than batches) would leave the
        # others waiting. compute() all-reduces the sum states, so every rank logs and stores the same figures.
        for name, metric in (("val/loss", self.val_loss), ("val/psnr", self.val_psnr), ("val/ssim", self.val_ssim)):
            self.log(name, metric.compute().float(), prog_bar=name != "val/ssim", rank_zero_only=False)
            metric.reset()
        mean, std = self.latent_stats.compute()
        self.latent_stats.reset()
        self.log("val/latent_std", std.float(), sync_dist=True)
        if not self.trainer.sanity_checking:  # a couple of sanity batches would give a noisy scale
            self.latent_mean.fill_(mean.item())
            self.scale_factor.fill_(1.0 / max(std.item(), 1e-8))
            self.latent_scale_measured = True
        if "rfid" in self._aux:
            self.log("val/rfid", self._aux["rfid"].compute().float(), sync_dist=True)
            self._aux["rfid"].reset()

    # ---- checkpoints ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_diffusion"] = stage_block(
            "vae", scale_factor=float(self.scale_factor), latent_mean=float(self.latent_mean),
            latent_scale_measured=self.latent_scale_measured, config=asdict(self.config),
            latent_channels=self.latent_channels, downsample_factor=self.downsample_factor,
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        block = checkpoint.get("lit_diffusion") or {}
        # checkpoints older than the flag: trust their stored scale, as loading them always has
        self.latent_scale_measured = bool(block.get("latent_scale_measured", True))
