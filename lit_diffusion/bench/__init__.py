"""`lit-diffusion bench`: each part of the framework against a plain baseline timed in the same run.

Every figure is a ratio framework / baseline from runs interleaved with the baseline's (alternating order), taking
medians, so a busy machine slows both sides alike; both absolute numbers are reported next to it.
  data      DataModule samples/s vs a raw webdataset + PIL loop (lit_diffusion.bench.data)      target >= 0.9
  train     steps/s of Lightning `fit` vs a hand-written loop, per stage                        target >= 0.95
  sampling  each sampler's loop vs the bare U-Net forwards it performs; batched CFG vs 2 calls  target <= 1.05
  eval      second in-loop evaluation (real statistics cached) vs the first                     target <= 0.6
  memory    peak RSS of training on 10x the shards vs 1x, same steps (streaming, not loading)  target <= 1.10
`train_step_flops` / `unet_step_flops` count model FLOPs per training step (FlopCounterMode), for MFU on a GPU.

Heavy imports (torch, lightning) happen inside the functions, so `lit-diffusion --help` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

SECTIONS = ("data", "train", "sampling", "eval", "memory")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# --quick: models small enough for a busy 2-core CPU (the shapes-sized configs are used otherwise)
QUICK_CLIP = dict(embed_dim=32, vision=dict(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                  text=dict(width=32, layers=1, heads=2), lr=1e-3, warmup_steps=2)
QUICK_VAE = dict(arch=dict(base_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                           mid_attention=False, norm_groups=4), lr=2e-3, warmup_steps=2)
QUICK_LDM = dict(image_size=16, unet=dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                          attention_resolutions=[2], head_dim=8, norm_groups=4),
                 warmup_steps=2, sample_steps=4, pooled_text=True)  # the conditioning path of the shapes config

# dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for MFU; --peak-tflops overrides
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


# ------------------------------------------------------------------------------------------------ the settings
class Settings:
    """Sizes and repeat counts of one bench run (`quick` for a smoke run on a busy CPU)."""

    def __init__(self, quick: bool = False, repeats: int | None = None, **overrides):
        self.quick = quick
        self.repeats = repeats or (2 if quick else 3)
        self.image_size = 16 if quick else 32
        self.train_warmup = 3  # steady state: intervals after this many steps
        self.train_measured = 8 if quick else 20
        self.sample_batch = 4 if quick else 16
        self.ddpm_timesteps = 50 if quick else 1000  # "ddpm with N steps": the ancestral chain of an N-step schedule
        self.ddim_steps = 10 if quick else 50
        self.dpm_steps = 10 if quick else 20
        self.cfg_calls = 10 if quick else 20
        self.sample_repeats = 5 if quick else 3  # the sampling runs are short: more repeats for a stable median
        self.eval_samples = 8 if quick else 32
        self.eval_steps = 4 if quick else 10
        self.memory_steps = 10 if quick else 30
        self.memory_shards = 2  # 1x; the 10x run reads 10 times as many
        self.memory_shard_size = 100 if quick else 200
        self.memory_pixels = 160 if quick else 192  # noise PNGs (incompressible): 10x = 150 / 430 MiB on disk
        # one epoch of configs/clip/shapes.yaml (100 batches of 64), the shortest of the shapes configs: every epoch
        # refills the 1000-sample shuffle buffer, a cost that a shorter epoch would overstate
        self.data_samples = 512 if quick else 6400
        for key, value in overrides.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown bench setting {key!r}")
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------------- reporting
def row(section: str, name: str, metric: str, framework: float, baseline: float, op: str, target: float,
        **extra) -> dict:
    """One table row; ratio = framework / baseline, compared with `target` by `op` (">=" or "<=")."""
    ratio = framework / baseline if baseline else float("nan")
    meets = ratio >= target if op == ">=" else ratio <= target
    return {"section": section, "name": name, "metric": metric, "framework": framework, "baseline": baseline,
            "ratio": ratio, "target": f"{op} {target:g}", "meets_target": bool(meets), **extra}


def machine_info(device: str) -> dict:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "lightning": lightning.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": device,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_table(report: dict) -> str:
    m = report["machine"]
    head = (f"machine: {m['cpu']} ({m['cpu_cores_usable']}/{m['cpu_cores']} cores), torch {m['torch']}, "
            f"lightning {m['lightning']}, device {m.get('gpu', m['device'])}, load {m['load_average_1min']}")
    cols = ("section", "name", "metric", "framework", "baseline", "ratio", "target", "ok")
    lines = [(r["section"], r["name"], r["metric"], f"{r['framework']:.4g}", f"{r['baseline']:.4g}",
              f"{r['ratio']:.3f}", r["target"], "yes" if r["meets_target"] else "NO") for r in report["rows"]]
    widths = [max(len(c), *(len(x[i]) for x in lines)) if lines else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [head, fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    out += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(out)


def _median(xs) -> float:
    return float(statistics.median(xs))


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- models and data
def make_shapes(out: Path, settings: Settings) -> Path:
    from lit_diffusion.data.shapes import write_shapes

    n = 512 if settings.quick else 2000
    write_shapes(out, train=n, val=max(64, settings.eval_samples * 2), size=settings.image_size,
                 shard_size=n // 4, seed=0)
    return out


def stage_args(stage: str, quick: bool) -> tuple[dict, int, float | None]:
    """(model init args, batch size, gradient_clip_val) of a stage: configs/<stage>/shapes.yaml, or --quick's."""
    if quick:
        return copy.deepcopy({"clip": QUICK_CLIP, "vae": QUICK_VAE, "ldm": QUICK_LDM}[stage]), 16, None
    import yaml

    path = CONFIG_DIR / stage / "shapes.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"bench: {path} not found (run from a source checkout, or use --quick)")
    cfg = yaml.safe_load(path.read_text())
    args = dict(cfg["model"]["init_args"])
    return args, int(cfg["data"]["init_args"]["batch_size"]), (cfg.get("trainer") or {}).get("gradient_clip_val")


def save_stage_checkpoint(module, path: Path) -> Path:
    """A loadable stage checkpoint of an (untrained) module, without a Trainer: what the LDM stage reads."""
    import torch

    if hasattr(module, "latent_scale_measured"):
        module.latent_scale_measured = True  # throughput only: scale 1 / mean 0 are fine
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def build_stage(stage: str, shapes_dir: Path, work: Path, quick: bool, clip_ckpt: str | None = None,
                vae_ckpt: str | None = None):
    """(module, batch size, gradient_clip_val) for `stage`, initialised from seed 0."""
    import torch

    args, batch, clip_val = stage_args(stage, quick)
    torch.manual_seed(0)
    if stage == "clip":
        from lit_diffusion.stages.clip import CLIPModule

        args["tokenizer_path"] = str(shapes_dir / "tokenizer.json")
        return CLIPModule(**args), batch, clip_val
    if stage == "vae":
        from lit_diffusion.stages.vae import VAEModule

        return VAEModule(**args), batch, clip_val
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    if clip_ckpt is None:
        clip_ckpt = str(save_stage_checkpoint(build_stage("clip", shapes_dir, work, quick)[0], work / "clip.ckpt"))
    if vae_ckpt is None:
        vae_ckpt = str(save_stage_checkpoint(build_stage("vae", shapes_dir, work, quick)[0], work / "vae.ckpt"))
    args.update(clip_ckpt=clip_ckpt, vae_ckpt=vae_ckpt)
    torch.manual_seed(0)
    return LatentDiffusionModule(**args), batch, clip_val


def prebuilt_batches(shapes_dir: Path, image_size: int, batch_size: int, n: int, device) -> list[dict]:
    """`n` DataModule batches held in memory (on `device`): both training loops get exactly these."""
    import torch

    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    dm = ImageCaptionDataModule(train_urls=str(shapes_dir / "train-*.tar"), image_size=image_size,
                                batch_size=batch_size, num_workers=0, train_batches_per_epoch=n, shuffle_buffer=256)
    dm.setup("fit")
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in dm.train_dataloader()]


# ------------------------------------------------------------------------------------------------- training
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
            _sync(device)
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
            _sync(device)
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
    return _median(intervals)


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
    lit_s, plain_s = _median(runs["lightning"]), _median(runs["plain"])
    details = {"lightning_step_seconds": runs["lightning"], "plain_step_seconds": runs["plain"],
               "batch_size": len(batches[0]["caption"]), "steps_per_run": len(batches),
               "steady_state_steps": len(batches) - 1 - settings.train_warmup, "precision": precision,
               "gradient_clip_val": gradient_clip_val,
               "params_trained": sum(p.numel() for p in template.parameters() if p.requires_grad)}
    if stage == "ldm":
        flops = train_step_flops(copy.deepcopy(template).to(device), batches[0])
        details["flops_per_step"] = flops
        details["mfu"] = flops["total"] / lit_s / peak_flops if peak_flops else None
    return (row("train", stage, "steps/s", 1.0 / lit_s, 1.0 / plain_s, ">=", 0.95,
                framework_label="Lightning fit", baseline_label="plain PyTorch loop"), details)


def bench_train(shapes_dir: Path, work: Path, device: str, settings: Settings, precision: str = "32-true",
                clip_ckpt: str | None = None, vae_ckpt: str | None = None, stages=("clip", "vae", "ldm"),
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


# ---------------------------------------------------------------------------------------------------- FLOPs
def train_step_flops(module, batch: dict) -> dict:
    """Model FLOPs of one LDM training step (frozen CLIP/VAE forwards + U-Net forward and backward), counted by
    FlopCounterMode on a real step; `unet` is the U-Net's share."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = module.model_step(batch, train=True)
        loss.backward()
    module.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    unet = sum(counts.get("UNet", {}).values())  # FlopCounterMode names modules by class from the outermost
    return {"total": int(counter.get_total_flops()), "unet": int(unet), "batch_size": int(batch["image"].shape[0]),
            "device": str(next(module.parameters()).device), "torch": torch.__version__}


def unet_step_flops(unet_config: dict, batch_size: int, latent_size: int, context_len: int = 77) -> dict:
    """U-Net parameters and FLOPs of one forward + backward at `batch_size`, on the meta device (no compute, any
    size), plus the bytes autograd saves for backward (fp32; bf16-mixed keeps most of them in half)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lit_diffusion.models.unet import UNet, UNetConfig

    cfg = UNetConfig.from_dict(unet_config)
    with torch.device("meta"):
        unet = UNet(cfg)
        x = torch.randn(batch_size, cfg.in_channels, latent_size, latent_size)
        t = torch.zeros(batch_size, dtype=torch.long)
        ctx = torch.randn(batch_size, context_len, cfg.context_dim) if cfg.context_dim else None
        mask = torch.ones(batch_size, context_len, dtype=torch.bool) if cfg.context_dim else None
    params = {id(p) for p in unet.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        if id(tensor) not in params:
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with FlopCounterMode(display=False) as fwd_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = unet(x, t, ctx, mask)
    with FlopCounterMode(display=False) as bwd_counter:
        out.float().pow(2).mean().backward()
    forward, backward = int(fwd_counter.get_total_flops()), int(bwd_counter.get_total_flops())
    return {"params": sum(p.numel() for p in unet.parameters()), "batch_size": batch_size,
            "forward_flops": forward, "backward_flops": backward, "total_flops": forward + backward,
            "saved_activation_bytes_fp32": saved}


def peak_flops_for(device_name: str | None) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if device_name and fragment in device_name:
            return flops
    return None


def base_config_estimate(path: Path | None = None) -> dict:
    """Parameters, FLOPs per step and saved-activation memory of configs/ldm/base.yaml's U-Net at its batch."""
    import yaml

    path = path or CONFIG_DIR / "ldm" / "base.yaml"
    cfg = yaml.safe_load(Path(path).read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    unet = dict(model["unet"])
    unet.setdefault("context_dim", 512)
    latent = int(model["image_size"]) // 8
    est = unet_step_flops(unet, 1, latent)
    batch = int(data["batch_size"])
    return {"config": str(path), "unet_params": est["params"], "latent_size": latent, "per_device_batch": batch,
            "unet_train_flops_per_step": est["total_flops"] * batch,
            "saved_activation_gib_fp32_per_device": est["saved_activation_bytes_fp32"] * batch / 2**30,
            "weights_grads_adam_ema_gib_fp32": est["params"] * (4 + 4 + 8 + 4) / 2**30}


# ------------------------------------------------------------------------------------------------- sampling
class CountedCalls:
    """Wraps a denoiser and counts its calls (each is one U-Net forward)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def sampler_run(name: str, denoiser, schedule, cond, uncond, guidance: float, shape, steps: int | None,
                device) -> int:
    """One sampling loop with batched CFG; -> the number of U-Net forwards it made."""
    import torch

    from lit_diffusion.diffusion import samplers
    from lit_diffusion.diffusion.guidance import cfg_model_fn

    counted = CountedCalls(denoiser)
    generator = torch.Generator(device=device).manual_seed(0)
    kwargs = {} if name == "ddpm" else {"steps": steps}
    samplers.sample(name, cfg_model_fn(counted, cond, uncond, guidance), schedule, shape, generator=generator,
                    device=device, **kwargs)
    return counted.calls


def sampler_timesteps(name: str, schedule, steps: int | None) -> list[int]:
    from lit_diffusion.diffusion.samplers import timestep_spacing

    if name == "ddpm":
        return list(range(schedule.num_timesteps - 1, -1, -1))
    return timestep_spacing(schedule.num_timesteps, steps)


def bare_forwards(denoiser, timesteps: list[int], cond, uncond, shape, device) -> int:
    """The U-Net forwards a guided sampler performs, and nothing else: one [2B] call per timestep."""
    import torch

    # the batch cfg_model_fn builds: [uncond; cond], contexts padded to one length (guidance's own helpers)
    from lit_diffusion.diffusion.guidance import _as_cond, _cat_conds, call_denoiser

    both = _cat_conds(_as_cond(uncond, shape[0], "uncond"), _as_cond(cond, shape[0], "cond"))
    x = torch.randn((2 * shape[0], *shape[1:]), device=device)
    calls = 0
    with torch.no_grad():
        for t in timesteps:
            call_denoiser(denoiser, x, torch.full((x.shape[0],), t, device=device, dtype=torch.long), both)
            calls += 1
    return calls


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def bench_sampling(module, device: str, settings: Settings, guidance: float = 3.0) -> tuple[list[dict], dict]:
    import torch

    from lit_diffusion.diffusion.guidance import call_denoiser, cfg_model_fn
    from lit_diffusion.diffusion.schedule import NoiseSchedule

    module = module.to(device).eval()
    module.configure_model()
    b = settings.sample_batch
    cond = module.encode_prompts(["a large red circle above a small blue square"] * b)
    uncond = module.null_cond(b)
    shape = (b, module.latent_channels, module.latent_size, module.latent_size)
    plans = {"ddpm": (NoiseSchedule(num_timesteps=settings.ddpm_timesteps), None),
             "ddim": (module.schedule, settings.ddim_steps), "dpmpp_2m": (module.schedule, settings.dpm_steps)}
    rows, details = [], {}
    for name, (schedule, steps) in plans.items():
        ts = sampler_timesteps(name, schedule, steps)
        times = {"sampler": [], "bare": []}
        calls = {}
        for r in range(settings.sample_repeats):
            for kind in (("sampler", "bare") if r % 2 == 0 else ("bare", "sampler")):
                if kind == "sampler":
                    sec, calls[kind] = _timed(lambda: sampler_run(name, module.denoiser, schedule, cond, uncond,
                                                                  guidance, shape, steps, device), device)
                else:
                    sec, calls[kind] = _timed(lambda: bare_forwards(module.denoiser, ts, cond, uncond, shape,
                                                                    device), device)
                times[kind].append(sec)
        if calls["sampler"] != calls["bare"]:
            raise RuntimeError(f"{name}: the sampler made {calls['sampler']} U-Net calls, the baseline {calls['bare']}")
        label = f"{name} ({len(ts)} steps)"
        rows.append(row("sampling", label, "s/run", _median(times["sampler"]), _median(times["bare"]), "<=", 1.05,
                        framework_label="sampler loop with CFG", baseline_label="bare U-Net forwards"))
        details[name] = {"unet_calls": calls["sampler"], "sampler_seconds": times["sampler"],
                         "bare_seconds": times["bare"], "batch": b, "forward_batch": 2 * b}

    # classifier-free guidance: one forward of [uncond; cond] (2B) vs two forwards of B, same combination
    x = torch.randn(shape, device=device)
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    batched = cfg_model_fn(module.denoiser, cond, uncond, guidance)

    def separate():
        out_u = call_denoiser(module.denoiser, x, t, uncond)
        out_c = call_denoiser(module.denoiser, x, t, cond)
        return out_u + guidance * (out_c - out_u)

    times = {"batched": [], "separate": []}
    with torch.no_grad():
        for r in range(settings.sample_repeats):
            for kind in (("batched", "separate") if r % 2 == 0 else ("separate", "batched")):
                fn = (lambda: batched(x, t)) if kind == "batched" else separate
                sec, _ = _timed(lambda: [fn() for _ in range(settings.cfg_calls)], device)
                times[kind].append(sec / settings.cfg_calls)
    rows.append(row("sampling", f"cfg batch {b}", "s/call", _median(times["batched"]), _median(times["separate"]),
                    "<=", 1.0, framework_label="one forward of 2B", baseline_label="two forwards of B"))
    details["cfg"] = {"batched_seconds": times["batched"], "separate_seconds": times["separate"], "batch": b}
    return rows, details


# ----------------------------------------------------------------------------------------------- evaluation
def bench_eval(module, shapes_dir: Path, work: Path, settings: Settings, backends=("clip",),
               inception_weights: str | None = None) -> tuple[list[dict], dict]:
    """Evaluator.run twice per fresh Evaluator (1st computes the real statistics, 2nd reuses them from memory),
    then once more with a new Evaluator (from the disk cache); real set = generated set = eval_samples."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator

    module = module.eval()
    n = settings.eval_samples
    dm = ImageCaptionDataModule(train_urls=None, val_urls=str(shapes_dir / "val-*.tar"),
                                image_size=settings.image_size, batch_size=n, num_workers=0)
    rows, details = [], {}
    # untimed warm-up: first-call costs (allocator, kernels, tokenizer caches) would flatter the ratio
    Evaluator(EvalConfig(guidance=[3.0], num_samples=n, backends=["clip"], sampler="ddim", steps=settings.eval_steps,
                         resolution=settings.image_size), module.clip).run(module, dm.eval_dataloader(n))
    for backend in backends:
        runs = {"first": [], "second": [], "disk": []}
        generate = {"first": [], "second": []}
        sources = []
        for r in range(settings.repeats):
            cfg = EvalConfig(guidance=[3.0], num_samples=n, backends=[backend], inception_weights=inception_weights,
                             sampler="ddim", steps=settings.eval_steps, cache_dir=str(work / f"fid_cache_{r}"),
                             data_id=f"bench-{r}", resolution=settings.image_size)
            evaluator = Evaluator(cfg, module.clip)
            for kind in ("first", "second"):
                evaluator.run(module, dm.eval_dataloader(n))
                runs[kind].append(evaluator.timings[-1]["seconds"])
                generate[kind].append(evaluator.timings[-1]["generate_seconds"])
            again = Evaluator(cfg, module.clip)
            again.run(module, dm.eval_dataloader(n))
            runs["disk"].append(again.timings[-1]["seconds"])
            sources.append([t["real_stats"][backend] for t in (*evaluator.timings, *again.timings)])
        first, second = _median(runs["first"]), _median(runs["second"])
        # a fixed cost of every evaluation that no cache removes: the Frechet distance given the real side's root
        from lit_diffusion.metrics.fid import frechet_distance

        real = evaluator.real_stats[backend]
        frechet_seconds, _ = _timed(lambda: frechet_distance(real.mu, real.sigma, real.mu, real.sigma,
                                                             root1=real.root), "cpu")
        rows.append(row("eval", f"{backend} features, {n} samples", "s/eval", second, first, "<=", 0.6,
                        framework_label="2nd evaluation (cached real stats)", baseline_label="1st evaluation"))
        details[backend] = {"seconds": runs, "generate_seconds": generate, "real_stats_sources": sources,
                            "disk_over_first": _median(runs["disk"]) / first, "num_samples": n,
                            "frechet_distance_seconds": frechet_seconds, "feature_dim": int(real.mu.numel()),
                            "sampler_steps": settings.eval_steps, "guidance": [3.0]}
    return rows, details


# --------------------------------------------------------------------------------------------------- memory
def write_noise_shards(out: Path, shards: int, per_shard: int, pixels: int, seed: int = 0) -> list[Path]:
    """Train shards of incompressible noise PNGs (each image ~3 x pixels^2 bytes on disk)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = out / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(buf, format="PNG")
                writer.write({"__key__": f"{s:06d}_{i:06d}", "png": buf.getvalue(), "txt": "noise", "json": {}})
        paths.append(path)
    return paths


def _vm_hwm_kib() -> int | None:
    """This process's own peak RSS (VmHWM). Unlike ru_maxrss it excludes the memory of the process image that
    `exec` replaced: a child spawned by a 2 GB benchmark process would otherwise report 2 GB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_child(urls: str, steps: int, image_size: int, batch_size: int, num_workers: int, out: str,
                 threads: int = 1) -> None:
    """The measured training run (in its own process): the quick VAE on `urls` for `steps` steps."""
    import gc
    import resource

    import lightning as L
    import torch

    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.stages.vae import VAEModule

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dm = ImageCaptionDataModule(train_urls=urls, image_size=image_size, batch_size=batch_size,
                                num_workers=num_workers, train_batches_per_epoch=steps, shuffle_buffer=500)
    module = VAEModule(**QUICK_VAE)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(Path(out).parent))
    trainer.fit(module, datamodule=dm)
    result = {"steps": int(trainer.global_step), "shards": len(dm.train_shards)}
    del trainer, dm
    gc.collect()  # ends the loader's workers, so their peak shows in RUSAGE_CHILDREN
    own = _vm_hwm_kib()
    result["main_peak_rss_kib"] = own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # forked loader workers (no exec: ru_maxrss is theirs); helper processes that fork + exec report at most the
    # parent's RSS at the fork, below the main peak, so the max below stays right
    result["worker_peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_kib"] = max(result["main_peak_rss_kib"], result["worker_peak_rss_kib"])
    Path(out).write_text(json.dumps(result))


def run_memory_child(urls: str, steps: int, image_size: int, batch_size: int, num_workers: int,
                     out: Path, threads: int = 1) -> dict:
    """Run `memory_child` in a subprocess; -> its report (steps, shards, peak RSS of the main process and of the
    largest worker, in KiB)."""
    cmd = [sys.executable, "-m", "lit_diffusion.bench", "memory-child", "--urls", urls, "--steps", str(steps),
           "--image-size", str(image_size), "--batch-size", str(batch_size), "--num-workers", str(num_workers),
           "--threads", str(threads), "--out", str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench memory: training subprocess failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(Path(out).read_text())


def bench_memory(work: Path, settings: Settings, num_workers: int = 1) -> tuple[list[dict], dict]:
    one = work / "memory_1x"
    ten = work / "memory_10x"
    base = write_noise_shards(one, settings.memory_shards, settings.memory_shard_size, settings.memory_pixels)
    ten.mkdir(parents=True, exist_ok=True)
    for copy_idx in range(10):  # same bytes per shard, 10x the shards
        for i, path in enumerate(base):
            shutil.copyfile(path, ten / f"train-{copy_idx * len(base) + i:06d}.tar")
    sizes = {name: sum(p.stat().st_size for p in d.glob("*.tar")) for name, d in (("1x", one), ("10x", ten))}
    runs = {"1x": [], "10x": []}
    for r in range(settings.repeats if not settings.quick else 1):
        for name in (("1x", "10x") if r % 2 == 0 else ("10x", "1x")):
            folder = one if name == "1x" else ten
            runs[name].append(run_memory_child(str(folder / "train-*.tar"), settings.memory_steps,
                                               settings.image_size, 16, num_workers, work / f"memory_{name}_{r}.json"))
    peak = {k: _median([v["peak_rss_kib"] for v in vs]) / 1024 for k, vs in runs.items()}
    details = {"runs": runs, "data_mib": {k: v / 2**20 for k, v in sizes.items()}, "num_workers": num_workers,
               "steps": {k: [v["steps"] for v in vs] for k, vs in runs.items()},
               "shards": {k: [v["shards"] for v in vs] for k, vs in runs.items()}}
    return [row("memory", f"10x shards ({sizes['10x'] / 2**20:.0f} MiB)", "peak RSS MiB", peak["10x"], peak["1x"],
                "<=", 1.10, framework_label="10x shards", baseline_label="1x shards")], details


# ------------------------------------------------------------------------------------------------------ data
def bench_data_section(shapes_dir: Path, settings: Settings) -> tuple[list[dict], dict]:
    from lit_diffusion.bench.data import bench_data

    result = bench_data(str(shapes_dir / "train-*.tar"), image_size=settings.image_size, batch_size=64,
                        num_samples=settings.data_samples, num_workers=1, repeats=settings.repeats)
    return [row("data", "DataModule (1 worker)", "samples/s", result["datamodule_samples_per_s"],
                result["raw_samples_per_s"], ">=", 0.9, framework_label="ImageCaptionDataModule",
                baseline_label="raw webdataset + PIL loop", cpu_ratio=result["cpu_ratio"])], result


# ------------------------------------------------------------------------------------------------ the runner
def run_bench(what: str = "all", quick: bool = False, json_out: str | None = None, device: str | None = None,
              precision: str = "32-true", data_dir: str | None = None, clip_ckpt: str | None = None,
              vae_ckpt: str | None = None, work_dir: str | None = None, repeats: int | None = None,
              inception_weights: str | None = None, peak_tflops: float | None = None,
              settings: Settings | None = None, threads: int | None = None) -> dict:
    """Run the `what` benchmark(s) ("all" or one of SECTIONS); -> the report (also written to `json_out`).

    `threads`: torch intra-op threads while measuring; default 1 on CPU: on a shared machine more threads than
    free cores make OpenMP spin-wait, and small-op loops (samplers, Lightning hooks) then slow down by 10x+."""
    import torch

    sections = SECTIONS if what == "all" else (what,)
    if any(s not in SECTIONS for s in sections):
        raise ValueError(f"bench: unknown benchmark {what!r}; choose all or one of {', '.join(SECTIONS)}")
    settings = settings or Settings(quick=quick, repeats=repeats)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    if threads or device == "cpu":
        torch.set_num_threads(threads or 1)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lit_diffusion_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(device), "settings": dict(vars(settings)), "rows": [], "details": {},
              "notes": []}
    try:
        with _quiet():
            _run_sections(report, sections, settings, work, device, precision, data_dir, clip_ckpt, vae_ckpt,
                          inception_weights, peak_tflops)
    finally:
        torch.set_num_threads(threads_before)
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["notes"] += _notes(report)
    report["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2, default=str))
    return report


def _run_sections(report: dict, sections, settings: Settings, work: Path, device: str, precision: str,
                  data_dir: str | None, clip_ckpt: str | None, vae_ckpt: str | None, inception_weights: str | None,
                  peak_tflops: float | None) -> None:
    shapes_dir = Path(data_dir) if data_dir else None
    if shapes_dir is None and set(sections) - {"memory"}:
        shapes_dir = make_shapes(work / "shapes", settings)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops_for(report["machine"].get("gpu"))
    ldm = None
    for section in sections:
        start = time.perf_counter()
        if section == "data":
            rows, details = bench_data_section(shapes_dir, settings)
        elif section == "train":
            rows, details = bench_train(shapes_dir, work, device, settings, precision, clip_ckpt, vae_ckpt,
                                        peak_flops=peak)
            if (CONFIG_DIR / "ldm" / "base.yaml").is_file():
                details["ldm_base_estimate"] = base_config_estimate()
        elif section in ("sampling", "eval"):
            ldm = ldm or build_stage("ldm", shapes_dir, work, settings.quick, clip_ckpt, vae_ckpt)[0]
            if section == "sampling":
                rows, details = bench_sampling(ldm, device, settings)
            else:
                _randomise_output(ldm)  # the bench's U-Net is always freshly initialised
                weights = inception_weights
                if weights is None:
                    from lit_diffusion.metrics.features import save_random_inception_weights

                    weights = str(save_random_inception_weights(work / "inception_random.pth"))
                    report["notes"].append("eval inception backend: random InceptionV3 weights (timing only)")
                rows, details = bench_eval(ldm.to(device), shapes_dir, work, settings, ("clip", "inception"),
                                           weights)
        else:
            rows, details = bench_memory(work, settings)
        details["bench_seconds"] = time.perf_counter() - start
        report["rows"] += rows
        report["details"][section] = details


@contextmanager
def _quiet():
    """Lightning's per-fit banners and warnings (no logger, eval-mode frozen stages, ...) would bury the table."""
    import logging

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lit_diffusion")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _randomise_output(module) -> None:
    """The U-Net's zero-initialised output layer makes every sample alike; small random weights instead, so the
    evaluation's generated images vary like a trained model's (timing is unaffected)."""
    import torch

    with torch.no_grad():
        for p in module.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)


def _notes(report: dict) -> list[str]:
    notes = []
    ev = report["details"].get("eval", {})
    for backend, d in ((b, ev.get(b)) for b in ("clip", "inception")):
        if not d:
            continue
        first = _median(d["seconds"]["first"])
        gen = _median(d["generate_seconds"]["second"])  # sampling + generated-image features + CLIP score
        fixed = (gen + d["frechet_distance_seconds"]) / first
        if fixed > 0.6:
            notes.append(f"eval {backend}: work no cache can remove (generation and its features {gen:.2f} s, the "
                         f"{d['feature_dim']}-d Frechet distance {d['frechet_distance_seconds']:.2f} s) is "
                         f"{fixed:.0%} of the first evaluation ({first:.2f} s), so the 2nd/1st ratio cannot reach "
                         f"0.6 at {d['num_samples']} samples")
    if report["machine"]["device"] == "cpu":
        notes.append("CPU run: the GPU path (bf16-mixed, compile, channels_last, fused AdamW, flash SDPA) is not "
                     "timed here; MFU needs a GPU")
    return notes


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="all", choices=("all", *SECTIONS), help="which benchmark (default all)")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--quick", action="store_true", help="tiny models and few repeats (a smoke run)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--precision", default="32-true", help="training precision for both sides, e.g. bf16-mixed")
    p.add_argument("--data", default=None, help="a shapes folder (train-*.tar, val-*.tar, tokenizer.json) to use "
                                                "instead of drawing one")
    p.add_argument("--clip-ckpt", default=None, help="CLIP checkpoint for the LDM (default: an untrained one)")
    p.add_argument("--vae-ckpt", default=None, help="VAE checkpoint for the LDM (default: an untrained one)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measurement")
    p.add_argument("--inception-weights", default=None, help="InceptionV3 file for the eval bench (default: random)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while measuring (default: 1 on CPU)")
    p.add_argument("--work-dir", default=None, help="keep generated data and checkpoints here")


def cmd_bench(args) -> None:
    report = run_bench(args.what, quick=args.quick, json_out=args.json, device=args.device,
                       precision=args.precision, data_dir=args.data, clip_ckpt=args.clip_ckpt,
                       vae_ckpt=args.vae_ckpt, work_dir=args.work_dir, repeats=args.repeats,
                       inception_weights=args.inception_weights, peak_tflops=args.peak_tflops,
                       threads=args.threads)
    print(format_table(report))


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against plain baselines (ratios, JSON)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)


def _main(argv: list[str] | None = None) -> None:
    """`python -m lit_diffusion.bench memory-child ...`: the subprocess of the memory benchmark."""
    parser = argparse.ArgumentParser(prog="python -m lit_diffusion.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    child = sub.add_parser("memory-child")
    child.add_argument("--urls", required=True)
    child.add_argument("--steps", type=int, required=True)
    child.add_argument("--image-size", type=int, default=16)
    child.add_argument("--batch-size", type=int, default=16)
    child.add_argument("--num-workers", type=int, default=1)
    child.add_argument("--threads", type=int, default=1)
    child.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    memory_child(args.urls, args.steps, args.image_size, args.batch_size, args.num_workers, args.out, args.threads)


if __name__ == "__main__":
    _main()
