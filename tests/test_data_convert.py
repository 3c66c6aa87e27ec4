import csv
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from lit_diffusion.data.convert import convert
from lit_diffusion.data.shards import ExactlyOnceStream, expand_urls


def _image(path, color, size=(20, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _read_split(out, split):
    stream = ExactlyOnceStream(expand_urls(out, split=split), 12)
    return {s["attrs"]["source"]: s for s in stream}


def _members(out, split):
    names = []
    for url in expand_urls(out, split=split):
        with tarfile.open(url) as tar:
            names += tar.getnames()
    return names


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.png", (255, 0, 0))
    (root / "a.txt").write_text("a red box")
    _image(root / "sub" / "b.jpg", (0, 0, 255), fmt="JPEG")
    (root / "sub" / "b.txt").write_text("  a blue box\n")
    (root / "sub" / "b.json").write_text('{"colour": "blue"}')
    _image(root / "c.png", (0, 255, 0))  # no caption
    (root / "d.png").write_bytes(b"\x89PNG broken")
    (root / "d.txt").write_text("broken")
    return root


def test_convert_folder(folder, tmp_path):
    out = tmp_path / "shards"
    info = convert(folder, out, shard_size=1)
    assert info["counts"] == {"train": 2}
    assert info["skipped"] == {"missing_caption": 1, "bad_image": 1}
    assert info["shards"]["train"] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "info.json").read_text())["urls"]["train"] == str(out / "train-{000000..000001}.tar")
    assert _members(out, "train") == [
        "000000000.json", "000000000.png", "000000000.txt", "000000001.jpg", "000000001.json", "000000001.txt",
    ]
    samples = _read_split(out, "train")
    red = samples[str(folder / "a.png")]
    assert red["caption"] == "a red box" and red["key"] == "000000000"
    assert (red["image"][0] == 255).all() and (red["image"][1:] == 0).all()  # 20x12 centre-cropped to 12x12
    blue = samples[str(folder / "sub" / "b.jpg")]
    assert blue["caption"] == "a blue box" and blue["attrs"]["colour"] == "blue"
    assert (blue["image"][2] > 240).all() and (blue["image"][:2] < 15).all()
    # JPEG bytes are stored untouched
    with tarfile.open(out / "train-000001.tar") as tar:
        assert tar.extractfile("000000001.jpg").read() == (folder / "sub" / "b.jpg").read_bytes()


def test_convert_csv_and_jsonl_with_val_split(tmp_path):
    images = tmp_path / "pics"
    rows = []
    for i in range(40):
        _image(images / f"{i}.png", (i * 6, 100, 200 - i * 5))
        rows.append({"file": f"pics/{i}.png", "text": f"picture number {i}"})
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "text"])
        writer.writeheader()
        writer.writerows(rows[:20])
    lines = [json.dumps({"file": r["file"], "text": r["text"], "score": 0.5}) for r in rows[20:]]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"file": "pics/0.png", "text": None}))  # stored as the caption "None"
    lines.insert(7, json.dumps({"file": "pics/1.png", "text": ["a", "list"]}))  # stored as its repr
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")

    out = tmp_path / "out"
    info = convert(
        [tmp_path / "list.csv", tmp_path / "list.jsonl"], out, val_fraction=0.25, seed=0,
        path_key="file", caption_key="text", shard_size=8,
    )
    assert info["skipped"] == {"bad_row": 3}
    assert info["counts"]["train"] + info["counts"]["val"] == 40 and 3 <= info["counts"]["val"] <= 20
    train, val = _read_split(out, "train"), _read_split(out, "val")
    assert not set(train) & set(val)
    for source, sample in {**train, **val}.items():
        i = int(source.rsplit("/", 1)[1].split(".")[0])
        assert sample["caption"] == f"picture number {i}"
        expected = np.array(Image.open(images / f"{i}.png").crop((4, 0, 16, 12)))
        np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
        if i >= 20:
            assert sample["attrs"]["score"] == 0.5
    # the split depends on the source, not on the run
    again = convert([tmp_path / "list.csv", tmp_path / "list.jsonl"], tmp_path / "again", val_fraction=0.25,
                    path_key="file", caption_key="text")
    assert again["counts"] == info["counts"]


def test_convert_errors(tmp_path, folder):
    with pytest.raises(ValueError, match="does not exist"):
        convert(tmp_path / "missing-dir", tmp_path / "o")
    (tmp_path / "bad.csv").write_text("image,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match=r"bad.csv: needs columns 'path' and 'caption'.*'image'"):
        convert(tmp_path / "bad.csv", tmp_path / "o")
    convert(folder, tmp_path / "o2")
    with pytest.raises(ValueError, match="already holds train-000000.tar"):
        convert(folder, tmp_path / "o2")
    assert convert(folder, tmp_path / "o2", overwrite=True)["counts"] == {"train": 2}
    assert convert(folder, tmp_path / "o3", prefix="val")["shards"] == {"val": ["val-000000.tar"]}
    # a missing input among good ones fails before anything is written, or replaced with --overwrite
    before = (tmp_path / "o2" / "train-000000.tar").read_bytes()
    with pytest.raises(ValueError, match="'imgz' does not exist"):
        convert([folder, "imgz"], tmp_path / "o2", overwrite=True)
    assert (tmp_path / "o2" / "train-000000.tar").read_bytes() == before
    with pytest.raises(ValueError, match="'imgz' does not exist"):
        convert([folder, "imgz"], tmp_path / "o4")
    assert not list((tmp_path / "o4").glob("*"))


def test_the_cli_sets_the_table_columns_and_overwrites_on_request(tmp_path, folder, capsys):
    from lit_diffusion.cli import main

    (tmp_path / "t.csv").write_text(f"image,text\n{folder / 'a.png'},a red box\n")
    with pytest.raises(SystemExit):
        main(["data", "convert", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o")])
    assert "(set --path-key / --caption-key)" in capsys.readouterr().err
    main(["data", "convert", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--path-key", "image",
          "--caption-key", "text"])
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 1}
    assert [s["caption"] for s in _read_split(tmp_path / "o", "train").values()] == ["a red box"]
    with pytest.raises(SystemExit):
        main(["data", "convert", str(folder), "--out", str(tmp_path / "o")])
    assert "pass --overwrite" in capsys.readouterr().err
    main(["data", "convert", str(folder), "--out", str(tmp_path / "o"), "--overwrite"])
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 2}


def test_a_phone_jpeg_keeps_its_bytes_and_orientation(tmp_path):
    """Many phone and camera JPEGs open as MPO in Pillow: they were re-encoded as PNG, which drops EXIF, so the
    stored image lay on its side."""
    import tarfile

    from lit_diffusion.data.shards import image_size_of

    folder = tmp_path / "in"
    folder.mkdir()
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: 20 wide, 40 high
    image.save(folder / "a.jpg", format="MPO", save_all=True, append_images=[image], exif=exif)
    (folder / "a.txt").write_text("a photo")
    source = (folder / "a.jpg").read_bytes()
    assert Image.open(folder / "a.jpg").format == "MPO" and image_size_of(source) == (40, 20)
    convert(folder, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        stored = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    assert stored["jpg"] == source and image_size_of(stored["jpg"]) == (40, 20)

