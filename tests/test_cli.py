import json
import logging
import subprocess
import sys

import pytest
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


def test_fit_says_a_users_mistake_in_one_line_also_from_inside_lightning(shapes_data, tmp_path, capsys, monkeypatch):
    """A shard pattern that matches nothing (found in the data module's setup, inside Lightning's fit), a
    `--ckpt_path` that is missing, truncated or another stage's, and a stage checkpoint of the wrong kind given to a
    model (found while jsonargparse builds it, which wraps the error) each end the command with exit code 2 and one
    line naming what was given; an error that is not a user's (a bug) keeps its traceback."""
    import torch

    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    vae_like = tmp_path / "vae_like.ckpt"
    torch.save({"lit_diffusion": {"kind": "vae", "version": 1}, "state_dict": {}}, vae_like)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(vae_like.read_bytes()[:200])
    base = ["fit", "--config", "configs/vae/shapes.yaml", "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
            "--trainer.max_steps", "1", "--data.init_args.num_workers", "0",
            "--data.init_args.train_urls", str(shapes_data / "train-*.tar"),
            "--data.init_args.val_urls", str(shapes_data / "val-*.tar")]

    def error(*extra) -> str:
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.strip().splitlines() if not line.startswith("INFO: ")]  # Lightning's own
        assert len(lines) == 1 and lines[0].startswith("lit-diffusion fit: error: "), lines
        return lines[0]

    missing = tmp_path / "nothing" / "train-*.tar"
    assert f"shard pattern '{missing}': no such file(s): {missing}" in error(
        "--data.init_args.train_urls", str(missing), "--run.name", "a")
    assert f"--ckpt_path {tmp_path}/gone.ckpt: vae checkpoint not found: {tmp_path}/gone.ckpt" in error(
        "--ckpt_path", str(tmp_path / "gone.ckpt"), "--run.name", "b")
    assert f"--ckpt_path {truncated}: cannot load vae checkpoint {truncated} safely (weights_only=True)" in error(
        "--ckpt_path", str(truncated), "--run.name", "c")
    base[2] = "configs/clip/shapes.yaml"
    assert f"--ckpt_path {vae_like}: {vae_like} is a 'vae' checkpoint, expected a 'clip' checkpoint" in error(
        "--ckpt_path", str(vae_like), "--run.name", "d", "--model.init_args.tokenizer_path",
        str(shapes_data / "tokenizer.json"))
    base[2] = "configs/ldm/shapes.yaml"
    assert f"{vae_like} is a 'vae' checkpoint, expected a 'clip' checkpoint" in error(
        "--model.init_args.clip_ckpt", str(vae_like), "--model.init_args.vae_ckpt", str(vae_like), "--run.name", "e")

    def bug(self, stage=None):
        raise ValueError("a bug in setup")

    base[2] = "configs/vae/shapes.yaml"
    monkeypatch.setattr(ImageCaptionDataModule, "setup", bug)
    with pytest.raises(ValueError, match="a bug in setup"):
        main([*base, "--run.name", "f"])


def test_the_ckpt_path_check_leaves_valid_checkpoints_alone_and_only_usage_errors_are_one_line(tmp_path):
    """A sharded (FSDP) checkpoint is a folder, and a checkpoint in torch's legacy format cannot be memory-mapped:
    both are Lightning's to read, not refused; an error raised while a UsageError was handled, `from None`, is not
    taken for it (it keeps its traceback), while one raised `from` it is."""
    import torch

    from lit_diffusion.cli import _usage_error
    from lit_diffusion.errors import UsageError
    from lit_diffusion.runtime.lightning_cli import _check_ckpt_path

    model = {"class_path": "lit_diffusion.stages.vae.VAEModule"}
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    _check_ckpt_path({"subcommand": "fit", "fit": {"ckpt_path": str(sharded), "model": model}})
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"lit_diffusion": {"kind": "vae", "version": 1}, "state_dict": {"w": torch.ones(2)}}, legacy,
               _use_new_zipfile_serialization=False)
    _check_ckpt_path({"subcommand": "fit", "fit": {"ckpt_path": str(legacy), "model": model}})
    with pytest.raises(UsageError, match="expected a 'clip' checkpoint"):
        _check_ckpt_path({"subcommand": "fit", "fit": {"ckpt_path": str(legacy), "model": {
            "class_path": "lit_diffusion.stages.clip.CLIPModule"}}})

    def raised(cause: bool) -> BaseException:
        try:
            try:
                raise UsageError("a user's mistake")
            except UsageError as usage:
                if cause:
                    raise ValueError("wrapped") from usage
                raise RuntimeError("a bug while handling it") from None
        except Exception as err:  # noqa: BLE001
            return err

    assert str(_usage_error(raised(cause=True))) == "a user's mistake"
    assert _usage_error(raised(cause=False)) is None


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
    # the folder also holds a run's own evaluation (the pipeline's runs/NAME/eval): it stays as it is
    (tmp_path / "eval_final.json").write_text("{}")
    (tmp_path / "fid_clip_vs_clip_score_final.png").write_bytes(b"run's own plot")
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
    assert Image.open(tmp_path / "fid_clip_vs_clip_score_eval.png").size[0] > 100  # named after --json
    assert (tmp_path / "eval_final.json").read_text() == "{}"
    assert (tmp_path / "fid_clip_vs_clip_score_final.png").read_bytes() == b"run's own plot"


def test_user_errors_are_one_line(tmp_path):
    proc = run_cli("sample", "--ckpt", str(tmp_path / "missing.ckpt"), "--prompt", "x")
    assert proc.returncode == 2
    assert "ldm checkpoint not found" in proc.stderr and "missing.ckpt" in proc.stderr
    assert "Traceback" not in proc.stderr


BAD_VALUES = [  # (argv, the option and what it says): refused by the parser before anything loads or runs
    (["sample", "--ckpt", "m.ckpt", "--prompt", "x", "--guidance", "nan"], "--guidance: expected a number, got 'nan'"),
    (["sample", "--ckpt", "m.ckpt", "--prompt", "x", "--eta", "-1"], "--eta: expected a number >= 0, got '-1'"),
    (["sample", "--ckpt", "m.ckpt", "--prompt", "x", "--num", "0"], "--num: expected a whole number >= 1, got '0'"),
    (["sample", "--ckpt", "m.ckpt", "--prompt", "x", "--steps", "0"], "--steps: expected a whole number >= 1"),
    (["evaluate", "--ckpt", "m.ckpt", "--data", "d", "--guidance", ""], "--guidance: expected comma-separated"),
    (["evaluate", "--ckpt", "m.ckpt", "--data", "d", "--guidance", "1,inf"], "--guidance: expected comma-separated"),
    (["evaluate", "--ckpt", "m.ckpt", "--data", "d", "--num-samples", "-4"], "--num-samples: expected a whole number"),
    (["evaluate", "--ckpt", "m.ckpt", "--data", "d", "--image-size", "0"], "--image-size: expected a whole number"),
    (["data", "tokenizer", "--data", "d", "--out", "t.json", "--vocab-size", "0"], "--vocab-size: expected a whole"),
    (["data", "tokenizer", "--data", "d", "--out", "t.json", "--max-captions", "0"], "--max-captions: expected"),
    (["data", "convert", "in", "--out", "o", "--shard-size", "0"], "--shard-size: expected a whole number >= 1"),
    (["data", "encode", "--clip", "c", "--vae", "v", "--train", "t", "--out", "o", "--frames", "0"], "--frames: "),
    (["data", "shapes", "--out", "o", "--train", "-5"], "--train: expected a whole number >= 0, got '-5'"),
    (["clip", "query", "--ckpt", "c", "--images", "i", "--text", "t", "--top-k", "-1"], "--top-k: expected a whole"),
    (["bench", "train", "--repeats", "0"], "--repeats: expected a whole number >= 1, got '0'"),
]


@pytest.mark.parametrize("argv,said", BAD_VALUES, ids=[" ".join(a[:2]) + " " + s.split(":")[0] for a, s in BAD_VALUES])
def test_values_that_make_no_sense_are_refused_naming_the_option(argv, said, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_outputs_that_hold_earlier_work_are_refused(tmp_path, capsys):
    """import, export and the tokenizer trainer would replace a checkpoint, a folder's files or a tokenizer: each
    is refused in one line before anything loads, and the file is as it was."""
    kept = tmp_path / "trained.ckpt"
    kept.write_bytes(b"a trained checkpoint")
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    cases = [(["import", "vae", str(tmp_path / "nowhere"), "--out", str(kept)], f"--out {kept} exists"),
             (["import", "clip", str(tmp_path / "nowhere"), "--out", str(folder)], f"--out {folder} is a folder"),
             (["export", "--ckpt", str(kept), "--to", "diffusers", "--out", str(folder)],
              f"--out {folder} already holds README.md: give an empty or new folder"),
             (["data", "tokenizer", "--data", str(tmp_path), "--out", str(kept)], f"--out {kept} exists")]
    for argv, said in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err and "Traceback" not in err, (argv, err)
    assert kept.read_bytes() == b"a trained checkpoint" and (folder / "README.md").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_clip_query_names_a_shard_given_as_images(tmp_path):
    from lit_diffusion.evaluation.clip_query import list_images

    with pytest.raises(ValueError, match=r"val-000000.tar is a shard: clip query ranks image files"):
        list_images(str(tmp_path / "val-000000.tar"))
    assert list_images(["a.png", "https://x/b.jpg"]) == ["a.png", "https://x/b.jpg"]


def test_paths_of_the_wrong_kind_are_one_line_errors(tmp_path, capsys):
    """A file where a folder goes, a folder where a file goes, latents into the image shards' own folder: one line
    naming the path, before any work."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "val-000000.tar").write_bytes(b"")
    cases = [(["data", "shapes", "--out", str(afile), "--train", "2", "--val", "1"], "afile"),
             (["sample", "--ckpt", "m.ckpt", "--prompt", "x", "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
             (["evaluate", "--ckpt", "m.ckpt", "--data", "d", "--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
             (["data", "encode", "--clip", "c", "--vae", str(tmp_path / "missing.ckpt"), "--data",
               str(shards / "val-*.tar"), "--out", str(tmp_path / "latents")], "vae checkpoint not found"),
             (["data", "encode", "--clip", "c", "--vae", "v", "--image-size", "16", "--data", str(shards / "val-*.tar"),
               "--out", str(shards)], f"--out {shards} is the folder of the shards it encodes")]
    for argv, said in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err and "Traceback" not in err, (argv, err)
