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
from lit_diffusion.data.buckets import BucketConfig
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


def _raw_bucketed_batches(urls: list[str], buckets: BucketConfig, batch_size: int, num_batches: int, seed: int = 0):
    """The same batches by hand, with aspect buckets: read shards in order (cycling), each image's header to its
    bucket, a random crop plan, decode with PIL and resize+crop, a buffer per bucket, a batch when one fills."""
    import random

    from lit_diffusion.data.buckets import apply, cover_crop

    rng = random.Random(seed)
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    buffers: dict[tuple, list] = {}
    made = 0
    for sample in (s for _ in range(10**9) for s in dataset):
        data = sample["png"] if "png" in sample else sample["jpg"]
        image = Image.open(io.BytesIO(data))
        index, _ = buckets.assign(image.size[1], image.size[0])
        plan = cover_crop(image.size[1], image.size[0], buckets.buckets[index], buckets.crop, rng)
        pixels = torch.from_numpy(np.array(apply(plan, image.convert("RGB")))).permute(2, 0, 1)
        items = buffers.setdefault(plan.target_size, [])
        items.append((pixels, plan, sample["txt"].decode("utf-8"), json.loads(sample["json"]) if "json" in sample
                      else {}, sample["__key__"]))
        if len(items) == batch_size:
            del buffers[plan.target_size]
            sizes = torch.tensor([[*p.original_size, *p.crop_top_left, *p.target_size] for _, p, *_ in items],
                                 dtype=torch.float32)
            yield {"image": torch.stack([i[0] for i in items]).float().div_(127.5).sub_(1.0), "size": sizes,
                   "caption": [i[2] for i in items], "attrs": [i[3] for i in items], "key": [i[4] for i in items]}
            made += 1
            if made == num_batches:
                return


def _time(batches) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["key"])
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
    buckets: dict | None = None,
) -> dict:
    """Samples/s of `ImageCaptionDataModule.train_dataloader()` and of the raw loop, over `num_samples` each.

    The loader is measured as training uses it (persistent workers): its first epoch, which includes worker
    start-up and filling the shuffle buffer, is reported as `datamodule_first_epoch_samples_per_s`; the best
    of the next `repeats` epochs is `datamodule_samples_per_s`. The raw loop gets one untimed warm-up pass
    (page cache) and reports its best of `repeats`. ratio = datamodule / raw. With `buckets` (BucketConfig
    fields), both bucket the images (the loader as training does; the raw loop by hand, `_raw_bucketed_batches`)."""
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
        buckets=buckets,
    )
    dm.setup("fit")
    if buckets is None:
        def raw():
            return _raw_batches(shards, image_size, batch_size, num_batches)
    else:
        def raw():
            return _raw_bucketed_batches(shards, dm.bucket_config, batch_size, num_batches)
    loader = dm.train_dataloader()
    # DataLoader workers run torch with one thread; so does the raw loop, or on a busy machine its small
    # tensor ops would pay for thread-pool contention and flatter the ratio.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time(raw())  # warm-up
        first_rate = _time_rate(_time(loader))
        dm_runs, raw_runs = [], []

        def run_dm():
            before = _worker_cpu_seconds(loader)
            n, _ = _time(loader)
            return n, _worker_cpu_seconds(loader) - before

        for _ in range(repeats):
            dm_runs.append(_cpu_per_sample(run_dm))
            raw_runs.append(
                _cpu_per_sample(lambda: (_time(raw())[0], 0.0))
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
        "buckets": buckets,
        "skipped": dm.skipped()["train"],
    }


def peak_rss_mb(urls, image_size: int, batch_size: int, num_batches: int, buckets: dict | None) -> float:
    """Peak resident memory (MB) of a fresh process that draws `num_batches` from the train loader (no workers):
    run at 1x and 10x the shards, equal values show that memory does not grow with the data set."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_draw_and_measure, (urls, image_size, batch_size, num_batches, buckets))


def _draw_and_measure(urls, image_size, batch_size, num_batches, buckets) -> float:
    from lit_diffusion.bench.memory import own_peak_rss_kib

    dm = ImageCaptionDataModule(train_urls=urls, image_size=image_size, batch_size=batch_size, num_workers=0,
                                train_batches_per_epoch=num_batches, shuffle_buffer=1000, buckets=buckets)
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass
    # the child's own: ru_maxrss of a spawned child starts at the parent's peak (exec keeps it), made 1x and 10x equal
    return own_peak_rss_kib() / 1024


MIXED_RATIOS = "1:1,3:2,2:3,2:1,1:2"  # the mixed-aspect shapes data of configs/pipeline/shapes_buckets.yaml


def bench_data_section(shapes_dir: Path, settings: Settings) -> tuple[list[dict], dict]:
    result = bench_data(str(shapes_dir / "train-*.tar"), image_size=settings.image_size, batch_size=64,
                        num_samples=settings.data_samples, num_workers=1, repeats=settings.repeats)
    rows = [row("data", "DataModule (1 worker)", "samples/s", result["datamodule_samples_per_s"],
                result["raw_samples_per_s"], ">=", 0.9, framework_label="ImageCaptionDataModule",
                baseline_label="raw webdataset + PIL loop", cpu_ratio=result["cpu_ratio"])]
    # aspect buckets on mixed-aspect shapes: the same loader against the same bucketing by hand, and its peak
    # memory on 10x the shards (the same shards listed ten times: what a resampled stream holds does not grow)
    from lit_diffusion.data.shapes import write_shapes

    mixed = shapes_dir.parent / f"{shapes_dir.name}_mixed"
    if not (mixed / "info.json").is_file():
        write_shapes(mixed, train=max(500, settings.data_samples), val=0, size=32, shard_size=250,
                     aspect_ratios=MIXED_RATIOS, multiple=8)
    buckets = {"step": 8, "crop": "random", "sizes": [[32, 32], [24, 40], [40, 24], [24, 48], [48, 24]]}
    urls = expand_urls(str(mixed / "train-*.tar"))
    bucketed = bench_data(urls, image_size=32, batch_size=64, num_samples=settings.data_samples, num_workers=1,
                          repeats=settings.repeats, buckets=buckets)
    rows.append(row("data", "DataModule, aspect buckets (1 worker)", "samples/s",
                    bucketed["datamodule_samples_per_s"], bucketed["raw_samples_per_s"], ">=", 0.9,
                    framework_label="ImageCaptionDataModule(buckets=...)",
                    baseline_label="raw webdataset + PIL loop, bucketed by hand", cpu_ratio=bucketed["cpu_ratio"]))
    batches = max(1, settings.data_samples // 64)
    rss = {"1x": peak_rss_mb(urls, 32, 64, batches, buckets), "10x": peak_rss_mb(urls * 10, 32, 64, batches, buckets)}
    rows.append(row("data", f"aspect buckets on 10x the shards ({len(urls) * 10})", "peak RSS MiB", rss["10x"],
                    rss["1x"], "<=", 1.1, framework_label="10x shards", baseline_label="1x shards"))
    return rows, {"square": result, "buckets": bucketed, "buckets_peak_rss_mib": rss}
