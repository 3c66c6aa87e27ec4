"""Convert your own images and captions into WebDataset shards (`{split}-%06d.tar` of KEY.<ext>, KEY.txt,
KEY.json) that `ImageCaptionDataModule` reads.

Inputs, one or several:
- a directory: every image (recursively, sorted) with a sidecar caption `NAME.txt` (and optional `NAME.json`
  attributes);
- a CSV file with a header, or a JSONL file of objects, with a path and a caption column/field; relative paths
  are relative to the CSV/JSONL file.
Images are stored as they are (no re-encoding) after a check that PIL can open them; broken rows are logged
and counted in the summary, not fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps
from webdataset import ShardWriter

from lit_diffusion.data.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# MPO: the JPEG of many phones and cameras (Pillow opens it so); kept as it is, EXIF orientation included
_EXT_OF_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "PPM": "ppm"}


def _rows_from_dir(root: Path) -> Iterator[tuple[str, Path, str | None, dict | None]]:
    """(source id, image path, caption or None, sidecar attrs or None) for every image under `root`."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
    for image in images:
        caption_file, json_file = image.with_suffix(".txt"), image.with_suffix(".json")
        caption = caption_file.read_bytes() if caption_file.is_file() else None
        attrs = json_file.read_bytes() if json_file.is_file() else None
        yield str(image), image, caption, attrs


def _rows_from_table(table: Path, path_key: str, caption_key: str) -> Iterator[tuple]:
    base = table.parent
    if table.suffix.lower() == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if path_key not in columns or caption_key not in columns:
                raise ValueError(
                    f"{table}: needs columns {path_key!r} and {caption_key!r}; found {columns} "
                    f"(set --path-key / --caption-key)"
                )
            for line, row in enumerate(reader, start=2):
                path, caption = row[path_key], row[caption_key] or ""  # None when a row is short
                yield f"{table}:{line}", (base / path if path else None), caption.encode("utf-8"), (
                    None if path else f"bad_row: empty {path_key!r}"
                )
        return
    with open(table, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            source = f"{table}:{line}"
            try:
                row = json.loads(text)
                path, caption = row[path_key], row[caption_key]
            except (ValueError, KeyError, TypeError) as exc:
                yield source, None, None, f"bad_row: not a JSON object with {path_key!r} and {caption_key!r} ({exc})"
                continue
            if not isinstance(caption, str):  # null would be stored as the caption "None", a list as its repr
                yield source, None, None, f"bad_row: {caption_key!r} is {type(caption).__name__}, not a string"
                continue
            extra = {k: v for k, v in row.items() if k not in (path_key, caption_key)}
            yield source, base / path, caption.encode("utf-8"), json.dumps(extra).encode() if extra else None


def _inputs(inputs) -> list[Path]:
    """The input paths, each checked (before anything is written or replaced)."""
    paths = [Path(item) for item in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for path in paths:
        if not path.exists():
            raise ValueError(f"convert input {str(path)!r} does not exist")
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".json"))):
            raise ValueError(f"convert input {str(path)!r}: expected a directory, a .csv or a .jsonl file")
    return paths


def _rows(inputs, path_key: str, caption_key: str) -> Iterator[tuple]:
    for path in _inputs(inputs):
        if path.is_dir():
            yield from _rows_from_dir(path)
        else:
            yield from _rows_from_table(path, path_key, caption_key)


def _sample(source: str, image_path: Path | None, caption, attrs) -> tuple[dict | None, str | None]:
    """Shard sample for one row, or (None, reason: detail)."""
    if image_path is None:
        return None, attrs  # attrs holds the row's error
    if caption is None:
        return None, "missing_caption: no caption (sidecar .txt)"
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return None, f"bad_caption: not UTF-8 ({exc})"
    if not text:
        return None, "missing_caption: empty caption"
    try:
        data = image_path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except FileNotFoundError:
        return None, f"missing_image: {image_path} does not exist"
    except Exception as exc:
        return None, f"bad_image: {image_path} cannot be read ({type(exc).__name__}: {exc})"
    meta = {"source": str(image_path)}
    if attrs is not None:
        try:
            meta = {**json.loads(attrs), **meta}
        except ValueError as exc:
            return None, f"bad_json: {exc}"
    ext = _EXT_OF_FORMAT.get(fmt)
    if ext is None:  # a format the decoder does not look for: store as PNG, turned upright (PNG drops EXIF)
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            ImageOps.exif_transpose(im).save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    return {ext: data, "txt": text.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode()}, None


def _is_val(source: str, seed: int, val_fraction: float) -> bool:
    # Hash of the source, not its position: adding files never moves old ones between splits.
    digest = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def convert(
    inputs,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
    path_key: str = "path",
    caption_key: str = "caption",
    overwrite: bool = False,
    prefix: str | None = None,
) -> dict:
    """Write shards of `inputs` (directories, CSV or JSONL files) to `out_dir`; with `val_fraction` > 0 a
    deterministic share goes to `val-%06d.tar`. Returns {"counts", "shards", "urls", "skipped"} (also in
    out_dir/info.json). `prefix` is another name for `split` (the shard name prefix)."""
    split = prefix or split
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    _inputs(inputs)  # a missing input fails here, before earlier shards are replaced or new ones written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = [split] + (["val"] if val_fraction > 0 and split != "val" else [])
    existing = [p for s in splits for p in sorted(out_dir.glob(f"{s}-*.tar"))]
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds {existing[0].name} (...); pass --overwrite (overwrite=True) or "
                         "another --out")
    for p in existing:
        p.unlink()

    writers, shards, counts, skipped = {}, {s: [] for s in splits}, Counter(), Counter()
    prefix = str(out_dir).replace("%", "%%")
    try:
        for source, image_path, caption, attrs in _rows(inputs, path_key, caption_key):
            sample, error = _sample(source, image_path, caption, attrs)
            if sample is None:
                skipped[error.split(":", 1)[0]] += 1
                log.warning("convert: skipping %s: %s", source, error)
                continue
            target = "val" if len(splits) > 1 and _is_val(source, seed, val_fraction) else split
            if target not in writers:
                writers[target] = ShardWriter(
                    f"{prefix}/{target}-%06d.tar", maxcount=shard_size, verbose=0, mtime=0, post=shards[target].append
                )
            sample["__key__"] = f"{counts[target]:09d}"
            writers[target].write(sample)
            counts[target] += 1
    finally:
        for writer in writers.values():
            writer.close()
    if not counts:
        raise ValueError(f"convert: no usable image-caption pairs in {inputs!r} (skipped: {dict(skipped)})")

    def urls(names: list[str], name: str) -> str | None:
        if not names:
            return None
        last = len(names) - 1
        return str(out_dir / (f"{name}-{{000000..{last:06d}}}.tar" if last else names[0]))

    names = {s: [Path(p).name for p in shards[s]] for s in splits}
    info = {
        "dataset": "converted",
        "counts": {s: counts[s] for s in splits},
        "shards": names,
        "urls": {s: urls(names[s], s) for s in splits},
        "skipped": dict(skipped),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("convert: wrote %s to %s, skipped %s", info["counts"], out_dir, dict(skipped))
    return info
