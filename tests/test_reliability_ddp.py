"""Under DDP a signal or a non-finite loss on one rank stops (or skips) every rank at the same step: 2 gloo CPU
processes (tests/ddp_safety_worker.py), one of which is signalled or sees the NaN. Each launch is bounded by a
timeout that only guards against a hang (the test then fails with both logs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_safety_worker.py"
HANG_GUARD_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, scenario: dict) -> list[tuple[int, dict | None, str]]:
    """Both ranks as Lightning starts its own children (LOCAL_RANK set: processes created externally);
    (exit status, record, log) per rank."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], [out / f"rank{r}.log" for r in range(2)]
    for rank, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), json.dumps(scenario)],
                                          env={**env, "LOCAL_RANK": str(rank)}, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    hung = []
    for rank, p in enumerate(procs):
        try:
            p.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            hung.append(rank)
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
                    q.wait()
    if hung:
        pytest.fail(f"rank(s) {hung} hung:\n" + "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs))
    records = [json.loads(p.read_text()) if (p := out / f"rank{r}.json").is_file() else None for r in range(2)]
    return [(p.returncode, rec, log.read_text()) for p, rec, log in zip(procs, records, logs)]


def assert_stopped_together(results, code: int) -> list[dict]:
    for rank, (rc, record, log) in enumerate(results):
        assert rc == code, f"rank {rank} exited with {rc}, expected {code}:\n{log[-4000:]}"
        assert record is not None, f"rank {rank} wrote no record:\n{log[-4000:]}"
    records = [r for _, r, _ in results]
    assert records[0]["global_step"] == records[1]["global_step"]
    assert records[0]["trained"] == records[1]["trained"]  # no rank trained a step alone
    return records


# (where in the step the signal lands, the step every rank stops at); one case runs in the fast suite
SIGNAL_CASES = [pytest.param(sig, when, stopped, id=f"{when}-{sig.name}",
                             marks=() if (sig, when) == (signal.SIGTERM, "after_check") else pytest.mark.slow)
                for sig in (signal.SIGTERM, signal.SIGUSR1)
                for when, stopped in [("before_check", 3), ("after_check", 4), ("mid_step", 4)]]


@pytest.mark.parametrize("sig,when,stopped", SIGNAL_CASES)
def test_signal_on_one_rank_saves_once_and_stops_every_rank_at_the_same_step(tmp_path, sig, when, stopped):
    """The signal reaches rank 1 only, at global step 3: at that batch end before SignalCheckpoint's check (acted on
    there), after it (where Lightning's own SIGTERM handling would stop rank 1 alone; acted on at the next batch
    end), or while the next batch trains (acted on at its end). Both ranks stop at the same step with exit status
    128 + signum; rank 0 alone writes last.ckpt, once, holding that step."""
    results = launch(tmp_path, {"signal": sig.name, "rank": 1, "step": 3, "when": when})
    records = assert_stopped_together(results, 128 + sig)
    assert records[0]["global_step"] == stopped
    assert records[0]["trained"] == list(range(stopped))
    assert [r["saved"] for r in records] == [[stopped], []]
    assert all(r["error"] == "SignalExit" for r in records)
    assert f"{sig.name}: saved {tmp_path / 'checkpoints' / 'last.ckpt'} at step {stopped}" in results[0][2]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == stopped
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigterm_on_one_rank_during_validation_stops_every_rank_after_it(tmp_path):
    """Lightning would end validation on rank 1 alone (its SIGTERM check between validation batches), leaving
    rank 0 in the next collective; here validation finishes on both ranks and both stop at the next batch end."""
    results = launch(tmp_path, {"signal": "SIGTERM", "rank": 1, "step": 4, "when": "validation"})
    records = assert_stopped_together(results, 128 + signal.SIGTERM)
    assert records[0]["global_step"] == 5  # validation ran after step 4 (val_check_interval=4); step 5 is next
    assert [r["saved"] for r in records] == [[5], []]


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """mode="stop": rank 1's NaN loss at step 3 stops both ranks before the optimizer step, both naming the step."""
    results = launch(tmp_path, {"nan_rank": 1, "nan_step": 3, "nonfinite": "stop"})
    records = assert_stopped_together(results, 1)
    assert [r["error"] for r in records] == ["NonFiniteLossError"] * 2
    assert "non-finite training loss (nan) at global step 3" in records[1]["message"]
    assert "non-finite training loss (on another rank) at global step 3" in records[0]["message"]
    assert records[0]["global_step"] == 3  # the bad update was not taken
    assert [r["saved"] for r in records] == [[], []]


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """mode="skip": both ranks drop the update of step 3 (weights unchanged, no NaN) and train on to max_steps."""
    results = launch(tmp_path, {"nan_rank": 1, "nan_step": 3, "nonfinite": "skip", "max_steps": 6})
    records = assert_stopped_together(results, 0)
    for r in records:
        assert r["global_step"] == 6 and r["skips"] == 1
        w = r["weights"]
        assert w["3"] == w["4"]  # before and after step 3's (skipped) update
        assert w["2"] != w["3"] and w["4"] != w["5"]  # the neighbouring steps did update
        assert all(torch.isfinite(torch.tensor(v)).all() for v in w.values())
    assert records[0]["weights"] == records[1]["weights"]  # DDP replicas stayed equal
