"""latents: what training from latent shards (`data encode` once) buys over encoding every batch online.

Rows (ratios of runs interleaved in one process, medians):
  train steps/s, latent shards vs online encoding: the shapes LDM configs (U-Net + DDPM, DiT + rectified flow),
      and configs/ldm/base.yaml shrunk to CPU size (same U-Net, VAE and CLIP structure, fewer channels, 64 px);
  loader samples/s, LatentDataModule vs a raw webdataset loop decoding the same .npy members (target >= 0.9);
  peak RSS of LDM training on 10x the latent shards vs 1x, same steps, each run its own process (target <= 1.1).
Details: encode throughput (samples/s of `lit-diffusion data encode`, checkpoint loading included) and bytes per
sample on disk, measured on the shapes encode and on written samples of Stable Diffusion's sizes (f=8, 4 latent
channels, CLIP ViT-L/14 text features 768 wide, float16) at 32 and 256 px.
Train runs load with one worker process, as configs/ldm/shapes.yaml does (`num_workers=0` puts the loaders' work
on the step's clock instead: the online mode decodes PNGs, the latent mode .npy arrays).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lit_diffusion.bench.common import (
    CONFIG_DIR,
    Settings,
    median,
    row,
    save_stage_checkpoint,
    stage_args,
    sync,
)

# configs/ldm/base.yaml (and its CLIP and VAE) at CPU size: the same structure, a quarter to an eighth the width
BASE_SMALL_CLIP = dict(embed_dim=64, vision=dict(image_size=64, patch_size=16, width=64, layers=2, heads=4),
                       text=dict(width=64, layers=12, heads=4), warmup_steps=2)
BASE_SMALL_VAE = dict(arch=dict(base_channels=16, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4,
                                mid_attention=True, norm_groups=8), warmup_steps=2)
BASE_SMALL_LDM = dict(image_size=64, unet=dict(model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=2,
                                               attention_resolutions=[2, 4], head_dim=16, transformer_depth=1,
                                               norm_groups=8),
                      schedule=dict(num_timesteps=1000, schedule="scaled_linear"), prediction="v",
                      loss_weighting="min_snr", warmup_steps=2, pooled_text=False)


def encode(clip_ckpt: str, vae_ckpt: str, urls: str, out: Path, image_size: int, dtype: str = "float16") -> dict:
    """What `lit-diffusion data encode` does, in this process; -> its manifest, with `seconds` and `samples_per_s`
    (checkpoint loading included)."""
    from lit_diffusion.data.encode import encode_shards
    from lit_diffusion.stages.encoders import frozen_encoders

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    encoders = frozen_encoders(clip_ckpt, vae_ckpt, "cpu")
    encode_shards(urls, out, encoders.encode_images, encoders.encode_captions, image_size=image_size,
                  clip_hash=encoders.clip_hash, vae_hash=encoders.vae_hash, latent_scale=encoders.latent_scale,
                  dtype=dtype, batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    return {**manifest, "seconds": seconds, "samples_per_s": manifest["samples"] / seconds}


# ------------------------------------------------------------------------------------------------ training


def _steps_per_s(module, dm, steps: int, warmup: int, device: str) -> float:
    """Steady-state training steps/s of `Trainer.fit(module, dm)`: the batch-start intervals after `warmup`."""
    import lightning as L

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(device)
            stamps.append(time.perf_counter())

    trainer = L.Trainer(accelerator=device, devices=1, max_steps=warmup + steps + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Stamp()])
    trainer.fit(module, datamodule=dm)
    return steps / (stamps[warmup + steps] - stamps[warmup])


def train_rates(ldm_args: dict, image_urls: str, latent_urls: str, image_size: int, batch_size: int,
                settings: Settings, device: str, num_workers: int = 1) -> dict:
    """Steps/s of the two modes (online: image shards through the frozen encoders every step; latents: latent
    shards), interleaved over `settings.repeats` rounds."""
    import torch

    from lit_diffusion.data.datamodule import ImageCaptionDataModule, LatentDataModule
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    steps, warmup = settings.train_measured, settings.train_warmup
    torch.manual_seed(0)
    initial = LatentDiffusionModule(**ldm_args)
    common = dict(batch_size=batch_size, num_workers=num_workers, train_batches_per_epoch=warmup + steps + 2,
                  shuffle_buffer=256, pin_memory=False)
    modes = ["online", "latents"]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(settings.repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            module = copy.deepcopy(initial)
            if mode == "latents":
                dm = LatentDataModule(train_urls=latent_urls, **common)
            else:
                dm = ImageCaptionDataModule(train_urls=image_urls, image_size=image_size, **common)
            rates[mode].append(_steps_per_s(module, dm, steps, warmup, device))
    return rates


# -------------------------------------------------------------------------------------------------- loader


def _raw_latent_batches(urls: list[str], batch_size: int, num_batches: int):
    """The hand-written loop: read the shards in order, np.load the arrays, pad the contexts, stack."""
    import io

    import numpy as np
    import torch
    import webdataset as wds

    def array(data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.load(io.BytesIO(data))).float()

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    samples, made = [], 0
    for s in (s for _ in range(10**9) for s in dataset):
        samples.append({"latent": array(s["latent.npy"]), "context": array(s["context.npy"]),
                        "pooled": array(s["pooled.npy"]), "caption": s["txt"].decode("utf-8"),
                        "attrs": json.loads(s["json"]) if "json" in s else {}, "key": s["__key__"]})
        if len(samples) == batch_size:
            n = max(x["context"].shape[0] for x in samples)
            context = torch.zeros(batch_size, n, samples[0]["context"].shape[1])
            for i, x in enumerate(samples):
                context[i, : x["context"].shape[0]] = x["context"]
            yield {"latent": torch.stack([x["latent"] for x in samples]), "context": context,
                   "pooled": torch.stack([x["pooled"] for x in samples]), "key": [x["key"] for x in samples]}
            samples, made = [], made + 1
            if made == num_batches:
                return


def loader_rates(latent_urls: str, batch_size: int, num_samples: int, repeats: int) -> dict:
    """Samples/s of `LatentDataModule.train_dataloader()` (num_workers 0) and of the raw loop; best of `repeats`
    each, after one untimed pass of each (page cache, shuffle buffer)."""
    import torch

    from lit_diffusion.data.datamodule import LatentDataModule
    from lit_diffusion.data.shards import expand_urls

    shards = expand_urls(latent_urls)
    batches = max(1, num_samples // batch_size)
    dm = LatentDataModule(train_urls=shards, batch_size=batch_size, num_workers=0, train_batches_per_epoch=batches,
                          shuffle_buffer=1000, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def rate(batches_iter) -> float:
        start, n = time.perf_counter(), 0
        for batch in batches_iter:
            n += batch["latent"].shape[0]
        return n / (time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rate(loader), rate(_raw_latent_batches(shards, batch_size, batches))
        dm_runs, raw_runs = [], []
        for _ in range(repeats):
            dm_runs.append(rate(loader))
            raw_runs.append(rate(_raw_latent_batches(shards, batch_size, batches)))
    finally:
        torch.set_num_threads(threads)
    return {"datamodule_samples_per_s": dm_runs, "raw_samples_per_s": raw_runs,
            "num_samples": batches * batch_size, "skipped": dm.skipped()["train"]}


# -------------------------------------------------------------------------------------------------- memory


def latents_child(args_json: str, out: str) -> None:
    """The measured run of the memory row, in its own process: the LDM from latent shards for `steps` steps."""
    import gc
    import resource

    import lightning as L
    import torch

    from lit_diffusion.bench.memory import own_peak_rss_kib
    from lit_diffusion.data.datamodule import LatentDataModule
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    spec = json.loads(Path(args_json).read_text())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = LatentDataModule(train_urls=spec["urls"], batch_size=spec["batch_size"], num_workers=1,
                          train_batches_per_epoch=spec["steps"], shuffle_buffer=1000)
    module = LatentDiffusionModule(**spec["ldm"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=spec["steps"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(Path(out).parent))
    trainer.fit(module, datamodule=dm)
    result = {"steps": int(trainer.global_step), "shards": len(dm.train_shards)}
    del trainer, dm
    gc.collect()  # ends the loader's worker, so its peak shows in RUSAGE_CHILDREN
    result["main_peak_rss_kib"] = own_peak_rss_kib()
    result["worker_peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_kib"] = max(result["main_peak_rss_kib"], result["worker_peak_rss_kib"])
    Path(out).write_text(json.dumps(result))


def replicate_shards(src: Path, dst: Path, copies: int) -> Path:
    """`dst` holding every train shard of `src` `copies` times under new names, with a manifest listing them."""
    manifest = json.loads((src / "manifest.json").read_text())
    train = [s for s in manifest["shards"] if s["name"].startswith("train")]
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for c in range(copies):
        for s in train:
            name = f"train-{len(shards):06d}.tar"
            shutil.copyfile(src / s["name"], dst / name)
            shards.append({**s, "name": name})
    manifest.update(shards=shards, samples=sum(s["samples"] for s in shards))
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def memory_rates(latents: Path, work: Path, ldm_args: dict, batch_size: int, settings: Settings) -> dict:
    one = replicate_shards(latents, work / "latents_1x", 1)
    ten = replicate_shards(latents, work / "latents_10x", 10)
    runs: dict[str, list[dict]] = {"1x": [], "10x": []}
    for r in range(settings.repeats):
        for name in (("1x", "10x") if r % 2 == 0 else ("10x", "1x")):
            spec = work / f"latents_memory_{name}_{r}.spec.json"
            spec.write_text(json.dumps({"urls": str((one if name == "1x" else ten) / "train-*.tar"),
                                        "steps": settings.memory_steps, "batch_size": batch_size,
                                        "ldm": ldm_args}))
            out = work / f"latents_memory_{name}_{r}.json"
            proc = subprocess.run([sys.executable, "-m", "lit_diffusion.bench", "latents-child", "--spec", str(spec),
                                   "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench latents: memory run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(out.read_text()))
    sizes = {k: sum(p.stat().st_size for p in d.glob("*.tar")) / 2**20 for k, d in (("1x", one), ("10x", ten))}
    return {"runs": runs, "data_mib": sizes}


# --------------------------------------------------------------------------------------------- bytes on disk


def bytes_per_sample(work: Path, image_size: int, context_tokens: int, width: int = 768, pooled: int = 768,
                     channels: int = 4, factor: int = 8, dtype: str = "float16", n: int = 64) -> float:
    """Bytes per sample of a latent shard of `n` samples of these sizes (random values, a shapes caption and
    attributes), tar and .npy headers included."""
    import torch

    from lit_diffusion.data.latents import LatentShardWriter

    h = image_size // factor
    path = work / f"bytes_{image_size}_{context_tokens}.tar"
    writer = LatentShardWriter(path, dtype)
    g = torch.Generator().manual_seed(0)
    attrs = json.dumps({"objects": [{"shape": "circle", "color": "red", "size": "small"}]}).encode()
    for i in range(n):
        writer.write(f"{i:08d}", torch.randn(channels, h, h, generator=g),
                     torch.randn(context_tokens, width, generator=g), torch.randn(pooled, generator=g),
                     "a small red circle above a large blue square", attrs)
    writer.commit()
    return path.stat().st_size / n


# ---------------------------------------------------------------------------------------------------- section


def _checkpoints(shapes_dir: Path, work: Path, clip_args: dict, vae_args: dict, tag: str) -> tuple[str, str]:
    import torch

    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    torch.manual_seed(0)
    clip = CLIPModule(**{**clip_args, "tokenizer_path": str(shapes_dir / "tokenizer.json")})
    vae = VAEModule(**vae_args)
    return (str(save_stage_checkpoint(clip, work / f"clip_{tag}.ckpt")),
            str(save_stage_checkpoint(vae, work / f"vae_{tag}.ckpt")))


def bench_latents(shapes_dir: Path, work: Path, device: str, settings: Settings) -> tuple[list[dict], dict]:
    images = str(shapes_dir / "train-*.tar")
    rows, details = [], {}
    # the shapes LDM config (its CLIP and VAE untrained: the cost of a step does not depend on the weights)
    clip_args, _, _ = stage_args("clip", settings.quick)
    vae_args, _, _ = stage_args("vae", settings.quick)
    ldm_args, batch, _ = stage_args("ldm", settings.quick)
    clip_ckpt, vae_ckpt = _checkpoints(shapes_dir, work, clip_args, vae_args, "shapes")
    ldm_args.update(clip_ckpt=clip_ckpt, vae_ckpt=vae_ckpt)
    size = int(ldm_args.get("image_size", settings.image_size))
    latents = work / "latents_shapes"
    manifest = encode(clip_ckpt, vae_ckpt, images, latents, size)
    details["encode_shapes"] = {k: manifest[k] for k in ("samples", "seconds", "samples_per_s", "shapes", "dtype")}
    details["bytes_per_sample_shapes"] = sum(s["bytes"] for s in manifest["shards"]) / manifest["samples"]
    rates = train_rates(ldm_args, images, str(latents / "train-*.tar"), size, batch, settings, device)
    details["train_shapes_steps_per_s"] = rates
    rows.append(row("latents", f"shapes LDM, latents vs online (batch {batch})", "steps/s",
                    median(rates["latents"]), median(rates["online"]), ">=", 1.0))

    # configs/ldm/shapes_dit.yaml: the DiT + rectified flow on the same latents
    if not settings.quick:
        import yaml

        dit_args = yaml.safe_load((CONFIG_DIR / "ldm" / "shapes_dit.yaml").read_text())["model"]["init_args"]
        dit_args.update(clip_ckpt=ldm_args["clip_ckpt"], vae_ckpt=ldm_args["vae_ckpt"])
        rates = train_rates(dit_args, images, str(latents / "train-*.tar"), size, batch, settings, device)
        details["train_shapes_dit_steps_per_s"] = rates
        rows.append(row("latents", f"shapes DiT + flow, latents vs online (batch {batch})", "steps/s",
                        median(rates["latents"]), median(rates["online"]), ">=", 1.0))

    # configs/ldm/base.yaml's structure at CPU size
    if not settings.quick:
        clip_ckpt, vae_ckpt = _checkpoints(shapes_dir, work, BASE_SMALL_CLIP, BASE_SMALL_VAE, "base_small")
        base_args = {**BASE_SMALL_LDM, "clip_ckpt": clip_ckpt, "vae_ckpt": vae_ckpt}
        base_latents = work / "latents_base_small"
        m = encode(clip_ckpt, vae_ckpt, images, base_latents, 64)
        details["encode_base_small"] = {k: m[k] for k in ("samples", "seconds", "samples_per_s", "shapes")}
        rates = train_rates(base_args, images, str(base_latents / "train-*.tar"), 64, 16, settings, device)
        details["train_base_small_steps_per_s"] = rates
        rows.append(row("latents", "base.yaml U-Net at CPU size (64 px, batch 16), latents vs online", "steps/s",
                        median(rates["latents"]), median(rates["online"]), ">=", 1.0))

    loader = loader_rates(str(latents / "train-*.tar"), 64, settings.data_samples, settings.repeats)
    details["loader"] = loader
    rows.append(row("latents", "LatentDataModule vs raw webdataset loop", "samples/s",
                    max(loader["datamodule_samples_per_s"]), max(loader["raw_samples_per_s"]), ">=", 0.9))

    memory = memory_rates(latents, work, ldm_args, batch, settings)
    details["memory"] = memory
    peak = {k: median([v["peak_rss_kib"] for v in vs]) / 1024 for k, vs in memory["runs"].items()}
    rows.append(row("latents", f"10x latent shards ({memory['data_mib']['10x']:.0f} MiB)", "peak RSS MiB",
                    peak["10x"], peak["1x"], "<=", 1.10))

    details["bytes_per_sample_sd_float16"] = {
        f"{px}px_{n}_tokens": bytes_per_sample(work, px, n) for px in (32, 256) for n in (16, 77)}
    return rows, details
