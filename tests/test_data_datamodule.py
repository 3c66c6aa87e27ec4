import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.shapes import render, write_shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm")
    write_shapes(out, train=120, val=37, size=16, shard_size=10, seed=1)  # 12 train shards, 4 val shards
    return out


def _dm(data, **kw):
    args = dict(
        train_urls=str(data / "train-{000000..000011}.tar"),
        val_urls=str(data / "val-*.tar"),
        image_size=16,
        batch_size=4,
        num_workers=0,
        train_batches_per_epoch=3,
        shuffle_buffer=20,
    )
    args.update(kw)
    dm = ImageCaptionDataModule(**args)
    return dm


def _as_rank(dm, rank, world):
    dm.rank_and_world_size = lambda: (rank, world)
    return dm


def _val_keys(dm):
    return [k for batch in dm.val_dataloader() for k in batch["key"]]


@pytest.mark.parametrize("val_urls", ["val-*.tar", "val-000003.tar"], ids=["4-shards", "1-shard"])
def test_val_exactly_once_across_2_ranks_x_2_workers(data, val_urls):
    per_rank = []
    for rank in range(2):
        dm = _as_rank(_dm(data, val_urls=str(data / val_urls), num_workers=2, persistent_workers=False), rank, 2)
        dm.setup("validate")
        per_rank.append(_val_keys(dm))
    keys = per_rank[0] + per_rank[1]
    expected = [f"{i:09d}" for i in range(37)] if val_urls == "val-*.tar" else [f"{i:09d}" for i in range(30, 37)]
    assert sorted(keys) == expected  # every sample once: nothing lost, nothing doubled
    # rank r reads the running indices i with i % 4 in {2r, 2r+1}
    assert sorted(per_rank[0]) == [k for j, k in enumerate(expected) if j % 4 in (0, 1)]


def test_val_max_samples_is_a_prefix_before_splitting(data):
    keys = []
    for rank in range(3):
        dm = _as_rank(_dm(data, val_max_samples=15), rank, 3)
        dm.setup("validate")
        keys += _val_keys(dm)
    assert sorted(keys) == [f"{i:09d}" for i in range(15)]


def test_eval_dataloader_takes_a_prefix_without_setup(data):
    dm = _dm(data, train_urls=None, num_workers=2, persistent_workers=False)
    assert sorted(k for b in dm.eval_dataloader(11) for k in b["key"]) == [f"{i:09d}" for i in range(11)]
    assert len([k for b in dm.eval_dataloader() for k in b["key"]]) == 37
    with pytest.raises(ValueError, match="val_urls is required"):
        _dm(data, val_urls=None).eval_dataloader(5)


def test_batches_are_exact_images_and_captions(data):
    dm = _dm(data, batch_size=5)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "size", "caption", "attrs", "key"}
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    # SDXL's size condition: the originals' size, nothing cropped from a square, 16 px targets
    side = float(batch["attrs"][0]["image_size"])
    assert torch.equal(batch["size"], torch.tensor([[side, side, 0.0, 0.0, 16.0, 16.0]] * 5))
    for image, caption, attrs in zip(batch["image"], batch["caption"], batch["attrs"]):
        assert caption == attrs["caption"]
        expected = torch.from_numpy(np.array(render(attrs, 16))).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(image, expected)


def _empty_tar(path):
    with tarfile.open(path, "w"):
        pass
    return str(path)


@pytest.mark.timeout(120)
def test_resampled_train_survives_uneven_shards(data, tmp_path):
    # one shard with 10 samples and one without any, read by 3 ranks x 2 workers: no rank may run dry or hang
    urls = [str(data / "train-000004.tar"), _empty_tar(tmp_path / "train-000001.tar")]
    for rank in range(3):
        dm = _as_rank(_dm(data, train_urls=urls, num_workers=2, train_batches_per_epoch=5), rank, 3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert len(loader) == 5
        for _ in range(2):
            batches = list(loader)
            assert len(batches) == 5 and all(b["image"].shape == (4, 3, 16, 16) for b in batches)
            assert {k for b in batches for k in b["key"]} <= {f"{i:09d}" for i in range(40, 50)}
        del loader


def _rendered(attrs, size=16):
    return torch.from_numpy(np.array(render(attrs, size))).permute(2, 0, 1).float() / 127.5 - 1


def _train_keys(dm, epochs=1):
    loader = dm.train_dataloader()
    return [[k for b in loader for k in b["key"]] for _ in range(epochs)]


def test_train_stream_is_seeded_per_seed_rank_and_epoch(data):
    dm = _dm(data)
    dm.setup("fit")
    first = _train_keys(dm, epochs=2)
    again = _dm(data)
    again.setup("fit")
    assert _train_keys(again, epochs=2) == first
    assert first[0] != first[1]  # the stream moves on between epochs
    other_seed = _dm(data, seed=1)
    other_seed.setup("fit")
    assert _train_keys(other_seed) != first[:1]
    rank1 = _as_rank(_dm(data), 1, 2)
    rank1.setup("fit")
    assert _train_keys(rank1) != first[:1]


def test_fresh_workers_draw_new_shards_each_epoch(data):
    dm = _dm(data, num_workers=1, persistent_workers=False, shuffle_buffer=1, train_batches_per_epoch=2)
    dm.setup("fit")
    epochs = _train_keys(dm, epochs=3)
    assert len({tuple(e) for e in epochs}) == 3
    assert dm.state_dict() == {"epoch": 2}


def test_random_flip_mirrors_some_images(data):
    dm = _dm(data, random_flip=True, train_batches_per_epoch=10)
    dm.setup("fit")
    flipped = Counter()
    for batch in dm.train_dataloader():
        for image, attrs in zip(batch["image"], batch["attrs"]):
            plain = _rendered(attrs)
            if torch.equal(image, plain) and torch.equal(image, plain.flip(-1)):
                continue  # symmetric image
            assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
            flipped[torch.equal(image, plain.flip(-1))] += 1
    assert flipped[True] > 0 and flipped[False] > 0


def test_skips_in_workers_are_counted_in_the_main_process(data, tmp_path):
    (tmp_path / "val-000001.tar").write_bytes(b"")  # a broken shard: every reader meets it, one reports it
    with tarfile.open(data / "val-000003.tar") as src, tarfile.open(tmp_path / "val-000000.tar", "w") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name == "000000032.png":
                payload = b"garbage"
                member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    dm = _dm(data, val_urls=str(tmp_path), num_workers=2, persistent_workers=False)
    dm.setup("validate")
    keys = _val_keys(dm)
    assert sorted(keys) == [f"{i:09d}" for i in range(30, 37) if i != 32]
    assert dm.skipped()["val"]["bad_image"] == 1 and dm.skipped()["val"]["shard"] == 1


def test_setup_errors_name_the_problem(data, tmp_path):
    dm = _dm(data, train_urls=str(data / "train-{000000..000099}.tar"))
    with pytest.raises(ValueError, match=r"train-\{000000\.\.000099\}\.tar"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="val_urls is required for validate"):
        _dm(data, val_urls=None).setup("validate")
    with pytest.raises(ValueError, match="no shards matching 'train-\\*.tar'"):
        _dm(data, train_urls=str(tmp_path)).setup("fit")
    assert _dm(data, val_urls=None).val_dataloader() == []


def test_hparams_are_plain(data):
    dm = _dm(data)
    assert json.loads(json.dumps(dict(dm.hparams)))["batch_size"] == 4


@pytest.mark.timeout(300)
def test_lightning_fit_uses_fixed_epochs_and_full_validation(data):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.train_batches, self.val_keys = 0, []

        def training_step(self, batch, _):
            self.train_batches += 1
            return self.layer(batch["image"].mean().view(1, 1)).sum()

        def validation_step(self, batch, _):
            self.val_keys += batch["key"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=_dm(data, train_batches_per_epoch=4))
    assert probe.train_batches == 8
    assert Counter(probe.val_keys) == Counter({f"{i:09d}": 2 for i in range(37)})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inline_bytes", [None, 0])
def test_workers_hand_over_uint8_and_images_arrive_as_float(data, tmp_path, monkeypatch, inline_bytes):
    import lightning as L

    from lit_diffusion.data import shards

    if inline_bytes is not None:  # every batch through shared memory (the workers are forked: they inherit it)
        monkeypatch.setattr(shards, "INLINE_BATCH_BYTES", inline_bytes)
    # outside a trainer the loader makes the workers' uint8 images float itself
    dm = _dm(data, num_workers=1, train_batches_per_epoch=2)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["image"].dtype == torch.float32
        for image, attrs in zip(batch["image"], batch["attrs"]):
            assert torch.equal(image, _rendered(attrs))
    raw = next(iter(dm.train_dataloader().loader))  # what crosses from the worker
    assert isinstance(raw["image"], np.ndarray if inline_bytes is None else torch.Tensor)
    assert raw["image"].dtype in (np.uint8, torch.uint8) and raw["image"].shape == (4, 3, 16, 16)

    # under a trainer they stay uint8 until transfer_batch_to_device has moved them
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((batch["image"].dtype, all(torch.equal(i, _rendered(a))
                                                        for i, a in zip(batch["image"], batch["attrs"]))))
            return self.weight * batch["image"].mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(probe, datamodule=_dm(data, num_workers=1, train_batches_per_epoch=3))
    assert probe.seen == [(torch.float32, True)] * 3


@pytest.mark.parametrize("bad_keys", [0, 3])
def test_an_epoch_reads_the_samples_it_yields_shuffled(data, monkeypatch, bad_keys):
    from lit_diffusion.data.shards import ResampledTrainStream, SharedEpoch

    urls = [str(p) for p in sorted(data.glob("train-*.tar"))]
    stream = ResampledTrainStream(urls, 16, batch_size=4, batches_per_epoch=5, shuffle_buffer=20, epoch=SharedEpoch())
    reads = []
    original = stream._shards

    def counting(rng):
        for sample in original(rng):
            reads.append(sample["__key__"])
            if len(reads) <= bad_keys:  # the first few undecodable
                sample = {**sample, "png": b"not a png"}
            yield sample

    monkeypatch.setattr(stream, "_shards", counting)
    keys = [k for batch in stream for k in batch["key"]]
    assert len(keys) == 20 and len(set(keys)) == 20
    assert stream.counter.counts().get("bad_image", 0) == bad_keys
    if not bad_keys:
        # every sample read was yielded: nothing is left in the shuffle buffer when the next epoch restarts
        assert sorted(keys) == sorted(reads) and keys != reads  # and shuffled
    else:
        # a dropped sample is replaced by reading on: 3 more than yielded, then the rest of that run's buffer
        assert set(keys) <= set(reads[bad_keys:]) and len(reads) >= 20 + bad_keys
