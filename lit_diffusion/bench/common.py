"""What every benchmark section shares: the run's settings, table rows and the table, machine facts, timing helpers,
and the stages (modules, checkpoints, batches) they measure.

Heavy imports (torch, lightning) happen inside the functions, so `lit-diffusion --help` stays fast.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# --quick: models small enough for a busy 2-core CPU (the shapes-sized configs are used otherwise)
QUICK_CLIP = dict(embed_dim=32, vision=dict(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                  text=dict(width=32, layers=1, heads=2), lr=1e-3, warmup_steps=2)
QUICK_VAE = dict(arch=dict(base_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                           mid_attention=False, norm_groups=4), lr=2e-3, warmup_steps=2)
QUICK_LDM = dict(image_size=16, unet=dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                          attention_resolutions=[2], head_dim=8, norm_groups=4),
                 warmup_steps=2, sample_steps=4, pooled_text=True)  # the conditioning path of the shapes config
# the DiT + rectified flow of configs/ldm/shapes_dit.yaml at a size whose step costs about what QUICK_LDM's does
# (17 vs 19 ms on the 2-core CPU), so that the two rows compare alike (the shapes configs' DiT costs 1.61x the U-Net)
QUICK_LDM_DIT = dict(image_size=16, dit=dict(patch_size=1, hidden_size=64, depth=4, num_heads=4), objective="flow",
                     flow=dict(timesteps="logit_normal"), sampler="euler", warmup_steps=2, sample_steps=4,
                     pooled_text=True)
# bench stage -> its configs/ folder and file (--quick uses the QUICK_* dicts above instead)
STAGE_CONFIGS = {"clip": "clip/shapes.yaml", "vae": "vae/shapes.yaml", "ldm": "ldm/shapes.yaml",
                 "ldm_dit": "ldm/shapes_dit.yaml"}



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
        # 100 batches of 64, half an epoch of configs/clip/shapes.yaml (the shortest of the shapes configs, 200):
        # each epoch refills the 1000-sample shuffle buffer, a cost that a much shorter epoch would overstate
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


def median(xs) -> float:
    return float(statistics.median(xs))


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------------- models and data
def make_shapes(out: Path, settings: Settings) -> Path:
    from lit_diffusion.data.shapes import write_shapes

    n = 512 if settings.quick else 2000
    write_shapes(out, train=n, val=max(64, settings.eval_samples * 2), size=settings.image_size,
                 shard_size=n // 4, seed=0)
    return out


def stage_args(stage: str, quick: bool) -> tuple[dict, int, float | None]:
    """(model init args, batch size, gradient_clip_val) of a stage (clip, vae, ldm: U-Net + DDPM, ldm_dit: DiT +
    flow): its shapes config in configs/, or --quick's."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"bench: unknown stage {stage!r}; choose from {', '.join(STAGE_CONFIGS)}")
    if quick:
        quick_args = {"clip": QUICK_CLIP, "vae": QUICK_VAE, "ldm": QUICK_LDM, "ldm_dit": QUICK_LDM_DIT}
        return copy.deepcopy(quick_args[stage]), 16, None
    import yaml

    path = CONFIG_DIR / STAGE_CONFIGS[stage]
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
    """(module, batch size, gradient_clip_val) for `stage`, initialised from seed 0; the LDM stages (ldm, ldm_dit)
    get untrained CLIP and VAE checkpoints written to `work` unless given."""
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
