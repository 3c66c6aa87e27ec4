"""Real-image FID statistics, computed once per (data, resolution, sample count, feature backend + weights).

The file name carries a readable summary and a hash of all key fields; the file itself stores the fields next to
mu, sigma, n and sigma's thin square root (what each later FID uses), and is checked on load, so a stale or
colliding file is recomputed rather than silently reused (a cache keyed only by file name is how FIDs against the
wrong reference set get published).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from lit_diffusion.metrics.fid import RealStats

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("data", "resolution", "num_samples", "backend", "weights")


def _canonical(key_fields: dict) -> str:
    missing = [k for k in REQUIRED_FIELDS if k not in key_fields]
    if missing:
        raise ValueError(f"FID stats cache key is missing fields {missing} (needs {list(REQUIRED_FIELDS)})")
    try:
        return json.dumps(key_fields, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ValueError(f"FID stats cache key fields must be plain JSON values: {err}") from err


def stats_key(key_fields: dict) -> str:
    return hashlib.sha256(_canonical(key_fields).encode()).hexdigest()


def stats_path(cache_dir: str | Path, key_fields: dict) -> Path:
    backend = re.sub(r"[^A-Za-z0-9.-]+", "-", str(key_fields["backend"]))
    res, n = key_fields["resolution"], key_fields["num_samples"]
    name = f"fid_stats_{backend}_{res}px_{n}_{stats_key(key_fields)[:12]}.pt"
    return Path(cache_dir) / name


_REMOTE = ("pipe:", "://")
_EDGE = 1 << 16  # bytes hashed at each end of a shard


def data_identity(urls: list[str | Path], mtime: bool = True) -> str | None:
    """An identity of local shard files that changes when their content does, cheap for many large shards:
    per shard, in stream order (which fixes the first N samples), its name, size, mtime and a hash of its first
    and last 64 KiB. None when any URL is remote (http, s3, `pipe:`): nothing cheap identifies those, so their
    real statistics are not cached on disk.

    Why these fields: a full hash would read every shard at each start. mtime is free and changes on any rewrite,
    also one touching only a shard's middle, which the sampled bytes miss; the hashed ends change on a re-draw
    even where mtime does not (coarse-mtime file systems, copies that keep times), since the first and last
    samples of a re-drawn shard differ. A byte-identical rewrite gets a new mtime and so one recomputation: a false
    miss costs a pass over real images, a false hit an FID against the wrong reference set.
    `mtime=False` leaves the times out, for identities that must survive a copy of the data (the pipeline's stage
    fingerprints, where a false miss stops a run).
    """
    digest = hashlib.sha256()
    for url in urls:
        url = str(url)
        if url.startswith(_REMOTE[0]) or _REMOTE[1] in url:
            return None
        path = Path(url.removeprefix("file:"))
        if not path.is_file():
            raise FileNotFoundError(f"FID stats cache: data file not found: {path}")
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(_EDGE)
            f.seek(max(st.st_size - _EDGE, len(head)))
            tail = f.read()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns if mtime else ''}:".encode())
        digest.update(hashlib.sha256(head + tail).digest())
    return digest.hexdigest()[:16]


def load_stats(path: Path, key_fields: dict) -> RealStats | None:
    """The cached statistics if `path` holds them for exactly `key_fields`; None (and a log line) otherwise."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        stored = blob["key_fields"]
        stats = RealStats.of(blob["mu"], blob["sigma"], int(blob["n"]), blob.get("root"))
    except Exception as err:
        log.warning("FID stats cache %s is unreadable (%s: %s); recomputing", path, type(err).__name__, err)
        return None
    try:
        same = _canonical(stored) == _canonical(key_fields)
    except (ValueError, TypeError, AttributeError):  # a file from an older key layout
        same = False
    if not same:
        stored = stored if isinstance(stored, dict) else {}
        diff = {k: (stored.get(k), key_fields.get(k)) for k in sorted(set(stored) | set(key_fields))
                if stored.get(k) != key_fields.get(k)}
        log.warning("FID stats cache %s was made for other settings %s (stored, wanted); recomputing", path, diff)
        return None
    return stats


def save_stats(path: Path, key_fields: dict, stats: RealStats | tuple) -> None:
    stats = RealStats.of(*stats)
    blob = {"key_fields": dict(key_fields), "key": stats_key(key_fields), "mu": stats.mu, "sigma": stats.sigma,
            "n": stats.n, "root": stats.root}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_real_stats(cache_dir: str | Path, key_fields: dict, compute_fn: Callable[[], RealStats | tuple],
                      is_writer: bool = True) -> RealStats:
    """Load RealStats (mu, sigma, n, root) for `key_fields` from `cache_dir`, or run `compute_fn` and (on the writer) save it.

    Under DDP every rank calls this: all ranks look before any computes, so they agree on hit or miss, and
    `compute_fn` may run collectives (e.g. `FID.real_stats()`); only `is_writer` (global rank zero) writes.
    """
    path = stats_path(cache_dir, key_fields)
    stats = load_stats(path, key_fields)
    if stats is not None:
        log.info("FID real statistics loaded from %s", path)
        return stats
    stats = RealStats.of(*compute_fn())
    if is_writer:
        save_stats(path, key_fields, stats)
        log.info("FID real statistics (%d images) saved to %s", stats.n, path)
    return stats
