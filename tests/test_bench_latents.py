"""bench latents: what its figures are made of (the figures themselves are measured by `lit-diffusion bench latents`,
never in a test)."""

import json

import pytest
import torch

from lit_diffusion.bench.latents import _raw_latent_batches, bytes_per_sample, replicate_shards
from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.data.latents import LatentShardWriter, write_manifest


def _tar_member(data_bytes: int) -> int:
    return 512 + -(-data_bytes // 512) * 512  # a header block, the data padded to whole blocks


@pytest.mark.parametrize("image_size, tokens", [(32, 16), (256, 77)])
def test_bytes_per_sample_is_the_tar_and_npy_closed_form(tmp_path, image_size, tokens):
    npy = 128  # numpy's .npy v1 header of these small shapes, padded to 64-byte alignment
    h = image_size // 8
    caption = len("a small red circle above a large blue square")
    attrs = len(json.dumps({"objects": [{"shape": "circle", "color": "red", "size": "small"}]}))
    sample = (_tar_member(npy + 4 * h * h * 2) + _tar_member(npy + tokens * 768 * 2) + _tar_member(npy + 768 * 2)
              + _tar_member(caption) + _tar_member(attrs))
    archive = -(-(64 * sample + 1024) // 10240) * 10240  # two end blocks, then whole 10 KiB records
    assert bytes_per_sample(tmp_path, image_size, tokens) == archive / 64


def test_the_raw_loop_reads_what_the_data_module_reads_and_replicas_are_accepted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    writer = LatentShardWriter(src / "train-000000.tar", "float16")
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        writer.write(f"k{i}", torch.randn(4, 2, 2, generator=g), torch.randn(1 + i % 3, 8, generator=g),
                     torch.randn(6, generator=g), f"caption {i}")
    writer.commit()
    write_manifest(src, {"format": "lit_diffusion.latents", "version": 1, "clip_hash": "c", "vae_hash": "v",
                         "dtype": "float16", "flips": False, "std": False, "samples": 8, "image_size": 16,
                         "shapes": {"latent": [4, 2, 2], "context": [None, 8], "pooled": [6]},
                         "shards": [{"name": "train-000000.tar", "source": "x", "samples": 8,
                                     "bytes": (src / "train-000000.tar").stat().st_size}]})
    ten = replicate_shards(src, tmp_path / "ten", 10)
    dm = LatentDataModule(train_urls=str(ten / "train-*.tar"), val_urls=str(ten / "train-*.tar"), num_workers=0,
                          batch_size=4)
    dm.setup("fit")
    assert len(dm.train_shards) == 10 and dm.manifest["samples"] == 80
    ours = list(dm.eval_dataloader())[:2]  # in shard order, as the raw loop reads
    raw = list(_raw_latent_batches(dm.train_shards, 4, 2))
    for a, b in zip(ours, raw):
        assert a["key"] == b["key"]
        for name in ("latent", "context", "pooled"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
