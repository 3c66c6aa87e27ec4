"""`data encode --image-embeddings` (unCLIP's prior target): each sample's CLIP image embedding of its centre square,
float32 and unit-norm, the train split's mean and std in the manifest (one rank or two), read back into batches
(the same for a flipped latent), refused when absent, bad arrays counted and named."""

import io
import json
import logging
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from latent_fakes import POOLED, WIDTH, fake_encode_captions, fake_encode_images
from PIL import Image

from lit_diffusion.data.buckets import BucketConfig
from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.data.encode import encode_shards
from lit_diffusion.data.latents import LatentDecoder, encode_array, read_manifest, require_image_embeddings
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.data.shards import ExactlyOnceStream, SkipCounter, shard_samples

CLIP_SIZE = 16  # conftest's TINY_CLIP: its image tower's size, below the sources' 24 px, so CLIP's resize shows


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Square and 3:2 / 2:3 canvases (24x24, 32x16, 16x32): the centre crop matters."""
    out = tmp_path_factory.mktemp("sources")
    write_shapes(out, train=12, val=4, size=24, shard_size=6, seed=5, aspect_ratios="1:1,3:2,2:3", multiple=8)
    return out


@pytest.fixture(scope="module")
def clip(tiny_ckpts):
    from lit_diffusion.stages.clip import CLIPModule

    module = CLIPModule.from_checkpoint(tiny_ckpts["clip"]).eval()
    assert module.image_size == CLIP_SIZE
    return module


def _splits(sources) -> dict:
    return {"train": str(sources / "train-*.tar"), "val": str(sources / "val-*.tar")}


def _centre_square(png: bytes, size: int) -> torch.Tensor:
    """CLIP's view computed here, by hand: the centre square resized (bicubic) to `size`, float [3, S, S] in
    [-1, 1]."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    square = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).float() / 127.5 - 1


def _sources_by_key(sources, split: str) -> dict[str, dict]:
    """KEY -> raw source sample of `split` (the shapes' train and val keys both count from 0)."""
    return {raw["__key__"]: raw for p in sorted(sources.glob(f"{split}-*.tar"))
            for raw in shard_samples(str(p), SkipCounter())}


def _stored(out: Path, split: str, name: str = "image_embedding.npy") -> dict[str, np.ndarray]:
    """KEY -> its .image_embedding.npy (or member `name`) as written, from the output shards of `split`."""
    arrays = {}
    for path in sorted(out.glob(f"{split}/*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                if member == name:
                    arrays[key] = np.load(io.BytesIO(tar.extractfile(info).read()), allow_pickle=False)
    return arrays


def _expected(clip, raws: dict[str, dict], keys) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: clip.encode_image(_centre_square(raws[k]["png"], CLIP_SIZE)[None])[0] for k in keys}


def _assert_stats(manifest: dict, train: dict[str, np.ndarray]) -> None:
    stacked = np.stack(list(train.values())).astype(np.float64)  # [N, E]
    stats = manifest["image_embedding"]
    assert stats["dim"] == stacked.shape[1]
    np.testing.assert_allclose(stats["mean"], stacked.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std"], stacked.std(0), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------- real tiny CLIP and VAE


def test_cli_writes_clips_embedding_of_the_centre_square_and_the_train_statistics(tiny_ckpts, clip, sources,
                                                                                   tmp_path):
    from lit_diffusion.cli import main

    out = tmp_path / "lat"
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--train", str(sources / "train-*.tar"), "--val", str(sources / "val-*.tar"), "--out", str(out),
          "--image-size", "24", "--dtype", "float16", "--batch-size", "4", "--device", "cpu", "--image-embeddings"])
    manifest = read_manifest(out)
    assert manifest["image_embeddings"] is True and manifest["samples"] == 16
    assert require_image_embeddings(manifest, "the prior") is manifest["image_embedding"]
    assert manifest["image_embedding"]["dim"] == clip.embed_dim == 32
    assert json.loads((out / "encode.json").read_text())["image_embeddings"] is True

    stored = {split: _stored(out, split) for split in ("train", "val")}
    for split, arrays in stored.items():
        raws = _sources_by_key(sources, split)
        assert sorted(arrays) == sorted(raws)  # every sample
        expected = _expected(clip, raws, arrays)
        for key, array in arrays.items():
            assert array.dtype == np.float32 and array.shape == (32,)  # float32 though the latents are float16
            assert np.linalg.norm(array) == pytest.approx(1.0, abs=1e-5)
            torch.testing.assert_close(torch.from_numpy(array), expected[key], rtol=1e-5, atol=1e-5)
    _assert_stats(manifest, stored["train"])  # over the train split alone

    dm = LatentDataModule(train_urls=str(out / "train" / "*.tar"), val_urls=str(out / "val" / "*.tar"),
                          batch_size=4, num_workers=0, train_batches_per_epoch=2)
    dm.setup("fit")
    for split, batches in (("val", dm.val_dataloader()), ("train", dm.train_dataloader())):
        for batch in batches:
            embedding = batch["image_embedding"]
            assert embedding.dtype == torch.float32 and embedding.shape == (4, 32)
            assert torch.equal(embedding, torch.stack([torch.from_numpy(stored[split][k]) for k in batch["key"]]))


def test_buckets_and_flips_keep_the_centre_squares_embedding(clip, sources, tmp_path):
    """Latents at bucket sizes (random crops) and flipped ones: the embedding is still the centre square's, and a
    flipped latent's batch row carries the flipped centre square's (the decoder's condition describes its target);
    shards written without the flipped embeddings are refused for random_flip."""
    buckets = BucketConfig(base_size=24, step=8)
    manifest = encode_shards(_splits(sources), tmp_path, fake_encode_images, fake_encode_captions, image_size=24,
                             clip_hash="c", vae_hash="v", batch_size=4, progress=False, buckets=buckets, flips=True,
                             image_embeddings=True, embed_images=clip.encode_image, clip_image_size=CLIP_SIZE)
    assert {tuple(s) for s in manifest["latent_shapes"]} == {(3, 8, 4), (3, 6, 6), (3, 4, 8)}
    for split in ("train", "val"):
        stored, raws = _stored(tmp_path, split), _sources_by_key(sources, split)
        expected = _expected(clip, raws, stored)
        assert sorted(stored) == sorted(raws)
        for key, array in stored.items():
            torch.testing.assert_close(torch.from_numpy(array), expected[key], rtol=1e-5, atol=1e-5)
    stored = _stored(tmp_path, "train")
    _assert_stats(manifest, stored)
    assert manifest["image_embedding"]["flips"] is True
    stored_flip = _stored(tmp_path, "train", "image_embedding_flip.npy")
    raws = _sources_by_key(sources, "train")
    assert sorted(stored_flip) == sorted(raws)
    with torch.no_grad():
        for key, array in stored_flip.items():
            expected = clip.encode_image(_centre_square(raws[key]["png"], CLIP_SIZE).flip(-1)[None])[0]
            torch.testing.assert_close(torch.from_numpy(array), F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-5)

    dm = LatentDataModule(train_urls=str(tmp_path / "train" / "*.tar"), batch_size=2, num_workers=0,
                          train_batches_per_epoch=12, shuffle_buffer=1, random_flip=True, seed=0)
    decode = LatentDecoder.from_manifest(read_manifest(tmp_path))
    rows = 0
    for batch in dm.train_dataloader():
        for key, latent, embedding in zip(batch["key"], batch["latent"], batch["image_embedding"]):
            raw = next(s for p in sorted(tmp_path.glob("train/*.tar")) for s in shard_samples(str(p), SkipCounter())
                       if s["__key__"] == key)
            flipped, plain = decode(raw, flip=True), decode(raw)
            assert torch.equal(flipped["image_embedding"], torch.from_numpy(stored_flip[key]))
            assert torch.equal(plain["image_embedding"], torch.from_numpy(stored[key]))
            is_flipped = torch.equal(latent, flipped["latent"]) and not torch.equal(latent, plain["latent"])
            assert torch.equal(embedding, (flipped if is_flipped else plain)["image_embedding"])
            rows += is_flipped
    assert rows > 0  # some rows were flipped latents, with the flipped image's embedding

    manifest_path = tmp_path / "manifest.json"  # as shards encoded before the flipped embeddings were written
    old = json.loads(manifest_path.read_text())
    del old["image_embedding"]["flips"]
    manifest_path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="random_flip needs the flipped images' CLIP embeddings too, but .* encode "
                                         r"them again \(`data encode --flips --image-embeddings`\)"):
        LatentDataModule(train_urls=str(tmp_path / "train" / "*.tar"), batch_size=2, num_workers=0,
                         random_flip=True).setup("fit")

    with pytest.raises(ValueError, match=r"encode.json differs in clip_image_size, image_embeddings\)"):
        encode_shards(_splits(sources), tmp_path, fake_encode_images, fake_encode_captions, image_size=24,
                      clip_hash="c", vae_hash="v", batch_size=4, progress=False, buckets=buckets, flips=True)


# --------------------------------------------------------------------------------------------- fake encoders


def fake_embed_images(images: torch.Tensor) -> torch.Tensor:
    """images [B,3,S,S] -> [B,6], not normalised (the encoder normalises): channel means and stds."""
    return torch.cat([images.mean((2, 3)), images.std((2, 3)) + 0.1], 1)


def _fake_encode(sources, out, **kw):
    return encode_shards(_splits(sources), out, fake_encode_images, fake_encode_captions, image_size=24,
                         clip_hash="c", vae_hash="v", batch_size=4, progress=False, **kw)


def test_without_the_flag_no_embeddings_and_the_prior_is_told_how_to_get_them(sources, tmp_path):
    manifest = _fake_encode(sources, tmp_path)
    assert manifest["image_embeddings"] is False and "image_embedding" not in manifest
    assert not _stored(tmp_path, "train") and not _stored(tmp_path, "val")
    assert "image_embeddings" not in json.loads((tmp_path / "encode.json").read_text())
    with pytest.raises(ValueError, match=r"prior stage needs CLIP image embeddings, but the latent shards of "
                                         r".*manifest.json have none: .*`lit-diffusion data encode "
                                         r"--image-embeddings`"):
        require_image_embeddings(read_manifest(tmp_path), "the prior stage")
    dm = LatentDataModule(train_urls=str(tmp_path / "train" / "*.tar"), batch_size=4, num_workers=0,
                          train_batches_per_epoch=1)
    assert "image_embedding" not in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="image_embeddings needs embed_images and clip_image_size"):
        _fake_encode(sources, tmp_path / "none", image_embeddings=True)


def _rank_worker(rank: int, port: int, sources: str, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _fake_encode(Path(sources), out, image_embeddings=True, embed_images=fake_embed_images,
                     clip_image_size=CLIP_SIZE)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_the_statistics_of_every_train_sample(sources, tmp_path):
    """Train shards 0 and 1 go to ranks 0 and 1: rank 0's manifest counts rank 1's embeddings too."""
    mp.spawn(_rank_worker, args=(_free_port(), str(sources), str(tmp_path / "two")), nprocs=2, join=True)
    two = read_manifest(tmp_path / "two")
    one = _fake_encode(sources, tmp_path / "one", image_embeddings=True, embed_images=fake_embed_images,
                       clip_image_size=CLIP_SIZE)
    train = _stored(tmp_path / "two", "train")
    assert len(train) == 12
    _assert_stats(two, train)
    assert two["image_embedding"] == one["image_embedding"]
    for split in ("train", "val"):
        raws = _sources_by_key(sources, split)
        for key, array in _stored(tmp_path / "two", split).items():
            want = F.normalize(fake_embed_images(_centre_square(raws[key]["png"], CLIP_SIZE)[None]), dim=-1)[0]
            torch.testing.assert_close(torch.from_numpy(array), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad samples


def _members(key, embedding=None, drop=False):
    arrays = {"latent.npy": (torch.ones(3, 4, 4), "float16"), "context.npy": (torch.ones(2, WIDTH), "float16"),
              "pooled.npy": (torch.ones(POOLED), "float16"),
              "image_embedding.npy": (torch.ones(6) if embedding is None else embedding, "float32")}
    members = [(f"{key}.{m}", encode_array(a, dtype)) for m, (a, dtype) in arrays.items()
               if not (drop and m == "image_embedding.npy")]
    return members + [(f"{key}.txt", b"a red circle")]


def test_bad_image_embeddings_are_skipped_counted_and_named(tmp_path, caplog):
    members = (_members("good0") + _members("shape", embedding=torch.ones(5)) + _members("missing", drop=True)
               + [(n, encode_array(torch.ones(6), "float16") if n.endswith("image_embedding.npy") else d)
                  for n, d in _members("half")] + _members("good1"))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    decode = LatentDecoder((3, 4, 4), WIDTH, POOLED, "float16", image_embedding_dim=6)
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        read = list(ExactlyOnceStream([str(tmp_path / "s.tar")], None, counter=counter, decode=decode))
    assert [s["key"] for s in read] == ["good0", "good1"]
    assert all(s["image_embedding"].shape == (6,) for s in read)
    assert counter.counts()["bad_array"] == 2 and counter.counts()["missing_member"] == 1 and counter.total == 3
    text = caplog.text
    assert "sample 'shape' of shard" in text and ".image_embedding.npy has shape [5], expected [6]" in text
    assert "'missing'" in text and "no .image_embedding.npy" in text
    assert "'half'" in text and ".image_embedding.npy has dtype float16, the manifest says float32" in text
