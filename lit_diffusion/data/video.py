"""Video-caption shards: clips decoded to a fixed number of frames at a fixed stride, and their DataModule.

A sample holds one clip (`KEY.mp4`, `.webm`, `.mkv`, `.mov`, `.avi` as video2dataset writes them, decoded with
PyAV, the optional `video` extra; or `KEY.apng` / `.gif`, decoded with PIL at their frame rate, `KEY.json`'s
`fps` or else the shortest frame's, a frame held for n frame durations counted n times: the embedded moving-shapes
data is animated PNG, lossless), `KEY.txt` and optionally `KEY.json`. A clip's attributes gain
`"partial_window": true` when its frames are not the whole clip its `frames` attribute counts (a longer source,
or a short clip played again), so that the motion judge leaves it out.

`VideoDecoder` takes frames 0, s, 2s, ..., (T - 1) s (T = `num_frames`, s = `frame_stride`) from the clip's
start; each frame is resized and centre-cropped to `image_size` as images are. What is wrong with a clip is
skipped, named (shard and key) and counted like a bad image: no video member (`missing_video`), a file that does
not decode or has no frames or frames of different sizes (`bad_video`), fewer than (T - 1) s + 1 frames
(`short_clip`, unless `short: loop`, which plays the clip again from its start until there are enough), frames
smaller than `image_size` with `small: skip` (`small_image`; `upscale`, the default, resizes them up).

`VideoDataModule` batches: {"video": float [B, T, 3, S, S] in [-1, 1], "caption", "attrs", "key"}, with every
guarantee of `ImageCaptionDataModule` (streamed, split by rank and worker, exactly-once validation, exact
mid-epoch resume), since it runs the same streams with this decoder. An image is a one-frame video
(`images_as_video`).
"""

from __future__ import annotations

import io
import math
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageSequence

from lit_diffusion.data.datamodule import _ShardDataModule
from lit_diffusion.data.shards import (
    IMAGE_EXTENSIONS,
    INLINE_BATCH_BYTES,
    BadSample,
    _open_rgb,
    decode_text,
    images_to_float,
    to_rgb,
)

PIL_VIDEO_EXTENSIONS = ("apng", "gif")
AV_VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
VIDEO_EXTENSIONS = PIL_VIDEO_EXTENSIONS + AV_VIDEO_EXTENSIONS
SHORT_POLICIES = ("skip", "loop")
# A clip's frames stand for the whole clip its attributes describe (its travel, its growth) when they span at least
# this share of it, first to last frame; else the clip is marked `partial_window`. Of 150 drawn moving-shapes clips
# (half of them growing or shrinking) per frame count and stride, the motion judge failed real clips spanning up to
# 0.61 of their clip (2 frames at stride 4 of 8: 15 of 150) and one of 150 at 0.71, none from 0.73 to 1.0.
WHOLE_SPAN = 0.8


def _pyav():
    try:
        import av
    except ImportError:  # a configuration error, not a bad sample: stop, saying what to install
        raise ImportError("reading .mp4/.webm/.mkv/.mov/.avi clips needs PyAV: pip install 'lit_diffusion[video]' "
                          "(or `av`)") from None
    return av


def read_frames(data: bytes, ext: str, limit: int, fps: float | None = None) -> list[Image.Image]:
    """The clip's first `limit` frames (fewer if it has fewer) as RGB images. An animated PNG or GIF is read at
    `fps` frames a second (its KEY.json's `fps`), or without it at the rate of its shortest frame."""
    if ext in PIL_VIDEO_EXTENSIONS:
        # a frame shown n frame durations counts n times: PIL, writing an animated PNG, merges identical consecutive
        # frames into one of twice the duration (and a clip whose frames all come in pairs has no short frame left:
        # hence `fps`, which the embedded data writes)
        frames = []
        with Image.open(io.BytesIO(data)) as clip:
            durations = []
            for frame in ImageSequence.Iterator(clip):
                frames.append(to_rgb(frame.copy()))
                durations.append(frame.info.get("duration") or 0)
                if len(frames) == limit:
                    break
        base = 1000 / fps if fps else min((d for d in durations if d > 0), default=0)
        if base:
            frames = [f for f, d in zip(frames, durations) for _ in range(max(1, round(d / base)))]
        return frames[:limit]
    av = _pyav()
    frames = []
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_image())  # RGB
            if len(frames) == limit:
                break
    return frames


def _square(frame: Image.Image, size: int) -> np.ndarray:
    """Shorter side resized to `size` (bicubic), centre crop: uint8 [size, size, 3]."""
    w, h = frame.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        frame = frame.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(frame)


def _one_frame_gif(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as gif:
            return getattr(gif, "n_frames", 1) == 1
    except MemoryError:
        raise
    except Exception:  # undecodable: the clip reader names and counts it
        return False


class VideoDecoder:
    """Raw tar sample -> {"video": uint8 [T, 3, S, S], "caption", "attrs", "key"}; raises BadSample (see the module
    docstring). Picklable, so DataLoader workers can run it."""

    def __init__(self, image_size: int, num_frames: int, frame_stride: int = 1, short: str = "skip",
                 small: str = "upscale", images: bool = False):
        if num_frames < 1 or frame_stride < 1:
            raise ValueError(f"num_frames={num_frames} and frame_stride={frame_stride} must be >= 1")
        if short not in SHORT_POLICIES:
            raise ValueError(f"short={short!r}: expected one of {SHORT_POLICIES}")
        if small not in ("upscale", "skip"):
            raise ValueError(f"small={small!r}: expected 'upscale' or 'skip'")
        self.image_size, self.num_frames, self.frame_stride = image_size, num_frames, frame_stride
        self.short, self.small, self.images = short, small, images

    @property
    def span(self) -> int:
        """Frames of the source a clip covers: (T - 1) s + 1."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def __call__(self, sample: dict, flip: bool = False) -> dict:
        if flip:  # a mirrored clip moves the other way: its caption would be wrong
            raise ValueError("random_flip mirrors a clip's motion (left <-> right) and would contradict its caption")
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        if self.images and (ext is None or (ext == "gif" and _one_frame_gif(sample[ext]))):
            return self._still(sample)  # a .gif is an image too: one frame is a still, not a short clip
        if ext is None:
            raise BadSample("missing_video", f"no video file (.{'/.'.join(VIDEO_EXTENSIONS)})")
        caption, attrs = decode_text(sample)
        try:
            fps = attrs.get("fps") if isinstance(attrs, dict) else None
            frames = read_frames(sample[ext], ext, self.span, fps if isinstance(fps, (int, float)) and fps > 0
                                 else None)
        except ImportError:
            raise
        except MemoryError:  # the process, not the sample: never counted as a bad sample
            raise
        except Exception as exc:  # PIL and PyAV raise many types on damaged files
            raise BadSample("bad_video", f".{ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if not frames:
            raise BadSample("bad_video", f".{ext} has no frames")
        sizes = {frame.size for frame in frames}
        if len(sizes) > 1:
            raise BadSample("bad_video", f".{ext} frames differ in size: {sorted(sizes)}")
        looped = len(frames) < self.span
        if looped:
            if self.short == "skip":
                raise BadSample("short_clip", f".{ext} has {len(frames)} frames; {self.num_frames} frames at stride "
                                              f"{self.frame_stride} need {self.span}")
            frames = (frames * math.ceil(self.span / len(frames)))[:self.span]
        source = attrs.get("frames") if isinstance(attrs, dict) else None
        if isinstance(source, int) and source > 1 and (looped or self.span - 1 < WHOLE_SPAN * (source - 1)):
            # the attributes describe the whole source clip, these frames a part of it (or it played twice): the
            # motion judge must not check them against it
            attrs = {**attrs, "partial_window": True}
        w, h = frames[0].size
        if min(w, h) < self.image_size and self.small == "skip":
            raise BadSample("small_image", f".{ext} frames are {w}x{h}, smaller than {self.image_size} px")
        picked = frames[::self.frame_stride][:self.num_frames]
        video = np.stack([_square(frame, self.image_size) for frame in picked])  # [T, S, S, 3]
        return {"video": torch.from_numpy(np.ascontiguousarray(video.transpose(0, 3, 1, 2))), "caption": caption,
                "attrs": attrs, "key": sample["__key__"]}


    def _still(self, sample: dict) -> dict:
        """An image sample as a one-frame video [1, 3, S, S] (joint image and video training)."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise BadSample("missing_video", f"no video or image file (.{'/.'.join(VIDEO_EXTENSIONS)}, "
                                             f".{'/.'.join(IMAGE_EXTENSIONS[:4])}/...)")
        caption, attrs = decode_text(sample)
        try:
            image, (h, w) = _open_rgb(sample[ext], self.image_size)
        except MemoryError:  # the process, not the sample: never counted as a bad sample
            raise
        except Exception as exc:
            raise BadSample("bad_image", f".{ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if min(w, h) < self.image_size and self.small == "skip":
            raise BadSample("small_image", f".{ext} is {w}x{h}, smaller than {self.image_size} px")
        frame = torch.from_numpy(np.ascontiguousarray(_square(image, self.image_size).transpose(2, 0, 1)))
        return {"video": frame[None], "caption": caption, "attrs": attrs, "key": sample["__key__"]}


def frame_count(sample: dict) -> int:
    """What groups a mix of clips and still images into batches: the frame count (every batch one of them)."""
    return sample["video"].shape[0]


def collate_videos(samples: list[dict], as_float: bool = True, as_images: bool = False) -> dict:
    """Decoded clips -> {"video": [B, T, 3, S, S] float in [-1, 1] (uint8 without `as_float`; a numpy array
    when small, handed over by value as image batches are), "caption", "attrs", "key"}; `as_images`: their frames
    as an image batch, {"image": [B * T, 3, S, S], ...}, each clip's caption, attributes and key once per frame."""
    key = "image" if as_images else "video"
    video = torch.stack([s["video"] for s in samples])
    frames = video.shape[1]
    if as_images:
        video = video.flatten(0, 1)
    if as_float:
        video = images_to_float(video)
    elif video.nbytes < INLINE_BATCH_BYTES:
        video = video.numpy()
    repeat = frames if as_images else 1
    return {key: video, "caption": [s["caption"] for s in samples for _ in range(repeat)],
            "attrs": [s["attrs"] for s in samples for _ in range(repeat)],
            "key": [s["key"] for s in samples for _ in range(repeat)]}


def images_as_video(batch: dict) -> dict:
    """An image batch as a batch of one-frame videos: "image" [B, 3, H, W] -> "video" [B, 1, 3, H, W]."""
    out = {k: v for k, v in batch.items() if k != "image"}
    out["video"] = torch.as_tensor(batch["image"]).unsqueeze(1)
    return out


class VideoDataModule(_ShardDataModule):
    """Video-caption shards with the guarantees of `ImageCaptionDataModule` (see the module docstring)."""

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        image_size: int = 32,
        num_frames: int = 8,
        frame_stride: int = 1,
        short: str = "skip",
        small: str = "upscale",
        batch_size: int = 32,
        num_workers: int = 2,
        train_batches_per_epoch: int = 100,
        shuffle_buffer: int = 1000,
        val_max_samples: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int = 4,
        as_images: bool = False,
        images: bool = False,
    ):
        """
        images: image samples (`KEY.png`/`.jpg`/... without a clip) in the shards are one-frame videos, and every
            batch holds clips or images, not both (Open-Sora's joint training: list image shards beside the video
            shards in train_urls; shards are drawn uniformly, so listing one twice doubles its share). The video
            DiT takes both with `temporal_patch: 1`.
        as_images: batches of the clips' frames as images ({"image": [batch_size * num_frames, 3, S, S], ...}), to
            train an image model (the VAE) on the frames of the same shards.
        num_frames / frame_stride: frames per clip, and the step between them in the source (frames 0, s, 2s...).
        short: a clip with fewer than (num_frames - 1) x frame_stride + 1 frames is skipped and counted ("skip")
            or played again from its start ("loop").
        small: frames smaller than image_size are resized up ("upscale") or the clip is skipped ("skip").
        The rest as ImageCaptionDataModule's (no random_flip: a mirrored clip moves the other way).
        """
        super().__init__()
        self.save_hyperparameters()
        self.image_size = image_size
        self.decoder = VideoDecoder(image_size, num_frames, frame_stride, short, small, images)  # checks them
        self.as_images = as_images
        self._init_common(train_urls, val_urls, batch_size, num_workers, train_batches_per_epoch, shuffle_buffer,
                          False, val_max_samples, seed, pin_memory, persistent_workers, prefetch_factor)

    @property
    def num_frames(self) -> int:
        return self.decoder.num_frames

    @property
    def frame_stride(self) -> int:
        return self.decoder.frame_stride

    def _decode(self, split: str):
        return self.decoder

    def _bucket_key(self):
        return frame_count if self.decoder.images else None  # batches of clips or of images, never mixed

    def _collate(self, train: bool):
        return partial(collate_videos, as_float=not train, as_images=self.as_images)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # the clips only: captions and attributes stay on the host (see ImageCaptionDataModule)
        key = "image" if self.as_images else "video"
        if isinstance(batch, dict) and key in batch:
            video = torch.as_tensor(batch[key]).to(device, non_blocking=True)
            return {**batch, key: images_to_float(video) if video.dtype == torch.uint8 else video}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
