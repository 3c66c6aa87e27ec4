import json

import pytest
import yaml

from lit_diffusion.bench.flops import unet_step_flops
from lit_diffusion.pipeline import eval_device, load_config, run_pipeline

DATA = {"image_size": 16, "batch_size": 16, "num_workers": 0, "train_batches_per_epoch": 3}


def _data_args():
    return {f"data.init_args.{k}": v for k, v in DATA.items()}


def tiny_pipeline(tmp_path) -> dict:
    trainer = {"trainer.max_steps": 6, "trainer.check_val_every_n_epoch": 1, "trainer.log_every_n_steps": 1,
               "trainer.enable_progress_bar": False}
    return {
        "name": "tiny", "root": str(tmp_path / "runs"), "seed": 0, "wandb": True,
        "data": {"out": str(tmp_path / "data"), "train": 192, "val": 48, "size": 16, "seed": 0, "shard_size": 96},
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
                **_data_args(), **trainer, "data.init_args.val_max_samples": 16, "model.init_args.image_size": 16,
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
