import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from lit_diffusion.data.shapes import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    render,
    sample_attrs,
    write_shapes,
)
from lit_diffusion.data.tokenizer import Tokenizer


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = write_shapes(out, train=250, val=60, size=32, shard_size=100, seed=3)
    return out, summary


def test_write_shapes_layout_and_summary(shapes_dir):
    out, summary = shapes_dir
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
    ]
    info = json.loads((out / "info.json").read_text())
    assert info["counts"] == {"train": 250, "val": 60}
    assert info["urls"]["train"] == str(out / "train-{000000..000002}.tar")
    assert info["urls"]["val"] == str(out / "val-000000.tar")
    assert summary["samples_per_s"] > 0 and summary["shards"] == info["shards"]
    names = list(_members(out / "train-000001.tar"))
    assert names[:3] == ["000000100.json", "000000100.png", "000000100.txt"]
    assert len(names) == 300
    tok = Tokenizer.load(out / "tokenizer.json")
    caption = json.loads(_members(out / "val-000000.tar")["000000007.json"])["caption"]
    assert tok.decode(tok([caption])[0]) == caption


def test_shard_round_trip_is_exact(shapes_dir):
    out, _ = shapes_dir
    files = _members(out / "val-000000.tar")
    for i in range(60):
        key = f"{i:09d}"
        attrs = json.loads(files[f"{key}.json"])
        assert files[f"{key}.txt"].decode("utf-8") == attrs["caption"]
        stored = np.asarray(Image.open(io.BytesIO(files[f"{key}.png"])))
        assert stored.shape == (32, 32, 3)
        np.testing.assert_array_equal(stored, np.asarray(render(attrs, 32)))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = write_shapes(tmp_path / "a", train=40, val=10, size=24, shard_size=16, seed=7)
    b = write_shapes(tmp_path / "b", train=40, val=10, size=24, shard_size=16, seed=7)
    c = write_shapes(tmp_path / "c", train=40, val=10, size=24, shard_size=16, seed=8)
    assert a["shards"] == b["shards"]
    for name in a["shards"]["train"] + a["shards"]["val"] + ["tokenizer.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (tmp_path / "c" / "train-000000.tar").read_bytes()
    assert a["urls"]["train"].endswith("train-{000000..000002}.tar")


def test_captions_match_attributes():
    rng = random.Random(0)
    seen_relations, seen_counts = set(), set()
    for _ in range(500):
        attrs = sample_attrs(rng, 32)
        objs = attrs["objects"]
        seen_counts.add(len(objs))
        phrases = [f"a {o['size']} {o['color']} {o['shape']}" for o in objs]
        for o in objs:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["r"] == SIZES[o["size"]]
        if len(objs) == 1:
            assert attrs["relation"] is None and attrs["caption"] == phrases[0]
        else:
            seen_relations.add(attrs["relation"])
            assert attrs["caption"] == f"{phrases[0]} {attrs['relation']} {phrases[1]}"
            assert objs[0]["color"] != objs[1]["color"]
            assert [o["size"] for o in objs] != ["large", "large"]
    assert seen_counts == {1, 2} and seen_relations == set(RELATIONS)


def _direction(relation):
    return {"above": (1, -1), "below": (1, 1), "left of": (0, -1), "right of": (0, 1)}[relation]


def test_relation_geometry_in_attributes():
    rng = random.Random(1)
    for _ in range(2000):
        attrs = sample_attrs(rng, 32)
        for o in attrs["objects"]:
            assert 0 < o["cx"] - o["r"] and o["cx"] + o["r"] < 1
            assert 0 < o["cy"] - o["r"] and o["cy"] + o["r"] < 1
        if attrs["relation"] is None:
            continue
        first, second = attrs["objects"]
        axis, sign = _direction(attrs["relation"])
        c1 = (first["cx"], first["cy"])
        c2 = (second["cx"], second["cy"])
        along = sign * (c1[axis] - c2[axis])  # > 0 when the relation holds
        across = abs(c1[1 - axis] - c2[1 - axis])
        # boxes separated along the relation's axis, and that axis dominates
        assert along >= first["r"] + second["r"] + 0.03
        assert across <= 0.5 * along + 1e-9


def _mask(image, color):
    return np.all(np.asarray(image) == np.array(color, dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_rendered_pixels_follow_attributes(size):
    rng = random.Random(size)
    palette = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    for _ in range(300):
        attrs = sample_attrs(rng, size)
        image = render(attrs, size)
        assert {tuple(p) for p in np.asarray(image).reshape(-1, 3)} <= palette  # no anti-aliasing
        masks = [_mask(image, COLORS[o["color"]]) for o in attrs["objects"]]
        for o, m in zip(attrs["objects"], masks):
            assert m.any()
            ys, xs = np.nonzero(m)
            # inside the image with a background border, and within the object's box (half-pixel rounding)
            assert xs.min() >= 0 and ys.min() >= 0 and xs.max() < size and ys.max() < size
            assert xs.min() >= (o["cx"] - o["r"]) * size - 0.5 and xs.max() <= (o["cx"] + o["r"]) * size
            assert ys.min() >= (o["cy"] - o["r"]) * size - 0.5 and ys.max() <= (o["cy"] + o["r"]) * size
        if attrs["relation"] is not None:
            axis, sign = _direction(attrs["relation"])
            (y1, x1), (y2, x2) = (np.nonzero(m) for m in masks)
            first_px, second_px = (x1, x2) if axis == 0 else (y1, y2)
            # every pixel of the first object lies beyond the second's on the relation's side: no overlap
            if sign < 0:
                assert first_px.max() < second_px.min()
            else:
                assert first_px.min() > second_px.max()


def test_write_shapes_refuses_foreign_shards(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="did not write"):
        write_shapes(tmp_path, train=5, val=0, size=16)


def test_write_shapes_replaces_its_own_stale_shards(tmp_path):
    write_shapes(tmp_path, train=30, val=0, size=16, shard_size=10)
    write_shapes(tmp_path, train=10, val=0, size=16, shard_size=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]
