"""Latent shards: the frozen encoders' outputs for every image-caption sample, written once, read every epoch.

Per sample (WebDataset members of one tar, KEY without dots):
    KEY.latent.npy          VAE posterior mean, scaled as `VAEModule.encode` returns it       [C, h, w]
    KEY.latent_std.npy      its posterior std, scaled alike (with `std`)                      [C, h, w]
    KEY.latent_flip.npy     the mean for the horizontally flipped image (with `flips`)        [C, h, w]
    KEY.latent_flip_std.npy the flipped image's std (with `flips` and `std`)                  [C, h, w]
    KEY.context.npy         CLIP token features of the caption's real tokens, no padding      [n, W]
    KEY.pooled.npy          CLIP's pooled text embedding                                      [E]
    KEY.size.npy            SDXL's size and crop condition, float32 whatever the dtype: original
                            (h, w), crop (top, left), target (h, w) in pixels                 [6]
    KEY.image_embedding.npy CLIP's L2-normalised embedding of the image's centre square, float32 whatever
                            the dtype (with `image_embeddings`; unCLIP's prior target)        [E]
    KEY.image_embedding_flip.npy  the same of the flipped image (with `flips` and `image_embeddings`: the
                            decoder's condition for a flipped latent)                         [E]
    KEY.patch_features.npy  CLIP's patch tokens of the whole image, in the shards' dtype (float16 by default;
                            REPA's target, `models.repa.clip_patch_features`; with `patch_features`)
                                                                                              [h_c, w_c, W]
    KEY.patch_features_flip.npy  the same of the flipped image (with `flips` and `patch_features`)
    KEY.txt, KEY.json       the caption and the source sample's attributes (json as it was)
Arrays are float16, float32 or bfloat16; npy has no bfloat16, so those are stored as the same 16 bits viewed
as uint16, and `manifest.json` says which. The manifest beside the shards names the encoders by the hashes of
their weights (`state_dict_hash`), the latent scale, shapes and dtype, counts per shard and in all, and the
source shards; with aspect buckets, the buckets (image pixels) and every latent shape in the shards
(`latent_shapes`; `shapes.latent` then gives only the channels: [C, null, null]); with image embeddings,
`image_embedding`: {"dim": E, "mean": [E], "std": [E]} over the train split's (`require_image_embeddings`), and
"flips": whether the flipped images' are in the shards too; with
patch features, `patch_features`: {"grid": [h_c, w_c], "dim": W, "dtype": the shards' dtype}. Shards are written
deterministically (fixed tar headers) under a temporary name and renamed when complete, so a shard under its final
name is always whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lit_diffusion.data.shards import BadSample, decode_text, flip_size_row

FORMAT = "lit_diffusion.latents"
VERSION = 1
# the caption's rows kept: its tokens up to and including its first end-of-text token (`Tokenizer.mask`), as the
# denoiser and the prior see a caption online and at sampling
TEXT_MASK = "through_eot"
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # name -> dtype stored in the npy
TMP_SUFFIX = ".tmp"  # a shard being written; never matches `*.tar`


def state_dict_hash(state_dict: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors, in name order: the same weights
    hash the same on any device, in any process; non-tensor entries are ignored."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bfloat16
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- arrays


def encode_array(tensor: torch.Tensor, dtype: str) -> bytes:
    """A tensor -> .npy bytes in `dtype` (bfloat16 as its bits, uint16)."""
    if dtype not in DTYPES:
        raise ValueError(f"latent dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    t = tensor.detach().to("cpu", getattr(torch, dtype)).contiguous()
    array = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes, dtype: str, what: str) -> torch.Tensor:
    """.npy bytes stored in `dtype` -> float32 tensor; anything else raises BadSample("bad_array") naming `what`."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:  # the process, not the sample: never counted as a bad sample
        raise
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError... on a damaged header or body
        raise BadSample("bad_array", f".{what} is not a readable .npy ({type(exc).__name__}: {exc})") from None
    if array.dtype != DTYPES[dtype]:
        raise BadSample("bad_array", f".{what} has dtype {array.dtype}, the manifest says {dtype} "
                                     f"(stored as {np.dtype(DTYPES[dtype])})")
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(array).float()


# ---------------------------------------------------------------------------------------------------- writing


class LatentShardWriter:
    """One latent shard, written to PATH.tmp and renamed to PATH by `commit()` once complete and on disk.

    Tar headers are fixed (mtime 0, uid/gid 0, mode 0444, no user names), so the same samples give the same
    bytes: a resumed encode job's shards equal an uninterrupted one's."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"latent dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.path, self.dtype = Path(path), dtype
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")
        # mtime an int: a float one costs every member a 1 KB PAX header (measured at 32 px, float16: 12.3 -> 7.2 KB
        # per sample)
        self._tar = wds.TarWriter(self._file, encoder=False, user="", group="", mode=0o444, mtime=0)
        self.samples = 0

    def write(self, key: str, latent: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, caption: str,
              attrs_json: bytes | None = None, latent_std: torch.Tensor | None = None,
              latent_flip: torch.Tensor | None = None, latent_flip_std: torch.Tensor | None = None,
              size: torch.Tensor | None = None, image_embedding: torch.Tensor | None = None,
              patch_features: torch.Tensor | None = None, patch_features_flip: torch.Tensor | None = None,
              image_embedding_flip: torch.Tensor | None = None) -> None:
        """One sample: latent [C,h,w], context [n,W] (real tokens only), pooled [E], size [6], image_embedding [E];
        the optional arrays alike."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot: WebDataset would split it into key and members")
        sample = {"__key__": key, "txt": caption.encode("utf-8")}
        arrays = {"latent.npy": latent, "context.npy": context, "pooled.npy": pooled, "latent_std.npy": latent_std,
                  "latent_flip.npy": latent_flip, "latent_flip_std.npy": latent_flip_std,
                  "patch_features.npy": patch_features, "patch_features_flip.npy": patch_features_flip}
        sample.update({name: encode_array(a, self.dtype) for name, a in arrays.items() if a is not None})
        if size is not None:
            sample["size.npy"] = encode_array(size.float(), "float32")  # pixel counts: exact in float32
        for name, embedding in (("image_embedding", image_embedding), ("image_embedding_flip", image_embedding_flip)):
            if embedding is not None:  # float32: the prior's target and the statistics it is normalised by
                sample[f"{name}.npy"] = encode_array(embedding.float(), "float32")
        if attrs_json is not None:
            sample["json"] = attrs_json
        self._tar.write(sample)
        self.samples += 1

    def commit(self) -> Path:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)  # atomic: the final name appears only for a complete shard
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- manifest


def write_manifest(out: str | os.PathLike, manifest: dict) -> Path:
    path = Path(out) / MANIFEST
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest at `path` (a manifest.json or the folder holding it); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"latent shards need their manifest: {path} does not exist (written by "
                                f"`lit-diffusion data encode` when every shard is complete)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latent-shard manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: latent-shard format version {manifest.get('version')}, this code reads {VERSION}")
    for key in ("clip_hash", "vae_hash", "dtype", "shapes", "shards", "flips", "std", "samples"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest has no {key!r}")
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype {manifest['dtype']!r} is not one of {sorted(DTYPES)}")
    manifest["path"] = str(path)
    return manifest


def check_hashes(manifest: dict, expected: dict[str, str] | None) -> None:
    """Refuse latents made by other encoders: `expected` maps "clip"/"vae" to `state_dict_hash` of the weights
    the consumer holds."""
    for name, want in (expected or {}).items():
        if name not in ("clip", "vae"):
            raise ValueError(f"expected_hashes keys are 'clip' and 'vae', got {name!r}")
        have = manifest[f"{name}_hash"]
        if want is not None and have != want:
            raise ValueError(f"{manifest['path']}: these latents were made with {name.upper()} weights {have}, but "
                             f"the model's {name.upper()} weights are {want}: encode the data again with this "
                             f"model's {name} checkpoint")


def check_text_mask(manifest: dict, tokenizer) -> None:
    """Refuse caption features encoded with the mask `tokens != pad_id` (shards whose manifest has no `text_mask`)
    for a tokenizer that pads with an ordinary token: an imported vocabulary pads with its end-of-text token
    (Hugging Face folders) or with "!" (OpenAI, open_clip), so the end-of-text row (or a "!") was dropped from
    every stored caption, while the empty caption of condition dropout and every prompt at sampling keep it. With
    the project's own tokenizers (a `<pad>` token of their own) the two masks are the same."""
    if manifest.get("text_mask") == TEXT_MASK or not tokenizer.pads_with_ordinary_token:
        return
    raise ValueError(f"{manifest.get('path')}: these caption features were encoded without the end-of-text token "
                     f"of a tokenizer that pads with it or another ordinary token (id {tokenizer.pad_id}): encode the "
                     f"data again (`lit-diffusion data encode`)")


def require_image_embeddings(manifest: dict, who: str) -> dict:
    """The manifest's image-embedding statistics {"dim": E, "mean": [E], "std": [E]}, or an error saying how to get
    them: `who` (a stage, an option) needs every sample's CLIP image embedding."""
    stats = manifest.get("image_embedding")
    if not stats:
        raise ValueError(f"{who} needs CLIP image embeddings, but the latent shards of {manifest.get('path')} have "
                         f"none: encode the data again with `lit-diffusion data encode --image-embeddings`")
    return stats


def manifest_entry(manifest: dict, url: str) -> dict | None:
    """The manifest's entry for a latent shard URL: the listed name (a path relative to the manifest's folder) the
    URL ends with, `SPLIT/000000.tar` (splits) or the shard's file name; None when it lists none."""
    listed = {s["name"]: s for s in manifest["shards"]}
    parts = url.split("/")
    return next((listed[name] for name in ("/".join(parts[-2:]), parts[-1]) if name in listed), None)


def check_shards(manifest: dict, urls: list[str]) -> None:
    """Every shard must be one the manifest lists, and a local one of the size it was written with."""
    count = len(manifest["shards"])
    for url in urls:
        entry = manifest_entry(manifest, url)
        if entry is None:
            raise ValueError(f"shard {url} is not listed in {manifest['path']} (it lists {count} shards): "
                             f"shards and manifest do not belong together")
        local = url.removeprefix("file:")
        if os.path.isfile(local) and os.path.getsize(local) != entry["bytes"]:
            raise ValueError(f"shard {url} has {os.path.getsize(local)} bytes, {manifest['path']} says "
                             f"{entry['bytes']}: the shard was changed or replaced after encoding")


# ---------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LatentDecoder:
    """Raw latent-shard sample -> {"latent": float32 [C,h,w], "context": [n,W], "pooled": [E], "caption",
    "attrs", "key"} (+ "latent_std", "image_embedding" [E] when the shards have them); a missing member or an
    array of the wrong shape or dtype raises BadSample, which the streams count and skip, naming shard and key.
    With `flip`, the flipped image's latent (and std)."""

    latent_shape: tuple[int, ...]  # with buckets: (C, None, None), and `latent_shapes` holds every shape
    context_width: int
    pooled_dim: int
    dtype: str
    flips: bool = False
    std: bool = False
    context_length: int | None = None
    latent_shapes: tuple[tuple[int, ...], ...] | None = None
    image_embedding_dim: int | None = None  # E when the shards hold image embeddings
    patch_features_shape: tuple[int, ...] | None = None  # (h_c, w_c, W) when the shards hold CLIP patch features

    @classmethod
    def from_manifest(cls, manifest: dict, context_length: int | None = None) -> LatentDecoder:
        shapes = manifest["shapes"]
        several = manifest.get("latent_shapes")
        embedding = manifest.get("image_embedding")
        patches = manifest.get("patch_features")
        return cls(tuple(shapes["latent"]), int(shapes["context"][1]), int(shapes["pooled"][0]), manifest["dtype"],
                   bool(manifest["flips"]), bool(manifest["std"]), context_length,
                   tuple(tuple(s) for s in several) if several else None,
                   int(embedding["dim"]) if embedding else None,
                   (*patches["grid"], int(patches["dim"])) if patches else None)

    def _array(self, sample: dict, member: str) -> torch.Tensor:
        if member not in sample:
            raise BadSample("missing_member", f"no .{member}")
        return decode_array(sample[member], self.dtype, member)

    def __call__(self, sample: dict, flip: bool = False) -> dict:
        prefix = "latent_flip" if flip else "latent"
        if flip and not self.flips:
            raise ValueError("flipped latents asked for, but the manifest says the shards have none (--flips)")
        latent = self._array(sample, f"{prefix}.npy")
        allowed = self.latent_shapes or (self.latent_shape,)
        if tuple(latent.shape) not in allowed:
            raise BadSample("bad_array", f".{prefix}.npy has shape {list(latent.shape)}, the manifest says "
                                         f"{' or '.join(str(list(s)) for s in allowed)}")
        out = {"latent": latent}
        if self.std:
            latent_std = self._array(sample, f"{prefix}_std.npy")
            if latent_std.shape != latent.shape:
                raise BadSample("bad_array", f".{prefix}_std.npy has shape {list(latent_std.shape)}, the latent "
                                             f"{list(latent.shape)}")
            out["latent_std"] = latent_std
        context = self._array(sample, "context.npy")  # [n, W]
        if context.ndim != 2 or context.shape[1] != self.context_width or context.shape[0] < 1:
            raise BadSample("bad_array", f".context.npy has shape {list(context.shape)}, expected [n >= 1, "
                                         f"{self.context_width}]")
        if self.context_length is not None and context.shape[0] > self.context_length:
            raise BadSample("bad_array", f".context.npy has {context.shape[0]} tokens, more than context_length="
                                         f"{self.context_length}")
        pooled = self._array(sample, "pooled.npy")
        if tuple(pooled.shape) != (self.pooled_dim,):
            raise BadSample("bad_array", f".pooled.npy has shape {list(pooled.shape)}, expected [{self.pooled_dim}]")
        if "size.npy" in sample:
            size = decode_array(sample["size.npy"], "float32", "size.npy")
            if tuple(size.shape) != (6,):
                raise BadSample("bad_array", f".size.npy has shape {list(size.shape)}, expected [6]")
            if flip and self.latent_shapes:  # mirrored bucket crop: its left edge measured from the other side
                size = flip_size_row(size)  # (a square centre crop stays where it was)
            out["size"] = size
        if self.image_embedding_dim is not None:
            # the embedding of the image the latent is of: the flipped image's with `flip` (the decoder's condition
            # must describe its target; the prior learns the caption's embedding of either)
            member = "image_embedding_flip.npy" if flip else "image_embedding.npy"
            if member not in sample:
                raise BadSample("missing_member", f"no .{member}")
            embedding = decode_array(sample[member], "float32", member)
            if tuple(embedding.shape) != (self.image_embedding_dim,):
                raise BadSample("bad_array", f".{member} has shape {list(embedding.shape)}, expected "
                                             f"[{self.image_embedding_dim}]")
            out["image_embedding"] = embedding
        if self.patch_features_shape is not None:  # the flipped image's with `flip`: CLIP sees the flipped image
            member = "patch_features_flip.npy" if flip else "patch_features.npy"
            features = self._array(sample, member)
            if tuple(features.shape) != tuple(self.patch_features_shape):
                raise BadSample("bad_array", f".{member} has shape {list(features.shape)}, expected "
                                             f"{list(self.patch_features_shape)}")
            out["patch_features"] = features
        caption, attrs = decode_text(sample)
        return {**out, "context": context, "pooled": pooled, "caption": caption, "attrs": attrs,
                "key": sample["__key__"]}


def collate_latents(samples: list[dict], context_length: int | None = None) -> dict:
    """Decoded latent samples -> {"latent": [B,C,h,w], "context": [B,L,W] zero-padded, "mask": [B,L] bool (True on
    real tokens), "pooled": [B,E], "caption", "attrs", "key"} (+ "latent_std" [B,C,h,w], "image_embedding" float32
    [B,E] when the samples have them); L is the longest caption's token count, or `context_length` when given."""
    lengths = torch.tensor([s["context"].shape[0] for s in samples])  # [B]
    length = int(lengths.max()) if context_length is None else context_length
    width = samples[0]["context"].shape[1]
    context = torch.zeros(len(samples), length, width)  # [B, L, W]
    for i, s in enumerate(samples):
        context[i, : s["context"].shape[0]] = s["context"]
    batch = {
        "latent": torch.stack([s["latent"] for s in samples]),  # [B, C, h, w]
        "context": context,
        "mask": torch.arange(length)[None, :] < lengths[:, None],  # [B, L]
        "pooled": torch.stack([s["pooled"] for s in samples]),  # [B, E]
        "caption": [s["caption"] for s in samples],
        "attrs": [s["attrs"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if "latent_std" in samples[0]:
        batch["latent_std"] = torch.stack([s["latent_std"] for s in samples])
    if "image_embedding" in samples[0]:
        batch["image_embedding"] = torch.stack([s["image_embedding"] for s in samples])  # [B, E]
    if "patch_features" in samples[0]:
        batch["patch_features"] = torch.stack([s["patch_features"] for s in samples])  # [B, h_c, w_c, W]
    if all("size" in s for s in samples):
        batch["size"] = torch.stack([s["size"] for s in samples])  # [B, 6]
    return batch


def latent_shape_key(sample: dict) -> tuple[int, ...]:
    """What groups latent samples of several buckets into batches: their latent's shape."""
    return tuple(sample["latent"].shape)
