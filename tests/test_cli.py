import json
import logging
import subprocess
import sys

import yaml
from conftest import _fit, tiny_datamodule
from PIL import Image

from lit_diffusion.cli import main


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lit_diffusion", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**__import__("os").environ, "WANDB_MODE": "offline"})


def test_data_shapes_command_writes_shards_tokenizer_and_info(tmp_path, capsys):
    main(["data", "shapes", "--out", str(tmp_path), "--train", "40", "--val", "10", "--size", "16",
          "--shard-size", "16", "--seed", "3"])
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert (tmp_path / "tokenizer.json").is_file()
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["counts"] == {"train": 40, "val": 10} and info["image_size"] == 16 and info["seed"] == 3
    assert summary["counts"] == info["counts"]


def test_fit_rejects_unknown_keys_and_prints_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(open("configs/vae/shapes.yaml"))
    cfg["model"]["init_args"]["learning_rate"] = 0.1
    bad.write_text(yaml.safe_dump(cfg))
    proc = run_cli("fit", "--config", str(bad), "--run.wandb", "false")
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr
    proc = run_cli("fit", "--config", "configs/vae/shapes.yaml", "--model.init_args.lr", "3e-4", "--print_config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["class_path"] == "lit_diffusion.stages.vae.VAEModule"
    assert printed["model"]["init_args"]["lr"] == 3e-4


def test_sample_and_evaluate_commands(tiny_ckpts, tmp_path, capsys, monkeypatch, caplog):
    from test_ldm import make_ldm

    from lit_diffusion.stages.ldm import LatentDiffusionModule

    calls, seeds = [], []
    sample = LatentDiffusionModule.sample

    def spy(self, prompts, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("guidance", "guidance_rescale", "clip_x0")})
        seeds.append(kwargs.get("seed"))
        return sample(self, prompts, **kwargs)

    monkeypatch.setattr(LatentDiffusionModule, "sample", spy)
    model = make_ldm(tiny_ckpts)
    trainer = _fit(model, tiny_datamodule(tiny_ckpts["data"]), 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    out = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(tmp_path / "ldm.ckpt"), "--prompt", "a large red circle", "--prompt",
          "a small blue square", "--negative-prompt", "a green square", "--guidance", "3", "--sampler", "ddim",
          "--steps", "3", "--seed", "0", "--num", "2", "--guidance-rescale", "0.7", "--clip-x0", "2.5",
          "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith("grid.png")
    assert Image.open(out).size[0] > 100
    assert calls == [{"guidance": 3.0, "guidance_rescale": 0.7, "clip_x0": 2.5}] * 2  # one call per prompt
    assert seeds == [[0, 1], [0, 1]]  # the grid's columns are titled "seed 0", "seed 1" for every row
    with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
        main(["sample", "--ckpt", str(tmp_path / "ldm.ckpt"), "--prompt", "a large red circle", "--guidance", "1",
              "--negative-prompt", "a green square", "--steps", "2", "--num", "1", "--out", str(out)])
    assert any("--negative-prompt and --guidance-rescale do nothing" in r.message for r in caplog.records)
    calls.clear()
    calls.clear()
    result = tmp_path / "eval.json"
    main(["evaluate", "--ckpt", str(tmp_path / "ldm.ckpt"), "--data", str(tiny_ckpts["data"] / "val-*.tar"),
          "--num-samples", "8", "--guidance", "1,3", "--features", "clip", "--steps", "3", "--batch-size", "4",
          "--guidance-rescale", "0.5", "--clip-x0", "3",
          "--cache-dir", str(tmp_path / "cache"), "--json", str(result)])
    # 2 batches of 4, each at both guidance scales
    assert calls == [{"guidance": g, "guidance_rescale": 0.5, "clip_x0": 3.0} for g in (1.0, 3.0)] * 2
    figures = json.loads(result.read_text())
    assert figures["eval/num_samples"] == 8
    for key in ("eval/fid_clip_g1.0", "eval/fid_clip_g3.0", "eval/clip_score_g3.0", "eval/caption_acc_g3.0"):
        assert isinstance(figures[key], float)
    assert (tmp_path / "fid_clip_vs_clip_score_final.png").is_file()


def test_user_errors_are_one_line(tmp_path):
    proc = run_cli("sample", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "x")
    assert proc.returncode == 2
    assert "ldm checkpoint not found" in proc.stderr and "missing.ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr
