"""Latent shards: encode (fake encoders, and the CLI with real tiny stages), read back, resume a killed job byte for
byte, 2 gloo ranks, manifests refused, bad samples counted."""

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from latent_fakes import (
    POOLED,
    WIDTH,
    fake_encode_captions,
    fake_encode_images,
    fake_encode_images_with_std,
)

from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.data.encode import encode_shards
from lit_diffusion.data.latents import (
    LatentDecoder,
    collate_latents,
    encode_array,
    read_manifest,
    state_dict_hash,
)
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.data.shards import (
    ExactlyOnceStream,
    SkipCounter,
    decode_sample,
    images_to_float,
    shard_samples,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_shapes(out, train=30, val=8, size=16, shard_size=10, seed=3)  # 3 train shards of 10
    return out


def _encode(images, out, **kw):
    kw = {"image_size": 16, "clip_hash": "c0ffee", "vae_hash": "beef", "batch_size": 4, "progress": False, **kw}
    encoder = kw.pop("encoder", fake_encode_images_with_std if kw.get("std") else fake_encode_images)
    return encode_shards(str(images / "train-*.tar"), out, encoder, fake_encode_captions, **kw)


def _source_samples(images):
    counter = SkipCounter()
    urls = sorted(str(p) for p in images.glob("train-*.tar"))
    return [decode_sample(raw, 16) for url in urls for raw in shard_samples(url, counter)]


def _read(out, **kw):
    manifest = read_manifest(out)
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    counter = SkipCounter()
    decode = LatentDecoder.from_manifest(manifest)
    return list(ExactlyOnceStream(urls, None, counter=counter, decode=decode, **kw)), counter, manifest


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_encode_then_read_equals_the_encoders_outputs(images, tmp_path, dtype):
    manifest = _encode(images, tmp_path, dtype=dtype, flips=True, std=True)
    read, counter, on_disk = _read(tmp_path)
    source = _source_samples(images)
    assert manifest == {k: v for k, v in on_disk.items() if k != "path"}
    assert manifest["samples"] == 30 and [s["samples"] for s in manifest["shards"]] == [10, 10, 10]
    assert manifest["shapes"] == {"latent": [3, 4, 4], "context": [None, WIDTH], "pooled": [POOLED]}
    assert (manifest["dtype"], manifest["flips"], manifest["std"]) == (dtype, True, True)
    assert counter.total == 0 and [s["key"] for s in read] == [s["key"] for s in source]
    torch_dtype = getattr(torch, dtype)
    for got, src in zip(read, source):
        image = images_to_float(src["image"])[None]  # [1, 3, 16, 16]
        mean, std = fake_encode_images_with_std(image)
        context, mask, pooled = fake_encode_captions([src["caption"]])
        # stored in `dtype`, read back as float32: equal to the encoder's output rounded to that dtype
        assert torch.equal(got["latent"], mean[0].to(torch_dtype).float())
        assert torch.equal(got["latent_std"], std[0].to(torch_dtype).float())
        assert torch.equal(got["context"], context[0][mask[0]].to(torch_dtype).float())  # [n, W], no padding
        assert torch.equal(got["pooled"], pooled[0].to(torch_dtype).float())
        assert got["caption"] == src["caption"] and got["attrs"] == src["attrs"]
        flipped = LatentDecoder.from_manifest(on_disk)({**_raw(tmp_path, got["key"])}, flip=True)
        assert torch.equal(flipped["latent"], fake_encode_images(image.flip(-1))[0].to(torch_dtype).float())
    if dtype == "float16":
        assert np.load(io.BytesIO(_raw(tmp_path, read[0]["key"])["latent.npy"])).dtype == np.float16
    if dtype == "bfloat16":  # stored as the bfloat16 bits: the top half of the float32 bits, rounded
        stored = np.load(io.BytesIO(_raw(tmp_path, read[0]["key"])["latent.npy"]))
        assert stored.dtype == np.uint16
        bits = read[0]["latent"].numpy().view(np.uint32) >> 16
        assert np.array_equal(stored.astype(np.uint32), bits)


def _raw(out, key):
    for tar_path in sorted(Path(out).glob("*.tar")):
        for sample in shard_samples(str(tar_path), SkipCounter()):
            if sample["__key__"] == key:
                return sample
    raise KeyError(key)


def test_latent_batches_pad_context_and_mask_real_tokens(images, tmp_path):
    _encode(images, tmp_path / "lat")
    shutil.copytree(tmp_path / "lat", tmp_path / "val")  # the same shards as a val split
    dm = LatentDataModule(train_urls=str(tmp_path / "lat"), val_urls=str(tmp_path / "val" / "train-*.tar"),
                          batch_size=4, num_workers=0, train_batches_per_epoch=3, shuffle_buffer=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    lengths = [len(c.split()) + 1 for c in batch["caption"]]
    assert batch["context"].shape == (4, max(lengths), WIDTH) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == lengths
    assert not batch["context"][~batch["mask"]].any()  # padding is zeros, not the encoder's masked garbage
    assert batch["latent"].dtype == torch.float32 and batch["latent"].shape == (4, 3, 4, 4)
    samples = _read(tmp_path / "lat")[0][:4]  # the val stream's first batch, one by one
    fixed = collate_latents(samples, context_length=20)
    assert fixed["context"].shape == (4, 20, WIDTH) and fixed["mask"].sum(1).tolist() == lengths
    assert torch.equal(fixed["context"][:, : max(lengths)], batch["context"])
    train = list(dm.train_dataloader())
    assert len(train) == 3 and all(b["latent"].shape == (4, 3, 4, 4) for b in train)


def test_latent_val_split_sees_every_sample_once_across_2_ranks_x_2_workers(images, tmp_path, monkeypatch):
    _encode(images, tmp_path)
    keys = []
    for rank in range(2):
        dm = LatentDataModule(val_urls=str(tmp_path / "train-*.tar"), batch_size=4, num_workers=2)
        monkeypatch.setattr(dm, "rank_and_world_size", lambda rank=rank: (rank, 2))
        keys += [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert sorted(keys) == sorted(s["key"] for s in _source_samples(images))  # 30 keys, none twice


def test_random_flip_draws_the_flipped_latent(images, tmp_path):
    _encode(images, tmp_path, flips=True)
    dm = LatentDataModule(train_urls=str(tmp_path), batch_size=5, num_workers=0, train_batches_per_epoch=6,
                          shuffle_buffer=1, random_flip=True, seed=1)
    decode = LatentDecoder.from_manifest(read_manifest(tmp_path))
    flipped = 0
    for batch in dm.train_dataloader():
        for key, latent in zip(batch["key"], batch["latent"]):
            raw = _raw(tmp_path, key)
            plain, mirrored = decode(raw)["latent"], decode(raw, flip=True)["latent"]
            assert torch.equal(latent, mirrored) or torch.equal(latent, plain)
            flipped += torch.equal(latent, mirrored) and not torch.equal(latent, plain)
    assert 5 <= flipped <= 25  # of 30 draws, p = 0.5 (seeded, so not flaky)
    with pytest.raises(ValueError, match="flipped latents.*--flips"):
        _encode(images, tmp_path / "noflip")
        LatentDataModule(train_urls=str(tmp_path / "noflip"), random_flip=True, num_workers=0).setup("fit")


# --------------------------------------------------------------------------------------- ranks and resumption


def _rank_worker(rank: int, port: int, images: str, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seen = []

        def counting(images_batch):
            seen.append(images_batch.shape[0])
            return fake_encode_images(images_batch)

        manifest = encode_shards(f"{images}/train-*.tar", out, counting, fake_encode_captions, image_size=16,
                                 clip_hash="c", vae_hash="v", batch_size=4, progress=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"encoded": sum(seen), "manifest": manifest}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_encode_disjoint_samples_whose_union_is_the_input(images, tmp_path):
    mp.spawn(_rank_worker, args=(_free_port(), str(images), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # shard i -> rank i % 2: rank 0 encodes shards 0 and 2, rank 1 shard 1; every sample exactly once
    assert [r["encoded"] for r in reports] == [20, 10]
    assert reports[1]["manifest"] is None and reports[0]["manifest"]["samples"] == 30
    keys = [s["__key__"] for p in sorted(tmp_path.glob("*.tar")) for s in shard_samples(str(p), SkipCounter())]
    assert sorted(keys) == sorted(s["key"] for s in _source_samples(images)) and len(set(keys)) == 30
    assert read_manifest(tmp_path)["samples"] == 30


KILLER = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {root!r}]
from latent_fakes import fake_encode_images, fake_encode_captions
from lit_diffusion.data.encode import encode_shards
calls = 0
def encode(images):
    global calls
    calls += 1
    if calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # as a preempted job dies: no cleanup, no exception handlers
    return fake_encode_images(images)
encode_shards({urls!r}, {out!r}, encode, fake_encode_captions, image_size=16, clip_hash="c", vae_hash="v",
              batch_size=4, dtype="float16", flips=True, progress=False)
"""


def test_a_killed_job_resumes_and_its_shards_equal_an_uninterrupted_run_byte_for_byte(images, tmp_path):
    urls = str(images / "train-*.tar")
    # batches of 4 per shard of 10 (4, 4, 2), two encoder calls each (plain, flipped): call 9 is inside shard 1
    script = KILLER.format(tests=str(TESTS), root=str(ROOT), kill_at=9, urls=urls, out=str(tmp_path / "resumed"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr
    resumed = tmp_path / "resumed"
    assert sorted(p.name for p in resumed.iterdir()) == ["encode.json", "train-000000.tar", "train-000001.tar.tmp"]
    assert not (resumed / "manifest.json").exists()
    first_shard = (resumed / "train-000000.tar").stat()

    calls = []

    def counting(batch):
        calls.append(batch.shape[0])
        return fake_encode_images(batch)

    manifest = encode_shards(urls, resumed, counting, fake_encode_captions, image_size=16, clip_hash="c",
                             vae_hash="v", batch_size=4, dtype="float16", flips=True, progress=False)
    assert sum(calls) == 2 * 20  # shards 1 and 2 only, plain and flipped: the complete shard 0 was kept
    assert (resumed / "train-000000.tar").stat().st_mtime_ns == first_shard.st_mtime_ns
    _encode(images, tmp_path / "straight", dtype="float16", flips=True)
    names = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in resumed.iterdir()) == ["encode.json", "manifest.json", *names]
    for name in names:
        assert (resumed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert manifest["shards"] == read_manifest(tmp_path / "straight")["shards"]
    with pytest.raises(ValueError, match=r"encode.json differs in dtype\): rerun that job's command"):
        # another job's settings would mix two kinds of shards under one manifest
        _encode(images, resumed, dtype="float32", flips=True, clip_hash="c", vae_hash="v")


# ------------------------------------------------------------------------------------------- refused manifests


def test_manifest_missing_mismatched_or_of_other_weights_is_refused(images, tmp_path):
    out = tmp_path / "lat"
    _encode(images, out)
    ok = LatentDataModule(train_urls=str(out), expected_hashes={"clip": "c0ffee", "vae": "beef"}, num_workers=0)
    ok.setup("fit")
    assert ok.manifest["samples"] == 30
    for name, hashes in (("CLIP", {"clip": "f00d"}), ("VAE", {"clip": "c0ffee", "vae": "cafe"})):
        have, want = ("c0ffee", "f00d") if name == "CLIP" else ("beef", "cafe")
        with pytest.raises(ValueError, match=f"manifest.json.*{name} weights {have}.*{name} weights are {want}"):
            LatentDataModule(train_urls=str(out), expected_hashes=hashes, num_workers=0).setup("fit")

    shutil.copy(out / "train-000001.tar", out / "train-000007.tar")  # a shard the manifest does not list
    with pytest.raises(ValueError, match="train-000007.tar is not listed in .*manifest.json"):
        LatentDataModule(train_urls=str(out), num_workers=0).setup("fit")
    (out / "train-000007.tar").unlink()
    with open(out / "train-000002.tar", "ab") as f:  # a shard changed after encoding
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="train-000002.tar has .* bytes, .*manifest.json says"):
        LatentDataModule(train_urls=str(out), num_workers=0).setup("fit")
    (out / "train-000002.tar").write_bytes((out / "train-000002.tar").read_bytes()[:-512])
    # the same shards from another encode job (other weights): one manifest found beside the first shard checked
    # them all by name and size, so the other job's shards passed its hashes
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "clip_hash": "f00d"}))
    with pytest.raises(ValueError, match=r"latent shards of several encode jobs \(.*lat/manifest.json, .*other/"):
        LatentDataModule(train_urls=f"{out}/train-000000.tar::{other}/train-000001.tar",
                         expected_hashes={"clip": "c0ffee", "vae": "beef"}, num_workers=0).setup("fit")
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lat/manifest.json does not exist"):
        LatentDataModule(train_urls=str(out), num_workers=0).setup("fit")


# ---------------------------------------------------------------------------------------------- bad samples


def _bucket_split(root, split, shape, std=False, n=4):
    """One split's latent shard and manifest, as a `data encode` run of that split alone writes them."""
    from lit_diffusion.data.latents import FORMAT, VERSION, LatentShardWriter, write_manifest

    out = root / split
    out.mkdir(parents=True)
    writer = LatentShardWriter(out / "000000.tar", "float32")
    for i in range(n):
        size = torch.tensor([16.0 * shape[1], 16.0 * shape[2], 0, 0, 16.0 * shape[1], 16.0 * shape[2]])
        writer.write(f"{split}{i}", torch.full(shape, float(i)), torch.zeros(3, 8), torch.zeros(8), f"{split} {i}",
                     size=size, **({"latent_std": torch.ones(shape)} if std else {}))
    path = writer.commit()
    write_manifest(out, {"format": FORMAT, "version": VERSION, "clip_hash": "c", "vae_hash": "v", "dtype": "float32",
                         "flips": False, "std": std, "image_size": 128, "samples": n,
                         "shapes": {"latent": [4, None, None], "context": [None, 8], "pooled": [8]},
                         "buckets": [[128, 128], [128, 256]], "latent_shapes": [list(shape)],
                         "shards": [{"name": "000000.tar", "source": f"{split}.tar", "samples": n,
                                     "bytes": os.path.getsize(path)}]})
    return str(path)


def test_splits_encoded_apart_are_each_read_with_their_own_manifest(tmp_path):
    """Train and val encoded by two `data encode` runs at other buckets: each split's latents are checked against
    its own manifest's shapes (the val manifest's had rejected every wide train latent as a bad sample)."""
    train = _bucket_split(tmp_path / "a", "train", (4, 8, 16))
    val = _bucket_split(tmp_path / "a", "val", (4, 8, 8))
    dm = LatentDataModule(train_urls=train, val_urls=val, batch_size=2, num_workers=0, train_batches_per_epoch=2,
                          shuffle_buffer=1)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and {tuple(b["latent"].shape[1:]) for b in batches} == {(4, 8, 16)}
    assert not any(dm.skipped()["train"].values())
    assert {tuple(b["latent"].shape) for b in dm.val_dataloader()} == {(2, 4, 8, 8)}
    # a std split beside one without: the model would sample posteriors in one and not the other
    with_std = _bucket_split(tmp_path / "b", "train", (4, 8, 16), std=True)
    dm = LatentDataModule(train_urls=with_std, val_urls=val, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="disagree on shapes, dtype, image embeddings or std"):
        dm.setup("fit")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _latent_members(key, latent=None, context=None, pooled=None, dtype="float16", drop=()):
    arrays = {"latent.npy": torch.ones(3, 4, 4) if latent is None else latent,
              "context.npy": torch.ones(2, WIDTH) if context is None else context,
              "pooled.npy": torch.ones(POOLED) if pooled is None else pooled}
    members = [(f"{key}.{m}", encode_array(a, dtype)) for m, a in arrays.items() if m not in drop]
    return members + [(f"{key}.txt", b"a red circle")]


def test_bad_latent_samples_are_skipped_counted_and_named(tmp_path, caplog):
    f64 = io.BytesIO()
    np.save(f64, np.ones((3, 4, 4)))  # float64: not the manifest's dtype
    members = (_latent_members("good0") + _latent_members("shape", latent=torch.ones(4, 4, 4))
               + [(n, f64.getvalue() if n.endswith("latent.npy") else d) for n, d in _latent_members("dtype")]
               + _latent_members("nocontext", drop=("context.npy",))
               + [(n, d[:40] if n.endswith("pooled.npy") else d) for n, d in _latent_members("cut")]
               + _latent_members("width", context=torch.ones(2, WIDTH + 1)) + _latent_members("good1"))
    _tar(tmp_path / "s.tar", members)
    decode = LatentDecoder((3, 4, 4), WIDTH, POOLED, "float16")
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="lit_diffusion.data.shards"):
        keys = [s["key"] for s in ExactlyOnceStream([str(tmp_path / "s.tar")], None, counter=counter, decode=decode)]
    assert keys == ["good0", "good1"]
    assert counter.counts()["bad_array"] == 4 and counter.counts()["missing_member"] == 1 and counter.total == 5
    text = caplog.text
    assert "sample 'shape' of shard" in text and "s.tar" in text
    assert "shape [4, 4, 4], the manifest says [3, 4, 4]" in text
    assert "'dtype'" in text and "dtype float64, the manifest says float16" in text
    assert "'nocontext'" in text and "no .context.npy" in text and "'cut'" in text and "'width'" in text


def test_state_dict_hash_names_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = net.state_dict()
    h = state_dict_hash(sd)
    assert len(h) == 64 and h == state_dict_hash(dict(reversed(list(sd.items()))))
    assert h == state_dict_hash({k: v.clone() for k, v in sd.items()})
    changed = {k: v.clone() for k, v in sd.items()}
    changed["0.weight"][1, 2] += 1e-6
    assert state_dict_hash(changed) != h
    assert state_dict_hash({k: v.to(torch.bfloat16) for k, v in sd.items()}) != h  # other bytes, other weights


# ------------------------------------------------------------------------------- the CLI with real tiny stages


def test_cli_data_encode_with_real_clip_and_vae(tiny_ckpts, tmp_path):
    from lit_diffusion.cli import main
    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    data = tiny_ckpts["data"]
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--data", str(data / "val-*.tar"), "--out", str(tmp_path), "--dtype", "float32", "--batch-size", "16",
          "--device", "cpu"])
    clip, vae = CLIPModule.from_checkpoint(tiny_ckpts["clip"]), VAEModule.from_checkpoint(tiny_ckpts["vae"])
    read, counter, manifest = _read(tmp_path)
    assert manifest["clip_hash"] == state_dict_hash(clip.state_dict())
    assert manifest["vae_hash"] == state_dict_hash(vae.state_dict())
    assert manifest["image_size"] == 16 and manifest["samples"] == 64 == len(read) and counter.total == 0
    assert manifest["latent_scale"]["scale_factor"] == pytest.approx(float(vae.scale_factor))
    source = [decode_sample(raw, 16) for raw in shard_samples(str(data / "val-000000.tar"), SkipCounter())]
    with torch.no_grad():
        images = images_to_float(torch.stack([s["image"] for s in source[:16]]))
        latents = vae.encode(images)
        tokens = clip.tokenize([s["caption"] for s in source[:16]])
        features, pooled = clip.encode_text(tokens)
    for i in range(16):
        real = clip.tokenizer.mask(tokens)[i]
        # the same batch of 16 as the encode job: float32 latents equal the online encoding to float tolerance
        torch.testing.assert_close(read[i]["latent"], latents[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(read[i]["context"], features[i][real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(read[i]["pooled"], pooled[i], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_under_torchrun_writes_what_one_process_writes(tiny_ckpts, tmp_path):
    """`torchrun --nproc-per-node 2 -m lit_diffusion data encode`: each rank joins the launcher's process group
    and encodes its shards; the shards and manifest equal a one-process run's."""
    from lit_diffusion.cli import main

    args = ["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
            "--data", str(tiny_ckpts["data"] / "train-*.tar"), "--batch-size", "32", "--device", "cpu"]
    main([*args, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "lit_diffusion", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert two["samples"] == 256 and {k: v for k, v in one.items() if k != "path"} == {
        k: v for k, v in two.items() if k != "path"}
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["name"]).read_bytes() == (tmp_path / "two" / shard["name"]).read_bytes()


@pytest.mark.parametrize("error,raised", [(MemoryError, MemoryError), (ValueError, "BadSample")])
def test_an_out_of_memory_error_is_raised_not_counted_as_a_bad_sample(monkeypatch, error, raised):
    """A sample whose arrays or image fail to decode is skipped and counted; an error of the process (out of
    memory) is not the sample's: counting it would silently shift the stream (a run then trains on other samples
    than its resumed copy), so it is raised."""
    import PIL.Image

    from lit_diffusion.data import latents as latents_module
    from lit_diffusion.data.shards import BadSample, decode_sample

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 2), dtype=np.float32))
    png = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(png, format="PNG")

    def fail(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(latents_module.np, "load", fail)
    monkeypatch.setattr(PIL.Image, "open", fail)
    expected = BadSample if raised == "BadSample" else raised
    with pytest.raises(expected, match="injected"):
        latents_module.decode_array(buffer.getvalue(), "float32", "latent.npy")
    with pytest.raises(expected, match="injected"):
        decode_sample({"__key__": "k", "png": png.getvalue(), "txt": b"a red circle"}, 8)


def test_an_imported_vocabulary_keeps_its_end_of_text_features_in_the_shards(tiny_ckpts, monkeypatch):
    """A Hugging Face tokenizer pads with its end-of-text token: `tokens != pad_id` dropped that row from every
    stored caption, while the empty caption of condition dropout and every prompt at sampling keep it
    (`Tokenizer.mask`). Shards of the old mask are refused for such a tokenizer, kept for ours."""
    from lit_diffusion.data.latents import TEXT_MASK, check_text_mask
    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.encoders import frozen_encoders

    load = CLIPModule.from_checkpoint

    def pads_with_eot(path, **kw):
        clip = load(path, **kw)
        clip.tokenizer.pad_id, clip.tokenizer._explicit_pad = clip.tokenizer.eot_id, True
        return clip

    monkeypatch.setattr(CLIPModule, "from_checkpoint", pads_with_eot)
    encoders = frozen_encoders(str(tiny_ckpts["clip"]), str(tiny_ckpts["vae"]))
    captions = ["a large red circle", "a small blue square above a green triangle"]
    with torch.no_grad():
        features, mask, pooled = encoders.encode_captions(captions)
        online = pads_with_eot(str(tiny_ckpts["clip"])).caption_conditions(captions)
    assert torch.equal(mask, online.mask) and torch.equal(features, online.context)
    tok = pads_with_eot(str(tiny_ckpts["clip"])).tokenizer
    assert mask.sum(1).tolist() == [len(tok.encode(c)) + 2 for c in captions]  # start, words, end of text
    old = {"path": "old/manifest.json"}
    with pytest.raises(ValueError, match="old/manifest.json: these caption features were encoded without the end"):
        check_text_mask(old, tok)
    check_text_mask({**old, "text_mask": TEXT_MASK}, tok)
    check_text_mask(old, load(str(tiny_ckpts["clip"])).tokenizer)  # our own <pad>: the two masks agree

