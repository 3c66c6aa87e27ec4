"""memory: peak RSS of training on 10x the shards against 1x, same steps (target <= 1.10): the loader streams
shards rather than loading them. Each run is its own process (`python -m lit_diffusion.bench memory-child`), so
one run's peak cannot hide another's."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

from lit_diffusion.bench.common import QUICK_VAE, Settings, median, row


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


def own_peak_rss_kib() -> int:
    """This process's own peak RSS in KiB: VmHWM where /proc has it, else ru_maxrss."""
    import resource

    own = _vm_hwm_kib()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
    result["main_peak_rss_kib"] = own_peak_rss_kib()
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
    peak = {k: median([v["peak_rss_kib"] for v in vs]) / 1024 for k, vs in runs.items()}
    details = {"runs": runs, "data_mib": {k: v / 2**20 for k, v in sizes.items()}, "num_workers": num_workers,
               "steps": {k: [v["steps"] for v in vs] for k, vs in runs.items()},
               "shards": {k: [v["shards"] for v in vs] for k, vs in runs.items()}}
    return [row("memory", f"10x shards ({sizes['10x'] / 2**20:.0f} MiB)", "peak RSS MiB", peak["10x"], peak["1x"],
                "<=", 1.10, framework_label="10x shards", baseline_label="1x shards")], details

