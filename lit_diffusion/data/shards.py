"""WebDataset shards: URL expansion, image/caption decoding, skip accounting, and the two sample streams.

- `expand_urls` turns brace patterns, globs, lists, directories, `pipe:` commands and remote URLs into a list
  of shard URLs and fails early, naming the pattern, when local shards are missing.
- `decode_sample` turns a raw tar sample into {"image": uint8 [3,S,S], "caption", "attrs", "key"}; anything
  wrong with a sample raises `BadSample`, which the streams log (naming shard and key) and count, then skip.
- `ResampledTrainStream`: an endless stream; every (rank, worker) draws shards at random with its own seed, so
  no rank runs dry on uneven shards; each epoch yields a fixed number of batches, shared among the workers.
  Each batch carries its worker's position in the epoch, so a run resumes in the middle of an epoch exactly.
- `ExactlyOnceStream`: every (rank, worker) reads the shards in order and keeps samples whose running index i
  has i % (world * workers) == rank * workers + worker, so each sample is seen exactly once however few shards
  there are; reading is repeated per reader, decoding is not.
Both streams take the decoding (and the train stream the collation) as functions: image-caption shards by
default, latent shards with `latents.LatentDecoder` and `latents.collate_latents`.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
import tarfile
from functools import partial
from itertools import islice
from multiprocessing.context import get_spawning_popen
from typing import Callable, Iterable, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, url_opener

from lit_diffusion.data.buckets import BucketConfig, CropPlan, apply, cover_crop
from lit_diffusion.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm")
CAPTION_EXTENSIONS = ("txt", "caption")
SKIP_REASONS = ("shard", "missing_image", "bad_image", "missing_caption", "bad_caption", "bad_json",
                "missing_member", "bad_array",  # these two: latent shards (a missing .npy, a wrong shape/dtype)
                # aspect buckets: an image smaller than its bucket (skipped, or upscaled and counted: `small`), and
                # one whose aspect ratio is outside the buckets' range (cropped into the nearest bucket and counted)
                "small_image", "aspect_cropped",
                # video shards (`data.video`): no clip member, a clip that does not decode, too few frames
                "missing_video", "bad_video", "short_clip")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "ais://", "hf://")
_MAX_LOGGED_PER_PROCESS = 50  # after this, skips are still counted but logged only every 1000th
_MAX_CONSECUTIVE_BAD = 10_000  # a resampled stream with no good sample in this many tries is misconfigured


# ---------------------------------------------------------------------------------------------- URL expansion


SPLIT_PREFIXES = ("train", "val", "validation", "test")  # `{split}-*.tar` in a folder of several splits


def _expand_folder(pattern: str, path: str, split: str | None) -> list[str]:
    """A folder's shards: its `{split}-*.tar`; where it has none and no other split's, all its `*.tar` (a folder
    per split, as img2dataset writes `train/00000.tar`). A folder of several splits read without a split is
    refused: its val shards would join the train ones."""
    every = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    splits = sorted({p for p in SPLIT_PREFIXES for f in every if os.path.basename(f).startswith(f"{p}-")})
    held = ", ".join(f"{p}-*.tar" for p in splits)
    if split:
        found = [f for f in every if os.path.basename(f).startswith(f"{split}-")]
        if found:
            return found
        if splits:
            raise UsageError(f"no shards matching '{split}-*.tar' in directory {pattern!r} (it holds {held})")
    elif len(splits) > 1:
        raise UsageError(f"directory {pattern!r} holds the shards of several splits ({held}): name one "
                         f"({pattern.rstrip('/')}/{splits[-1]}-*.tar) or give the folder where its split is known")
    if not every:
        want = f"'{split}-*.tar' (or, a folder of one split, '*.tar')" if split else "'*.tar'"
        raise UsageError(f"no shards matching {want} in directory {pattern!r}")
    return every


def _expand_local(pattern: str, split: str | None) -> list[str]:
    path = os.path.expandvars(os.path.expanduser(pattern.removeprefix("file:")))
    if os.path.isdir(path):
        return _expand_folder(pattern, path, split)
    urls, missing = [], []
    for item in braceexpand.braceexpand(path):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                missing.append(item)
            urls.extend(matches)
        elif os.path.isfile(item):
            urls.append(item)
        else:
            missing.append(item)
    if missing:
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise UsageError(f"shard pattern {pattern!r}: no such file(s): {shown}")
    return urls


def expand_urls(urls: str | os.PathLike | Iterable, split: str | None = None) -> list[str]:
    """Shard URLs for a brace pattern (`train-{000000..000007}.tar`), a glob (`data/shapes/train-*.tar`), a
    directory (with `split`: its `{split}-*.tar`, or all its shards in a folder of that split alone; without: all
    its shards, refused where they are several splits'), `::`-separated or list of any of these, `pipe:` commands
    and remote URLs (brace-expanded, not checked: webdataset opens them). Missing local shards or an empty
    result raise UsageError (a ValueError) naming the pattern."""
    if urls is None:
        raise UsageError("no shard URLs given (None)")
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        parts = text.split("::")
    else:
        text, parts = repr(urls), [os.fspath(u) for u in urls]
    result: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if part.startswith(_REMOTE_PREFIXES):
            result.extend(braceexpand.braceexpand(part))
        else:
            result.extend(_expand_local(part, split))
    if not result:
        raise UsageError(f"shard pattern {text!r} expands to no shards")
    return result


# -------------------------------------------------------------------------------------------- skip accounting


class _SharedInts:
    """Integers shared between the main process and DataLoader workers, forked or spawned.

    A lock-free RawArray: a SemLock made in one start-method context cannot reach processes of another, so
    callers give every writer its own slots instead. Outside process start-up (plain pickle, deepcopy) it
    pickles as a detached snapshot instead of failing."""

    def __init__(self, n: int):
        self._array = mp.RawArray("q", n)

    def __getstate__(self):
        if get_spawning_popen() is not None:
            return {"array": self._array}
        return {"values": list(self._array)}

    def __setstate__(self, state):
        if "array" in state:
            self._array = state["array"]
        else:
            self._array = mp.RawArray("q", len(state["values"]))
            self._array[:] = state["values"]

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, index: int) -> int:
        return self._array[index]

    def __setitem__(self, index: int, value: int) -> None:
        self._array[index] = value


class SkipCounter:
    """Counts skipped samples/shards by reason, summed over the main process and all DataLoader workers.

    Each process writes only its own row (main process: row 0, worker w: row w + 1), so no lock is needed."""

    _ROWS = 65  # main process + 64 workers; more workers share rows (and may rarely lose a count)

    def __init__(self):
        self._ints = _SharedInts(self._ROWS * len(SKIP_REASONS))
        self.logged = 0

    def add(self, reason: str) -> int:
        info = get_worker_info()
        row = 0 if info is None else (info.id + 1) % self._ROWS
        self._ints[row * len(SKIP_REASONS) + SKIP_REASONS.index(reason)] += 1
        return self.total

    def counts(self) -> dict[str, int]:
        n = len(SKIP_REASONS)
        return {r: sum(self._ints[row * n + i] for row in range(self._ROWS)) for i, r in enumerate(SKIP_REASONS)}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts()})"


class SharedEpoch:
    """Epoch number set in the main process (its only writer) and read by workers, so non-persistent workers,
    which get a fresh copy of the dataset every epoch, still draw new shards and shuffles each epoch."""

    def __init__(self, epoch: int = 0):
        self._ints = _SharedInts(1)
        self._ints[0] = epoch

    @property
    def value(self) -> int:
        return self._ints[0]

    def set(self, epoch: int) -> None:
        self._ints[0] = epoch


def _report(counter: SkipCounter, reason: str, url: str, key: str | None, detail: object) -> None:
    total = counter.add(reason)
    counter.logged += 1  # per process: each worker logs its own first skips
    if counter.logged <= _MAX_LOGGED_PER_PROCESS or counter.logged % 1000 == 0:
        where = f"sample {key!r} of shard {url!r}" if key is not None else f"shard {url!r}"
        suffix = f" ({total} skipped so far)"
        if counter.logged == _MAX_LOGGED_PER_PROCESS:
            suffix += "; further skips are counted, and logged only every 1000th"
        log.warning("skipping %s: %s: %s%s", where, reason, detail, suffix)


# ---------------------------------------------------------------------------------------------------- decoding


class BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16/32-bit grey scaled to 8 bits, transparency composited onto white, CMYK through
    its ICC profile when it has one."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit PNGs): full scale is 65535
        grey = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except MemoryError:  # the process, not the data: never counted as a bad shard or sample
            raise
        except Exception:  # a broken profile: fall back to PIL's plain conversion
            pass
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    if image.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        return image.getexif().get(0x0112, 1)
    return 1


def image_size_of(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes as displayed (EXIF orientation applied), from the header alone: no
    pixel is decoded (aspect buckets are chosen before decoding)."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    return (w, h) if _orientation(image) in _TRANSPOSING_ORIENTATIONS else (h, w)


def _open_rgb(data: bytes, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decoded RGB image (EXIF orientation applied) and its full (height, width); with `min_side`, a JPEG is
    decoded at a reduced scale that still keeps its shorter side >= min_side (libjpeg's draft: much faster)."""
    image = Image.open(io.BytesIO(data))
    orientation = _orientation(image)
    w, h = image.size
    original = (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)
    if image.format == "JPEG" and min_side:
        scale = min_side / min(image.size)
        image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image), original


def _to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    array = np.array(image)  # [H, W, 3] uint8, a writable copy
    if flip:
        array = np.ascontiguousarray(array[:, ::-1])
    return torch.from_numpy(array).permute(2, 0, 1)  # [3, H, W]


def size_row(original: tuple[int, int], crop_top_left: tuple[float, float], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size and crop condition of one sample, float [6]: original (h, w), crop (top, left) in the resized
    image's pixels, target (h, w) (`models.conditions.SIZE_FIELDS`)."""
    return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)


def flip_size_row(size: torch.Tensor) -> torch.Tensor:
    """The size condition of the mirrored image of a bucket crop: the crop's left offset measured from the other
    side (the integer resized width minus the crop's right edge). Not for `decode_image_and_size`'s square centre
    crops: their offset is a rounded centre, which a mirror leaves where it was."""
    oh, ow, top, left, th, tw = size.tolist()
    resized_w = round(ow * max(th / oh, tw / ow))
    out = size.clone()
    out[3] = resized_w - tw - left
    return out


def decode_image_and_size(data: bytes, image_size: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bytes -> uint8 [3, S, S] (RGB, shorter side resized to S, down or up, bicubic, centre crop) and its
    size condition [6] (the original size, the centre crop's offset in resized pixels, S x S)."""
    image, (oh, ow) = _open_rgb(data, image_size)
    w, h = image.size
    if (w, h) != (image_size, image_size):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        image = image.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))
    scale = image_size / min(oh, ow)
    crop = (round((oh - min(oh, ow)) / 2 * scale), round((ow - min(oh, ow)) / 2 * scale))
    return _to_tensor(image, flip), size_row((oh, ow), crop, (image_size, image_size))


def decode_image(data: bytes, image_size: int, flip: bool = False) -> torch.Tensor:
    """Image bytes -> uint8 [3, S, S]: RGB, shorter side resized to S (down or up, bicubic), centre crop."""
    return decode_image_and_size(data, image_size, flip)[0]


def decode_planned(data: bytes, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """Image bytes -> uint8 [3, bh, bw] by a bucket's crop plan (`buckets.cover_crop`: resize to cover, crop)."""
    image, original = _open_rgb(data, min(plan.resized_size))  # a JPEG may decode at a reduced scale
    if original != plan.original_size:
        raise ValueError(f"image is {original[0]}x{original[1]}, its header said {plan.original_size}")
    return _to_tensor(apply(plan, image), flip)


def decode_text(sample: dict) -> tuple[str, dict]:
    """A raw tar sample's caption (.txt or .caption, UTF-8, stripped, not empty) and attributes (.json, {} when
    absent); raises BadSample. Image and latent samples share it."""
    caption_ext = next((e for e in CAPTION_EXTENSIONS if e in sample), None)
    if caption_ext is None:
        raise BadSample("missing_caption", "no .txt caption file")
    try:
        caption = sample[caption_ext].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample("bad_caption", f"caption is not UTF-8 ({exc})") from None
    if not caption:
        raise BadSample("missing_caption", "caption file is empty")
    attrs = {}
    if "json" in sample:
        try:
            attrs = json.loads(sample["json"])
        except ValueError as exc:
            raise BadSample("bad_json", f"invalid .json ({exc})") from None
    return caption, attrs


def _image_member(sample: dict) -> tuple[str, bytes]:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_ext is None:
        raise BadSample("missing_image", f"no image file (.{'/.'.join(IMAGE_EXTENSIONS[:4])}/...)")
    if not sample[image_ext]:
        raise BadSample("bad_image", f"zero-byte .{image_ext}")
    return image_ext, sample[image_ext]


def decode_sample(sample: dict, image_size: int | None, flip: bool = False, plan: CropPlan | None = None) -> dict:
    """Raw tar sample -> {"image": uint8 [3,S,S], "size": float [6], "caption": str, "attrs": dict, "key": str};
    with a bucket's crop `plan`, the image is [3, bh, bw] (see `bucket_plan`); raises BadSample."""
    image_ext, data = _image_member(sample)
    caption, attrs = decode_text(sample)
    try:
        if plan is None:
            # its crop is the exact centre of the original (a box, not a rounded offset): the mirror's is the same
            image, size = decode_image_and_size(data, image_size, flip)
        else:
            image = decode_planned(data, plan, flip)
            size = size_row(plan.original_size, plan.crop_top_left, plan.target_size)
            if flip:
                size = flip_size_row(size)
    except MemoryError:  # the process, not the sample: never counted as a bad sample
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadSample("bad_image", f".{image_ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
    return {"image": image, "size": size, "caption": caption, "attrs": attrs, "key": sample["__key__"]}


def decode_bucketed(sample: dict, buckets: BucketConfig, rng: random.Random | None,
                    flip: bool = False) -> tuple[dict | None, str | None]:
    """`bucket_plan` then `decode_sample(plan=...)`, opening the image once: (decoded sample or None when skipped,
    the plan's note). The crop is drawn before the caption and pixels are checked, as `bucket_plan` alone draws
    it, so a replay by headers (`ResampledTrainStream._bucketed`) consumes `rng` alike. Raises BadSample."""
    image_ext, data = _image_member(sample)
    try:
        image = Image.open(io.BytesIO(data))
        orientation = _orientation(image)
        w, h = image.size
        height, width = (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)
    except MemoryError:  # the process, not the sample: never counted as a bad sample
        raise
    except Exception as exc:
        raise BadSample("bad_image", f".{image_ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
    plan, note = _plan(height, width, buckets, rng)
    if plan is None:
        return None, note
    caption, attrs = decode_text(sample)
    try:
        if image.format == "JPEG":
            scale = min(plan.resized_size) / min(image.size)
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        pixels = _to_tensor(apply(plan, to_rgb(image)), flip)
    except MemoryError:  # the process, not the sample: never counted as a bad sample
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadSample("bad_image", f".{image_ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
    size = size_row(plan.original_size, plan.crop_top_left, plan.target_size)
    return {"image": pixels, "size": flip_size_row(size) if flip else size, "caption": caption, "attrs": attrs,
            "key": sample["__key__"]}, note


def _plan(height: int, width: int, buckets: BucketConfig, rng) -> tuple[CropPlan | None, str | None]:
    index, reason = buckets.assign(height, width)
    if reason == "small" and buckets.small == "skip":
        return None, "small_image"
    plan = cover_crop(height, width, buckets.buckets[index], buckets.crop, rng if buckets.crop == "random" else None)
    return plan, {"small": "small_image", "aspect_out_of_range": "aspect_cropped"}.get(reason)


def bucket_plan(sample: dict, buckets: BucketConfig, rng: random.Random | None) -> tuple[CropPlan | None, str | None]:
    """A raw sample's bucket and crop, from its image header alone: (plan, None), (plan, "aspect_cropped") for an
    aspect ratio outside the buckets' range (cropped into the nearest), (plan, "small_image") for an image that
    must be upscaled to cover its bucket (kept: `buckets.small` is "upscale"), or (None, "small_image") (skipped:
    "skip"). `rng` draws a random crop's offset (`buckets.crop` "random"). Raises BadSample for an unreadable
    image header."""
    image_ext, data = _image_member(sample)
    try:
        height, width = image_size_of(data)
    except MemoryError:  # the process, not the sample: never counted as a bad sample
        raise
    except Exception as exc:
        raise BadSample("bad_image", f".{image_ext} cannot be decoded ({type(exc).__name__}: {exc})") from None
    return _plan(height, width, buckets, rng)


# A train worker hands a smaller uint8 image batch to the main process as a numpy array, pickled by value through
# its pipe, not as a tensor in shared memory: each shared tensor costs a file-descriptor exchange with the
# worker's resource-sharer thread, which contends with the decoding for the GIL. Measured here for a 196 KB batch
# (64 x 3 x 32 x 32): main-process CPU 0.11 ms by value vs 0.33 ms shared, and the data bench ratio 0.93 vs 0.85.
# By value costs the main process a copy, which passes shared memory's fixed cost near 512 KB (1 MB: 1.8 vs 0.6 ms).
INLINE_BATCH_BYTES = 512 * 1024


def images_to_float(images) -> torch.Tensor:
    """uint8 images [..., 3, S, S] (a tensor on any device, or a numpy array) -> float in [-1, 1]."""
    return torch.as_tensor(images).float().div_(127.5).sub_(1.0)


def collate(samples: list[dict], as_float: bool = True) -> dict:
    """Decoded samples of one size -> {"image": float [B,3,H,W] in [-1,1] (uint8 without `as_float`), "size":
    float [B,6] (each sample's original size, crop and target size), "caption": list, "attrs": list, "key": list}."""
    images = torch.stack([s["image"] for s in samples])  # [B, 3, H, W] uint8
    return {
        "image": images_to_float(images) if as_float else images,
        "size": torch.stack([s["size"] for s in samples]),  # [B, 6]
        "caption": [s["caption"] for s in samples],
        "attrs": [s["attrs"] for s in samples],
        "key": [s["key"] for s in samples],
    }


# ------------------------------------------------------------------------------------------------ the streams


class _TrackedStream:
    """Read-through wrapper remembering how many bytes a shard had, its last 1024 of them, and where its last
    non-zero byte was.

    Python's tarfile reads a tar cut inside a header as a clean end of archive; a complete tar ends with two
    zero blocks on a 512-byte boundary, which is what `complete()` checks. It also ends quietly at a damaged
    header (a bad checksum) past the first: `data_after(offset)` tells that data followed where it stopped."""

    def __init__(self, stream):
        self.stream, self.size, self.tail, self.last_data = stream, 0, b"", 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        kept = len(data.rstrip(b"\0"))  # scans only the trailing zeros
        if kept:
            self.last_data = self.size + kept
        self.size += len(data)
        self.tail = (self.tail + data[-1024:])[-1024:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def complete(self) -> bool:
        return self.size % 512 == 0 and len(self.tail) == 1024 and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.stream.close()


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as its own reader does
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "lzma"}  # magic -> the module that reads it
_BLOCK = 512
_CHUNK = 1 << 16
_REGULAR = (b"0", b"\0", b"7")  # regular files (tarfile's REGULAR_TYPES less GNU sparse, refused below)
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: their size field is ignored
_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _PAX_SOLARIS = b"L", b"K", b"x", b"g", b"X"
_PAX_LENGTH = re.compile(rb"(\d{1,18}) ")


class _Blocks:
    """Exact byte ranges of a stream read in 64 KB chunks (a tar's members are mostly small: one read per chunk,
    not three per member); `offset` counts the bytes handed out."""

    def __init__(self, stream):
        self.stream, self.buf, self.pos, self.offset = stream, b"", 0, 0

    def take(self, n: int) -> bytes:
        """The next n bytes, fewer only where the stream ends."""
        end = self.pos + n
        if end <= len(self.buf):
            out, self.pos = self.buf[self.pos:end], end
        else:
            parts, need = [self.buf[self.pos:]], n - (len(self.buf) - self.pos)
            self.buf, self.pos = b"", 0
            while need > 0:
                data = self.stream.read(max(need, _CHUNK))
                if not data:
                    break
                parts.append(data[:need])
                if len(data) > need:
                    self.buf = data[need:]
                need -= len(data)
            out = b"".join(parts)
        self.offset += len(out)
        return out

    def peek(self, n: int) -> bytes:
        """The next (up to) n bytes, without consuming them."""
        data = self.take(n)
        self.buf, self.pos, self.offset = data + self.buf[self.pos:], 0, self.offset - len(data)
        return data


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal ASCII, or GNU's base-256 (first byte 0x80 or 0xff), as tarfile reads it."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """POSIX: the unsigned byte sum of the header with its checksum field read as spaces; some old tars summed
    signed bytes (tarfile accepts both)."""
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b >= 128)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's "LENGTH KEY=VALUE\n" records; a record whose length does not reach past its digits,
    runs off the header or does not end in a newline is a damaged header (a length of 0 would never move on)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_LENGTH.match(data, pos)
        end = pos + int(match[1]) if match else -1
        if not match or end <= match.end() or end > len(data) or data[end - 1] != 0x0A:
            raise tarfile.ReadError(f"damaged pax record at byte {pos} of its header")
        key, equals, value = data[match.end():end - 1].partition(b"=")
        if not equals:
            raise tarfile.ReadError(f"damaged pax record at byte {pos} of its header: no '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _plain_tar_members(blocks: _Blocks, stream: "_TrackedStream", url: str) -> Iterator[dict]:
    """(fname, data) of an uncompressed tar's regular files, reading the headers directly: Python's tarfile spends
    about half of a small sample's reading time parsing headers. Ustar, GNU (long names) and pax (path, size)
    headers, as tarfile reads them; a header that fails its checksum or does not parse is a damaged archive
    (tarfile's `ReadError`), a zero block ends the archive, a member cut short is "unexpected end of data"."""
    long_name, pax = None, {}
    while True:
        at = blocks.offset
        header = blocks.take(_BLOCK)
        if len(header) < _BLOCK or not header.strip(b"\0"):
            break  # the end of the archive, or a cut inside a header (`shard_samples` checks completeness)
        if not _checksum_ok(header):
            raise tarfile.ReadError(f"damaged tar header at byte {at}: bad checksum")
        kind = header[156:157]
        try:
            size = _number(header[124:136])
        except ValueError:
            raise tarfile.ReadError(f"damaged tar header at byte {at}: size field {header[124:136]!r}") from None
        if "size" in pax:
            size = int(pax["size"])
        if size < 0:
            raise tarfile.ReadError(f"damaged tar header at byte {at}: negative size {size}")
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (_LONG_NAME, _LONG_LINK, _PAX, _PAX_GLOBAL, _PAX_SOLARIS):
            data = blocks.take(padded)
            if len(data) < padded:
                raise tarfile.ReadError("unexpected end of data")
            if kind == _LONG_NAME:
                long_name = _text(data[:size])
            elif kind in (_PAX, _PAX_SOLARIS):
                pax = _pax_records(data[:size])
                if any(k.startswith("GNU.sparse.") for k in pax):
                    raise tarfile.ReadError(f"sparse member (pax GNU.sparse records) at byte {at}: not supported in "
                                            f"a shard")
            elif kind == _PAX_GLOBAL and {"path", "size"} & set(_pax_records(data[:size])):
                raise tarfile.ReadError(f"global pax header at byte {at} sets path or size for every later member: "
                                        f"not supported in a shard")
            continue  # a long link name, or a global pax header of comments, changes nothing that is read here
        name = long_name if long_name is not None else pax.get("path")
        if name is None:
            name, prefix = _text(header[:100]), _text(header[345:500])
            name = f"{prefix}/{name}" if prefix else name
        long_name, pax = None, {}
        if kind == b"S":
            raise tarfile.ReadError(f"GNU sparse member {name!r} at byte {at}: not supported in a shard")
        if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):
            continue  # no data follows (an old-style directory is a "regular file" named with a slash)
        data = blocks.take(padded)
        if len(data) < padded:
            raise tarfile.ReadError("unexpected end of data")
        if kind in _REGULAR and not _META.match(name):
            yield {"fname": name, "data": data[:size], "__url__": url}
    stream.drain()
    if stream.last_data > at:
        raise tarfile.ReadError(f"damaged tar header at byte {at}: the {stream.last_data - at} bytes after it "
                                f"cannot be read")


def _tar_members(stream: _TrackedStream, url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """(fname, data) of a tar's regular files, as webdataset's tar_file_iterator gives them, read directly
    (`_plain_tar_members`); a gzip, bzip2 or xz tar through its decompressor, the decompressed stream tracked as
    `stream.inner`, whose end `shard_samples` checks (the compressed bytes never end in zero blocks)."""
    try:
        blocks = _Blocks(stream)
        head = blocks.peek(6)
        module = next((m for magic, m in _COMPRESSED.items() if head.startswith(magic)), None)
        if module is not None:
            if module == "gzip":
                import gzip

                decompressed = gzip.GzipFile(fileobj=_Replay(blocks))
            elif module == "bz2":
                import bz2

                decompressed = bz2.BZ2File(_Replay(blocks))
            else:
                import lzma

                decompressed = lzma.LZMAFile(_Replay(blocks))
            stream.inner = _TrackedStream(decompressed)
            blocks, stream = _Blocks(stream.inner), stream.inner
        yield from _plain_tar_members(blocks, stream, url)
    except MemoryError:  # the process, not the data: never counted as a bad shard or sample
        raise
    except Exception as exn:  # damaged archives raise ReadError, EOFError, OSError, ValueError...
        handler(exn)


class _Replay:
    """A file object over `_Blocks`: what was peeked, then the rest of the stream."""

    def __init__(self, blocks: _Blocks):
        self.blocks = blocks

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = [self.blocks.take(_CHUNK)]
            while parts[-1]:
                parts.append(self.blocks.take(_CHUNK))
            return b"".join(parts)
        return self.blocks.take(n)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def shard_samples(url: str, counter: SkipCounter, report: bool = True) -> Iterator[dict]:
    """Raw samples of one shard. Unreadable, truncated, damaged or failing (`pipe:` exit status) shards are logged
    and counted once (unless `report` is off); the samples read before the fault are kept."""
    failed = False
    tracked: list[_TrackedStream] = []

    def handler(exn: Exception) -> bool:
        nonlocal failed
        if isinstance(exn, MemoryError):  # the process, not the shard
            raise exn
        if not failed and report:
            _report(counter, "shard", url, None, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        failed = True
        return True

    def members() -> Iterator[dict]:
        for source in url_opener([{"url": url}], handler=handler):
            tracked.append(_TrackedStream(source["stream"]))
            yield from _tar_members(tracked[-1], url, handler)

    finished = False
    try:
        yield from group_by_keys(members(), handler=handler)
        finished = True
    finally:  # also when the reader stops early (then unchecked): the shard is closed now, not when collected
        for stream in tracked:
            try:
                tar = getattr(stream, "inner", stream)  # a compressed shard's end is its decompressed stream's
                if finished and not failed:
                    tar.drain()
                    if not tar.complete():
                        handler(EOFError(f"truncated tar: ends after {tar.size} bytes without an end-of-archive "
                                         f"block"))
                stream.close()  # a pipe: command reports its exit status here
            except MemoryError:  # the process, not the data: never counted as a bad shard or sample
                raise
            except Exception as exn:
                if finished:
                    handler(exn)


Decode = Callable[..., dict]  # decode(raw_sample, flip=bool) -> decoded sample; raises BadSample
POSITION_KEY = "__position__"  # a train batch's place in its worker's epoch (EpochLoader takes it out)


def image_decoder(image_size: int) -> Decode:
    return partial(decode_sample, image_size=image_size)


def collate_for_transfer(samples: list[dict]) -> dict:
    """A train worker's image batch: uint8 (a quarter of the bytes to hand to the main process, which makes them
    float), small batches as numpy arrays (by value through the worker's pipe: see INLINE_BATCH_BYTES)."""
    batch = collate(samples, as_float=False)
    if batch["image"].nbytes < INLINE_BATCH_BYTES:
        batch["image"] = batch["image"].numpy()
    batch["size"] = batch["size"].numpy()  # 24 bytes a sample: by value too, no shared-memory handle
    return batch


def _decoded(samples: Iterable[dict], decode: Decode, counter: SkipCounter,
             flip: Callable[[], bool] | None) -> Iterator[dict]:
    for sample in samples:
        try:
            yield decode(sample, flip=flip() if flip else False)
        except BadSample as bad:
            _report(counter, bad.reason, sample.get("__url__", "?"), sample.get("__key__"), bad.detail)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ResampledTrainStream(IterableDataset):
    """Collated batches from an endless stream: shards drawn with replacement, a sample shuffle buffer, decode.

    One iteration (an epoch) yields `batches_per_epoch` batches in total over the DataLoader's workers, worker w
    its share, so DataLoader iteration ends on its own and no prefetched batch is thrown away.
    Every epoch the stream restarts from the seed of (seed, rank, worker, shared epoch), whether or not the
    dataset object survives between epochs (num_workers=0, persistent workers), so a run repeats exactly for the
    same world size and workers, and a run resumed at an epoch boundary draws what the uninterrupted run drew.
    An epoch reads the raw samples it needs and no more: its shuffle buffer fills at the start and drains at the
    end, as a finite webdataset pipeline's does, so no read sample is left over when the stream restarts.

    Mid-epoch resume: every batch carries, under POSITION_KEY, (worker, batches, drawn, bad): how many batches
    this worker has yielded this epoch, how many samples it drew from its shuffled stream for them, and which
    of those failed to decode. Given `resume` (set before the workers start: see `EpochLoader.load_state_dict`),
    a worker replays its stream up to that position without decoding and yields only the rest of its share. The
    DataLoader asks its workers round-robin from worker 0, and the uninterrupted run's next batch was worker
    (b mod W)'s after b batches, so a resumed epoch rotates the workers' roles by `resume["offset"]`.

    `decode(raw, flip=...)` and `collate_fn(samples)` make the batches: image-caption samples by default.
    """

    def __init__(
        self,
        urls: list[str],
        image_size: int | None,
        batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        counter: SkipCounter | None = None,
        epoch: SharedEpoch | None = None,
        decode: Decode | None = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
        buckets: BucketConfig | None = None,
        bucket_key: Callable[[dict], object] | None = None,
    ):
        super().__init__()
        self.urls, self.image_size = list(urls), image_size
        self.decode = decode if decode is not None else image_decoder(image_size)
        self.collate_fn = collate_fn if collate_fn is not None else collate_for_transfer
        # aspect buckets (image shards: a bucket and crop per sample from its header, `bucket_plan`), or any
        # `bucket_key(decoded sample)` (latent shards: their latent's shape); None: every sample one size
        self.buckets, self.bucket_key = buckets, bucket_key
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.counter = counter if counter is not None else SkipCounter()
        self.epoch = epoch if epoch is not None else SharedEpoch()
        # {"epoch", "num_workers", "offset", "workers": {worker: {"batches", "drawn"?, "bad"?}}}: see the class doc
        self.resume: dict | None = None
        self._stream: tuple[tuple[int, int, int], Iterator[dict | None], dict] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}  # generators do not pickle; a new process starts afresh

    def share(self, worker: int, num_workers: int) -> int:
        return self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)

    def _shards(self, rng: random.Random) -> Iterator[dict]:
        empty_in_a_row = 0
        limit = 20 * len(self.urls) + 100  # chance of a false alarm with one good shard in n: ~e^-20
        while True:
            url = self.urls[rng.randrange(len(self.urls))]
            n = 0
            for sample in shard_samples(url, self.counter):
                n += 1
                yield sample
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise RuntimeError(
                    f"{empty_in_a_row} shards in a row gave no samples; shards {self.urls[:3]}... "
                    f"({len(self.urls)} in all) look empty or unreadable; skipped: {self.counter.counts()}"
                )

    def _samples(self, worker: int, needed: int, position: dict, replay: dict | None) -> Iterator[dict | None]:
        """Decoded samples for one epoch of `needed`: raw samples are read in runs of what is still needed and
        shuffled through a buffer that drains at the end of each run, so an epoch reads what it yields; a new run
        starts only when undecodable samples were dropped. `position` is kept up to date ("drawn", "bad"). The
        first `replay["drawn"]` samples drawn are replayed: None for each good one, nothing for the bad ones."""
        base = f"{self.seed}-{self.rank}-{worker}-{self.epoch.value}"
        shard_rng, shuffle_rng, flip_rng = (random.Random(f"{base}-{part}") for part in ("shard", "shuffle", "flip"))
        raw = self._shards(shard_rng)
        flip = (lambda: flip_rng.random() < 0.5) if self.random_flip else None
        replay_to, replay_bad = (replay["drawn"], set(replay["bad"])) if replay else (0, set())
        since_good = 0

        def decoded(samples: Iterable[dict]) -> Iterator[dict | None]:
            nonlocal since_good
            for sample in samples:
                since_good += 1
                # A resampled stream of undecodable data would otherwise spin forever, logging skips.
                if since_good > _MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(
                        f"{_MAX_CONSECUTIVE_BAD} samples in a row could not be decoded from shards "
                        f"{self.urls[:3]}... ({len(self.urls)} in all); skipped: {self.counter.counts()}"
                    )
                index = position["drawn"]
                position["drawn"] += 1
                flipped = flip() if flip else False  # drawn for replayed samples too, so later flips line up
                if index < replay_to:
                    # Replaying what the interrupted run consumed: the shard bytes are read again, since a tar
                    # stream has no index and the shuffle buffer must hold what it held then; nothing is decoded,
                    # the samples that failed to decode then are known by their place in the stream.
                    if index in replay_bad:
                        position["bad"].append(index)
                    else:
                        yield None
                    continue
                try:
                    yield self.decode(sample, flip=flipped)
                except BadSample as bad:
                    position["bad"].append(index)
                    _report(self.counter, bad.reason, sample.get("__url__", "?"), sample.get("__key__"), bad.detail)

        epoch_size = needed
        while True:  # (past `needed`, when an epoch is iterated again, the stream goes on in epoch-sized runs)
            run = islice(raw, needed if needed > 0 else epoch_size)
            if self.shuffle_buffer > 1:
                run = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng)(run)
            for sample in decoded(run):
                since_good = 0
                needed -= 1
                yield sample

    def _bucketed(self, worker: int, share: int, position: dict, replay: dict | None) -> Iterator[dict | None]:
        """This worker's `share` batches of an epoch, each of one bucket: samples go to per-bucket buffers and a
        bucket that fills is a batch. The partial buckets are drained, not dropped: once as many buckets hold
        samples as batches remain, each becomes one (smaller) batch, so the epoch still yields exactly `share`
        batches (no rank waits for another under DDP) and its last few batches (at most the number of buckets in
        use) may hold fewer than `batch_size` samples. Reading continues the shuffled stream of the epoch's seed;
        what is still in the shuffle buffer at the end is not used (the stream restarts every epoch).

        Resume (`replay`: the position of the last consumed batch): the first `replay["batches"]` batches are
        replayed dry, each sample's bucket from its header and the ones that failed to decode known by their
        place in the stream (`replay["bad"]`), so the buffers hold what they held then; they are then decoded and
        the epoch goes on. Yields None for a replayed batch."""
        base = f"{self.seed}-{self.rank}-{worker}-{self.epoch.value}"
        shard_rng, shuffle_rng, flip_rng, crop_rng = (random.Random(f"{base}-{part}")
                                                      for part in ("shard", "shuffle", "flip", "crop"))
        raw: Iterator[dict] = self._shards(shard_rng)
        if self.shuffle_buffer > 1:
            raw = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=shuffle_rng)(raw)
        replay_batches = replay["batches"] if replay else 0
        replay_bad = set(replay.get("bad", ())) if replay else set()
        know_bad = replay is None or "drawn" in replay  # else (another world size...) replaying decodes: still exact
        buffers: dict[object, list] = {}  # bucket -> [(decoded sample, or (raw, plan, flip) while replaying)]
        yielded, since_good = 0, 0

        def emit(items: list) -> dict | None:
            nonlocal yielded
            yielded += 1
            if yielded <= replay_batches:
                return None
            samples = [self.decode(item[0], flip=item[2], **item[1]) if isinstance(item, tuple) else item
                       for item in items]  # buffered while replaying: decoded now (they decoded then)
            return self.collate_fn(samples)

        while yielded < share:
            filled = [key for key, items in buffers.items() if items]
            if len(filled) >= share - yielded:  # drain: one batch per partial bucket, in bucket order
                for key in sorted(filled, key=str):
                    yield emit(buffers.pop(key))
                break
            sample = next(raw)
            index = position["drawn"]
            position["drawn"] += 1
            flipped = flip_rng.random() < 0.5 if self.random_flip else False
            since_good += 1
            if since_good > _MAX_CONSECUTIVE_BAD:
                raise RuntimeError(f"{_MAX_CONSECUTIVE_BAD} samples in a row could not be used from shards "
                                   f"{self.urls[:3]}... ({len(self.urls)} in all); skipped: {self.counter.counts()}")
            replaying = yielded < replay_batches
            try:
                if self.buckets is not None and not (replaying and know_bad):  # decoded, one open of the image
                    item, note = decode_bucketed(sample, self.buckets, crop_rng, flipped)
                    if note and not replaying:
                        self.counter.add(note)
                    if item is None:  # too small, and `small: skip`
                        continue
                    key = tuple(item["image"].shape[-2:])
                else:
                    key, extra = None, {}
                    if self.buckets is not None:  # replaying: the bucket from the header alone
                        plan, _ = bucket_plan(sample, self.buckets, crop_rng)
                        if plan is None:
                            continue
                        key, extra = plan.target_size, {"plan": plan}
                    if replaying and know_bad:
                        if index in replay_bad:
                            position["bad"].append(index)
                            continue
                        item = (sample, extra, flipped)
                        if key is None:  # keyed by the decoded sample (a latent's shape): decode to know it
                            item = self.decode(sample, flip=flipped)
                    else:
                        item = self.decode(sample, flip=flipped, **extra)
                    if key is None:
                        key = self.bucket_key(item)
            except BadSample as bad:
                position["bad"].append(index)
                if not replaying:
                    _report(self.counter, bad.reason, sample.get("__url__", "?"), sample.get("__key__"), bad.detail)
                continue
            since_good = 0
            buffers.setdefault(key, []).append(item)
            if len(buffers[key]) == self.batch_size:
                yield emit(buffers.pop(key))

    def _bucketed_epoch(self, worker: int, share: int, resume: dict | None) -> Iterator[dict]:
        """`__iter__` with buckets: the epoch's batches from `_bucketed`, each tagged with its position. (An epoch
        iterated twice, as with num_workers=0 and no trainer, starts again: buckets keep no stream between.)"""
        done = resume["workers"].get(worker, {"batches": 0}) if resume else {"batches": 0}
        position = {"batches": 0, "drawn": 0, "bad": []}
        for batch in self._bucketed(worker, share, position, done if done["batches"] else None):
            position["batches"] += 1
            if batch is None:  # replayed
                continue
            batch[POSITION_KEY] = (worker, position["batches"], position["drawn"], tuple(position["bad"]))
            yield batch

    def _resume_point(self, num_workers: int) -> dict | None:
        resume = self.resume
        if resume is None or resume["epoch"] != self.epoch.value or resume["num_workers"] != num_workers:
            return None
        return resume

    def __iter__(self) -> Iterator[dict]:
        dl_worker, num_workers = _worker()
        resume = self._resume_point(num_workers)
        # the role (seeds, share) this DataLoader worker plays: rotated in a resumed epoch, see the class doc
        worker = (dl_worker + resume["offset"]) % num_workers if resume else dl_worker
        key = (worker, num_workers, self.epoch.value)
        share = self.share(worker, num_workers)
        todo = share
        if self.buckets is not None or self.bucket_key is not None:
            yield from self._bucketed_epoch(worker, share, resume)
            return
        if self._stream is None or self._stream[0] != key:
            position = {"batches": 0, "drawn": 0, "bad": []}
            done = resume["workers"].get(worker, {"batches": 0}) if resume else {"batches": 0}
            # without a recorded position (another world size, an old checkpoint) the replay decodes: still exact
            replay = done if "drawn" in done else None
            samples = self._samples(worker, share * self.batch_size, position, replay)
            for _ in range(done["batches"] * self.batch_size):
                next(samples)
            position["batches"] = done["batches"]
            todo = share - done["batches"]
            self._stream = (key, samples, position)
        _, samples, position = self._stream
        for _ in range(todo):
            batch = self.collate_fn([next(samples) for _ in range(self.batch_size)])
            position["batches"] += 1
            batch[POSITION_KEY] = (worker, position["batches"], position["drawn"], tuple(position["bad"]))
            yield batch


class ExactlyOnceStream(IterableDataset):
    """Decoded samples in shard order, each seen by exactly one (rank, worker); the first `max_samples` raw
    samples (in shard order, before the split) when given. `decode(raw, flip=False)`: image-caption by default."""

    def __init__(
        self,
        urls: list[str],
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        counter: SkipCounter | None = None,
        decode: Decode | None = None,
        buckets: BucketConfig | None = None,
        bucket_key: Callable[[dict], object] | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
    ):
        super().__init__()
        self.urls, self.image_size = list(urls), image_size
        self.decode = decode if decode is not None else image_decoder(image_size)
        self.rank, self.world_size, self.max_samples = rank, world_size, max_samples
        self.counter = counter if counter is not None else SkipCounter()
        # with buckets (or a bucket_key), batches of `batch_size` of one size each, collated here; the partial
        # buckets are emitted at the end. Evaluation crops at the centre.
        if buckets is not None and buckets.crop != "center":
            buckets = dataclasses.replace(buckets, crop="center")
        self.buckets, self.bucket_key = buckets, bucket_key
        self.batch_size, self.collate_fn = batch_size, collate_fn or collate

    def _mine(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        readers, slot = self.world_size * num_workers, self.rank * num_workers + worker
        # every reader meets the same broken shards; only the first reports them, so each counts once
        raw = (s for url in self.urls for s in shard_samples(url, self.counter, report=slot == 0))
        if self.max_samples is not None:
            raw = islice(raw, self.max_samples)
        for index, sample in enumerate(raw):
            if index % readers == slot:
                yield sample

    def __iter__(self) -> Iterator[dict]:
        if self.buckets is None and self.bucket_key is None:
            return _decoded(self._mine(), self.decode, self.counter, None)
        return self._bucketed()

    def _bucketed(self) -> Iterator[dict]:
        buffers: dict[object, list[dict]] = {}
        for sample in self._mine():
            try:
                extra = {}
                if self.buckets is not None:
                    plan, note = bucket_plan(sample, self.buckets, None)
                    if note:
                        self.counter.add(note)
                    if plan is None:
                        continue
                    extra = {"plan": plan}
                decoded = self.decode(sample, flip=False, **extra)
            except BadSample as bad:
                _report(self.counter, bad.reason, sample.get("__url__", "?"), sample.get("__key__"), bad.detail)
                continue
            key = tuple(decoded["image"].shape) if self.buckets is not None else self.bucket_key(decoded)
            buffers.setdefault(key, []).append(decoded)
            if len(buffers[key]) == self.batch_size:
                yield self.collate_fn(buffers.pop(key))
        for key in sorted(buffers, key=str):  # the partial buckets, drained
            yield self.collate_fn(buffers[key])
