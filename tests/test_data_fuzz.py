"""Property-based fuzzing of both shard readers (image-caption and latent): truncated, bit-flipped and
member-shuffled tars never crash or hang the loader, and every sample they lose is counted.

What is asserted, with N samples in the intact tar, Y samples yielded, S samples skipped (counted by reason) and
H = 1 when the shard itself is reported broken (counted once, reason "shard"), else 0:
- truncated or bit-flipped: Y + S <= N (nothing is invented), and Y + S == N unless H == 1: a sample can only
  go missing without its own count when the tar's structure broke, and then the shard's count says so;
- members shuffled (an intact tar, its members in another order): H == 0, and the reader's samples are the
  runs of consecutive members with one key: Y == the runs holding every member a sample needs, S == the others
  (computed here from the member order, independently of the reader).
"""

import atexit
import io
import json
import random
import shutil
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from latent_fakes import POOLED, WIDTH

from lit_diffusion.data.latents import LatentDecoder, LatentShardWriter
from lit_diffusion.data.shapes import render, sample_attrs
from lit_diffusion.data.shards import ExactlyOnceStream, SkipCounter

SAMPLES = 5
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
REQUIRED = {"images": {"png", "txt"}, "latents": {"latent.npy", "context.npy", "pooled.npy", "txt"}}
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-shards-"))  # module-wide: hypothesis examples cannot take tmp_path
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@cache
def intact(kind: str) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    """The intact tar's bytes and its members in order."""
    path = _DIR / f"intact-{kind}.tar"
    if kind == "images":
        with tarfile.open(path, "w") as tar:
            for i in range(SAMPLES):
                attrs = sample_attrs(i, 16)
                for ext, data in (("json", json.dumps(attrs).encode()), ("png", _png(render(attrs, 16))),
                                  ("txt", attrs["caption"].encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    else:
        g = torch.Generator().manual_seed(0)
        writer = LatentShardWriter(path, "float16")
        for i in range(SAMPLES):
            writer.write(f"{i:06d}", torch.randn(3, 4, 4, generator=g), torch.randn(2 + i % 3, WIDTH, generator=g),
                         torch.randn(POOLED, generator=g), f"caption {i}", b"{}")
        writer.commit()
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tuple((m.name, tar.extractfile(m).read()) for m in tar.getmembers())
    return data, members


def _read(kind: str, data: bytes) -> tuple[list[str], dict[str, int]]:
    path = _DIR / f"case-{kind}.tar"
    path.write_bytes(data)
    counter = SkipCounter()
    if kind == "images":
        stream = ExactlyOnceStream([str(path)], 16, counter=counter)
    else:
        stream = ExactlyOnceStream([str(path)], None, counter=counter,
                                   decode=LatentDecoder((3, 4, 4), WIDTH, POOLED, "float16"))
    keys = [s["key"] for s in stream]
    return keys, counter.counts()


def _check_lossy(kind: str, data: bytes) -> None:
    keys, counts = _read(kind, data)
    shard = counts.pop("shard")
    yielded, skipped = len(keys), sum(counts.values())
    assert shard in (0, 1)
    assert yielded + skipped <= SAMPLES
    assert yielded + skipped == SAMPLES or shard == 1, (yielded, counts)
    assert set(keys) <= {f"{i:06d}" for i in range(SAMPLES)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["images", "latents"])
@FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_tars(kind, fraction):
    data, _ = intact(kind)
    _check_lossy(kind, data[: int(fraction * len(data))])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["images", "latents"])
@FUZZ
@given(bits=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=8))
def test_bit_flipped_tars(kind, bits):
    data, _ = intact(kind)
    flipped = bytearray(data)
    for b in bits:
        bit = int(b * len(data) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
    _check_lossy(kind, bytes(flipped))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["images", "latents"])
@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_member_shuffled_tars(kind, seed):
    _, members = intact(kind)
    order = list(members)
    random.Random(seed).shuffle(order)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in order:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    runs: list[tuple[str, set]] = []  # consecutive members with one key: the samples a tar reader sees
    for name in (n for n, _ in order):
        key, _, member = name.partition(".")
        if runs and runs[-1][0] == key:
            runs[-1][1].add(member)
        else:
            runs.append((key, {member}))
    complete = [key for key, have in runs if REQUIRED[kind] <= have]
    keys, counts = _read(kind, buf.getvalue())
    assert counts.pop("shard") == 0
    assert keys == complete and sum(counts.values()) == len(runs) - len(complete)
