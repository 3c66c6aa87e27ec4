"""Pre-emption and kills: SIGTERM/SIGUSR1 write last.ckpt before exit; a SIGKILLed run resumes with
`--ckpt_path last` to the same final step."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_reliability_checkpoints import SendSignal, _vae_run, tiny_vae_config

from lit_diffusion.runtime.safety import SignalCheckpoint

REPO = Path(__file__).resolve().parent.parent


def test_sigterm_saves_the_current_step_and_exits_143(shapes_data, tmp_path):
    """Lightning 2.6 alone would stop at the batch end with exit status 0 and no checkpoint."""
    with pytest.raises(SystemExit) as exit_info:
        _vae_run(shapes_data, tmp_path, [SendSignal(3, signal.SIGTERM), SignalCheckpoint()])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert exit_info.value.path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_sigterm_after_the_batch_end_check_still_saves_and_exits_143(shapes_data, tmp_path):
    """The signal lands after SignalCheckpoint's batch-end check; Lightning then stops the same batch end with its
    own SIGTERMException (exit status 0, no checkpoint), which SignalCheckpoint turns into ours."""
    with pytest.raises(SystemExit) as exit_info:
        _vae_run(shapes_data, tmp_path, [SignalCheckpoint(), SendSignal(3, signal.SIGTERM)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert exit_info.value.path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


# ------------------------------------------------------------------------------------------- real processes
def _start(tmp_path, config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LIT_DIFFUSION_RUN_NAME", None)
    argv = [sys.executable, "-m", "lit_diffusion", "fit", "--config", str(config), "--run.root",
            str(tmp_path / "runs"), "--run.name", "r", "--run.wandb", "false", *extra]
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", -1) >= step and "train/loss" in r for r in _rows(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkilled_run_resumes_from_last_ckpt_to_the_same_final_step(shapes_data, tmp_path):
    max_steps = 14
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vae_config(shapes_data, max_steps=max_steps, limit_val_batches=0)))
    run_dir = tmp_path / "runs" / "r"
    kill_after = random.randint(4, 10)
    proc = _start(tmp_path, config, "--run.checkpoint_every", "2")
    _wait_for_step(proc, run_dir, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= saved <= max_steps - 2 and saved % 2 == 0, (kill_after, saved)
    rows_before = len(_rows(run_dir))

    proc = _start(tmp_path, config, "--run.checkpoint_every", "2", "--ckpt_path", "last")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    resumed_rows = [r for r in _rows(run_dir)[rows_before:] if "train/loss" in r]
    assert resumed_rows[0]["step"] == saved, (kill_after, saved)  # started from the checkpoint, not from 0
    assert resumed_rows[-1]["step"] == max_steps - 1
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == max_steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_writes_a_checkpoint_at_the_current_step_and_the_process_exits(shapes_data, tmp_path, sig):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vae_config(shapes_data, max_steps=200, limit_val_batches=0)))
    run_dir = tmp_path / "runs" / "r"
    proc = _start(tmp_path, config, "--run.checkpoint_every", "1000")  # no periodic checkpoint before the signal
    _wait_for_step(proc, run_dir, 3)
    sent_at = max(r["step"] for r in _rows(run_dir) if "train/loss" in r)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    match = re.search(rf"{sig.name}: saved (\S+) at step (\d+)", out)
    assert match, out
    last = run_dir / "checkpoints" / "last.ckpt"
    assert Path(match.group(1)).resolve() == last.resolve()
    step = torch.load(last, weights_only=True)["global_step"]
    assert step == int(match.group(2))
    assert sent_at < step <= sent_at + 4  # the step it was at, not an older one (and it did not train on)
