"""data: throughput of the DataModule's train loader against a plain webdataset + PIL loop doing the same work
(decode, RGB, shorter-side resize + centre crop, to float tensor, batch) in the calling process (target >= 0.9)."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lit_diffusion.bench.common import Settings, row
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.shards import expand_urls


def _raw_batches(urls: list[str], image_size: int, batch_size: int, num_batches: int):
    """What one would write by hand for the same batches: read shards in order (cycling), decode the image
    with PIL, the caption and the attributes, stack."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    images, captions, attrs, keys, made = [], [], [], [], 0
    for sample in (s for _ in range(10**9) for s in dataset):  # passes over the shards until done
        image = Image.open(io.BytesIO(sample["png"] if "png" in sample else sample["jpg"])).convert("RGB")
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        if (w, h) != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        captions.append(sample["txt"].decode("utf-8"))
        attrs.append(json.loads(sample["json"]) if "json" in sample else {})
        keys.append(sample["__key__"])
        if len(images) == batch_size:
            image_batch = torch.stack(images).float().div_(127.5).sub_(1.0)
            yield {"image": image_batch, "caption": captions, "attrs": attrs, "key": keys}
            images, captions, attrs, keys, made = [], [], [], [], made + 1
            if made == num_batches:
                return


def _time(batches) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += batch["image"].shape[0]
    return n, time.perf_counter() - start


def _worker_cpu_seconds(loader) -> float:
    """User + system CPU seconds of the loader's live worker processes (Linux /proc; 0 elsewhere)."""
    iterator = getattr(loader.loader, "_iterator", None)
    total = 0.0
    for worker in getattr(iterator, "_workers", []):
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def _cpu_per_sample(run) -> tuple[float, float, float]:
    """(samples/s wall, CPU seconds per sample, wall seconds) of `run()` -> (n, extra worker CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    n, worker_cpu = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu + worker_cpu
    return n / wall, cpu / n, wall


def _time_rate(result: tuple[int, float]) -> float:
    return result[0] / result[1]


def bench_data(
    urls,
    image_size: int = 32,
    batch_size: int = 64,
    num_samples: int = 2000,
    num_workers: int = 1,
    shuffle_buffer: int = 1000,
    repeats: int = 3,
) -> dict:
    """Samples/s of `ImageCaptionDataModule.train_dataloader()` and of the raw loop, over `num_samples` each.

    The loader is measured as training uses it (persistent workers): its first epoch, which includes worker
    start-up and filling the shuffle buffer, is reported as `datamodule_first_epoch_samples_per_s`; the best
    of the next `repeats` epochs is `datamodule_samples_per_s`. The raw loop gets one untimed warm-up pass
    (page cache) and reports its best of `repeats`. ratio = datamodule / raw."""
    shards = expand_urls(urls, split="train")
    num_batches = max(1, math.ceil(num_samples / batch_size))
    dm = ImageCaptionDataModule(
        train_urls=shards,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        train_batches_per_epoch=num_batches,
        shuffle_buffer=shuffle_buffer,
        pin_memory=False,
        persistent_workers=num_workers > 0,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    # DataLoader workers run torch with one thread; so does the raw loop, or on a busy machine its small
    # tensor ops would pay for thread-pool contention and flatter the ratio.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time(_raw_batches(shards, image_size, batch_size, num_batches))  # warm-up
        first_rate = _time_rate(_time(loader))
        dm_runs, raw_runs = [], []

        def run_dm():
            before = _worker_cpu_seconds(loader)
            n, _ = _time(loader)
            return n, _worker_cpu_seconds(loader) - before

        for _ in range(repeats):
            dm_runs.append(_cpu_per_sample(run_dm))
            raw_runs.append(
                _cpu_per_sample(lambda: (_time(_raw_batches(shards, image_size, batch_size, num_batches))[0], 0.0))
            )
    finally:
        torch.set_num_threads(threads)
        del loader  # ends persistent workers
    dm_rate, raw_rate = max(r[0] for r in dm_runs), max(r[0] for r in raw_runs)
    dm_cpu, raw_cpu = min(r[1] for r in dm_runs), min(r[1] for r in raw_runs)
    return {
        "datamodule_samples_per_s": dm_rate,
        "raw_samples_per_s": raw_rate,
        "ratio": dm_rate / raw_rate,
        # CPU seconds per sample (main + workers): robust to other load on a shared machine, where wall-clock
        # rates mostly measure the scheduler. cpu_ratio = raw CPU per sample / datamodule CPU per sample.
        "datamodule_cpu_us_per_sample": dm_cpu * 1e6,
        "raw_cpu_us_per_sample": raw_cpu * 1e6,
        "cpu_ratio": raw_cpu / dm_cpu,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "datamodule_first_epoch_samples_per_s": first_rate,
        "num_samples": num_batches * batch_size,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "skipped": dm.skipped()["train"],
    }


def bench_data_section(shapes_dir: Path, settings: Settings) -> tuple[list[dict], dict]:
    result = bench_data(str(shapes_dir / "train-*.tar"), image_size=settings.image_size, batch_size=64,
                        num_samples=settings.data_samples, num_workers=1, repeats=settings.repeats)
    return [row("data", "DataModule (1 worker)", "samples/s", result["datamodule_samples_per_s"],
                result["raw_samples_per_s"], ">=", 0.9, framework_label="ImageCaptionDataModule",
                baseline_label="raw webdataset + PIL loop", cpu_ratio=result["cpu_ratio"])], result
