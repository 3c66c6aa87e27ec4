"""The offline sweep runner: W&B's sweep engine proposes, a stand-in program runs, summary.json feeds back."""

import itertools
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lit_diffusion import sweep as sw

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))

# Writes RUN_ROOT/RUN_NAME/summary.json like tracking.JSONLLogger, with a metric that is a known function of the
# parameters; fails (exit 3) for x=1, y=b.
PROGRAM = textwrap.dedent("""
    import json, pathlib, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    x, y = float(args["x"]), args.get("y", "a")
    if x == 1 and y == "b":
        print("diverged: loss is nan", file=sys.stderr)
        sys.exit(3)
    loss = (x - 2.5) ** 2 + {"a": 0.0, "b": 0.5}[y]
    out = pathlib.Path(args["run.root"]) / args["run.name"]
    out.mkdir(parents=True, exist_ok=True)
    summary = {"final": {"eval/loss": loss}, "best": {"eval/loss": loss - 0.25}, "best_step": {"eval/loss": 7},
               "params": {"argv": sys.argv[1:]}, "status": "success"}
    (out / "summary.json").write_text(json.dumps(summary))
""")


def f(params):
    return (float(params["x"]) - 2.5) ** 2 + {"a": 0.0, "b": 0.5}[params.get("y", "a")]


def write_sweep(tmp_path, method="grid", parameters=None, **extra):
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    config = {"program": str(program), "method": method, "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": parameters or {"x": {"values": [1, 2, 3]}, "y": {"values": ["a", "b"]}}, **extra}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_grid_runs_every_combination_records_failures_and_keeps_going(tmp_path):
    path = write_sweep(tmp_path)
    state = sw.run_sweep(path, root=tmp_path / "sweeps", overrides=["trainer.max_steps=2"], echo=False)
    runs = state["runs"]
    assert sorted((r["params"]["x"], r["params"]["y"]) for r in runs) == sorted(itertools.product([1, 2, 3], "ab"))
    assert [r["name"] for r in runs] == [f"run-{i:03d}" for i in range(6)]
    failed = [r for r in runs if r["status"] == "failed"]
    assert [(r["params"]["x"], r["params"]["y"]) for r in failed] == [(1, "b")]
    assert failed[0]["returncode"] == 3 and failed[0]["metric"] is None
    assert "diverged: loss is nan" in failed[0]["log_tail"]
    assert state["failed"] == [failed[0]["name"]]
    # the runs after the failure still ran, and each metric is the program's function of its params
    assert runs.index(failed[0]) < len(runs) - 1
    for r in runs:
        if r["status"] == "finished":
            assert r["metric"] == f(r["params"]) and r["metric_best"] == f(r["params"]) - 0.25
    assert state["best"]["params"] in ({"x": 2, "y": "a"}, {"x": 3, "y": "a"})  # both 0.25 from 2.5
    assert state["best"]["metric"] == 0.25
    # every run got the override and the sweep's run dir / name / group
    argv = json.loads((tmp_path / "sweeps" / "grid" / "run-000" / "summary.json").read_text())["params"]["argv"]
    assert argv[-4:] == ["--trainer.max_steps=2", f"--run.root={tmp_path / 'sweeps' / 'grid'}", "--run.name=run-000",
                         "--run.group=grid"]
    on_disk = json.loads((tmp_path / "sweeps" / "grid" / "sweep.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(runs)) and on_disk["config"]["method"] == "grid"


def test_grid_count_then_resume_finishes_the_grid_without_repeats(tmp_path):
    path = write_sweep(tmp_path, parameters={"x": {"values": [2, 3, 4]}})
    first = sw.run_sweep(path, count=2, root=tmp_path, name="s", echo=False)
    assert [r["params"]["x"] for r in first["runs"]] == [2, 3]
    second = sw.run_sweep(path, root=tmp_path, name="s", echo=False)  # the rest of the grid
    assert [r["params"]["x"] for r in second["runs"]] == [2, 3, 4]
    assert [r["name"] for r in second["runs"]] == ["run-000", "run-001", "run-002"]
    third = sw.run_sweep(path, count=5, root=tmp_path, name="s", echo=False)
    assert len(third["runs"]) == 3  # exhausted: nothing new


def test_resuming_with_other_overrides_is_refused(tmp_path):
    """Runs made with another --set would be ranked beside the new ones: refused, naming both."""
    path = write_sweep(tmp_path, parameters={"x": {"values": [2, 3, 4]}})
    sw.run_sweep(path, count=1, root=tmp_path, name="s", overrides=["trainer.max_steps=10"], echo=False)
    with pytest.raises(ValueError, match=r"--set --trainer.max_steps=10, not --trainer.max_steps=1000"):
        sw.run_sweep(path, count=1, root=tmp_path, name="s", overrides=["trainer.max_steps=1000"], echo=False)
    with pytest.raises(ValueError, match=r"not \(none\)"):
        sw.run_sweep(path, count=1, root=tmp_path, name="s", echo=False)
    again = sw.run_sweep(path, count=1, root=tmp_path, name="s", overrides=["trainer.max_steps=10"], echo=False)
    assert [r["params"]["x"] for r in again["runs"]] == [2, 3]


def test_a_relative_root_with_cwd_reads_the_runs_it_wrote(tmp_path, monkeypatch):
    """`cwd` moves where the command runs; the runs still write under `root` as this process sees it, where their
    metric is read back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    path = write_sweep(tmp_path, parameters={"x": {"values": [2]}})
    state = sw.run_sweep(path, root="rel_runs", name="s", cwd=tmp_path / "elsewhere", echo=False)
    assert state["runs"][0]["status"] == "finished" and state["runs"][0]["metric"] == f({"x": 2})
    assert (tmp_path / "rel_runs" / "s" / "run-000" / "summary.json").is_file()
    assert not (tmp_path / "elsewhere" / "rel_runs").exists()


def test_a_final_nan_is_noted_and_never_best(tmp_path):
    program = tmp_path / "program.py"
    program.write_text(PROGRAM.replace('"final": {"eval/loss": loss}', '"final": {"eval/loss": float("nan") if x == 2 else loss}'))
    config = {"program": str(program), "method": "grid", "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": {"x": {"values": [2, 4]}}}
    state = sw.run_sweep(config, root=tmp_path, name="s", echo=False)
    nan_run = state["runs"][0]
    assert nan_run["metric"] is None and "eval/loss = nan (not a figure)" in nan_run["note"]
    assert state["best"]["params"] == {"x": 4}


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_respect_count_and_bounds(tmp_path, method):
    path = write_sweep(tmp_path, method=method,
                       parameters={"x": {"min": 0.0, "max": 5.0}, "y": {"values": ["a", "b"]}})
    state = sw.run_sweep(path, count=4, root=tmp_path / "s", echo=False)
    assert len(state["runs"]) == 4
    for r in state["runs"]:
        assert 0.0 <= r["params"]["x"] <= 5.0 and r["params"]["y"] in ("a", "b")
        assert r["status"] == "finished" and math.isclose(r["metric"], f(r["params"]))
    # seeded: the same sweep proposes the same runs
    again = sw.run_sweep(path, count=4, root=tmp_path / "again", echo=False)
    assert [r["params"] for r in again["runs"]] == [r["params"] for r in state["runs"]]


def test_random_without_count_is_refused(tmp_path):
    path = write_sweep(tmp_path, method="random", parameters={"x": {"min": 0.0, "max": 5.0}})
    with pytest.raises(ValueError, match="--count"):
        sw.run_sweep(path, root=tmp_path, echo=False)


def test_engine_sees_finished_failed_and_best_values():
    run = sw._engine_run({"name": "run-000", "status": "finished", "params": {"x": 2.0}, "metric": 3.0,
                          "metric_best": 1.5}, "eval/loss")
    assert run.state == "finished" and run.config == {"x": {"value": 2.0}}
    assert run.metric_extremum("eval/loss", "minimum") == 1.5  # as the W&B controller sees summary + history
    failed = sw._engine_run({"name": "run-001", "status": "failed", "params": {"x": 1.0}, "metric": None}, "eval/loss")
    assert failed.state == "failed" and failed.summary_metrics == {} and failed.history == []


def test_missing_program_is_a_failed_run_not_a_crash(tmp_path):
    path = write_sweep(tmp_path, parameters={"x": {"values": [2]}})
    config = yaml.safe_load(path.read_text())
    config["program"] = str(tmp_path / "nope.py")
    path.write_text(yaml.safe_dump(config))
    state = sw.run_sweep(path, root=tmp_path / "s", echo=False)
    assert [r["status"] for r in state["runs"]] == ["failed"]
    assert "nope.py" in state["runs"][0]["log_tail"]


def test_commands_are_expanded_like_wandb_agent(monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"model.init_args.lr": 0.0003, "model.init_args.sampler": "ddim", "run.wandb": False, "n": 3}
    ours = sw.command_args(params)
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    for macro in ours:
        assert ours[macro] == theirs[macro], macro
    config = {"program": "train.py", "command": ["${env}", "${interpreter}", "-m", "lit_diffusion", "fit",
                                                 "${args_no_hyphens}", "${envvar:SWEEP_TEST_VAR}"]}
    import os

    os.environ["SWEEP_TEST_VAR"] = "--seed_everything=3"
    try:
        cmd = sw.expand_command(config, {"a.b": 1.5}, interpreter="python")
    finally:
        del os.environ["SWEEP_TEST_VAR"]
    assert cmd[1:] == ["python", "-m", "lit_diffusion", "fit", "a.b=1.5", "--seed_everything=3"]
    # inside an argument too, as wandb's create_sweep_command (an unset variable stands as its name)
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    chunks = ["--data=${envvar:SWEEP_TEST_DIR}/shards", "${envvar:SWEEP_TEST_UNSET}x", "--k=${args}"]
    monkeypatch.setenv("SWEEP_TEST_DIR", "/data")
    monkeypatch.delenv("SWEEP_TEST_UNSET", raising=False)
    assert sw.expand_command({"command": chunks}, {}) == create_sweep_command(list(chunks)) == [
        "--data=/data/shards", "SWEEP_TEST_UNSETx", "--k=${args}"]
    # a lower-case name wandb leaves as it is: kept, not dropped, and refused by validation
    monkeypatch.setenv("low_var", "X")
    lower = ["${envvar:low_var}", "--a=${envvar:low_var}"]
    assert sw.expand_command({"command": lower}, {}) == create_sweep_command(list(lower)) == lower
    with pytest.raises(sw.SweepConfigError, match=r"\$\{envvar:low_var\}: wandb expands only names of A-Z"):
        sw.validate_sweep_config({"method": "grid", "parameters": {"x": {"values": [1]}},
                                  "command": ["${interpreter}", "p.py", "${args}", "--a=${envvar:low_var}"]}, "s.yaml")
    assert sw.expand_command({"program": "p.py"}, {"k": 2}, interpreter="py")[1:] == ["py", "p.py", "--k=2"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweeps_validate_and_run_the_ldm_stage(path):
    config = sw.load_sweep_config(path)
    sweeps, _ = sw._import_sweeps()
    filled = sweeps.SweepConfig(config)  # the schema W&B's server applies
    assert filled["metric"] == {"name": "eval/fid_clip", "goal": "minimize"}
    cmd = sw.expand_command(config, {"k": 1})
    assert cmd[1:] == [sys.executable, "-m", "lit_diffusion", "fit", "--config", "configs/ldm/shapes.yaml", "--k=1"]
    assert "${args}" in config["command"] and (REPO / config["program"]).is_file()
    assert sw.propose(config, []) is not None


def test_shipped_sweeps_cover_the_required_parameters():
    params = {p.name: set(sw.load_sweep_config(p)["parameters"]) for p in SHIPPED}
    wanted = [{"model.init_args.guidance", "model.init_args.p_uncond"},
              {"model.init_args.lr", "trainer.callbacks.decay"},
              {"model.init_args.sampler", "model.init_args.sample_steps"}]
    for keys in wanted:
        assert any(keys <= p for p in params.values()), keys


def _first_value(spec):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][-1]
    return spec["min"]


def _lookup(namespace, key):
    node = namespace
    for part in key.split("."):
        if isinstance(node, list):  # LightningCLI applies `callbacks.X` to the list's last entry
            node = node[-1].init_args
        node = node[part]
    return node


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweep_parameters_parse_against_the_ldm_config(path, monkeypatch):
    """Every swept key is an option that configs/ldm/shapes.yaml's LightningCLI accepts, holding the value."""
    from lit_diffusion.runtime.lightning_cli import LitDiffusionCLI

    class ParseOnly(LitDiffusionCLI):
        def instantiate_classes(self):
            pass

    config = sw.load_sweep_config(path)
    params = {k: _first_value(v) for k, v in config["parameters"].items()}
    cmd = sw.expand_command(config, params)
    argv = cmd[cmd.index("fit") + 1:]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-diffusion"])
    try:
        cli = ParseOnly(args=argv, run=False)
    except SystemExit:
        pytest.fail(f"configs/ldm/shapes.yaml rejects {path.name}'s arguments {argv[2:]} (see stderr); "
                    "`trainer.callbacks.decay` needs EMAWeightAveraging as the last entry of trainer.callbacks")
    for key, value in params.items():
        got = _lookup(cli.config, key)
        assert got == value, (f"{path.name}: --{key}={value} parsed to {got!r}; for trainer.callbacks.decay the "
                              "EMAWeightAveraging callback must be the last entry of trainer.callbacks")


@pytest.mark.parametrize("change, words", [
    ({"method": "grd"}, ["method", "'grd'"]),
    ({"metrc": {"name": "x"}}, ["metrc"]),
    ({"parameters": {"x": {"valuess": [1, 2]}}}, ["parameters.x", "valuess"]),
    ({"metric": {"name": "loss", "goal": "minimise"}}, ["metric.goal", "minimise"]),
    ({"command": ["${interpreter}", "${program}"]}, ["command", "${args}"]),
    ({"command": ["${interpreter}", "${program}", "${argz}"]}, ["command", "${argz}"]),
    ({"parameters": {"x": {"min": 3.0, "max": 1.0}}}, ["x", "min"]),
])
def test_invalid_sweep_yaml_names_the_file_and_key(tmp_path, change, words):
    path = write_sweep(tmp_path)
    config = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(sw.SweepConfigError) as err:
        sw.load_sweep_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_cli_reports_a_bad_sweep_yaml_in_one_line(tmp_path, capsys):
    from lit_diffusion.cli import main

    path = write_sweep(tmp_path)
    path.write_text(path.read_text().replace("method: grid", "method: gridd"))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--root", str(tmp_path / "s")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lit-diffusion sweep: error" in err and str(path) in err and "method" in err and "gridd" in err


def test_cli_runs_a_sweep(tmp_path, capsys):
    from lit_diffusion.cli import main

    path = write_sweep(tmp_path, parameters={"x": {"values": [2, 4]}})
    main(["sweep", str(path), "--count", "2", "--root", str(tmp_path / "s"), "--name", "cli", "--set", "k=v"])
    state = json.loads((tmp_path / "s" / "cli" / "sweep.json").read_text())
    assert [r["metric"] for r in state["runs"]] == [0.25, 2.25]
    assert all("--k=v" in r["command"] for r in state["runs"])
    assert "best run by eval/loss (minimize): run-000" in capsys.readouterr().out


def test_run_sweep_takes_a_config_dict_from_python(tmp_path):
    """How a test shrinks a shipped sweep: load it, narrow the grid, run with overrides."""
    path = write_sweep(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["parameters"] = {"x": {"values": [2.5]}, "y": {"value": "b"}}
    state = sw.run_sweep(config, root=tmp_path / "s", name="py", overrides={"trainer.max_steps": 1}, echo=False)
    assert [(r["params"], r["metric"]) for r in state["runs"]] == [({"x": 2.5, "y": "b"}, 0.5)]
    assert "--trainer.max_steps=1" in state["runs"][0]["command"]


@pytest.mark.slow
def test_offline_sweep_of_three_tiny_ldm_runs_and_their_comparison(tiny_ckpts, tmp_path):
    """The real thing: 3 latent-diffusion runs (grid over guidance) and a table whose numbers are the runs'."""
    import csv as _csv
    import json as _json

    import yaml as _yaml
    from conftest import TINY_UNET

    from lit_diffusion.evaluation.compare import compare
    from lit_diffusion.sweep import run_sweep

    data = tiny_ckpts["data"]
    tiny = {
        "model": {"init_args": {"clip_ckpt": str(tiny_ckpts["clip"]), "vae_ckpt": str(tiny_ckpts["vae"]),
                                "image_size": 16, "unet": TINY_UNET, "sample_steps": 2, "warmup_steps": 0}},
        # image shards: the shipped config trains from the pipeline's latent shards, which this test has not made
        "data": {"class_path": "lit_diffusion.data.datamodule.ImageCaptionDataModule",
                 "init_args": {"train_urls": str(data / "train-*.tar"), "val_urls": str(data / "val-*.tar"),
                               "image_size": 16, "batch_size": 8, "num_workers": 0, "train_batches_per_epoch": 2,
                               "val_max_samples": 8}},
        "trainer": {"max_steps": 2, "enable_progress_bar": False, "callbacks": [
            {"class_path": "lit_diffusion.callbacks.evaluation.DiffusionEvaluation",
             "init_args": {"every_n_steps": 0, "guidance": [1.0], "num_samples": 8,
                           "cache_dir": str(tmp_path / "cache")}}]},
    }
    tiny_path = tmp_path / "tiny.yaml"
    tiny_path.write_text(_yaml.safe_dump(tiny))
    sweep = _yaml.safe_load(open("sweeps/ldm_guidance_puncond.yaml"))
    sweep["parameters"] = {"model.init_args.guidance": {"values": [1.5, 3.0, 5.0]}}
    state = run_sweep(sweep, root=tmp_path / "sweeps", name="e2e",
                      overrides=[f"--config={tiny_path}", "--run.wandb=false"], echo=False)
    sweep_dir = tmp_path / "sweeps" / "e2e"
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file())
    assert len(runs) == 3, state
    out = compare([str(sweep_dir)], tmp_path / "cmp", echo=False)
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = {r["run"]: r for r in _csv.DictReader(f)}
    assert len(rows) == 3 and out
    for run in runs:
        summary = _json.loads((run / "summary.json").read_text())["final"]
        row = rows[run.name]
        guidance = float(row["model.init_args.guidance"])
        assert float(row["eval/fid_clip"]) == pytest.approx(summary["eval/fid_clip"], rel=1e-9)
        assert summary["eval/fid_clip"] == summary[f"eval/fid_clip_g{guidance:.1f}"]
        assert float(row["eval/clip_score_g1.0"]) == pytest.approx(summary["eval/clip_score_g1.0"], rel=1e-9)


def test_a_failed_run_is_never_the_best_and_a_swept_key_cannot_be_set(tmp_path):
    """A run that wrote a figure and then failed (here: the best figure of all, then exit 3) is not the sweep's
    best and does not stop it at the target: its figure is from before it stopped, and W&B's engine ranks it
    worst. `--set` of a key the sweep varies is refused: the last value wins, so every run would have used it."""
    program = tmp_path / "program.py"
    source = PROGRAM.replace('    print("diverged: loss is nan", file=sys.stderr)\n    sys.exit(3)\n', '    pass\n')
    source = source.replace('(out / "summary.json").write_text(json.dumps(summary))\n',
                            'if x == 1 and y == "b":\n    summary["final"]["eval/loss"] = -100.0\n'
                            '(out / "summary.json").write_text(json.dumps(summary))\n'
                            'sys.exit(3 if x == 1 and y == "b" else 0)\n')
    assert source.count("-100.0") == 1 and "diverged" not in source
    program.write_text(source)
    config = {"program": str(program), "method": "grid", "metric": {"name": "eval/loss", "goal": "minimize",
                                                                     "target": -50.0},
              "parameters": {"x": {"values": [1, 2, 3]}, "y": {"values": ["a", "b"]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    state = sw.run_sweep(path, root=tmp_path / "sweeps", echo=False)
    failed = [r for r in state["runs"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["metric"] == -100.0 and len(state["runs"]) == 6  # not stopped by it
    assert state["best"]["metric"] == 0.25 and state["best"]["params"]["y"] == "a"
    from lit_diffusion.evaluation.compare import compare

    result = compare([str(tmp_path / "sweeps" / "grid")], tmp_path / "cmp", echo=False)
    assert result["best"] == state["best"]["name"]
    with pytest.raises(ValueError, match=r"--set x: the sweep varies it"):
        sw.run_sweep(path, root=tmp_path / "other", overrides=["x=3", "trainer.max_steps=2"], echo=False)


def test_the_video_frechet_distance_and_seconds_are_lower_is_better():
    from lit_diffusion.runtime.tracking import lower_is_better

    assert lower_is_better("eval/fcd") and lower_is_better("eval/fcd_g3.0") and lower_is_better("eval/seconds")
    assert not lower_is_better("eval/clip_score_g3.0") and not lower_is_better("eval/motion_acc")
