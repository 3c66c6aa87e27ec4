"""Unsafe inputs: a checkpoint that would run code is refused; shards are streamed, never unpacked to disk; the
W&B API key never lands in a run directory, even with W&B configured but unreachable."""

import socket
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_datamodule
from test_reliability_checkpoints import run_cli, tiny_vae_config

from lit_diffusion.stages.base import CheckpointError, load_stage_checkpoint


class Exploit:
    """Unpickling this opens (creates) a file: any callable could run here, e.g. os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "clip.ckpt"
    torch.save({"lit_diffusion": {"kind": "clip", "version": 1}, "state_dict": {}, "payload": Exploit(marker)},
               evil)
    with pytest.raises(CheckpointError, match=rf"cannot load clip checkpoint {evil} safely \(weights_only=True\)"):
        load_stage_checkpoint(evil, "clip")
    assert not marker.exists()
    # the file really is an exploit: the unsafe loader runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _listing(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


def test_shards_are_streamed_not_extracted(shapes_data, tmp_path, monkeypatch):
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert tempfile.gettempdir() == str(tmp)
    before = _listing(work, tmp, shapes_data)
    dm = tiny_datamodule(shapes_data, batch_size=8)
    dm.setup("fit")
    train = sum(len(b["key"]) for b in dm.train_dataloader())
    val = sum(len(b["key"]) for b in dm.val_dataloader())
    assert (train, val) == (5 * 8, 64)  # a full pass over both streams happened
    assert _listing(work, tmp, shapes_data) == before


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_unreachable_falls_back_offline_and_the_api_key_is_in_no_file(shapes_data, tmp_path, monkeypatch):
    key = "local-0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("LIT_DIFFUSION_RUN_NAME", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vae_config(shapes_data, max_steps=3, limit_val_batches=1)))
    try:
        cli = run_cli(["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.name", "r",
                       "--run.checkpoint_every", "2"])
    finally:
        import wandb

        wandb.finish()  # Lightning leaves the run open; later in-process runs would otherwise log into it
    assert cli.trainer.global_step == 3
    run_dir = tmp_path / "runs" / "r"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, sorted(_listing(run_dir))  # W&B ran, offline, and kept its files in the run dir
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "last.ckpt"} <= {p.name for p in files}
    leaked = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert not leaked
    assert not [p for p in tmp_path.iterdir() if p.name not in ("runs", "tiny.yaml")]  # nothing outside it
