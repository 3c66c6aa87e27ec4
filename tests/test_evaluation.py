import io
import json
import os
import shutil
import socket
import tarfile
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import _fit, randomise_unet, tiny_datamodule
from PIL import Image
from test_ldm import make_ldm

from lit_diffusion.callbacks.evaluation import DiffusionEvaluation
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.evaluation.evaluator import (
    EvalConfig,
    Evaluator,
    eval_data_id,
    evaluate_checkpoint,
    sample_seed,
)
from lit_diffusion.metrics.clip_score import clip_score_per_sample
from lit_diffusion.metrics.features import CLIPFeatures, save_random_inception_weights, to_uint8
from lit_diffusion.metrics.fid import FID
from lit_diffusion.metrics.stats_cache import data_identity
from lit_diffusion.runtime.tracking import JSONLLogger


def test_evaluation_equals_a_direct_computation_and_reuses_real_statistics(tiny_ckpts, tmp_path):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    dm = tiny_datamodule(tiny_ckpts["data"])
    cfg = EvalConfig(guidance=[1.0, 3.0], num_samples=24, backends=["clip"], cache_dir=str(tmp_path / "cache"),
                     data_id="tiny", resolution=16)
    evaluator = Evaluator(cfg, model.clip)
    first = evaluator.run(model, dm.eval_dataloader(24))
    assert evaluator.timings[-1]["real_stats"] == {"clip": "computed"}
    assert first["eval/num_samples"] == 24
    assert set(first) >= {"eval/fid_clip_g1.0", "eval/fid_clip_g3.0", "eval/clip_score_g1.0", "eval/clip_score_g3.0",
                          "eval/caption_acc_g1.0", "eval/caption_acc_g3.0"}
    assert len(list((tmp_path / "cache").glob("fid_stats_clip_16px_24_*.pt"))) == 1

    # the same numbers by hand: the same captions, seeds and sampler
    batches = list(dm.eval_dataloader(24))
    captions = [c for b in batches for c in b["caption"]]
    keys = [k for b in batches for k in b["key"]]
    images = model.sample(captions, guidance=3.0, seed=[sample_seed(k, 0) for k in keys])
    images = to_uint8(images).float() / 255  # the metrics see the images as a PNG holds them
    with torch.no_grad():
        _, text = model.clip.encode_text(model.clip.tokenize(captions))
        score = clip_score_per_sample(model.clip.encode_image(images * 2 - 1), text).mean()
    assert abs(float(score) - first["eval/clip_score_g3.0"]) < 1e-4

    # a second evaluator finds the real statistics on disk and gives the same figures
    again = Evaluator(cfg, model.clip)
    second = again.run(model, dm.eval_dataloader(24))
    assert again.timings[-1]["real_stats"] == {"clip": "disk"}
    for key, value in first.items():
        if key.startswith("eval/") and key != "eval/seconds":
            assert abs(second[key] - value) <= 1e-6 * max(1.0, abs(value)), key


@pytest.mark.parametrize("accumulate", [1, 2])  # 2: the micro-batches before the first step are not step 0
def test_in_loop_evaluation_logs_keys_files_and_uses_ema_weights(tiny_ckpts, tmp_path, accumulate, monkeypatch):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def unet(module):
        return {k: v.detach().clone() for k, v in module.unet.state_dict().items()}

    evaluated, trained = {}, {}
    run = Evaluator.run

    def recording_run(self, model, loader, step=None, **kw):
        evaluated[step] = unet(model)
        return run(self, model, loader, step=step, **kw)

    monkeypatch.setattr(Evaluator, "run", recording_run)
    model = make_ldm(tiny_ckpts)
    evaluation = DiffusionEvaluation(every_n_steps=2, guidance=[1.0, 2.0], num_samples=16,
                                     cache_dir=str(tmp_path / "cache"))
    jsonl = JSONLLogger(tmp_path / "run")
    ema = EMAWeightAveraging(decay=0.9)
    record = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda t, m, *a: trained.__setitem__(t.global_step, unet(m)))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=[jsonl], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=accumulate, callbacks=[ema, evaluation, record],
                        default_root_dir=str(tmp_path / "run"))
    trainer.fit(model, datamodule=tiny_datamodule(tiny_ckpts["data"]))
    assert [h["step"] for h in evaluation.history] == [2, 4]
    # step 4 was evaluated with the average (what the module holds after fit), not the trained weights
    average = unet(model)
    assert all(torch.equal(evaluated[4][k], v) for k, v in average.items())
    assert not all(torch.equal(evaluated[4][k], v) for k, v in trained[4].items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "eval/fid_clip_g2.0" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert logged[-1]["eval/clip_score_g1.0"] == evaluation.history[-1]["eval/clip_score_g1.0"]
    # the model's own guidance (3.0) joins the list, and its figures are logged without the suffix too
    assert logged[-1]["eval/fid_clip"] == logged[-1]["eval/fid_clip_g3.0"]
    assert logged[-1]["eval/clip_score"] == logged[-1]["eval/clip_score_g3.0"]
    assert (tmp_path / "run" / "eval" / "eval_step0000004.json").is_file()
    assert (tmp_path / "run" / "eval" / "fid_clip_vs_clip_score_step0000004.png").is_file()
    # the second evaluation reused the real statistics of the first
    assert [t["real_stats"] for t in evaluation.evaluator.timings] == [{"clip": "computed"}, {"clip": "memory"}]
    # cached under the val shards' content, not their URL
    (cached,) = (tmp_path / "cache").glob("*.pt")
    data = tiny_ckpts["data"]
    assert torch.load(cached, weights_only=True)["key_fields"]["data"] == data_identity(sorted(data.glob("val-*.tar")))


# ---------------------------------------------------------------- real statistics keyed by the data's content


@pytest.fixture(scope="module")
def ldm_ckpt(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    _fit(model, tiny_datamodule(tiny_ckpts["data"]), 1, root).save_checkpoint(root / "ldm.ckpt")
    return root / "ldm.ckpt"


@pytest.fixture
def count_real_updates(monkeypatch):
    """How many batches of real images went through feature extraction."""
    calls = []
    update = FID.update

    def counted(self, images, real):
        calls.append(real)
        return update(self, images, real)

    monkeypatch.setattr(FID, "update", counted)
    return lambda: sum(calls)


def test_real_statistics_are_keyed_by_data_content_not_its_path(ldm_ckpt, tmp_path, count_real_updates):
    data, cache = tmp_path / "data", tmp_path / "cache"
    cfg = EvalConfig(guidance=[1.0], num_samples=16, backends=["clip"], steps=2, cache_dir=str(cache))

    def evaluate(config=cfg):
        results, *_ = evaluate_checkpoint(ldm_ckpt, str(data / "val-*.tar"), config, tmp_path / "out", batch_size=8)
        return results["eval/fid_clip_g1.0"]

    write_shapes(data, train=0, val=24, size=16, shard_size=16, seed=0)
    first = evaluate()
    assert count_real_updates() == 2  # 16 real images in batches of 8
    (old_file,) = cache.glob("*.pt")

    # the same data again: read from the cache, same figure
    assert evaluate() == first and count_real_updates() == 2

    # re-drawn with another seed into the same folder (the same URL): recomputed, and different
    write_shapes(data, train=0, val=24, size=16, shard_size=16, seed=1)
    redrawn = evaluate()
    assert count_real_updates() == 4
    (new_file,) = set(cache.glob("*.pt")) - {old_file}
    old_mu, new_mu = (torch.load(f, weights_only=True)["mu"] for f in (old_file, new_file))
    assert (old_mu - new_mu).abs().max() > 1e-3
    # ... and equal to statistics computed with no cache at all
    assert redrawn == pytest.approx(evaluate(replace(cfg, cache_dir=None)), rel=1e-9)
    assert count_real_updates() == 6


def test_data_identity_sees_content_and_mtime_and_not_remote_urls(tmp_path):
    shard = tmp_path / "val-000000.tar"
    shard.write_bytes(b"a" * 100_000 + b"b" * 100_000)
    ident = data_identity([shard])
    assert data_identity([str(shard)]) == ident
    stat = shard.stat()

    # same size and mtime, other bytes at the end (a re-draw on a coarse-mtime file system)
    shard.write_bytes(b"a" * 100_000 + b"c" * 100_000)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_identity([shard]) != ident
    # the same bytes rewritten: a new mtime, a new identity (one recomputation rather than a risk of reuse)
    shard.write_bytes(b"a" * 100_000 + b"b" * 100_000)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_identity([shard]) != ident
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_identity([shard]) == ident

    assert data_identity([shard, "https://example.com/val-000001.tar"]) is None
    assert data_identity(["pipe:curl -s https://example.com/val.tar"]) is None
    with pytest.raises(FileNotFoundError, match="val-000009.tar"):
        data_identity([shard, tmp_path / "val-000009.tar"])


# ---------------------------------------------------------------- the evaluated images, saved for offline checks


def raw_val_images(data, n: int) -> dict[str, tuple[bytes, str]]:
    """The first n val samples as stored in the shards, {key: (png bytes, caption)}, read with tarfile alone."""
    samples: dict[str, dict] = {}
    for shard in sorted(data.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v["png"], v["txt"].decode()) for k, v in list(samples.items())[:n]}


def load_pngs(paths) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])  # uint8


def test_evaluate_saves_exactly_the_images_its_figures_are_computed_on(ldm_ckpt, tiny_ckpts, tmp_path, capsys):
    from lit_diffusion.cli import main
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    saved, result, data = tmp_path / "images", tmp_path / "eval.json", tiny_ckpts["data"]
    args = ["evaluate", "--ckpt", str(ldm_ckpt), "--data", str(data / "val-*.tar"), "--num-samples", "12",
            "--guidance", "1,3", "--features", "clip", "--steps", "2", "--batch-size", "5",
            "--cache-dir", str(tmp_path / "cache"), "--save-images", str(saved), "--json", str(result)]
    main(args)
    figures = json.loads(result.read_text())
    assert json.loads(capsys.readouterr().out)["files"]["images"] == str(saved)
    raw = raw_val_images(data, 12)
    assert sorted(p.name for p in saved.iterdir()) == ["g1.0", "g3.0", "real"]
    for folder in saved.iterdir():
        assert sorted(p.stem for p in folder.glob("*.png")) == sorted(raw), folder
    # the real images as the shards hold them (16 px: no resize)
    keys = sorted(raw)
    real = load_pngs(saved / "real" / f"{k}.png" for k in keys)
    assert torch.equal(real, load_pngs(io.BytesIO(raw[k][0]) for k in keys))

    # FID and CLIP score recomputed from the PNG files alone equal the reported figures
    clip = LatentDiffusionModule.from_checkpoint(ldm_ckpt).clip
    with torch.no_grad():
        _, text = clip.encode_text(clip.tokenize([raw[k][1] for k in keys]))
    for g in ("1.0", "3.0"):
        fake = load_pngs(saved / f"g{g}" / f"{k}.png" for k in keys).float() / 255
        fid = FID(CLIPFeatures(clip))
        fid.update(real.float() / 255, real=True)
        fid.update(fake, real=False)
        assert figures[f"eval/fid_clip_g{g}"] == pytest.approx(fid.compute().item(), rel=1e-5)
        with torch.no_grad():
            score = clip_score_per_sample(clip.encode_image(fake * 2 - 1), text).mean().item()
        assert figures[f"eval/clip_score_g{g}"] == pytest.approx(score, rel=1e-5)

    # a second run into the same folder would mix two runs' images: refused, naming the folder
    with pytest.raises(SystemExit):
        main(args)
    assert "already hold files" in capsys.readouterr().err


@pytest.mark.slow
def test_torch_fidelity_on_the_saved_images_gives_the_reported_inception_fid(ldm_ckpt, tiny_ckpts, tmp_path, capsys):
    import torch_fidelity

    from lit_diffusion.cli import main

    weights = save_random_inception_weights(tmp_path / "random_inception.pth", seed=0)
    saved, result, data = tmp_path / "images", tmp_path / "eval.json", tiny_ckpts["data"]
    main(["evaluate", "--ckpt", str(ldm_ckpt), "--data", str(data / "val-*.tar"), "--num-samples", "32",
          "--guidance", "3", "--features", "inception", "--inception-weights", str(weights), "--steps", "2",
          "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--save-images", str(saved),
          "--json", str(result)])
    reported = json.loads(result.read_text())["eval/fid_inception_g3.0"]
    # the real side straight from the shards' PNG bytes, not from anything evaluate wrote
    real = tmp_path / "real"
    real.mkdir()
    for key, (png, _) in raw_val_images(data, 32).items():
        (real / f"{key}.png").write_bytes(png)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(saved / "g3.0"), input2=str(real), fid=True, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=16, feature_extractor_weights_path=str(weights),
    )["frechet_inception_distance"]
    print(f"evaluate: {reported:.6f}  torch-fidelity on the saved PNGs: {theirs:.6f}")
    assert theirs > 0
    assert reported == pytest.approx(theirs, rel=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_evaluate(rank, world, port, model, data, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import lit_diffusion.evaluation.evaluator as evaluator

        # rank zero's identity wins, even where another node's copy of the data has other mtimes
        if rank == 1:
            evaluator.data_identity = lambda urls: "another-node-copy"
        data_id = evaluator.eval_data_id(str(data / "val-*.tar"))
        # an error on rank zero reaches every rank instead of leaving them waiting
        try:
            evaluator.eval_data_id(str(data / "missing-*.tar"))
            error = ""
        except ValueError as err:
            error = str(err)
        results = Evaluator(replace(cfg, data_id=data_id), model.clip).run(model, tiny_datamodule(data, 5)
                                                                           .eval_dataloader(cfg.num_samples))
        torch.save({"data_id": data_id, "error": error, "results": results}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_cache_key_save_their_own_images_and_give_the_one_rank_figures(tiny_ckpts, tmp_path):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    data = tiny_ckpts["data"]
    cfg = EvalConfig(guidance=[3.0], num_samples=12, backends=["clip"], sampler="ddim", steps=2, resolution=16,
                     cache_dir=str(tmp_path / "cache"))
    one = Evaluator(replace(cfg, data_id=eval_data_id(str(data / "val-*.tar")), save_images=str(tmp_path / "one")),
                    model.clip).run(model, tiny_datamodule(data, 5).eval_dataloader(12))
    shutil.rmtree(tmp_path / "cache")
    # fork: the children inherit the model and the imports
    two = replace(cfg, save_images=str(tmp_path / "two"))
    mp.start_processes(_ddp_evaluate, args=(2, _free_port(), model, data, two, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["data_id"] == ranks[1]["data_id"] == data_identity(sorted(data.glob("val-*.tar")))
    assert all("missing-*.tar" in r["error"] for r in ranks)
    for key, value in one.items():
        if key.startswith("eval/") and key != "eval/seconds":
            for r in ranks:
                assert r["results"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # one cache file, written once; the union of both ranks' images is the one-rank set, pixel for pixel
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    for folder in ("g3.0", "real"):
        names = sorted(p.name for p in (tmp_path / "one" / folder).iterdir())
        assert len(names) == 12 and sorted(p.name for p in (tmp_path / "two" / folder).iterdir()) == names
        assert torch.equal(load_pngs(tmp_path / "two" / folder / n for n in names),
                           load_pngs(tmp_path / "one" / folder / n for n in names)), folder


@pytest.mark.parametrize("guidance,message", [([1.2, 1.25, 3.0], r"guidance scales \[1\.25\].*one decimal"),
                                              ([3.0, 1.0, 3.0], r"guidance scales \[3\.0\] are listed more than once")])
def test_scales_the_figures_cannot_tell_apart_are_refused(guidance, message):
    """Figures are keyed `_g{scale:.1f}`: 1.25's were logged as g1.2 over 1.2's, and a scale listed twice counted
    every sample twice."""
    from lit_diffusion.evaluation.video import VideoEvaluator

    config = EvalConfig(guidance=guidance)
    with pytest.raises(ValueError, match=message):
        Evaluator(config, None)
    with pytest.raises(ValueError, match=message):
        VideoEvaluator(config, None, 8)


# ------------------------------------------------------------------------------------- the VAE's ceiling, stand-ins
class StandInCLIP(torch.nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> their 2x2 mean colours projected to 8 unit-norm features; a caption -> a
    fixed random unit vector per caption."""

    embed_dim = 8

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(12, self.embed_dim, generator=torch.Generator().manual_seed(0)))

    def encode_image(self, images):
        return torch.nn.functional.normalize(torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1) @ self.proj,
                                             dim=-1)

    def tokenize(self, captions):
        return torch.tensor([sum(map(ord, c)) for c in captions])

    def encode_text(self, tokens):
        emb = torch.stack([torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(int(t))) for t in tokens])
        return None, torch.nn.functional.normalize(emb, dim=-1)


class MirroringVAE:
    """'Latents' that are the images mirrored left to right, decoded as they are; `calls` counts its round trips."""

    def __init__(self):
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return images.flip(-1)

    def decode(self, latents):
        return latents


class ReplayImages:
    """A 'model' whose samples are the real val images of the captions' keys (found by the per-key seed)."""

    device = torch.device("cpu")

    def __init__(self, images_by_seed: dict):
        self.images_by_seed, self.vae = images_by_seed, MirroringVAE()

    def sample(self, captions, seed, **_):
        return torch.stack([self.images_by_seed[s] for s in seed])


VAL = 23  # two ranks: 12 and 11 images, in batches of 5


def _shapes_loader(root, n=VAL):
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    return ImageCaptionDataModule(val_urls=str(Path(root) / "val-*.tar"), image_size=16, batch_size=5,
                                  num_workers=0).eval_dataloader(n)


def _replay_images(root) -> ReplayImages:
    return ReplayImages({sample_seed(k, 0): ((image + 1) / 2).clamp(0, 1)
                         for batch in _shapes_loader(root) for k, image in zip(batch["key"], batch["image"])})


def _evaluate_replay(root, model):
    evaluator = Evaluator(EvalConfig(guidance=[1.0, 3.0], num_samples=VAL, backends=["clip"]), StandInCLIP())
    return evaluator, evaluator.run(model, _shapes_loader(root))


def _ddp_replay(rank, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, results = _evaluate_replay(root, _replay_images(root))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_val")
    write_shapes(root, train=0, val=VAL, size=16, shard_size=10, seed=0)
    return root


def test_the_vae_ceiling_is_the_judge_on_the_real_images_round_trip_computed_once(shapes_val, tmp_path):
    """A VAE that mirrors every image: its round trip of the real images passes the caption judge exactly where the
    judge passes the mirrored images (every one-object caption; a two-object caption unless its relation is left
    or right), by caption kind; the generated images do not go through it, the later evaluations keep the figures
    without a second round trip, the report shows them, and two ranks give the one-process figures."""
    from lit_diffusion.evaluation.report import _vae_ceiling_lines
    from lit_diffusion.metrics.caption_accuracy import caption_kind, check_image

    passed = {"one_object": [], "two_objects": []}
    for batch in _shapes_loader(shapes_val):
        for image, attrs in zip(batch["image"], batch["attrs"]):
            mirrored = to_uint8(((image.flip(-1) + 1) / 2).clamp(0, 1)).float().div(255)
            passed[caption_kind(attrs)].append(check_image(mirrored, attrs)["correct"])
    assert all(passed["one_object"]) and 0 < sum(passed["two_objects"]) < len(passed["two_objects"])
    model = _replay_images(shapes_val)
    evaluator, first = _evaluate_replay(shapes_val, model)
    assert first["eval/caption_acc_vae"] == pytest.approx(sum(map(sum, passed.values())) / VAL)
    for kind, results in passed.items():
        assert first[f"eval_detail/caption_vae_{kind}"] == pytest.approx(sum(results) / len(results))
    assert first["eval/caption_acc_g3.0"] == 1.0  # the samples are the real images, not round-tripped
    calls = model.vae.calls
    assert calls == 5  # once per batch of the first evaluation
    second = evaluator.run(model, _shapes_loader(shapes_val))
    assert model.vae.calls == calls
    assert {k: v for k, v in second.items() if "_vae" in k} == {k: v for k, v in first.items() if "_vae" in k}
    line = "\n".join(_vae_ceiling_lines(first, "caption", "images"))
    assert f"pass the judge in {first['eval/caption_acc_vae']:.4g} of the images (one object 1, two objects " \
           f"{first['eval_detail/caption_vae_two_objects']:.4g})" in line

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_replay, args=(port, str(shapes_val), str(tmp_path / "ddp.json")), nprocs=2, join=True,
                       start_method="fork")
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    for key, value in first.items():
        if key != "eval/seconds":
            assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


class KeepingVAE:
    def encode(self, images):
        return images

    def decode(self, latents):
        return latents


def test_the_vae_ceiling_judges_only_the_real_images_the_loader_kept_whole(tmp_path):
    """A square reader centre-crops a 2:1 image, cutting objects its caption describes: such images are left out
    of the VAE's ceiling (counted in `eval_detail/caption_vae_judged`), so a VAE that keeps every image scores the
    judge's reading of the whole images, not of the crops."""
    from lit_diffusion.metrics.caption_accuracy import check_image

    write_shapes(tmp_path, train=0, val=VAL, size=24, shard_size=10, seed=0, aspect_ratios="1:1,2:1,1:2")
    passed = {"whole": [], "cropped": []}
    for batch in _shapes_loader(tmp_path):
        for image, attrs in zip(batch["image"], batch["attrs"]):
            stored = to_uint8(((image + 1) / 2).clamp(0, 1)).float().div(255)
            which = "whole" if attrs["width"] == attrs["height"] else "cropped"
            passed[which].append(check_image(stored, attrs)["correct"])
    whole = sum(passed["whole"]) / len(passed["whole"])
    assert passed["cropped"] and sum(passed["cropped"]) / len(passed["cropped"]) < whole  # the crops fail more
    model = _replay_images(tmp_path)
    model.vae = KeepingVAE()
    _, results = _evaluate_replay(tmp_path, model)
    assert results["eval_detail/caption_vae_judged"] == len(passed["whole"])
    assert results["eval/caption_acc_vae"] == pytest.approx(whole)
