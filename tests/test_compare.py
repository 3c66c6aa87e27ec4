"""`compare`: the table holds the runs' summary.json numbers, the Pareto front is right, missing stays missing."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from lit_diffusion.evaluation import compare as cmp


def write_run(directory: Path, final: dict, best: dict | None = None, best_step: dict | None = None,
              config: dict | None = None, status: str = "success") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    summary = {"final": final, "best": best or final, "best_step": best_step or {k: 100 for k in final},
               "params": {}, "status": status}
    (directory / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def ldm_config(guidance: float, decay: float = 0.995, lr: float = 1e-3, name: str = "r") -> dict:
    return {"seed_everything": 0,
            "model": {"class_path": "lit_diffusion.stages.ldm.LatentDiffusionModule",
                      "init_args": {"guidance": guidance, "lr": lr, "unet": {"channel_mult": [1, 2]}}},
            "trainer": {"max_steps": 100, "default_root_dir": f"runs/{name}", "callbacks": [
                {"class_path": "lit_diffusion.callbacks.ema.EMAWeightAveraging", "init_args": {"decay": decay}}]},
            "run": {"name": name, "root": "runs"}}


def metrics(fid: dict, clip: dict, acc: dict, own: float | None = None) -> dict:
    out = {}
    for g in fid:
        out[f"eval/fid_clip_g{g:.1f}"] = fid[g]
        out[f"eval/clip_score_g{g:.1f}"] = clip[g]
        if g in acc:
            out[f"eval/caption_acc_g{g:.1f}"] = acc[g]
    if own is not None:
        out["eval/fid_clip"], out["eval/clip_score"] = fid[own], clip[own]
    out["train/loss"] = 0.123456789
    return out


def read_markdown_table(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


@pytest.fixture
def three_runs(tmp_path):
    a = write_run(tmp_path / "a", metrics({1.0: 40.123456789, 3.0: 25.5, 5.0: 30.0}, {1.0: 20.0, 3.0: 24.25, 5.0: 26.0},
                                          {1.0: 0.2, 3.0: 0.45, 5.0: 0.5}, own=3.0),
                  best_step={"eval/fid_clip": 200}, config=ldm_config(3.0, name="a"))
    # b lacks guidance 5 entirely and caption accuracy at 3
    b = write_run(tmp_path / "b", metrics({1.0: 38.0, 3.0: 22.0}, {1.0: 19.0, 3.0: 23.0}, {1.0: 0.25}, own=1.0),
                  best_step={"eval/fid_clip": 300}, config=ldm_config(1.0, name="b"))
    c = write_run(tmp_path / "c", metrics({1.0: 45.0, 3.0: 30.0, 5.0: 21.0}, {1.0: 18.0, 3.0: 22.0, 5.0: 25.0},
                                          {1.0: 0.1, 3.0: 0.3, 5.0: 0.35}, own=5.0),
                  best_step={"eval/fid_clip": 400}, config=ldm_config(5.0, name="c"))
    return [a, b, c]


def test_table_numbers_are_the_summary_numbers(three_runs, tmp_path, capsys):
    result = cmp.compare([str(p) for p in three_runs], tmp_path / "out")
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    table = read_markdown_table(tmp_path / "out" / "compare.md")
    assert [r["run"] for r in rows] == [r["run"] for r in table] == ["a", "b", "c"]
    for run_dir, row, md in zip(three_runs, rows, table):
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        for key in [k for k in final if k.startswith("eval/")]:
            assert float(row[key]) == final[key], key  # the CSV holds the exact value
            assert float(md[key]) == pytest.approx(final[key], rel=1e-5), key
        assert int(row["best_step"]) == json.loads((run_dir / "summary.json").read_text())["best_step"]["eval/fid_clip"]
    # only the parameter that differs is a column; run names/dirs are not parameters
    assert "model.init_args.guidance" in rows[0] and [float(r["model.init_args.guidance"]) for r in rows] == [3, 1, 5]
    assert not any(k.startswith(("model.init_args.lr", "run.", "trainer.default_root_dir")) for k in rows[0])
    assert "train/loss" not in rows[0]
    # missing stays missing (never 0), by name, on stdout and in the file
    assert rows[1]["eval/fid_clip_g5.0"] == rows[1]["eval/caption_acc_g3.0"] == "missing"
    assert md_cell(table, "b", "eval/clip_score_g5.0") == "missing"
    assert result["lacking"] == {"b": ["eval/caption_acc_g3.0", "eval/fid_clip_g5.0", "eval/clip_score_g5.0",
                                       "eval/caption_acc_g5.0"]}
    out = capsys.readouterr().out
    assert "b lacks eval/caption_acc_g3.0, eval/fid_clip_g5.0" in out
    # best by the default metric eval/fid_clip (each run's own guidance): a 25.5, b 38.0, c 21.0
    assert result["best"] == "c" and result["metric"] == "eval/fid_clip" and result["goal"] == "minimize"
    assert "Best run by `eval/fid_clip` (minimize): **c**" in (tmp_path / "out" / "compare.md").read_text()
    png = tmp_path / "out" / "fid_clip_vs_clip_score.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def md_cell(table, run, key):
    return next(r for r in table if r["run"] == run)[key]


def test_metric_and_goal_options(three_runs, tmp_path):
    result = cmp.compare([str(p) for p in three_runs], tmp_path / "o", metric="eval/caption_acc_g1.0", echo=False)
    assert result["goal"] == "maximize" and result["best"] == "b"  # 0.25
    result = cmp.compare([str(p) for p in three_runs], tmp_path / "o", metric="eval/caption_acc_g1.0",
                         goal="minimize", echo=False)
    assert result["best"] == "c"  # 0.1
    result = cmp.compare([str(p) for p in three_runs], tmp_path / "o", which="best", echo=False)
    assert result["best"] == "c"


def test_pareto_mask_on_a_constructed_example():
    # (clip score, fid): higher clip and lower fid are better
    points = [(20.0, 40.0), (24.0, 25.0), (26.0, 30.0), (23.0, 22.0), (22.0, 30.0), (26.0, 30.0), (18.0, 45.0)]
    # (20,40) dominated by (24,25); (22,30) by (23,22); (18,45) by everything; the duplicates (26,30) both stay
    assert cmp.pareto_mask(points) == [False, True, True, True, False, True, False]
    assert cmp.pareto_mask([]) == [] and cmp.pareto_mask([(1.0, 1.0)]) == [True]


def test_best_points_pair_only_figures_of_one_step():
    """Each best is over the run on its own: a best FID of step 1000 beside a best CLIP score of step 3000 is a
    point no checkpoint reached, and the front was built from such points."""
    run = cmp.RunInfo(name="a", source="a",
                      best={"eval/fid_clip_g3.0": 5.0, "eval/clip_score_g3.0": 30.0,
                            "eval/fid_clip_g1.0": 9.0, "eval/clip_score_g1.0": 20.0},
                      best_step={"eval/fid_clip_g3.0": 1000, "eval/clip_score_g3.0": 3000,
                                 "eval/fid_clip_g1.0": 2000, "eval/clip_score_g1.0": 2000})
    assert cmp.tradeoff([run], "clip", which="best") == {"a": [(1.0, 20.0, 9.0)]}
    run.final = dict(run.best)
    assert cmp.tradeoff([run], "clip") == {"a": [(1.0, 20.0, 9.0), (3.0, 30.0, 5.0)]}


def test_pareto_front_across_runs_and_guidance(three_runs, tmp_path):
    result = cmp.compare([str(p) for p in three_runs], tmp_path / "out", echo=False)
    # all points (clip, fid): a (20,40.1) (24.25,25.5) (26,30); b (19,38) (23,22); c (18,45) (22,30) (25,21)
    assert sorted(result["pareto"]["clip"]) == [("a", 5.0), ("c", 5.0)]
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "- c g=5: CLIP score 25, FID 21" in text and "- a g=5: CLIP score 26, FID 30" in text


def test_sweep_dir_expands_to_its_runs_with_params_and_metric(tmp_path, capsys):
    sweep_dir = tmp_path / "sweeps" / "lr_ema"
    records = []
    for i, (lr, decay, clip) in enumerate([(1e-3, 0.99, 21.0), (3e-4, 0.999, 24.0), (1e-4, 0.99, None)]):
        name = f"run-{i:03d}"
        if clip is not None:
            write_run(sweep_dir / name, {"eval/clip_score": clip, "eval/clip_score_g3.0": clip},
                      config=ldm_config(3.0, decay=decay, lr=lr, name=name))
        records.append({"name": name, "params": {"model.init_args.lr": lr, "trainer.callbacks.decay": decay},
                        "status": "finished" if clip is not None else "failed", "run_dir": "elsewhere/" + name})
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "lr_ema", "runs": records,
                                                      "metric": {"name": "eval/clip_score", "goal": "maximize"}}))
    result = cmp.compare([str(sweep_dir)], tmp_path / "out")
    assert result["metric"] == "eval/clip_score" and result["goal"] == "maximize" and result["best"] == "run-001"
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["run-000", "run-001", "run-002"]
    assert [r["status"] for r in rows] == ["finished", "finished", "failed"]
    assert [float(r["model.init_args.lr"]) for r in rows] == [1e-3, 3e-4, 1e-4]
    # the swept decay is shown once, not again as trainer.callbacks.0.init_args.decay from config.yaml
    assert [float(r["trainer.callbacks.decay"]) for r in rows] == [0.99, 0.999, 0.99]
    assert not any("callbacks.0" in k for k in rows[0])
    assert rows[2]["eval/clip_score"] == "missing" and rows[2]["best_step"] == "missing"
    assert "run-002 lacks eval/clip_score, eval/clip_score_g3.0" in capsys.readouterr().out


def test_wandb_runs_need_wandb_online(tmp_path, monkeypatch, capsys):
    from lit_diffusion.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match=r"wandb:me/proj/abc123: reading runs from W&B needs W&B online.*offline"):
        cmp.compare(["wandb:me/proj/abc123"], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "wandb:me/proj", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "lit-diffusion compare: error: wandb:me/proj" in err and "run directories" in err
    with pytest.raises(ValueError, match="expected wandb:ENTITY/PROJECT"):
        cmp.compare(["wandb:onlyentity"], tmp_path / "out")


class FakeRun:
    def __init__(self, name, config, summary, history, state="finished"):
        self.name, self.config, self.summary, self.state, self.id = name, config, summary, state, name
        self.url = f"https://wandb.ai/me/proj/runs/{name}"
        self._history = history

    def scan_history(self, keys=None):
        """As wandb's `Run.scan_history`: with keys, the rows holding all of them and only those keys (and W&B's
        own `_step`, a count of log calls); without, every row whole."""
        rows = [dict(row, _step=i) for i, row in enumerate(self._history)]
        if keys is None:
            return rows
        return [{k: row[k] for k in [*keys, "_step"]} for row in rows if all(k in row for k in keys)]


class FakeApi:
    def __init__(self, runs, config):
        self._runs, self._config = runs, config
        self.asked = []

    def sweep(self, path):
        self.asked.append(path)
        return type("Sweep", (), {"runs": self._runs, "config": self._config})()

    def runs(self, path):
        self.asked.append(path)
        return self._runs


def test_wandb_sweep_through_the_api(tmp_path):
    full = ldm_config(3.0)
    runs = [FakeRun("sunny-1", {"model.init_args.guidance": 1.5, "config": {**full, "model": {
                        **full["model"], "init_args": {**full["model"]["init_args"], "guidance": 1.5}}}},
                    {"eval/fid_clip": 30.0, "eval/fid_clip_g1.5": 30.0, "eval/clip_score_g1.5": 20.0,
                     "eval/fid_vs_clip_score": {"_type": "images"}},
                    [{"eval/fid_clip": 35.0, "trainer/global_step": 100}, {"eval/fid_clip": 30.0,
                                                                          "trainer/global_step": 200}]),
            FakeRun("rainy-2", {"model.init_args.guidance": 5.0, "config": full},
                    {"eval/fid_clip": 28.0, "eval/fid_clip_g5.0": 28.0, "eval/clip_score_g5.0": 25.0},
                    [{"eval/fid_clip": 26.0, "trainer/global_step": 100}, {"eval/fid_clip": 28.0,
                                                                          "trainer/global_step": 200}])]
    api = FakeApi(runs, {"metric": {"name": "eval/fid_clip", "goal": "minimize"},
                         "parameters": {"model.init_args.guidance": {"values": [1.5, 5.0]}}})
    result = cmp.compare(["wandb:me/proj/abc123"], tmp_path / "out", api=api, echo=False)
    assert api.asked == ["me/proj/abc123"]
    assert result["best"] == "rainy-2"
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["model.init_args.guidance"]) for r in rows] == [1.5, 5.0]
    assert [int(r["best_step"]) for r in rows] == [200, 100]
    assert [float(r["eval/fid_clip"]) for r in rows] == [30.0, 28.0]
    assert rows[0]["eval/fid_clip_g5.0"] == "missing" and rows[1]["eval/fid_clip_g1.5"] == "missing"
    assert rows[0]["source"] == "https://wandb.ai/me/proj/runs/sunny-1"


def test_not_a_run_dir_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        cmp.compare([str(tmp_path / "empty")], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        cmp.compare([str(tmp_path / "nope")], tmp_path / "out")


def test_flatten_names_nested_config_keys():
    flat = cmp.flatten(ldm_config(3.0))
    assert flat["model.init_args.guidance"] == 3.0
    assert flat["trainer.callbacks.0.init_args.decay"] == 0.995
    assert flat["model.init_args.unet.channel_mult"] == [1, 2]


def test_wandb_runs_of_one_name_stay_apart(tmp_path):
    """Offline sweeps name their runs run-000, run-001, ... in every sweep, so a W&B project holds runs of one
    name: each keeps its row and its points (told apart by the run id), and the Pareto front sees both."""
    full = ldm_config(3.0)
    runs = [FakeRun("run-000", {"config": full}, {"eval/fid_clip_g3.0": 10.0, "eval/clip_score_g3.0": 30.0}, []),
            FakeRun("run-000", {"config": full}, {"eval/fid_clip_g3.0": 50.0, "eval/clip_score_g3.0": 10.0}, [])]
    runs[1].url = "https://wandb.ai/me/proj/runs/x7y8"
    result = cmp.compare(["wandb:me/proj"], tmp_path / "out", api=FakeApi(runs, {}), echo=False)
    assert [r["run"] for r in result["rows"]] == ["run-000 (run-000)", "run-000 (x7y8)"]
    assert result["pareto"]["clip"] == [("run-000 (run-000)", 3.0)]
    assert cmp.tradeoff(result["runs"], "clip") == {"run-000 (run-000)": [(3.0, 30.0, 10.0)],
                                                    "run-000 (x7y8)": [(3.0, 10.0, 50.0)]}


def test_a_run_listed_twice_is_refused(tmp_path, monkeypatch):
    run = write_run(tmp_path / "a", {"eval/fid_clip": 1.0})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="listed more than once"):
        cmp.compare([str(run), "a/"], tmp_path / "out", echo=False)  # one folder, named two ways


def test_runs_of_one_name_under_folders_of_one_name_are_numbered(tmp_path):
    runs = [write_run(tmp_path / side / "x" / "run-000", {"eval/fid_clip": v}) for side, v in (("l", 1.0), ("r", 2.0))]
    third = write_run(tmp_path / "m" / "x" / "run-000", {"eval/fid_clip": 3.0})
    result = cmp.compare([*map(str, runs), str(third)], tmp_path / "out", echo=False)
    assert [r["run"] for r in result["rows"]] == ["x/run-000 #1", "x/run-000 #2", "x/run-000 #3"]
    assert [r["eval/fid_clip"] for r in result["rows"]] == [1.0, 2.0, 3.0]


def test_wandb_best_step_is_the_training_step(tmp_path):
    """W&B's `_step` counts log calls (the training loss every 25 steps, ...): the best step is Lightning's
    `trainer/global_step`, which W&B returns only when asked for."""
    history = [{"train/loss": 0.5, "trainer/global_step": 25 * i} for i in range(1, 40)]
    history.insert(30, {"eval/fid_clip": 12.0, "trainer/global_step": 775})
    history.append({"eval/fid_clip": 10.0, "trainer/global_step": 1550})
    run = FakeRun("a", {"config": ldm_config(3.0)}, {"eval/fid_clip": 10.0}, history)
    api = FakeApi([run], {"metric": {"name": "eval/fid_clip", "goal": "minimize"}, "parameters": {}})
    result = cmp.compare(["wandb:me/proj/sw"], tmp_path / "out", api=api, echo=False)
    assert result["rows"][0]["best_step"] == 1550


def test_a_wandb_run_without_training_steps_keeps_its_best(tmp_path):
    """A sweep program that logs with plain `wandb.log` has no trainer/global_step: its best is still found
    (its step unknown, -1), as with `--which best`."""
    history = [{"eval/fid_clip": 12.0}, {"eval/fid_clip": 9.0}, {"eval/fid_clip": 10.0}]
    api = FakeApi([FakeRun("a", {"config": ldm_config(3.0)}, {"eval/fid_clip": 10.0}, history)],
                  {"metric": {"name": "eval/fid_clip", "goal": "minimize"}, "parameters": {}})
    for which in ("final", "best"):
        info = cmp.compare(["wandb:me/proj/sw"], tmp_path / which, which=which, api=api, echo=False)["runs"][0]
        assert info.best["eval/fid_clip"] == 9.0 and info.best_step["eval/fid_clip"] == -1, which


def test_wandb_best_values_of_every_figure(tmp_path):
    """`--which best` on W&B runs: every figure's best comes from the run's history (a sweep keeps only its
    metric's), and only pairs of one step make points."""
    history = [{"eval/fid_clip": 12.0, "eval/fid_clip_g3.0": 12.0, "eval/clip_score_g3.0": 31.0,
                "trainer/global_step": 100},
               {"train/loss": 0.2, "trainer/global_step": 150},
               {"eval/fid_clip": 10.0, "eval/fid_clip_g3.0": 10.0, "eval/clip_score_g3.0": 30.0,
                "trainer/global_step": 200}]
    run = FakeRun("a", {"config": ldm_config(3.0)},
                  {"eval/fid_clip": 10.0, "eval/fid_clip_g3.0": 10.0, "eval/clip_score_g3.0": 30.0}, history)
    api = FakeApi([run], {"metric": {"name": "eval/fid_clip", "goal": "minimize"}, "parameters": {}})
    result = cmp.compare(["wandb:me/proj/sw"], tmp_path / "out", which="best", api=api, echo=False)
    row = result["rows"][0]
    assert (row["eval/fid_clip"], row["eval/fid_clip_g3.0"], row["eval/clip_score_g3.0"]) == (10.0, 10.0, 31.0)
    assert result["lacking"] == {} and row["best_step"] == 200
    info = result["runs"][0]
    assert info.best_step["eval/fid_clip_g3.0"] == 200 and info.best_step["eval/clip_score_g3.0"] == 100
    assert cmp.tradeoff(result["runs"], "clip", "best") == {}  # the two bests are of different steps


def test_unfinished_and_broken_down_runs_are_not_best(tmp_path):
    """A summary.json without a status (the run is going, or was killed before Lightning finalized it) reads
    "unfinished" and is not ranked; a final figure that broke down (NaN, as W&B's summary keeps it) shows as nan
    and is not ranked either, nor plotted."""
    done = write_run(tmp_path / "done", {"eval/fid_clip": 20.0, "eval/fid_clip_g3.0": 20.0,
                                         "eval/clip_score_g3.0": 25.0})
    killed = write_run(tmp_path / "killed", {"eval/fid_clip": 15.0})
    summary = json.loads((killed / "summary.json").read_text())
    del summary["status"]
    (killed / "summary.json").write_text(json.dumps(summary))
    broken = write_run(tmp_path / "broken", {"eval/fid_clip": float("nan"), "eval/fid_clip_g3.0": float("nan"),
                                             "eval/clip_score_g3.0": 30.0}, best={"eval/fid_clip": 5.0})
    result = cmp.compare([str(done), str(killed), str(broken)], tmp_path / "out", echo=False)
    assert [r["status"] for r in result["rows"]] == ["success", "unfinished", "success"]
    assert result["best"] == "done"
    table = read_markdown_table(tmp_path / "out" / "compare.md")
    assert [r["eval/fid_clip"] for r in table] == ["20", "15", "nan"]
    assert cmp.tradeoff(result["runs"], "clip") == {"done": [(3.0, 25.0, 20.0)]}
