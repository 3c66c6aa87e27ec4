"""video: throughput of `VideoDataModule`'s train loader (1 worker) against a raw webdataset + PyAV loop doing the same
work (decode the mp4, take the frames, resize and centre-crop each, stack, batch) in the calling process (target
>= 0.9), on moving-shapes clips written as video2dataset writes clips (`KEY.mp4`, H.264), and the loader's peak
memory on 10x the shards (target <= 1.1x)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lit_diffusion.bench.common import Settings, row
from lit_diffusion.bench.data import _cpu_per_sample, _time, _worker_cpu_seconds
from lit_diffusion.data.moving_shapes import clip_attrs, render_clip
from lit_diffusion.data.shards import expand_urls
from lit_diffusion.data.video import VideoDataModule, _square


def encode_mp4(frames, fps: int = 8) -> bytes:
    """Frames (PIL RGB) as an H.264 mp4, lossless (crf 0, yuv444p), as a clip of video2dataset's shards."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt, stream.options = "yuv444p", {"crf": "0"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(frame)))
        out.mux(stream.encode())
    return buf.getvalue()


def write_mp4_shards(out: Path, clips: int, size: int, frames: int, shard_size: int = 250) -> list[str]:
    """Moving-shapes clips as mp4 shards (`KEY.mp4`, `KEY.txt`, `KEY.json`), written once."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for first in range(0, clips, shard_size):
        path = out / f"train-{first // shard_size:06d}.tar"
        paths.append(str(path))
        if path.is_file():
            continue
        with tarfile.open(path.with_suffix(".tmp"), "w") as tar:
            for i in range(first, min(first + shard_size, clips)):
                attrs = clip_attrs(i, size, frames)
                for ext, data in (("mp4", encode_mp4(render_clip(attrs))), ("txt", attrs["caption"].encode()),
                                  ("json", json.dumps(attrs).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path.with_suffix(".tmp").rename(path)
    return paths


def _raw_batches(urls: list[str], size: int, frames: int, batch_size: int, num_batches: int):
    """What one would write by hand: read the shards in order (cycling), decode each mp4's first frames with PyAV,
    resize and centre-crop them, stack, batch."""
    import av

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    clips, captions, attrs, keys, made = [], [], [], [], 0
    for sample in (s for _ in range(10**9) for s in dataset):
        picked = []
        with av.open(io.BytesIO(sample["mp4"])) as container:
            for frame in container.decode(container.streams.video[0]):
                picked.append(_square(frame.to_image(), size))
                if len(picked) == frames:
                    break
        clips.append(torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2))
        captions.append(sample["txt"].decode("utf-8"))
        attrs.append(json.loads(sample["json"]))
        keys.append(sample["__key__"])
        if len(clips) == batch_size:
            yield {"video": torch.stack(clips).float().div_(127.5).sub_(1.0), "caption": captions, "attrs": attrs,
                   "key": keys}
            clips, captions, attrs, keys, made = [], [], [], [], made + 1
            if made == num_batches:
                return


def bench_video_loader(urls, size: int, frames: int, batch_size: int, num_samples: int, repeats: int) -> dict:
    """Clips/s of the loader (persistent worker, best of `repeats` epochs after the first) and of the raw loop (best
    of `repeats` after a warm-up pass), with CPU time per clip (main process and worker): ratio = loader / raw."""
    shards = expand_urls(urls)
    num_batches = max(1, math.ceil(num_samples / batch_size))
    dm = VideoDataModule(train_urls=shards, image_size=size, num_frames=frames, batch_size=batch_size, num_workers=1,
                         train_batches_per_epoch=num_batches, shuffle_buffer=200, pin_memory=False,
                         persistent_workers=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time(_raw_batches(shards, size, frames, batch_size, num_batches))  # warm-up
        _time(loader)

        def run_dm():
            before = _worker_cpu_seconds(loader)
            n, _ = _time(loader)
            return n, _worker_cpu_seconds(loader) - before

        dm_runs, raw_runs = [], []
        for _ in range(repeats):
            dm_runs.append(_cpu_per_sample(run_dm))
            raw_runs.append(_cpu_per_sample(lambda: (_time(_raw_batches(shards, size, frames, batch_size,
                                                                        num_batches))[0], 0.0)))
    finally:
        torch.set_num_threads(threads)
        del loader
    return {"datamodule_clips_per_s": max(r[0] for r in dm_runs), "raw_clips_per_s": max(r[0] for r in raw_runs),
            "cpu_ratio": min(r[1] for r in raw_runs) / min(r[1] for r in dm_runs),
            "num_clips": num_batches * batch_size, "skipped": dm.skipped()["train"]}


def _draw_and_measure(urls, size, frames, batch_size, num_batches) -> float:
    from lit_diffusion.bench.memory import own_peak_rss_kib

    dm = VideoDataModule(train_urls=urls, image_size=size, num_frames=frames, batch_size=batch_size, num_workers=0,
                         train_batches_per_epoch=num_batches, shuffle_buffer=200)
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass
    # the child's own: ru_maxrss of a spawned child starts at the parent's peak (exec keeps it), made 1x and 10x equal
    return own_peak_rss_kib() / 1024


def peak_rss_mb(urls, size, frames, batch_size, num_batches) -> float:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_draw_and_measure, (urls, size, frames, batch_size, num_batches))


def bench_video(work: Path, settings: Settings) -> tuple[list[dict], dict]:
    size, frames, batch = 32, 8, 16
    clips = 200 if settings.quick else 1000
    urls = write_mp4_shards(work / "moving_shapes_mp4", clips, size, frames)
    result = bench_video_loader(urls, size, frames, batch, clips, settings.repeats)
    rows = [row("video", "VideoDataModule (1 worker), mp4 clips of 8 x 32 px", "clips/s",
                result["datamodule_clips_per_s"], result["raw_clips_per_s"], ">=", 0.9,
                framework_label="VideoDataModule", baseline_label="raw webdataset + PyAV loop",
                cpu_ratio=result["cpu_ratio"])]
    batches = max(1, clips // batch // 2)
    rss = {"1x": peak_rss_mb(urls, size, frames, batch, batches),
           "10x": peak_rss_mb(urls * 10, size, frames, batch, batches)}
    rows.append(row("video", f"VideoDataModule on 10x the shards ({len(urls) * 10})", "peak RSS MiB", rss["10x"],
                    rss["1x"], "<=", 1.1, framework_label="10x shards", baseline_label="1x shards"))
    return rows, {"loader": result, "peak_rss_mib": rss}
