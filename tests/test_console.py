"""What a newcomer reads: a stage's console output, written to a file as a launcher or a job scheduler does, holds
no warning that the README does not explain and no progress-bar redraws."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import TINY_CLIP
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_diffusion.runtime.progress import LineProgress

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_a_stage_run_logged_to_a_file_is_short_and_warns_only_of_what_the_readme_explains(shapes_data, tmp_path):
    vision = TINY_CLIP["vision"]
    argv = [sys.executable, "-m", "lit_diffusion", "fit", "--config", "configs/clip/shapes.yaml",
            "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2", "--run.root", str(tmp_path / "runs"),
            "--data.init_args.train_urls", str(shapes_data / "train-*.tar"),
            "--data.init_args.val_urls", str(shapes_data / "val-*.tar"), "--data.init_args.image_size", "16",
            "--data.init_args.num_workers", "0", "--data.init_args.train_batches_per_epoch", "3",
            "--model.init_args.tokenizer_path", str(shapes_data / "tokenizer.json"),
            "--model.init_args.embed_dim", "32",
            "--model.init_args.vision", str({**vision, "image_size": 16}).replace("'", '"'),
            "--model.init_args.text", str(TINY_CLIP["text"]).replace("'", '"'), "--run.name", "clip",
            "--run.progress_every", "2"]
    log = tmp_path / "console.txt"
    with open(log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                              env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.replace("\r", "\n").splitlines()
    assert len(lines) < 150 and len(text) < 20_000, f"{len(lines)} lines, {len(text)} bytes"
    # a warning's words, or the `FILE.py:LINE: message` of Python's warnings (Lightning's omit the category)
    warnings = [line for line in lines if re.search(r"warn|deprecat|tip:|\.py:\d+: ", line, re.IGNORECASE)]
    explained = {"W&B logs offline (WANDB_MODE=offline)": "wandb sync"}  # what the README says of each
    for line in warnings:
        known = [k for k in explained if k in line]
        assert known and explained[known[0]] in README, f"unexplained warning: {line}"
    # instead of a bar's redraws, one line every run.progress_every steps and at the last one
    progress = [line for line in lines if line.startswith("[clip] step ")]
    assert [line.split()[2] for line in progress] == ["2/6", "4/6", "6/6"], progress
    assert all(re.search(r"train/loss \d", line) and " it/s " in line for line in progress), progress
    assert progress[-1].endswith("ETA 0:00")
    assert not [line for line in lines if line.startswith("Epoch ")]  # no bar
    # the same command again would overwrite this run's checkpoint and append to its metrics: refused in one line
    last = tmp_path / "runs" / "clip" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    again = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                           env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"{tmp_path / 'runs' / 'clip'} holds the checkpoints of an earlier run (last.ckpt): resume it with " \
           f"--ckpt_path {last}" in again.stderr
    assert last.read_bytes() == before


class _Steps(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", float(self.global_step + 1))  # a known value per step
        return out


def test_line_progress_prints_every_n_steps_and_the_last():
    stream = io.StringIO()
    trainer = L.Trainer(max_steps=7, callbacks=[LineProgress(3, name="t", stream=stream)], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(_Steps())
    lines = stream.getvalue().splitlines()
    assert [line.split()[:3] for line in lines] == [["[t]", "step", f"{n}/7"] for n in (3, 6, 7)], lines
    # the loss logged at step n (global_step n - 1 during that batch) is n
    assert [float(re.search(r"train/loss (\S+)", line).group(1)) for line in lines] == [3.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="every_n_steps"):
        LineProgress(0)


@pytest.mark.slow
def test_the_pipelines_console_in_a_file_is_short_and_warns_only_of_what_the_readme_explains(tmp_path):
    """`lit-diffusion pipeline` as a job scheduler runs it (stdout to a file): each stage's progress as lines, no
    unexplained warning, and a log a person can read."""
    import yaml
    from test_pipeline import tiny_pipeline

    cfg = tiny_pipeline(tmp_path)
    for stage in cfg["stages"].values():  # the bars on, as a user's configs have them
        stage["args"].pop("trainer.enable_progress_bar")
        stage["args"]["run.progress_every"] = 3
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "console.txt"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "lit_diffusion", "pipeline", "--config", str(path)], stdout=out,
                              stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                              env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=1200)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.replace("\r", "\n").splitlines()
    assert len(lines) < 400 and len(text) < 60_000, f"{len(lines)} lines, {len(text)} bytes"
    for stage in ("clip", "vae", "ldm"):
        steps = [line.split()[2] for line in lines if line.startswith(f"[{stage}] step ")]
        assert steps == ["3/6", "6/6"], (stage, steps)
    assert not [line for line in lines if line.startswith("Epoch ")]  # no bar
    warnings = [line for line in lines if re.search(r"warn|deprecat|tip:|\.py:\d+: ", line, re.IGNORECASE)]
    explained = {"W&B logs offline (WANDB_MODE=offline)": "wandb sync"}
    for line in warnings:
        known = [k for k in explained if k in line]
        assert known and explained[known[0]] in README, f"unexplained warning: {line}"
