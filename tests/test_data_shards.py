import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lit_diffusion.data.shapes import render, sample_attrs, write_shapes
from lit_diffusion.data.shards import (
    ExactlyOnceStream,
    SkipCounter,
    collate,
    decode_image,
    decode_sample,
    expand_urls,
)


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _good(key: str, seed: int = 0) -> list[tuple[str, bytes]]:
    attrs = sample_attrs(seed, 16)
    return [
        (f"{key}.json", json.dumps(attrs).encode()),
        (f"{key}.png", _png(render(attrs, 16))),
        (f"{key}.txt", attrs["caption"].encode()),
    ]


def _read(urls, counter=None):
    counter = counter or SkipCounter()
    return [s["key"] for s in ExactlyOnceStream(urls, 16, counter=counter)], counter


# ------------------------------------------------------------------------------------------------ URL expansion


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("urls")
    write_shapes(out, train=30, val=10, size=16, shard_size=10)
    return out


def test_expand_brace_glob_dir_list(shard_dir):
    names = [str(shard_dir / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_urls(str(shard_dir / "train-{000000..000002}.tar")) == names
    assert expand_urls(str(shard_dir / "train-*.tar")) == names
    assert expand_urls(shard_dir, split="train") == names
    assert expand_urls(str(shard_dir) + "/", split="val") == [str(shard_dir / "val-000000.tar")]
    assert expand_urls([names[2], str(shard_dir / "val-*.tar")]) == [names[2], str(shard_dir / "val-000000.tar")]
    assert expand_urls(f"{names[0]}::{names[1]}") == names[:2]


def test_a_folder_of_several_splits_is_read_by_split_and_one_of_one_split_whole(shard_dir, tmp_path):
    """img2dataset writes a folder per split (`train/00000.tar`); a folder of ours holds `train-*` and `val-*`, and
    read without a split it gave both: `data encode --train DIR --val DIR` and the tokenizer took the val shards."""
    with pytest.raises(ValueError, match=r"several splits \(train-\*\.tar, val-\*\.tar\)"):
        expand_urls(shard_dir)
    per_split = tmp_path / "train"
    per_split.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (per_split / name).write_bytes((shard_dir / "train-000000.tar").read_bytes())
    whole = [str(per_split / "00000.tar"), str(per_split / "00001.tar")]
    assert expand_urls(per_split, split="train") == expand_urls(per_split) == whole
    with pytest.raises(ValueError, match=r"no shards matching 'test-\*\.tar'.*holds train-\*\.tar, val-\*\.tar"):
        expand_urls(shard_dir, split="test")


def test_encode_and_the_tokenizer_read_a_folder_by_split(shard_dir, tmp_path, monkeypatch):
    from lit_diffusion.data.encode import _sources_and_names
    from lit_diffusion.data.tokenizer import Tokenizer, train_from_shards

    _, _, splits = _sources_and_names({"train": str(shard_dir), "val": str(shard_dir)})
    assert splits == {"train": expand_urls(shard_dir, split="train"), "val": [str(shard_dir / "val-000000.tar")]}
    seen = []
    real = Tokenizer.train
    monkeypatch.setattr(Tokenizer, "train", staticmethod(lambda captions, **kw: seen.append(captions) or real(
        captions, **kw)))
    train_from_shards(shard_dir, tmp_path / "tok.json", vocab_size=300, context_length=16)
    assert len(seen[0]) == 30  # the 30 train captions, none of the 10 val ones


def test_the_tokenizer_skips_and_counts_a_caption_the_data_modules_would_skip(tmp_path, caplog, monkeypatch):
    """A caption that is not UTF-8 stopped `data tokenizer` with an unrelated error; `.caption` files were not read."""
    from lit_diffusion.data.tokenizer import Tokenizer, train_from_shards

    png = _kv(_good("x"))["png"]
    url = _tar(tmp_path / "train-000000.tar", _good("a") + [("b.png", png), ("b.txt", b"caf\xe9 \xff")]
               + [("c.png", png), ("c.caption", b"a small red circle ")] + [("d.png", png), ("d.txt", b"  ")])
    seen = []
    real = Tokenizer.train
    monkeypatch.setattr(Tokenizer, "train", staticmethod(lambda captions, **kw: seen.append(captions) or real(
        captions, **kw)))
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        train_from_shards(url, tmp_path / "tok.json", vocab_size=300, context_length=16)
    skips = [r.message for r in caplog.records if "skipping" in r.message]
    assert "'b'" in skips[0] and "bad_caption" in skips[0] and "(1 skipped so far)" in skips[0]
    assert "'d'" in skips[1] and "missing_caption" in skips[1] and "(2 skipped so far)" in skips[1]
    assert seen == [[_kv(_good("a"))["txt"].decode(), "a small red circle"]]


def test_a_val_shard_listed_twice_is_refused(shard_dir):
    """Overlapping val patterns counted the shard's samples twice in validation and in-loop FID."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    dm = ImageCaptionDataModule(train_urls=None, val_urls=f"{shard_dir}/val-*.tar::{shard_dir}/val-000000.tar",
                                image_size=16, num_workers=0)
    with pytest.raises(ValueError, match=r"val_urls lists .*val-000000.tar more than once"):
        dm.setup("validate")


def test_expand_remote_and_pipe_left_to_webdataset():
    pipes = expand_urls("pipe:curl -s http://x/a-{0..1}.tar")
    assert pipes == ["pipe:curl -s http://x/a-0.tar", "pipe:curl -s http://x/a-1.tar"]
    remote = expand_urls("https://host/d/train-{000..001}.tar")
    assert remote == ["https://host/d/train-000.tar", "https://host/d/train-001.tar"]


def test_expand_missing_or_empty_names_the_pattern(shard_dir, tmp_path):
    pattern = str(shard_dir / "train-{000000..000007}.tar")
    with pytest.raises(ValueError, match=r"train-\{000000\.\.000007\}\.tar.*train-000003\.tar"):
        expand_urls(pattern)
    with pytest.raises(ValueError, match="nothing-"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="no shards matching 'test-\\*.tar'"):
        expand_urls(shard_dir, split="test")
    with pytest.raises(ValueError, match="expands to no shards"):
        expand_urls([])


# ------------------------------------------------------------------------------------------------ decoding modes


def test_grayscale_and_upsample_small():
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8), "L")
    out = decode_image(_png(grey), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert (out == 77).all()


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128], [65535, 257 * 200]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I")
    big = image.resize((16, 16), Image.NEAREST)
    out = decode_image(_png(big), 16)
    assert out[0, 0, 0] == 0 and out[0, 0, 15] == 128 and out[0, 15, 0] == 255 and out[0, 15, 15] == 200
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    out = decode_image(_png(cmyk, format="TIFF"), 16)
    assert out[:, 5, 5].tolist() == [255, 0, 0]


def test_transparency_composites_on_white():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 8, 16))
    out = decode_image(_png(rgba), 16)
    assert out[:, 4, 2].tolist() == [200, 10, 10] and out[:, 4, 12].tolist() == [255, 255, 255]
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.paste(0, (0, 0, 16, 4))
    out = decode_image(_png(pal, transparency=0), 16)
    assert out[:, 1, 1].tolist() == [255, 255, 255] and out[:, 10, 1].tolist() == [10, 200, 30]


def test_resize_shorter_side_and_centre_crop_and_flip():
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = (255, 0, 0)
    wide[:, 16:48] = (0, 0, 255)
    wide[:, 48:] = (0, 255, 0)
    out = decode_image(_png(Image.fromarray(wide)), 16)
    assert out.shape == (3, 16, 16)
    # only the blue centre remains; the bicubic kernel may blend a little of the cropped-off bands into the
    # outermost columns, as resizing first and cropping after would
    inner = out[:, :, 1:-1]
    assert (inner[2] >= 250).all() and (inner[0] <= 5).all() and (inner[1] <= 5).all()
    assert (out[2] >= 200).all() and (out[0] <= 40).all() and (out[1] <= 40).all()
    half = np.zeros((16, 16, 3), np.uint8)
    half[:, :4] = 255
    flipped = decode_image(_png(Image.fromarray(half)), 16, flip=True)
    assert (flipped[:, :, 12:] == 255).all() and (flipped[:, :, :12] == 0).all()


@pytest.mark.parametrize("width", [101, 100, 64, 33])
def test_a_mirrored_centre_crop_keeps_its_size_condition(width):
    """The square path crops the exact centre of the original: a mirror of it is the same crop, so its size row is
    the unflipped one (the bucket formula, on a rounded offset, moved 50 x 101 at 32 px from 16 to 17)."""
    image = _png(Image.new("RGB", (width, 50), (10, 20, 30)))
    plain = decode_sample({"__key__": "k", "png": image, "txt": b"x"}, 32)["size"]
    mirrored = decode_sample({"__key__": "k", "png": image, "txt": b"x"}, 32, flip=True)["size"]
    assert mirrored.tolist() == plain.tolist()
    side = min(50, width)
    crop = [round((50 - side) / 2 * 32 / side), round((width - side) / 2 * 32 / side)]
    assert plain.tolist() == [50, width, *crop, 32, 32]


def test_collate_batch_format():
    samples = [decode_sample(dict(_kv(_good("k1", 1)), __key__="k1"), 16)]
    white = _png(Image.new("RGB", (16, 16), (255, 255, 255)))
    samples.append(decode_sample({"__key__": "k2", "png": white, "txt": b"x"}, 16))
    batch = collate(samples)
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"][1].eq(1.0).all() and batch["image"].min() >= -1
    assert batch["key"] == ["k1", "k2"] and batch["attrs"][1] == {} and batch["caption"][1] == "x"
    assert batch["attrs"][0]["caption"] == batch["caption"][0]


def _kv(members):
    return {name.split(".", 1)[1]: data for name, data in members}


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad_members, reason",
    [
        ([("b.png", b"\x89PNG\r\n\x1a\nthis is not a png"), ("b.txt", b"a red circle")], "bad_image"),
        ([("b.png", b""), ("b.txt", b"a red circle")], "bad_image"),
        ([("b.png", None)], "missing_caption"),
        ([("b.txt", b"a red circle"), ("b.json", b"{}")], "missing_image"),
        ([("b.png", None), ("b.txt", b"caf\xe9 \xff")], "bad_caption"),
    ],
    ids=["corrupt-image", "zero-byte-image", "missing-caption", "missing-image", "non-utf8-caption"],
)
def test_bad_sample_is_skipped_counted_and_logged(tmp_path, caplog, bad_members, reason):
    png = _kv(_good("x"))["png"]
    members = _good("a") + [(n, png if d is None else d) for n, d in bad_members] + _good("c", 2)
    url = _tar(tmp_path / "s.tar", members)
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        keys, counter = _read([url])
    assert keys == ["a", "c"]
    assert counter.counts()[reason] == 1 and counter.total == 1
    assert any("'b'" in r.message and url in r.message and reason in r.message for r in caplog.records)


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.75, "block"])
def test_truncated_tar_keeps_good_prefix(tmp_path, caplog, cut):
    members = [m for i in range(6) for m in _good(f"k{i}", i)]
    url = _tar(tmp_path / "t.tar", members)
    data = open(url, "rb").read()
    end = 512 * 9 if cut == "block" else int(len(data) * cut) + 100  # in a header, in data, on a boundary
    (tmp_path / "t.tar").write_bytes(data[:end])
    good = _tar(tmp_path / "next.tar", _good("n0"))
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        keys, counter = _read([url, good])
    assert 0 < len(keys) < 7 and keys[-1] == "n0"
    assert keys[:-1] == [f"k{i}" for i in range(len(keys) - 1)]
    assert counter.counts()["shard"] == 1
    assert any(url in r.message and "shard" in r.message for r in caplog.records)


def test_unreadable_and_failing_pipe_shards_are_skipped(tmp_path, caplog):
    good = _tar(tmp_path / "g.tar", _good("g0"))
    empty_file = tmp_path / "zero.tar"
    empty_file.write_bytes(b"")
    missing = str(tmp_path / "vanished.tar")  # removed after setup
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        keys, counter = _read(["pipe:exit 3", str(empty_file), missing, good, f"pipe:cat {good}"])
    assert keys == ["g0", "g0"]
    assert counter.counts()["shard"] == 3
    messages = " ".join(r.message for r in caplog.records)
    assert "pipe:exit 3" in messages and "vanished.tar" in messages and "zero.tar" in messages


def test_skip_counter_survives_pickling_as_snapshot():
    import pickle

    counter = SkipCounter()
    counter.add("bad_image")
    copy = pickle.loads(pickle.dumps(counter))
    assert copy.counts()["bad_image"] == 1
    copy.add("bad_image")
    assert counter.counts()["bad_image"] == 1


def test_large_jpeg_and_exif_orientation():
    big = Image.new("RGB", (400, 300), (30, 160, 90))
    out = decode_image(_png(big, format="JPEG", quality=95), 32)  # decoded at reduced scale, then resized
    assert out.shape == (3, 32, 32)
    assert (out.int() - torch.tensor([30, 160, 90]).view(3, 1, 1)).abs().max() <= 3
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise, the left half on top
    out = decode_image(_png(wide, format="JPEG", quality=95, exif=exif), 16)
    assert out[0, 2, 8] > 200 and out[2, 2, 8] < 60  # top: red
    assert out[2, 13, 8] > 200 and out[0, 13, 8] < 60  # bottom: blue


# ---------------------------------------------------------------------------- the tar reader against tarfile's


def _reference_members(path) -> list[tuple[str, bytes]]:
    """webdataset's own reader (Python's tarfile underneath): what the direct reader must give."""
    from webdataset.tariterators import tar_file_iterator

    with open(path, "rb") as stream:
        return [(m["fname"], m["data"]) for m in tar_file_iterator(stream)]


def _our_members(path) -> tuple[list[tuple[str, bytes]], list[Exception]]:
    from lit_diffusion.data.shards import _TrackedStream, _tar_members

    errors = []
    with open(path, "rb") as f:
        members = [(m["fname"], m["data"]) for m in _tar_members(_TrackedStream(f), str(path), errors.append)]
    return members, errors


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_tar_reader_equals_tarfile(tmp_path, fmt, compression):
    """Long names (GNU 'L' headers, pax 'path' records, ustar prefixes), non-ASCII names, empty and multi-block
    members, directories, symlinks, webdataset's __meta__ members and a pax global header: the members read
    directly equal webdataset's reader's, in order, byte for byte."""
    rng = np.random.default_rng(0)
    long_dir = "d" * 90 + "/" + "e" * 60  # > 100 characters: a ustar prefix, GNU's long name or pax's path
    members = [("a.txt", b"caption"), ("a.png", rng.bytes(3000)), ("b.txt", b""), (f"{long_dir}/c.txt", b"x"),
               ("g" * 60 + "/" + "h" * 60 + ".json", b"{}"), ("dé/ü.txt", "ü".encode()), ("__meta__/x.json", b"{}"),
               ("k.npy", rng.bytes(512)), ("k.txt", b"y" * 1025)]
    if fmt != tarfile.USTAR_FORMAT:  # a name of more than 100 characters without a "/" to split it at
        members.append(("f" * 120 + ".txt", b"z"))
    path = tmp_path / f"s.tar{'.gz' if compression else ''}"
    headers = {"comment": "global"} if fmt == tarfile.PAX_FORMAT else None
    with tarfile.open(path, f"w:{compression}", format=fmt, pax_headers=headers) as tar:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
        tar.addfile(link)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours, errors = _our_members(path)
    assert not errors
    assert ours == _reference_members(path)
    assert [n for n, _ in ours] == [n for n, _ in members if not n.startswith("__meta__")]


def test_tar_reader_reads_gnu_tar(tmp_path):
    """Shards written by GNU tar (its default format, long names as 'L' headers) read as tarfile reads them."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    src = tmp_path / "src"
    (src / ("n" * 110)).mkdir(parents=True)
    (src / ("n" * 110) / "0001.txt").write_text("a long-named caption")
    (src / "0002.txt").write_text("short")
    (src / "0002.png").write_bytes(bytes(range(256)) * 5)
    subprocess.run(["tar", "-cf", str(tmp_path / "g.tar"), "-C", str(src), "."], check=True)
    ours, errors = _our_members(tmp_path / "g.tar")
    assert not errors and ours == _reference_members(tmp_path / "g.tar")
    assert sorted(n for n, _ in ours) == ["./0002.png", "./0002.txt", f"./{'n' * 110}/0001.txt"]


@pytest.mark.parametrize("where", ["first", "later"])
def test_tar_reader_refuses_a_damaged_header(tmp_path, where):
    """A header whose checksum fails is a damaged shard (reported with its byte offset), whichever header it is;
    the members before it are kept."""
    url = _tar(tmp_path / "s.tar", _good("a") + _good("b", 1))
    data = bytearray(open(url, "rb").read())
    at = 0 if where == "first" else sum(512 + -(-len(d) // 512) * 512 for _, d in _good("a"))
    data[at + 3] ^= 0x40  # a letter of the member's name
    (tmp_path / "s.tar").write_bytes(bytes(data))
    ours, errors = _our_members(tmp_path / "s.tar")
    assert [n for n, _ in ours] == ([] if where == "first" else [n for n, _ in _good("a")])
    assert len(errors) == 1 and f"damaged tar header at byte {at}" in str(errors[0])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("length", [b"000", b"-06", b"999"])
def test_a_damaged_pax_record_is_reported_not_looped_on(tmp_path, length):
    """A pax record whose length is 0 (never moving on), negative or past the header: a damaged shard, reported,
    in bounded time; the member before it is kept."""
    path = tmp_path / "p.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a.txt", b"first"), ("b" * 120 + ".txt", b"second")):  # the long name needs pax
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = bytearray(path.read_bytes())
    at = data.index(b" path=")
    digits = at - data[:at][::-1].index(b"\n") if b"\n" in data[:at] else at - 3
    data[digits:at] = length[-(at - digits):].rjust(at - digits, b"0")
    path.write_bytes(bytes(data))
    ours, errors = _our_members(path)
    assert [n for n, _ in ours] == ["a.txt"] and len(errors) == 1
    assert "damaged pax record" in str(errors[0])


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_shards_read_whole_and_count_only_real_damage(tmp_path, compression):
    """An intact compressed shard gives its samples and no skip (its end is checked on the decompressed tar); the
    same shard cut in half keeps the samples before the cut and is counted once."""
    import bz2
    import gzip
    import lzma

    url = _tar(tmp_path / "plain.tar", [m for i in range(4) for m in _good(f"k{i}", i)])
    packed = tmp_path / f"s.tar.{compression}"
    raw = open(url, "rb").read()
    packed.write_bytes({"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compression](raw))
    keys, counter = _read([str(packed)])
    assert keys == ["k0", "k1", "k2", "k3"] and counter.total == 0
    (tmp_path / f"cut.tar.{compression}").write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    keys, counter = _read([str(tmp_path / f"cut.tar.{compression}")])
    assert keys == [f"k{i}" for i in range(len(keys))] and len(keys) < 4
    assert counter.counts()["shard"] == 1 and counter.total == 1


def test_sparse_pax_members_are_refused():
    from lit_diffusion.data.shards import _Blocks, _plain_tar_members, _TrackedStream

    records = b"22 GNU.sparse.major=1\n"  # the length counts its own digits, the space and the newline
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    member = tarfile.TarInfo("k.bin")
    member.size = 4
    blob = (header.tobuf(tarfile.USTAR_FORMAT) + records.ljust(512, b"\0") + member.tobuf(tarfile.USTAR_FORMAT)
            + b"data".ljust(512, b"\0") + b"\0" * 1024)
    stream = _TrackedStream(io.BytesIO(blob))
    with pytest.raises(tarfile.ReadError, match="sparse member"):
        list(_plain_tar_members(_Blocks(stream), stream, "x"))
