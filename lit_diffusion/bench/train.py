"""train: steps/s of Lightning `fit` against a hand-written loop, per stage (target >= 0.95).

Both sides train copies of one initialised module on the same pre-built batches, with the module's own optimizer,
LR schedule, precision and gradient clipping. Stages: clip, vae, ldm (U-Net + DDPM) and ldm_dit (DiT + rectified
flow); the LDM rows also report FLOPs per step and MFU (bench.flops).
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from lit_diffusion.bench.common import Settings, build_stage, median, prebuilt_batches, row, sync
from lit_diffusion.bench.flops import train_step_flops


def _step_timer(seed: int, device):
    """A Lightning callback that seeds the global RNG where the plain loop does and stamps each batch start."""
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_start(self, trainer, pl_module):
            import torch

            torch.manual_seed(seed)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            self.stamps.append(time.perf_counter())

    return StepTimer()


class _Batches:
    """A list of batches as one iterable loader (Lightning reads a bare list as several dataloaders)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _StepsOnly:
    """What `adamw_with_warmup` reads from a trainer: the schedule length Lightning would report."""

    def __init__(self, steps: int):
        self.estimated_stepping_batches = steps


def configured_optimizer(module, total_steps: int):
    """(optimizer, per-step scheduler) from the module's own `configure_optimizers`, as Lightning would build them
    for `max_steps=total_steps`."""
    module._trainer = _StepsOnly(total_steps)
    try:
        conf = module.configure_optimizers()
    finally:
        module._trainer = None
    if not isinstance(conf, dict) or not module.automatic_optimization:
        raise ValueError("bench train: only stages with one optimizer and automatic optimization are supported")
    sched = conf.get("lr_scheduler")
    sched = sched["scheduler"] if isinstance(sched, dict) else sched
    return conf["optimizer"], sched


def lightning_fit(module, batches: list[dict], device: str, precision: str = "32-true",
                  gradient_clip_val: float | None = None, seed: int = 0, root: str | None = None) -> list[float]:
    """Train `module` on `batches` (one each) with `Trainer.fit`; -> the batch-start timestamps."""
    import lightning as L

    timer = _step_timer(seed, device)
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        max_steps=len(batches), precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=gradient_clip_val, callbacks=[timer],
                        default_root_dir=root or tempfile.gettempdir())
    trainer.fit(module, train_dataloaders=_Batches(batches))
    if trainer.global_step != len(batches):
        raise RuntimeError(f"Lightning ran {trainer.global_step} steps, expected {len(batches)}")
    return timer.stamps


def plain_loop(module, batches: list[dict], device: str, precision: str = "32-true",
               gradient_clip_val: float | None = None, seed: int = 0) -> list[float]:
    """What one writes by hand: the module's loss (`training_step`), zero_grad, backward, clip, step, schedule,
    and the stage's own per-batch hook (CLIP clamps its logit scale there); -> the batch-start timestamps."""
    import torch

    module.to(device)
    module.configure_model()
    module.train()
    opt, sched = configured_optimizer(module, len(batches))
    params = [p for group in opt.param_groups for p in group["params"]]
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        autocast = torch.autocast(torch.device(device).type, dtype=dtype)
    elif precision in ("32-true", "32", 32):
        autocast = nullcontext()
    else:
        raise ValueError(f"bench: precision {precision!r} is not supported by the plain loop")
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision == "16-mixed" else None
    stamps = []
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns and returns
        for i, batch in enumerate(batches):
            sync(device)
            stamps.append(time.perf_counter())
            with autocast:
                loss = module.training_step(batch, i)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if gradient_clip_val:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if sched is not None:
                sched.step()
            module.on_train_batch_end(loss, batch, i)
    return stamps


def _steady_step_seconds(stamps: list[float], warmup: int) -> float:
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return median(intervals)


def bench_train_stage(stage: str, template, batches: list[dict], device: str, settings: Settings,
                      precision: str = "32-true", gradient_clip_val: float | None = None, work: Path | None = None,
                      peak_flops: float | None = None) -> tuple[dict, dict]:
    """Lightning fit vs the plain loop on copies of `template`, interleaved; -> (row, details)."""
    runs = {"lightning": [], "plain": []}
    for r in range(settings.repeats):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
        for kind in order:
            module = copy.deepcopy(template)
            if kind == "lightning":
                stamps = lightning_fit(module, batches, device, precision, gradient_clip_val,
                                       root=str(work) if work else None)
            else:
                stamps = plain_loop(module, batches, device, precision, gradient_clip_val)
            runs[kind].append(_steady_step_seconds(stamps, settings.train_warmup))
            del module
    lit_s, plain_s = median(runs["lightning"]), median(runs["plain"])
    details = {"lightning_step_seconds": runs["lightning"], "plain_step_seconds": runs["plain"],
               "batch_size": len(batches[0]["caption"]), "steps_per_run": len(batches),
               "steady_state_steps": len(batches) - 1 - settings.train_warmup, "precision": precision,
               "gradient_clip_val": gradient_clip_val,
               "params_trained": sum(p.numel() for p in template.parameters() if p.requires_grad)}
    if stage.startswith("ldm"):  # any denoiser: FlopCounterMode counts the real step
        flops = train_step_flops(copy.deepcopy(template).to(device), batches[0])
        details["flops_per_step"] = flops
        details["mfu"] = flops["total"] / lit_s / peak_flops if peak_flops else None
    return (row("train", stage, "steps/s", 1.0 / lit_s, 1.0 / plain_s, ">=", 0.95,
                framework_label="Lightning fit", baseline_label="plain PyTorch loop"), details)


def bench_train(shapes_dir: Path, work: Path, device: str, settings: Settings, precision: str = "32-true",
                clip_ckpt: str | None = None, vae_ckpt: str | None = None, stages=("clip", "vae", "ldm", "ldm_dit"),
                peak_flops: float | None = None) -> tuple[list[dict], dict]:
    rows, details = [], {}
    n = settings.train_warmup + settings.train_measured + 1
    for stage in stages:
        module, batch_size, clip_val = build_stage(stage, shapes_dir, work, settings.quick, clip_ckpt, vae_ckpt)
        batches = prebuilt_batches(shapes_dir, settings.image_size, batch_size, n, device)
        r, d = bench_train_stage(stage, module, batches, device, settings, precision, clip_val, work, peak_flops)
        rows.append(r)
        details[stage] = d
    details["fairness"] = ("both sides train copies of one initialised module on the same pre-built batches held "
                           "in memory (no data loading timed), with the optimizer and LR schedule of the module's "
                           "configure_optimizers, the same precision and gradient clipping; timed: median "
                           "interval between batch starts after warm-up (Trainer set-up excluded)")
    return rows, details

