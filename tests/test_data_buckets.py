"""Aspect buckets in the data modules: every batch of one bucket, each image resized to cover its bucket and cropped
minimally, SDXL's size and crop condition per sample, partial buckets drained, validation exactly once across
ranks, and two DDP ranks whose shards hold different aspect mixes training in step without a hang."""

import io
import json
import socket
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from lit_diffusion.data.buckets import BucketConfig
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.data.shards import decode_image_and_size

RATIOS = "1:1,3:2,2:3,2:1,1:2"
SIZES = [[32, 32], [24, 40], [40, 24], [24, 48], [48, 24]]  # [h, w]: the canvases of RATIOS at 32 px, multiple 8


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_shapes(root, train=60, val=23, size=32, shard_size=20, seed=3, aspect_ratios=RATIOS, multiple=8)
    return root


def _png(width, height, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, images: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for ext, payload in (("png", data), ("txt", f"a photo {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _module(urls, val_urls=None, **kw):
    args = dict(train_urls=urls, val_urls=val_urls, image_size=32, batch_size=4, num_workers=0,
                train_batches_per_epoch=10, shuffle_buffer=8, seed=1, buckets={"sizes": SIZES, "step": 8})
    return ImageCaptionDataModule(**{**args, **kw})


def test_every_batch_is_one_bucket_and_each_canvas_fits_its_own(mixed):
    dm = _module(str(mixed / "train-*.tar"))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    seen = set()
    for batch in batches:
        h, w = batch["image"].shape[-2:]
        assert [h, w] in SIZES
        for attrs, size in zip(batch["attrs"], batch["size"]):
            assert (attrs["height"], attrs["width"]) == (h, w)  # the bucket of its own canvas: nothing cropped
            assert size.tolist() == [h, w, 0, 0, h, w]
        seen.add((h, w))
    assert len(seen) >= 4
    # an epoch's last batches may be partial buckets (drained, not dropped); all others are full
    sizes = [len(b["key"]) for b in batches]
    partial = [i for i, n in enumerate(sizes) if n < 4]
    assert partial == list(range(10 - len(partial), 10)) and len(partial) <= len(SIZES)


def test_images_of_any_size_are_cropped_minimally_and_counted(tmp_path):
    """Photos of sizes the shapes data never has: a 3:1 panorama (outside the 1:2..2:1 buckets: cropped into the
    widest, counted), a tiny portrait (smaller than its bucket: upscaled and counted, or skipped), a landscape."""
    images = {"pano": _png(300, 100), "tiny": _png(10, 16, 1), "land": _png(120, 64, 2)}
    _shard(tmp_path / "photos-000.tar", images)
    dm = _module(str(tmp_path / "photos-000.tar"), batch_size=1, train_batches_per_epoch=3, shuffle_buffer=1,
                 buckets={"sizes": SIZES, "step": 8, "crop": "center"})
    dm.setup("fit")
    got = {b["key"][0]: b for b in dm.train_dataloader()}
    assert got["pano"]["image"].shape[-2:] == (24, 48)
    # cover 24x48 from 100x300: scale max(24/100, 48/300) = 0.24 -> 24x72, centre crop 48 of 72 wide -> left 12
    assert got["pano"]["size"][0].tolist() == [100, 300, 0, 12, 24, 48]
    assert got["tiny"]["image"].shape[-2:] == (40, 24) and got["tiny"]["size"][0].tolist()[:2] == [16, 10]
    assert got["land"]["image"].shape[-2:] == (24, 48)
    counts = dm.skipped()["train"]
    assert counts["aspect_cropped"] >= 1 and counts["small_image"] >= 1
    skipping = _module(str(tmp_path / "photos-000.tar"), batch_size=1, train_batches_per_epoch=3, shuffle_buffer=1,
                       buckets={"sizes": SIZES, "step": 8, "small": "skip"})
    skipping.setup("fit")
    assert "tiny" not in {b["key"][0] for b in skipping.train_dataloader()}


def test_a_centre_crop_reports_its_offset_in_the_size_condition():
    image, size = decode_image_and_size(_png(48, 32), 16)
    assert image.shape == (3, 16, 16)
    assert size.tolist() == [32, 48, 0, 4, 16, 16]  # (48 - 32) / 2 = 8 source px, 4 at 16 / 32 scale


def test_bad_bucket_settings_name_the_option(mixed):
    with pytest.raises(ValueError, match=r"data.init_args.buckets: .*multiples of step 8"):
        _module(str(mixed / "train-*.tar"), buckets={"sizes": [[30, 30]], "step": 8})
    with pytest.raises(ValueError, match=r"data.init_args.buckets: crop must be 'random' or 'center'"):
        _module(str(mixed / "train-*.tar"), buckets={"crop": "middle"})
    assert BucketConfig(base_size=32, step=8, sizes=SIZES).aspect_range == (0.5, 2.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_sees_every_sample_once_across_ranks_in_batches_of_one_size(mixed, workers):
    keys = []
    for rank in range(3):
        dm = _module(str(mixed / "train-*.tar"), str(mixed / "val-*.tar"), num_workers=workers)
        dm.rank_and_world_size = lambda rank=rank: (rank, 3)
        dm.setup("validate")
        for batch in dm.val_dataloader():
            assert len({tuple(i.shape) for i in batch["image"]}) == 1 and len(batch["key"]) <= 4
            keys += batch["key"]
    assert sorted(keys) == [f"{i:09d}" for i in range(23)]


# --------------------------------------------------------------------------------------------------- 2 ranks
class ShapeModel(L.LightningModule):
    """A conv net that takes any size; records the shape of every training batch."""

    def __init__(self, out: str):
        super().__init__()
        self.conv, self.out, self.shapes = torch.nn.Conv2d(3, 3, 3, padding=1), out, []

    def training_step(self, batch, batch_idx):
        self.shapes.append(list(batch["image"].shape))
        return (self.conv(batch["image"]) - batch["image"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        with open(f"{self.out}/rank{self.global_rank}.json", "w") as f:
            json.dump({"shapes": self.shapes, "step": self.global_step,
                       "weight": self.conv.weight.detach().sum().item()}, f)


def _ddp_fit(rank: int, port: int, root: str, out: str):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    dm = _module(f"{root}/wide-000.tar::{root}/tall-000.tar::{root}/square-000.tar", train_batches_per_epoch=6,
                 shuffle_buffer=2, seed=rank)  # shard draws differ between the ranks
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    trainer.fit(ShapeModel(out), datamodule=dm)


def test_two_ranks_with_different_aspect_mixes_train_in_step(tmp_path):
    """Each shard holds one aspect ratio only, so the ranks' batches have different shapes in the same step; DDP
    averages their gradients all the same, and both ranks finish every step (no hang, equal weights)."""
    shapes = {"wide": (48, 24), "tall": (24, 48), "square": (32, 32)}
    for name, (w, h) in shapes.items():
        _shard(tmp_path / f"{name}-000.tar", {f"{name}{i}": _png(w, h, i) for i in range(8)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_fit, args=(port, str(tmp_path), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 12
    assert ranks[0]["weight"] == ranks[1]["weight"]  # gradients were averaged every step
    differ = [i for i, (a, b) in enumerate(zip(ranks[0]["shapes"], ranks[1]["shapes"])) if a[-2:] != b[-2:]]
    assert differ, "the ranks never trained on different shapes in the same step"


# ------------------------------------------------------------------------------------------------ latent shards
def test_latents_are_encoded_at_each_samples_bucket_and_read_back_in_one_shape_batches(mixed, tmp_path):
    from latent_fakes import fake_encode_captions, fake_encode_images

    from lit_diffusion.data.datamodule import LatentDataModule
    from lit_diffusion.data.encode import encode_shards

    buckets = BucketConfig(base_size=32, step=8, sizes=SIZES)
    manifest = encode_shards({"train": str(mixed / "train-*.tar"), "val": str(mixed / "val-*.tar")}, tmp_path / "lat",
                             fake_encode_images, fake_encode_captions, image_size=32, clip_hash="c", vae_hash="v",
                             flips=True, batch_size=8, progress=False, buckets=buckets)
    assert sorted(manifest["buckets"]) == sorted(SIZES) and manifest["shapes"]["latent"] == [3, None, None]
    assert {tuple(s) for s in manifest["latent_shapes"]} == {(3, h // 4, w // 4) for h, w in SIZES}
    dm = LatentDataModule(train_urls=str(tmp_path / "lat" / "train" / "*.tar"),
                          val_urls=str(tmp_path / "lat" / "val" / "*.tar"), batch_size=4, num_workers=0,
                          train_batches_per_epoch=8, random_flip=True, seed=0)
    dm.setup("fit")
    assert sorted(dm.buckets) == sorted(SIZES)
    for batch in dm.train_dataloader():
        h, w = batch["latent"].shape[-2:]
        for attrs, size in zip(batch["attrs"], batch["size"]):
            assert (attrs["height"], attrs["width"]) == (4 * h, 4 * w)
            assert size.tolist() == [4 * h, 4 * w, 0, 0, 4 * h, 4 * w]  # a whole canvas, flipped or not
    keys = [k for b in dm.eval_dataloader() for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(23)]


def test_the_bench_baseline_buckets_as_the_data_module_does(mixed):
    """`bench data`'s raw loop (the baseline of the >= 0.9 throughput target) does the loader's work by hand: the
    same bucket, pixels and size condition for every sample."""
    from lit_diffusion.bench.data import _raw_bucketed_batches

    buckets = {"sizes": SIZES, "step": 8, "crop": "center"}
    dm = _module(str(mixed / "train-000000.tar"), batch_size=2, train_batches_per_epoch=10, shuffle_buffer=1,
                 buckets=buckets)
    dm.setup("fit")
    ours = {k: (img, size) for b in dm.train_dataloader() for k, img, size in zip(b["key"], b["image"], b["size"])}
    raw = {k: (img, size) for b in _raw_bucketed_batches([str(mixed / "train-000000.tar")], dm.bucket_config, 2, 10)
           for k, img, size in zip(b["key"], b["image"], b["size"])}
    common = set(ours) & set(raw)
    assert len(common) >= 10
    for key in common:
        assert torch.equal(ours[key][0].float() / 127.5 - 1 if ours[key][0].dtype == torch.uint8 else ours[key][0],
                           raw[key][0]) and torch.equal(ours[key][1], raw[key][1]), key
