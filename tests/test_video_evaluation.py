"""The video evaluation (`evaluation.video.VideoEvaluator`): a model that returns the real clips scores motion accuracy
1.0 and Frechet distances 0; the same clips played backwards keep every frame (per-frame FID 0) but fail every
direction and move the clips' Frechet distance; clips whose frames are part of their source are not judged, still
images in the val stream are left out; two DDP ranks give the figures of one process, and with a sharded denoiser
make the same denoiser calls when their shares of the clips differ."""

import json
import logging
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lit_diffusion.data.moving_shapes import write_moving_shapes
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.data.video import VideoDataModule
from lit_diffusion.evaluation.evaluator import EvalConfig, sample_seed
from lit_diffusion.evaluation.video import VideoEvaluator
from lit_diffusion.metrics.features import to_uint8

FRAMES, CLIPS = 4, 24
UNEVEN = 21  # clips for two ranks: 11 and 10, three batches of 5 and two


class OrderAwareCLIP(nn.Module):
    """A stand-in for the video CLIP: a clip's embedding mixes its frames' mean colours, each frame with its own
    weights (so the order of the frames matters); a caption's embedding is a fixed random vector per caption."""

    embed_dim = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.frame_proj = nn.Parameter(torch.randn(FRAMES, 3 * 4, self.embed_dim, generator=g))

    def encode_image(self, clips):  # [B, T, 3, H, W] in [-1, 1]
        pooled = nn.functional.adaptive_avg_pool2d(clips.flatten(0, 1), 2).flatten(1).unflatten(0, clips.shape[:2])
        emb = torch.einsum("btc,tce->be", pooled, self.frame_proj)
        return nn.functional.normalize(emb, dim=-1)

    def tokenize(self, captions):
        return torch.tensor([sum(map(ord, c)) for c in captions])

    def encode_text(self, tokens):
        emb = torch.stack([torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(int(t))) for t in tokens])
        return None, nn.functional.normalize(emb, dim=-1)


class StandInVAE:
    """Frames [N, 3, H, W] in [-1, 1] to 'latents' and back: as they are, or mirrored left to right."""

    def __init__(self, mirror: bool = False):
        self.mirror = mirror

    def encode(self, frames):
        return frames.flip(-1) if self.mirror else frames

    def decode(self, latents):
        return latents


class Replay:
    """A 'model' whose samples are the real clips of the captions' keys (found by the per-key seed), optionally
    played backwards; its VAE (for the evaluation's round trip of the real clips) returns them as they are."""

    device = torch.device("cpu")

    def __init__(self, clips_by_seed: dict, reverse: bool = False, sharded: bool = False, vae: StandInVAE | None = None):
        self.clips_by_seed, self.reverse, self.sharded = clips_by_seed, reverse, sharded
        self.vae = vae or StandInVAE()
        self.calls = 0

    def sample(self, captions, seed, **_):
        self.calls += 1
        if captions == [""]:  # a rank's dummy call while another generates (`sharded`)
            return torch.zeros(1, *next(iter(self.clips_by_seed.values())).shape)
        clips = torch.stack([self.clips_by_seed[s] for s in seed])
        return clips.flip(1) if self.reverse else clips


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_eval")
    write_moving_shapes(root, train=0, val=CLIPS, size=16, frames=FRAMES, shard_size=10)
    return root


def _data(clips, urls=None, **kw):
    return VideoDataModule(val_urls=urls or str(clips / "val-*.tar"), image_size=16, num_frames=FRAMES,
                           batch_size=5, num_workers=0, **kw)


def _replay(clips, reverse=False, vae=None, **kw):
    by_seed = {}
    for batch in _data(clips, **kw).eval_dataloader(CLIPS):
        for key, clip in zip(batch["key"], batch["video"]):
            by_seed[sample_seed(key, 0)] = ((clip + 1) / 2).clamp(0, 1)
    return Replay(by_seed, reverse, vae=vae)


def _run(clips, reverse=False, model=None, num_samples=CLIPS, **kw):
    evaluator = VideoEvaluator(EvalConfig(guidance=[1.0, 3.0], num_samples=num_samples), OrderAwareCLIP(), FRAMES)
    return evaluator.run(model or _replay(clips, reverse, **kw), _data(clips, **kw).eval_dataloader(num_samples))


def test_the_real_clips_score_perfectly(clips):
    results = _run(clips)
    assert results["eval/num_samples"] == CLIPS
    assert results["eval/motion_acc_vae"] == 1.0  # a VAE that keeps the clips keeps every caption
    for g in ("1.0", "3.0"):
        assert results[f"eval/motion_acc_g{g}"] == 1.0
        assert results[f"eval/fid_frames_g{g}"] == pytest.approx(0.0, abs=1e-6)
        assert results[f"eval/fcd_g{g}"] == pytest.approx(0.0, abs=1e-6)


def test_clips_played_backwards_keep_their_frames_but_not_their_motion(clips):
    forward, backward = _run(clips), _run(clips, reverse=True)
    assert backward["eval_detail/motion_direction_g3.0"] == 0.0
    assert backward["eval/motion_acc_g3.0"] == 0.0
    assert backward["eval_detail/motion_shapes_g3.0"] == 1.0  # only the motion is wrong
    assert backward["eval/fid_frames_g3.0"] == pytest.approx(0.0, abs=1e-6)  # the same frames, in another order
    assert backward["eval/fcd_g3.0"] > 1e-3 > 1e-6 > forward["eval/fcd_g3.0"]
    assert backward["eval/clip_score_g3.0"] != forward["eval/clip_score_g3.0"]


def test_the_vae_round_trip_is_judged_once_against_each_clips_caption(clips):
    """A VAE that mirrors every frame: its round trip of the real clips passes the judge exactly where the judge
    passes the mirrored clips (objects moving up or down), by caption kind; the figure is kept for the later
    evaluations, which do not send the clips through the VAE again."""
    from lit_diffusion.metrics.caption_accuracy import caption_kind
    from lit_diffusion.metrics.motion_accuracy import check_clip

    passed = {"one_object": [], "two_objects": []}
    for batch in _data(clips).eval_dataloader(CLIPS):
        for clip, attrs in zip(batch["video"], batch["attrs"]):
            mirrored = to_uint8(((clip.flip(-1) + 1) / 2).clamp(0, 1)).float().div(255)
            passed[caption_kind(attrs)].append(check_clip(mirrored, attrs)["correct"])
    assert all(passed.values()) and 0 < sum(map(sum, passed.values())) < CLIPS  # some pass, some do not
    model = _replay(clips, vae=StandInVAE(mirror=True))
    evaluator = VideoEvaluator(EvalConfig(guidance=[1.0, 3.0], num_samples=CLIPS), OrderAwareCLIP(), FRAMES)
    first = evaluator.run(model, _data(clips).eval_dataloader(CLIPS))
    assert first["eval/motion_acc_vae"] == pytest.approx(sum(map(sum, passed.values())) / CLIPS)
    for kind, results in passed.items():
        assert first[f"eval_detail/motion_vae_{kind}"] == pytest.approx(sum(results) / len(results))
    assert first["eval/motion_acc_g3.0"] == 1.0  # the samples themselves do not go through it
    model.vae = None  # the second evaluation must not need it
    second = evaluator.run(model, _data(clips).eval_dataloader(CLIPS))
    assert {k: v for k, v in second.items() if "_vae" in k} == {k: v for k, v in first.items() if "_vae" in k}


def test_the_judge_leaves_out_clips_whose_frames_are_part_of_their_source(tmp_path):
    """Clips of 2 * FRAMES frames: read at stride 2 the frames span each clip and the judge passes them all; read
    at stride 1 they are its first half, which the attributes do not describe, and no clip is judged."""
    write_moving_shapes(tmp_path, train=0, val=10, size=16, frames=2 * FRAMES, shard_size=10)
    spanning = _run(tmp_path, num_samples=10, frame_stride=2)
    assert spanning["eval_detail/motion_judged"] == 10 and spanning["eval/motion_acc_g3.0"] == 1.0
    half = _run(tmp_path, num_samples=10)
    assert half["eval_detail/motion_judged"] == 0 and "eval/motion_acc_g3.0" not in half
    assert half["eval/num_samples"] == 10


def test_still_images_in_the_val_stream_are_left_out(clips, tmp_path, caplog):
    """Joint image and video val data (`images: true`): the video metrics are the clips' alone, as without the
    images, and the log counts the images left out."""
    write_shapes(tmp_path, train=0, val=7, size=16, shard_size=7)
    urls = [str(clips / "val-*.tar"), str(tmp_path / "val-*.tar")]
    alone = _run(clips)
    with caplog.at_level(logging.INFO, logger="lit_diffusion"):
        mixed = _run(clips, model=_replay(clips), num_samples=CLIPS + 7, urls=urls, images=True)
    assert mixed["eval/num_samples"] == CLIPS
    for key, value in alone.items():
        if key != "eval/seconds":
            assert mixed[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any("7 still images of the val stream skipped" in r.getMessage() for r in caplog.records)


def _ddp_worker(rank: int, port: int, root: str, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from pathlib import Path

        # 21 clips give rank 0 eleven (three batches) and rank 1 ten (two): as a sharded (FSDP) denoiser must,
        # rank 1 makes dummy calls while rank 0 generates its third batch
        model = _replay(Path(root), reverse=True, vae=StandInVAE(mirror=True))
        model.sharded = True
        results = _run(Path(root), model=model, num_samples=UNEVEN)
        calls = [None, None]
        dist.all_gather_object(calls, model.calls)
        if rank == 0:
            Path(out).write_text(json.dumps({**results, "calls": calls}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one_process(clips, tmp_path):
    alone = _run(clips, num_samples=UNEVEN, model=_replay(clips, reverse=True, vae=StandInVAE(mirror=True)))
    assert 0 < alone["eval/motion_acc_vae"] < 1  # the round trip's judge is reduced over the ranks too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(clips), str(tmp_path / "ddp.json")), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["eval/num_samples"] == alone["eval/num_samples"] == UNEVEN
    assert ddp.pop("calls") == [6, 6]  # 3 batches x 2 guidance scales on each rank
    for key, value in alone.items():
        if key != "eval/seconds":
            assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
