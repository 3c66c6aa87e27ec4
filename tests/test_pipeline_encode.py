"""The pipeline's encode step (`encode:`): after stage 2, `data encode` runs once; the diffusion stage reads the
latent shards, and its fingerprint holds their manifest. The stages are faked; the encode is real (tiny CLIP/VAE)."""

import json
import shutil
from pathlib import Path
import subprocess

import pytest
from test_pipeline import FakeFit

from lit_diffusion import pipeline
from lit_diffusion.cli import main
from lit_diffusion.data.latents import state_dict_hash
from lit_diffusion.stages.clip import CLIPModule


class FakeStages(FakeFit):
    """`fit` of clip and vae leaves the tiny real checkpoints (the encode loads them); `data encode` runs for real,
    in this process."""

    def __init__(self, ckpts):
        super().__init__()
        self.ckpts = ckpts

    def __call__(self, argv, env=None):
        if argv[3:5] == ["data", "encode"]:
            self.calls.append(("encode", argv[5:]))
            main(argv[3:])
            return subprocess.CompletedProcess(argv, 0)
        done = super().__call__(argv, env)
        stage = self.calls[-1][0]
        if stage in self.ckpts:
            opts = dict(zip(argv[4::2], argv[5::2]))
            shutil.copy(self.ckpts[stage], f"{opts['--run.root']}/{stage}/checkpoints/last.ckpt")
        return done


@pytest.fixture
def run(tiny_ckpts, tmp_path, monkeypatch):
    configs = {}
    for stage in ("clip", "vae", "ldm"):
        configs[stage] = tmp_path / f"{stage}.yaml"
        shutil.copy(f"configs/{stage}/shapes.yaml", configs[stage])
    data_dir = tiny_ckpts["data"]
    cfg = {"name": "t", "root": str(tmp_path / "runs"), "seed": 0, "wandb": False,
           "encode": {"dtype": "float32", "batch_size": 32, "device": "cpu"},
           "stages": {s: {"config": str(configs[s]), "args": {"trainer.max_steps": 6}} for s in configs}}
    data = {"train_urls": str(data_dir / "train-*.tar"), "val_urls": str(data_dir / "val-*.tar"),
            "tokenizer": str(data_dir / "tokenizer.json")}
    fake = FakeStages({"clip": tiny_ckpts["clip"], "vae": tiny_ckpts["vae"]})
    monkeypatch.setattr(pipeline.subprocess, "run", fake)
    root = tmp_path / "runs" / "t"
    return lambda: pipeline.train_stages(cfg, root, "t", data), fake, root, cfg


def test_encode_runs_after_stage_2_and_the_ldm_trains_from_its_latents(run, tiny_ckpts):
    train, fake, root, cfg = run
    train()
    assert [c[0] for c in fake.calls] == ["clip", "vae", "encode", "ldm"]
    encode = dict(zip(fake.calls[2][1][::2], fake.calls[2][1][1::2]))
    data = tiny_ckpts["data"]
    assert encode["--clip"] == str(root / "clip.ckpt") and encode["--out"] == str(root / "latents")
    assert encode["--train"].split("::") == [str(p) for p in sorted(data.glob("train-*.tar"))]
    assert encode["--val"].split("::") == [str(p) for p in sorted(data.glob("val-*.tar"))]
    assert encode["--dtype"] == "float32" and "--flips" not in fake.calls[2][1]
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["samples"] == 256 + 64 and manifest["dtype"] == "float32"
    assert manifest["clip_hash"] == state_dict_hash(CLIPModule.from_checkpoint(tiny_ckpts["clip"]).state_dict())
    # the diffusion stage's command: LatentDataModule (its class_path before its init_args) on the latent shards
    argv = json.loads((root / "ldm" / "checkpoints" / "last.ckpt").read_text())
    i = argv.index("--data.class_path")
    assert argv[i + 1] == pipeline.LATENT_DATA and argv.index("--data.init_args.train_urls") > i
    n_train = len(list(data.glob("train-*.tar")))
    assert argv[argv.index("--data.init_args.train_urls") + 1] == str(
        root / "latents" / "train" / f"{{000000..{n_train - 1:06d}}}.tar")
    assert argv[argv.index("--data.init_args.val_urls") + 1] == str(root / "latents" / "val" / "{000000..000000}.tar")
    assert sorted(p.name for p in (root / "latents" / "train").iterdir()) == [f"{i:06d}.tar" for i in range(n_train)]
    record = json.loads((root / "ldm.fingerprint.json").read_text())
    assert record["latents"] == {k: v for k, v in manifest.items() if k != "skipped"}
    # a rerun with the same inputs encodes and trains nothing
    again = train()
    assert len(fake.calls) == 4 and all(s["skipped"] for s in again.values())


def test_latents_made_from_other_inputs_stop_the_run(run):
    train, fake, root, cfg = run
    train()
    # re-encoded (other dtype): the finished diffusion stage was made from the old latents
    shutil.rmtree(root / "latents")
    cfg["encode"]["dtype"] = "float16"
    with pytest.raises(pipeline.StageInputsChanged, match=r"(?s)\[ldm\] .*\n  - latents: the latent shards "
                                                          r"are not encoded yet \(.*latents/train/\{000000\.\.0+1\}.tar\)\nTo"):
        train()
    assert len(fake.calls) == 4
    # without the diffusion stage's outputs: encoded again, then trained from the float16 latents
    for path in (root / "ldm", root / "ldm.ckpt", root / "ldm.fingerprint.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train()
    assert [c[0] for c in fake.calls[4:]] == ["encode", "ldm"]
    assert json.loads((root / "ldm.fingerprint.json").read_text())["latents"]["dtype"] == "float16"
    # latents of other CLIP weights (a manifest naming another hash) are refused before the stage trains
    path = root / "latents" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "clip_hash": "0" * 64}))
    with pytest.raises(pipeline.StageInputsChanged, match=r"(?s)\[ldm\] .*\n  - latents: the latent shards "
                                                          r"were encoded from other inputs \(manifest keys "
                                                          r"clip_hash\)\nTo"):
        train()
    for path_ in (root / "ldm", root / "ldm.ckpt", root / "ldm.fingerprint.json"):
        shutil.rmtree(path_) if path_.is_dir() else path_.unlink()
    with pytest.raises(pipeline.StageInputsChanged, match=rf"\[encode\] {path} was made from other inputs \(clip\)"
                                                          rf".*rm -r {root / 'latents'}"):
        train()
    assert [c[0] for c in fake.calls[6:]] == []


def test_a_changed_encode_block_or_a_retrained_encoder_stops_the_run_before_anything_trains(run, tiny_ckpts):
    """The latents' own inputs: the `encode:` block that wrote them (a changed dtype had been skipped over: the
    diffusion stage was reused, or retrained on the old float32 shards) and the CLIP that encoded them (its retrain
    hint left them out, and the run stopped at the encode after CLIP and the VAE had trained again)."""
    train, fake, root, cfg = run
    train()
    assert json.loads((root / "latents" / pipeline.ENCODE_RECORD).read_text())["dtype"] == "float32"
    cfg["encode"]["dtype"] = "float16"
    with pytest.raises(pipeline.StageInputsChanged, match=r"(?s)\[encode\] .*latents was written by another encode: "
                                                          r"block .*\n  - encode.dtype: \"float32\" -> \"float16\"\n"
                                                          r"To encode again .*rm -r .*latents .*ldm\.ckpt"):
        train()
    cfg["encode"]["dtype"] = "float32"
    cfg["encode"]["device"] = "cuda"  # where it runs does not change the shards
    train()
    assert len(fake.calls) == 4
    cfg["encode"]["device"] = "cpu"
    # CLIP trained again (its config changed): the hint names the latents too
    clip_config = Path(cfg["stages"]["clip"]["config"])
    clip_config.write_text(clip_config.read_text().replace("lr: 1.0e-3", "lr: 5.0e-4"))
    with pytest.raises(pipeline.StageInputsChanged) as err:
        train()
    doomed = str(err.value).split("rm -r ")[1].split(";")[0].split()
    assert str(root / "clip.ckpt") in doomed and str(root / "latents") in doomed and str(root / "ldm.ckpt") in doomed
    # the stages' outputs deleted but the latents kept: refused before CLIP trains, not after it and the VAE did
    for path in doomed:
        if path != str(root / "latents"):
            shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    with pytest.raises(pipeline.StageInputsChanged, match=r"\[encode\] .*latents was encoded by the clip\.ckpt that "
                                                          r"will be trained again now"):
        train()
    assert len(fake.calls) == 4
    shutil.rmtree(root / "latents")
    train()
    assert [c[0] for c in fake.calls[4:]] == ["clip", "vae", "encode", "ldm"]


def test_unknown_encode_keys_are_named(tmp_path):
    cfg = yaml_config(tmp_path, {"encode": {"out": "x", "dtyp": "float16"}})
    with pytest.raises(ValueError, match=r"unknown encode keys \['dtyp'\]"):
        pipeline.load_config(cfg)


def yaml_config(tmp_path, extra: dict):
    import yaml

    cfg = yaml.safe_load(open("configs/pipeline/shapes.yaml"))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**cfg, **extra}))
    return path


@pytest.mark.parametrize("config", ["configs/ldm/base.yaml", "configs/ldm/shapes.yaml"])
def test_the_ldm_command_parses_to_a_latent_data_module(config, tmp_path, monkeypatch):
    """LightningCLI reads the switched data module: the image-only options of the stage config (image_size) are
    dropped with the old class, the shared ones kept."""
    import sys

    import yaml

    from lit_diffusion.runtime.lightning_cli import LitDiffusionCLI

    class ParseOnly(LitDiffusionCLI):
        def instantiate_classes(self):
            pass

    for name in ("photos-train-0.tar", "photos-train-1.tar", "photos-val-0.tar"):
        (tmp_path / name).touch()  # names only: latent_data counts them
    data = pipeline.latent_data({"encode": {}}, tmp_path, {"train_urls": str(tmp_path / "photos-train-*.tar"),
                                                           "val_urls": str(tmp_path / "photos-val-*.tar")})
    overrides = pipeline.stage_overrides("ldm", {"stages": {"ldm": {}}}, data, {})
    argv = ["--config", config] + [a for k, v in overrides.items() for a in pipeline._arg(k, v)]
    monkeypatch.setattr(sys, "argv", ["lit-diffusion"])
    cli = ParseOnly(args=argv, run=False)
    parsed = cli.config["data"]
    assert parsed["class_path"] == pipeline.LATENT_DATA
    args = dict(parsed["init_args"])
    assert args["train_urls"] == str(tmp_path / "latents" / "train" / "{000000..000001}.tar")
    assert "image_size" not in args
    given = yaml.safe_load(open(config))["data"]["init_args"]
    assert args["batch_size"] == given["batch_size"] and args["val_max_samples"] == given["val_max_samples"]


@pytest.mark.parametrize("layout", ["img2dataset", "named"])
def test_users_shard_names_and_layouts_are_encoded_and_read_exactly(layout, run, tiny_ckpts, tmp_path):
    """Shards named as the shapes data never are: img2dataset's `train/00000.tar` + `val/00000.tar` (the same file
    name in both splits), or `NAME-train-{000000..000001}.tar` + `NAME-val-000000.tar` (GNU tar's names)."""
    train, fake, root, cfg = run
    src = tiny_ckpts["data"]
    user = tmp_path / "user"
    trains, vals = sorted(src.glob("train-*.tar")), sorted(src.glob("val-*.tar"))
    if layout == "img2dataset":
        names = {**{f"train/{i:05d}.tar": p for i, p in enumerate(trains)}, "val/00000.tar": vals[0]}
        urls = {"train_urls": str(user / "train" / "{00000..00001}.tar"), "val_urls": str(user / "val" / "00000.tar")}
    else:
        names = {**{f"photos-train-{i:06d}.tar": p for i, p in enumerate(trains)}, "photos-val-000000.tar": vals[0]}
        urls = {"train_urls": str(user / "photos-train-{000000..000001}.tar"),
                "val_urls": str(user / "photos-val-000000.tar")}
    for name, path in names.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, user / name)
    data = {**urls, "tokenizer": str(src / "tokenizer.json")}
    pipeline.train_stages(cfg, root, "t", data)
    assert [c[0] for c in fake.calls] == ["clip", "vae", "encode", "ldm"]
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["splits"] == {"train": ["train/000000.tar", "train/000001.tar"], "val": ["val/000000.tar"]}
    assert [s["source"] for s in manifest["shards"]] == [str(user / n) for n in names]
    # the diffusion stage reads exactly the shards written, and its data module finds and accepts their manifest
    argv = json.loads((root / "ldm" / "checkpoints" / "last.ckpt").read_text())
    given = {k: argv[argv.index(f"--data.init_args.{k}") + 1] for k in ("train_urls", "val_urls")}
    from lit_diffusion.data.datamodule import LatentDataModule

    module = LatentDataModule(**given, batch_size=4, num_workers=0)
    module.setup("fit")
    assert module.train_shards == [str(root / "latents" / n) for n in manifest["splits"]["train"]]
    assert module.manifests["val"]["path"] == str(root / "latents" / "manifest.json")
    assert sum(1 for _ in module.eval_dataloader()) * 4 >= manifest["shards"][-1]["samples"]


def test_a_latent_config_without_encode_is_refused_before_anything_trains(run):
    train, fake, root, cfg = run
    del cfg["encode"]
    cfg["stages"]["ldm"]["config"] = "configs/ldm/shapes_dit.yaml"
    with pytest.raises(pipeline.PipelineConfigError, match=r"stages\.ldm \(configs/ldm/shapes_dit\.yaml\): "
                                                           r"data\.class_path is .*LatentDataModule .*no `encode:` "
                                                           r"block.*add `encode: \{\}`"):
        train()
    assert fake.calls == [] and not root.exists()


@pytest.mark.parametrize("args, message", [
    ({"data.init_args.random_flip": True}, r"data\.init_args\.random_flip is true.*`encode: \{flips: true\}`"),
    ({"model.init_args.sample_posterior": True}, r"model\.init_args\.sample_posterior is true.*`encode: \{std: true\}`"),
    ({"data.init_args.image_size": 16}, r"the pipeline passes data\.init_args\.image_size, which LatentDataModule "
                                        r"does not take"),
])
def test_latent_data_that_cannot_serve_the_stage_is_refused_before_anything_trains(run, args, message):
    train, fake, root, cfg = run
    cfg["stages"]["ldm"]["args"].update(args)
    with pytest.raises(pipeline.PipelineConfigError, match=r"stages\.ldm .*" + message):
        train()
    assert fake.calls == []


def test_a_latent_data_module_for_clip_is_refused(run, tmp_path):
    train, fake, root, cfg = run
    cfg["stages"]["clip"]["args"]["data.class_path"] = pipeline.LATENT_DATA
    with pytest.raises(pipeline.PipelineConfigError, match=r"stages\.clip .*the clip stage trains on images"):
        train()
    assert fake.calls == []


def test_the_prior_trains_after_the_encode_on_its_latents_with_the_clip(run, tiny_ckpts, tmp_path):
    """unCLIP: `stages.prior` runs between the VAE and the diffusion stage, after the encode (with image
    embeddings), on the same latent shards, given the finished CLIP."""
    train, fake, root, cfg = run
    cfg["encode"]["image_embeddings"] = True
    shutil.copy("configs/prior/shapes.yaml", tmp_path / "prior.yaml")
    cfg["stages"]["prior"] = {"config": str(tmp_path / "prior.yaml"), "args": {"trainer.max_steps": 6}}
    results = train()
    assert [c[0] for c in fake.calls] == ["clip", "vae", "encode", "prior", "ldm"]
    assert "--image-embeddings" in fake.calls[2][1]
    assert json.loads((root / "latents" / "manifest.json").read_text())["image_embedding"]["dim"] == 32
    argv = json.loads((root / "prior" / "checkpoints" / "last.ckpt").read_text())
    assert argv[argv.index("--model.init_args.clip_ckpt") + 1] == str(root / "clip.ckpt")
    assert argv[argv.index("--data.class_path") + 1] == pipeline.LATENT_DATA
    assert argv[argv.index("--data.init_args.train_urls") + 1].startswith(str(root / "latents" / "train"))
    assert "--model.init_args.vae_ckpt" not in argv
    assert list(results) == ["clip", "vae", "prior", "ldm"]


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_unclip_stages_without_image_embeddings_are_refused_before_anything_trains(run, tmp_path, stage):
    train, fake, root, cfg = run
    if stage == "prior":
        shutil.copy("configs/prior/shapes.yaml", tmp_path / "prior.yaml")
        cfg["stages"]["prior"] = {"config": str(tmp_path / "prior.yaml")}
        message = r"stages\.prior .*the prior trains on CLIP image embeddings"
    else:
        cfg["stages"]["ldm"]["args"]["model.init_args.condition"] = "text+image_embedding"
        message = r"stages\.ldm .*condition: text\+image_embedding \(unCLIP's decoder\) trains on CLIP image embeddings"
    with pytest.raises(pipeline.PipelineConfigError, match=message + r".*`encode: \{image_embeddings: true\}`"):
        train()
    assert fake.calls == []
