import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lit_diffusion import pipeline
from lit_diffusion.bench.flops import unet_step_flops
from lit_diffusion.pipeline import eval_device, load_config, run_pipeline

DATA = {"image_size": 16, "batch_size": 16, "num_workers": 0, "train_batches_per_epoch": 3}


def _data_args(latents: bool = False):
    # latent shards fix the image size (the encode's); LatentDataModule takes no image_size
    return {f"data.init_args.{k}": v for k, v in DATA.items() if not (latents and k == "image_size")}


def tiny_pipeline(tmp_path) -> dict:
    trainer = {"trainer.max_steps": 6, "trainer.check_val_every_n_epoch": 1, "trainer.log_every_n_steps": 1,
               "trainer.enable_progress_bar": False}
    return {
        "name": "tiny", "root": str(tmp_path / "runs"), "seed": 0, "wandb": True,
        "data": {"out": str(tmp_path / "data"), "train": 192, "val": 48, "size": 16, "seed": 0, "shard_size": 96},
        "encode": {"dtype": "float32", "device": "cpu"},
        "stages": {
            "clip": {"config": "configs/clip/shapes.yaml", "args": {
                **_data_args(), **trainer, "model.init_args.embed_dim": 32,
                "model.init_args.vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                "model.init_args.text": {"width": 32, "layers": 1, "heads": 2}}},
            "vae": {"config": "configs/vae/shapes.yaml", "args": {
                **_data_args(), **trainer, "model.init_args.rfid_backend": "clip",
                "model.init_args.arch": {"base_channels": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                                         "z_channels": 4, "mid_attention": False, "norm_groups": 4}}},
            "ldm": {"config": "configs/ldm/shapes.yaml", "args": {
                **_data_args(latents=True), **trainer, "data.init_args.val_max_samples": 16,
                "model.init_args.image_size": 16,
                "model.init_args.sample_steps": 3, "model.init_args.warmup_steps": 0,
                "model.init_args.unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                         "attention_resolutions": [2], "head_dim": 8, "norm_groups": 4}}},
        },
        "evaluation": {"guidance": [1, 3], "num_samples": 16, "features": ["clip"], "sampler": "ddim", "steps": 3},
        "samples": {"prompts": ["a large red circle", "a small blue square"], "negative_prompt": "a red circle",
                    "guidance": [1, 3], "steps": 3},
    }


@pytest.mark.slow
def test_pipeline_end_to_end_report_matches_run_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_pipeline(tmp_path)))
    out = run_pipeline(cfg_path)
    root = tmp_path / "runs" / "tiny"
    report = json.loads((root / "report.json").read_text())
    assert out["json"] == str(root / "report.json")
    for stage in ("clip", "vae", "ldm"):
        assert (root / f"{stage}.ckpt").is_file()
        summary = json.loads((root / stage / "summary.json").read_text())
        for key, value in report["stages"][stage]["figures"].items():
            assert value == summary["final"].get(key), (stage, key)
        assert report["stages"][stage]["config"]["trainer"]["max_steps"] == 6
        assert list((root / stage / "wandb").glob("offline-run-*")), f"{stage}: no offline W&B run"
    assert report["stages"]["clip"]["figures"]["val/i2t_r1"] is not None
    assert report["stages"]["vae"]["figures"]["val/psnr"] is not None
    assert report["stages"]["vae"]["figures"]["val/rfid"] is not None
    evaluation = json.loads((root / "eval" / "eval_final.json").read_text())
    for key in ("eval/fid_clip_g1.0", "eval/fid_clip_g3.0", "eval/clip_score_g3.0", "eval/caption_acc_g3.0"):
        assert report["evaluation"]["results"][key] == evaluation[key]
    md = (root / "report.md").read_text()
    g3 = report["evaluation"]["results"]
    assert f"| 3 | {g3['eval/fid_clip_g3.0']:.4g} | {g3['eval/clip_score_g3.0']:.4g} |" in md
    kinds = [evaluation.get(f"eval_detail/caption_{k}_g3.0") for k in ("one_object", "two_objects")]
    assert None not in kinds and f"| 3 | {kinds[0]:.4g} | {kinds[1]:.4g} |" in md  # the breakdown by kind
    # CLIP trained with relation hard negatives (configs/clip/shapes.yaml) and measured how often it tells them apart
    assert 0 <= report["stages"]["clip"]["figures"]["val/negative_acc"] <= 1
    assert (root / "samples.png").is_file() and (root / "eval" / "fid_clip_vs_clip_score_final.png").is_file()
    # the in-loop evaluation ran at the end of the diffusion stage too
    ldm_rows = [json.loads(x) for x in (root / "ldm" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/fid_clip_g3.0" in r for r in ldm_rows)

    # a second run finds every finished checkpoint and trains nothing
    again = run_pipeline(cfg_path)["report"]
    assert all(again["stages"][s]["skipped"] for s in ("clip", "vae", "ldm"))
    assert again["evaluation"]["results"]["eval/fid_clip_g3.0"] == pytest.approx(g3["eval/fid_clip_g3.0"], rel=1e-6)


def test_base_pipeline_runs_the_gpu_scale_stage_configs_on_real_shards():
    cfg = load_config("configs/pipeline/base.yaml")
    assert cfg["data"]["train_urls"] and "out" not in cfg["data"]  # real shards, not the shapes generator
    stages = {s: yaml.safe_load(open(cfg["stages"][s]["config"])) for s in ("clip", "vae", "ldm")}
    for stage, raw in stages.items():
        assert raw["trainer"]["accelerator"] == "gpu" and raw["trainer"]["precision"] == "bf16-mixed", stage
    ldm, vae = stages["ldm"]["model"]["init_args"], stages["vae"]["model"]["init_args"]
    assert ldm["image_size"] == stages["vae"]["data"]["init_args"]["image_size"] == 256
    assert 2 ** (len(vae["arch"]["ch_mult"]) - 1) == 8  # f=8: 32x32 latents
    width = stages["clip"]["model"]["init_args"]["text"]["width"]
    assert 2e8 < unet_step_flops({**ldm["unet"], "context_dim": width}, 1, 32)["params"] < 9e8
    assert stages["clip"]["model"]["init_args"]["hard_negatives"]
    assert eval_device(cfg) == "cuda" and eval_device(load_config("configs/pipeline/shapes.yaml")) == "cpu"


# ---- reruns: a finished checkpoint is reused only for the inputs that made it (stage runs faked) ----
class FakeFit:
    """Stands in for the `lit-diffusion fit` subprocess: writes last.ckpt (its bytes depend on the argv, as a
    real checkpoint depends on its inputs) and summary.json; `fail` makes a stage stop half way."""

    def __init__(self):
        self.calls, self.fail = [], set()

    def __call__(self, argv, env=None):
        opts = dict(zip(argv[4::2], argv[5::2]))
        stage, run_dir = opts["--run.name"], Path(opts["--run.root"]) / opts["--run.name"]
        self.calls.append((stage, opts.get("--ckpt_path")))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_text(json.dumps([a for a in argv if a != "--ckpt_path"]))
        (run_dir / "summary.json").write_text(json.dumps({"final": {"val/loss": 1.0}}))
        return subprocess.CompletedProcess(argv, 1 if stage in self.fail else 0)


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        (data_dir / name).write_bytes(name.encode() * 100)
    (data_dir / "tokenizer.json").write_text('{"vocab": 1}')
    configs = {}
    for stage in ("clip", "vae", "ldm"):
        configs[stage] = tmp_path / f"{stage}.yaml"
        shutil.copy(f"configs/{stage}/shapes.yaml", configs[stage])
    # without `encode:` the diffusion stage reads the image shards
    ldm = yaml.safe_load(configs["ldm"].read_text())
    ldm["data"]["class_path"] = "lit_diffusion.data.datamodule.ImageCaptionDataModule"
    configs["ldm"].write_text(yaml.safe_dump(ldm))
    cfg = {"name": "t", "root": str(tmp_path / "runs"), "seed": 0, "wandb": False,
           "stages": {s: {"config": str(configs[s]), "args": {"trainer.max_steps": 6}} for s in configs}}
    data = {"train_urls": str(data_dir / "train-*.tar"), "val_urls": str(data_dir / "val-000000.tar"),
            "tokenizer": str(data_dir / "tokenizer.json")}
    fit = FakeFit()
    monkeypatch.setattr(pipeline.subprocess, "run", fit)
    root = tmp_path / "runs" / "t"
    return SimpleNamespace(cfg=cfg, data=data, fit=fit, root=root, configs=configs, data_dir=data_dir,
                           run=lambda: pipeline.train_stages(cfg, root, "t", data))


def _changed(run, *named: str) -> str:
    """Runs the pipeline expecting it to stop before training anything; returns the message."""
    before = len(run.fit.calls)
    with pytest.raises(pipeline.StageInputsChanged) as err:
        run.run()
    assert len(run.fit.calls) == before, "a stage trained although an input changed"
    message = str(err.value)
    for text in named:
        assert text in message, message
    return message


def test_rerun_with_the_same_inputs_trains_nothing(fake_run):
    first = fake_run.run()
    assert [c[0] for c in fake_run.fit.calls] == ["clip", "vae", "ldm"]
    assert not any(s["skipped"] for s in first.values())
    record = json.loads((fake_run.root / "vae.fingerprint.json").read_text())
    assert record["overrides"]["model.init_args.clip_ckpt"] == str(fake_run.root / "clip.ckpt")
    assert set(record["files"]) == {"model.init_args.clip_ckpt"} and set(record["data"]) == {"train", "val"}
    again = fake_run.run()
    assert len(fake_run.fit.calls) == 3 and all(s["skipped"] for s in again.values())


def test_a_changed_override_stops_the_run_and_names_the_key(fake_run):
    fake_run.run()
    fake_run.cfg["stages"]["vae"]["args"]["trainer.max_steps"] = 8
    root = fake_run.root
    message = _changed(fake_run, f"[vae] {root / 'vae.ckpt'} was made with other inputs",
                       "override --trainer.max_steps: 6 -> 8",
                       f"rm -r {root / 'vae.ckpt'} {root / 'vae.fingerprint.json'} {root / 'vae'} "
                       f"{root / 'ldm.ckpt'} {root / 'ldm.fingerprint.json'} {root / 'ldm'};",
                       "choose another run name")
    assert "[clip]" not in message and "max_steps: 6 -> 8" in message.splitlines()[1]
    # doing what the message says retrains vae and ldm, from scratch, and keeps clip
    for path in message.split("rm -r ")[1].split(";")[0].split():
        shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    fake_run.run()
    assert fake_run.fit.calls[3:] == [("vae", None), ("ldm", None)]


def test_a_changed_stage_config_file_names_the_file_and_key(fake_run):
    fake_run.run()
    path = fake_run.configs["clip"]
    raw = yaml.safe_load(path.read_text())
    raw["model"]["init_args"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(raw))
    _changed(fake_run, "[clip]", f"config {path}: model.init_args.lr: 0.001 -> 0.5", "To retrain clip and vae and ldm")
    fake_run.cfg["seed"] = 1
    _changed(fake_run, "seed: 0 -> 1")


def test_changed_data_or_tokenizer_is_named(fake_run):
    fake_run.run()
    shard = fake_run.data_dir / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[::-1])  # same name and size, other content
    _changed(fake_run, "[clip]", f"data train: the train shards ({fake_run.data['train_urls']}) changed")
    shard.write_bytes(shard.read_bytes()[::-1])
    fake_run.run()  # back as it was: nothing to do
    (fake_run.data_dir / "tokenizer.json").write_text('{"vocab": 2}')
    _changed(fake_run, "[clip]", f"file --model.init_args.tokenizer_path: {fake_run.data['tokenizer']} has other "
                                 "content")
    assert len(fake_run.fit.calls) == 3


def test_a_replaced_upstream_checkpoint_stops_the_stages_after_it(fake_run):
    fake_run.run()
    (fake_run.root / "clip.ckpt").write_text("a CLIP trained elsewhere")
    _changed(fake_run, "[vae]", f"file --model.init_args.clip_ckpt: {fake_run.root / 'clip.ckpt'} has other content")
    # a missing upstream is about to be trained again: what was made from the old one is stale
    (fake_run.root / "clip.ckpt").unlink()
    shutil.rmtree(fake_run.root / "clip")
    _changed(fake_run, f"[vae] {fake_run.root / 'vae.ckpt'} was made from a clip.ckpt that is missing")


def test_an_interrupted_stage_resumes_and_only_for_the_same_inputs(fake_run):
    fake_run.fit.fail = {"vae"}
    with pytest.raises(RuntimeError, match="stage vae failed"):
        fake_run.run()
    assert not (fake_run.root / "vae.ckpt").exists() and (fake_run.root / "vae" / "fingerprint.json").is_file()
    fake_run.fit.fail = set()
    fake_run.run()
    last = str(fake_run.root / "vae" / "checkpoints" / "last.ckpt")
    assert fake_run.fit.calls == [("clip", None), ("vae", None), ("vae", last), ("ldm", None)]

    # interrupted again after an input changed: last.ckpt was made from the old inputs, so no resume
    for path in (fake_run.root / "vae.ckpt", fake_run.root / "ldm.ckpt"):
        path.unlink()
    shutil.rmtree(fake_run.root / "ldm")
    fake_run.cfg["stages"]["vae"]["args"]["model.init_args.lr"] = 1e-3
    _changed(fake_run, f"[vae] the interrupted run {last} was started with other inputs",
             "override --model.init_args.lr: <unset> -> 0.001", f" {fake_run.root / 'vae'} ")


def test_the_runs_own_tokenizer_is_in_its_folder_and_refused_for_other_inputs(tmp_path):
    """Users' shards without a tokenizer: it is trained into the run's folder (runs/NAME, the config file's stem
    when there is no `name:`; it had gone to runs/pipeline, which the run never made) and its inputs are recorded,
    so other shards or another vocab_size / context_length stop the run instead of reusing it."""
    from lit_diffusion.data.shapes import write_shapes
    from lit_diffusion.data.tokenizer import Tokenizer

    data_dir = tmp_path / "data"
    write_shapes(data_dir, train=64, val=16, size=16, shard_size=32, seed=0)
    (data_dir / "tokenizer.json").unlink()
    cfg = {"stages": {"clip": {"config": "x"}},
           "data": {"train_urls": str(data_dir / "train-*.tar"), "val_urls": str(data_dir / "val-*.tar"),
                    "vocab_size": 300, "context_length": 16}}
    root = tmp_path / "runs" / "mine"
    data = pipeline._ensure_data(cfg, root)
    assert data["tokenizer"] == str(root / "tokenizer.json")
    assert Tokenizer.load(root / "tokenizer.json").context_length == 16
    assert pipeline._ensure_data(cfg, root)["tokenizer"] == data["tokenizer"]  # the same inputs: reused
    cfg["data"]["context_length"] = 77
    with pytest.raises(pipeline.StageInputsChanged, match=r"(?s)\[tokenizer\] .*tokenizer.json was trained on other "
                                                          r"inputs .*data.context_length: 16 -> 77\nTo train it again"):
        pipeline._ensure_data(cfg, root)
    cfg["data"]["context_length"] = 16
    (data_dir / "train-000001.tar").unlink()  # other shards
    with pytest.raises(pipeline.StageInputsChanged, match=r"data.train_urls: "):
        pipeline._ensure_data(cfg, root)
    cfg["data"].pop("val_urls")
    with pytest.raises(ValueError, match="data.train_urls is given without data.val_urls"):
        pipeline._ensure_data(cfg, root)


def test_evaluation_and_samples_keys_are_checked_and_rescale_and_clip_reach_the_evaluation(tmp_path):
    """`evaluation:` and `samples:` keys were read with .get: a typo, or guidance_rescale / clip_x0 (which
    `lit-diffusion evaluate` takes), were dropped silently and the figures were at the defaults."""
    cfg = yaml.safe_load(Path("configs/pipeline/shapes.yaml").read_text())
    cfg["evaluation"] = {**cfg["evaluation"], "guidance_rescale": 0.7, "clip_x0": 2.0}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ecfg = pipeline._eval_config(load_config(path))
    assert (ecfg.guidance_rescale, ecfg.clip_x0) == (0.7, 2.0)
    for block, typo in (("evaluation", "num_sample"), ("samples", "prompt")):
        bad = {**cfg, block: {**(cfg.get(block) or {}), typo: 5}}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=rf"unknown {block} keys \['{typo}'\]; known: "):
            load_config(path)


def test_summaries_and_reports_show_the_binding_figures_a_clip_config_names():
    from lit_diffusion.pipeline import _one_line
    from lit_diffusion.stages.registry import STAGE_KEYS, stage_keys

    final = {"val/i2t_r1": 0.9, "val/binding_acc_shape": 0.96, "val/binding_acc_color": 0.94, "val/other": 1.0}
    assert stage_keys("clip", final) == STAGE_KEYS["clip"] + ("val/binding_acc_color", "val/binding_acc_shape")
    assert stage_keys("vae", {"val/binding_acc_color": 1.0}) == STAGE_KEYS["vae"]
    line = _one_line("clip", {"final": final}, 90.0)
    assert line == "[clip] done in 1.5 min: val/i2t_r1=0.9, val/binding_acc_color=0.94, val/binding_acc_shape=0.96"
