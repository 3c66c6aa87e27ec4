"""`lit-diffusion compare RUNS... --out DIR`: one table and one FID-vs-CLIP-score figure for several runs.

RUNS are run directories (summary.json, config.yaml), sweep directories (sweep.json: expanded to their runs, with
the sweep's parameters and metric), or `wandb:ENTITY/PROJECT[/SWEEP_ID]` (read through `wandb.Api()`, online only).
Writes DIR/compare.md (Markdown), DIR/compare.csv and DIR/fid_{features}_vs_clip_score.png (every run's points
across guidance scales, the Pareto front of all of them marked). The table shows the parameters that differ between
runs and the final value of each metric in summary.json (`--which best` for the best value); a metric a run lacks
reads "missing", never 0, and the command says which run lacks which metric.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from lit_diffusion.runtime import tracking

MISSING = "missing"
GUIDANCE_KEY = re.compile(
    r"^eval/(?P<kind>fid_(?P<backend>[A-Za-z0-9]+)|clip_score|caption_acc)_g(?P<g>\d+(?:\.\d+)?)$")
# config entries that name the run rather than configure it
# the figures at a run's own sampling guidance (model.init_args.guidance), and the evaluation's cost
OWN_KEY = re.compile(r"^eval/(fid_[A-Za-z0-9]+|clip_score|caption_acc|seconds)$")
_NOT_PARAMS = ("run.", "config", "trainer.logger", "trainer.default_root_dir", "ckpt_path")
DEFAULT_METRIC = "eval/fid_clip"


FINISHED = ("success", "finished")  # ours (Lightning's finalize), the sweep's and W&B's for a run that ended well
# a summary.json without a status: the run is still going, or was stopped before Lightning could finalize it
UNFINISHED = "unfinished"
STEP_KEY = "trainer/global_step"  # what Lightning's WandbLogger logs beside every metric (W&B's _step counts calls)


@dataclass
class RunInfo:
    name: str
    source: str  # directory or W&B url
    status: str = "unknown"
    params: dict[str, Any] = field(default_factory=dict)  # flat, dotted keys
    sweep_params: tuple[str, ...] = ()  # the keys a sweep set (shown first)
    has_config: bool = False  # a run that failed before writing config.yaml says nothing about config keys
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    best_step: dict[str, int] = field(default_factory=dict)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.init_args.lr": 1e-3, "trainer.callbacks.0.init_args.decay": 0.995, ...}."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        items = ((str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return {prefix: list(obj) if isinstance(obj, tuple) else obj} if prefix else {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _config_params(config: Mapping | None) -> dict[str, Any]:
    flat = flatten(config or {})
    return {k: v for k, v in flat.items() if not any(k == p.rstrip(".") or k.startswith(p) for p in _NOT_PARAMS)}


def _numbers(d: Mapping | None, finite: bool = True) -> dict[str, float]:
    """The numeric entries; with finite=False NaN and inf are kept (a final value that broke down is shown as it
    is, as W&B's summary keeps it, and never ranks or plots)."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or math.isfinite(v)):
            out[k] = float(v)
    return out


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ collecting
def _run_from_dir(directory: Path, name: str | None = None, status: str | None = None,
                  sweep_params: Mapping[str, Any] | None = None) -> RunInfo:
    summary = {}
    if (directory / "summary.json").is_file():
        try:
            summary = json.loads((directory / "summary.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{directory / 'summary.json'} is not valid JSON: {err}") from None
    params = {}
    has_config = (directory / "config.yaml").is_file()
    if has_config:
        params = _config_params(yaml.safe_load((directory / "config.yaml").read_text()))
    params.update(sweep_params or {})
    return RunInfo(name=name or directory.name, source=str(directory), has_config=has_config,
                   status=status or summary.get("status") or (UNFINISHED if summary else "no summary"),
                   params=params, sweep_params=tuple(sweep_params or ()),
                   final=_numbers(summary.get("final"), finite=False),
                   best=_numbers(summary.get("best")),
                   best_step={k: int(v) for k, v in (summary.get("best_step") or {}).items()
                              if isinstance(v, (int, float))})


def _runs_from_sweep(directory: Path) -> tuple[list[RunInfo], dict | None]:
    try:
        state = json.loads((directory / "sweep.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / 'sweep.json'} is not valid JSON: {err}") from None
    runs = []
    for record in state.get("runs", []):
        # the sweep may have been run from another folder: its runs sit next to sweep.json
        run_directory = directory / record["name"]
        if not run_directory.is_dir() and record.get("run_dir"):
            run_directory = Path(record["run_dir"])
        runs.append(_run_from_dir(run_directory, name=record["name"], status=record.get("status"),
                                  sweep_params=record.get("params") or {}))
    return runs, state.get("metric")


def parse_wandb_spec(spec: str) -> tuple[str, str, str | None]:
    parts = spec[len("wandb:"):].strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec!r}: expected wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/SWEEP_ID")
    return parts[0], parts[1], (parts[2] if len(parts) == 3 else None)


def _runs_from_wandb(spec: str, api=None, history: bool = False) -> tuple[list[RunInfo], dict | None]:
    """The runs of a W&B project or sweep; with `history`, each run's best value and step of every figure (one
    scan of its history), else of the sweep's metric alone."""
    entity, project, sweep_id = parse_wandb_spec(spec)
    if api is None:
        mode, why = tracking.wandb_mode()
        if mode != "online":
            raise ValueError(
                f"{spec}: reading runs from W&B needs W&B online, but W&B is {mode} ({why}). Offline, compare run "
                "directories (runs/NAME) or a sweep directory (runs/sweeps/NAME); `wandb sync` uploads offline runs")
        import wandb

        api = wandb.Api()
    metric = None
    if sweep_id:
        sweep = api.sweep(f"{entity}/{project}/{sweep_id}")
        wandb_runs = list(sweep.runs)
        metric = (sweep.config or {}).get("metric")
        swept = tuple((sweep.config or {}).get("parameters") or ())
    else:
        wandb_runs = list(api.runs(f"{entity}/{project}"))
        swept = ()
    runs = []
    for r in wandb_runs:
        config = dict(r.config or {})
        # RunConfigCallback stores the full resolved LightningCLI config under "config"
        full = config["config"] if isinstance(config.get("config"), Mapping) else config
        params = _config_params(full)
        sweep_params = {k: config[k] for k in swept if k in config}
        params.update(sweep_params)
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary or {})
        info = RunInfo(name=r.name, source=getattr(r, "url", f"{entity}/{project}/{r.id}"), status=r.state,
                       params=params, sweep_params=tuple(sweep_params), final=_numbers(summary, finite=False),
                       has_config=True)
        name = (metric or {}).get("name")
        if history:
            _wandb_bests(r.scan_history(), None, name, (metric or {}).get("goal"), info)
        elif name:
            # W&B returns the rows holding every key asked for, and only those keys (and its own `_step`); a run
            # not logged through Lightning has no training step beside its metric: its best then has step -1
            _wandb_bests(r.scan_history(keys=[name, STEP_KEY]), [name], name, metric.get("goal"), info)
            if name not in info.best:
                _wandb_bests(r.scan_history(keys=[name]), [name], name, metric.get("goal"), info)
        runs.append(info)
    return runs, metric


def _wandb_bests(rows, keys: Sequence[str] | None, metric: str | None, goal: str | None, info: RunInfo) -> None:
    """Each key's best finite value over a W&B history and the training step it was logged at (Lightning's
    `trainer/global_step`; -1 where a row lacks it), all numeric keys when `keys` is None. The sweep's `goal`
    ranks its `metric`, the key's name the others (`tracking.lower_is_better`)."""
    best: dict[str, tuple[float, int]] = {}
    for row in rows:
        step = row.get(STEP_KEY)
        for key, value in row.items():
            if (keys is not None and key not in keys) or key.startswith("_") or key in (STEP_KEY, "epoch"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            lower = goal == "minimize" if key == metric and goal else tracking.lower_is_better(key)
            if key not in best or (value < best[key][0] if lower else value > best[key][0]):
                best[key] = (float(value), int(step) if isinstance(step, (int, float)) else -1)
    for key, (value, step) in best.items():
        info.best[key], info.best_step[key] = value, step


def collect_runs(specs: Sequence[str], api=None, history: bool = False) -> tuple[list[RunInfo], dict | None]:
    """Runs named by run dirs, sweep dirs or wandb: specs, and the sweep metric {name, goal} if one was found;
    `history`: W&B runs' best values of every figure (`--which best`), read from their histories."""
    runs, metric = [], None
    for spec in specs:
        spec = str(spec)
        if spec.startswith("wandb:"):
            found, m = _runs_from_wandb(spec, api, history)
        else:
            path = Path(spec)
            if (path / "sweep.json").is_file():
                found, m = _runs_from_sweep(path)
            elif (path / "summary.json").is_file() or (path / "config.yaml").is_file():
                found, m = [_run_from_dir(path)], None
            elif not path.exists():
                raise FileNotFoundError(f"{spec} does not exist")
            else:
                raise ValueError(f"{spec} is neither a run directory (summary.json) nor a sweep directory (sweep.json)")
        runs += found
        metric = metric or m
    if not runs:
        raise ValueError("no runs to compare")
    sources = [r.source if "://" in r.source else str(Path(r.source).resolve()) for r in runs]
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)}: listed more than once (directly, or in a sweep and on its own)")
    names = [r.name for r in runs]
    for r in runs:  # the same run name from two sweeps, or two W&B runs of one name: tell them apart
        if names.count(r.name) > 1:
            where = r.source.rstrip("/")
            # a W&B run by its id (the url's last part), a run directory by its parent folder
            r.name = (f"{r.name} ({where.rsplit('/', 1)[-1]})" if "://" in where
                      else f"{Path(where).parent.name}/{r.name}")
    alike: dict[str, list[RunInfo]] = {}
    for r in runs:  # still alike (two run folders of one name under parents of one name): number them
        alike.setdefault(r.name, []).append(r)
    for group in alike.values():
        for i, r in enumerate(group if len(group) > 1 else ()):
            r.name = f"{r.name} #{i + 1}"
    return runs, metric


# -------------------------------------------------------------------------------------------------- analysis
def differing_params(runs: Sequence[RunInfo]) -> list[str]:
    """Keys whose values are not the same in every run: swept keys first, then the rest of the configs.

    Config keys are compared among the runs that wrote a config.yaml. A config key that merely repeats a swept
    column (`trainer.callbacks.3.init_args.decay` for a sweep's `trainer.callbacks.decay`) is left out.
    """
    def value(r: RunInfo, k: str) -> str | None:
        if k not in r.params and not r.has_config and k not in r.sweep_params:
            return None  # unknown, not different
        return json.dumps(r.params.get(k, MISSING), default=str, sort_keys=True)

    keys = list(dict.fromkeys(k for r in runs for k in r.params))
    swept = list(dict.fromkeys(k for r in runs for k in r.sweep_params))
    column = {k: [value(r, k) for r in runs] for k in keys}
    differ = [k for k in keys if len({v for v in column[k] if v is not None}) > 1]
    shown = [k for k in swept if k in differ]

    def repeats_swept(k: str) -> bool:
        return any(all(v is None or v == w for v, w in zip(column[k], column[s])) for s in shown)

    return shown + [k for k in differ if k not in shown and not repeats_swept(k)]


def guidance_metrics(runs: Sequence[RunInfo]) -> tuple[list[float], list[str], list[str]]:
    """(guidance scales, FID backends, metric keys in table order) found in any run."""
    scales, backends, keys = set(), set(), set()
    for r in runs:
        for k in (*r.final, *r.best):
            m = GUIDANCE_KEY.match(k)
            if m:
                scales.add(float(m["g"]))
                keys.add(k)
                if m["backend"]:
                    backends.add(m["backend"])
    backends = sorted(backends)
    order = {f"fid_{b}": i for i, b in enumerate(backends)} | {"clip_score": len(backends),
                                                                "caption_acc": len(backends) + 1}
    ordered = sorted(keys, key=lambda k: (float(GUIDANCE_KEY.match(k)["g"]), order[GUIDANCE_KEY.match(k)["kind"]]))
    return sorted(scales), backends, ordered


def pareto_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """points: (clip_score, fid); on the front when no other point has clip >= and fid <=, one of them strictly."""
    mask = []
    for i, (c, f) in enumerate(points):
        dominated = any(c2 >= c and f2 <= f and (c2 > c or f2 < f) for j, (c2, f2) in enumerate(points) if j != i)
        mask.append(not dominated)
    return mask


def tradeoff(runs: Sequence[RunInfo], backend: str,
             which: str = "final") -> dict[str, list[tuple[float, float, float]]]:
    """run -> [(guidance, clip_score, fid)] where a run has both figures at a guidance scale. With `which="best"`
    only where both bests are of one step: each is the best over the run on its own, and a best FID of step 1000
    beside a best CLIP score of step 3000 is a point no checkpoint reached."""
    out = {}
    for r in runs:
        values = getattr(r, which)
        pts = []
        for k, fid in values.items():
            m = GUIDANCE_KEY.match(k)
            if m and m["backend"] == backend and _finite(fid):
                clip_key = f"eval/clip_score_g{m['g']}"
                clip = values.get(clip_key)
                if which == "best" and (r.best_step.get(k) is None or r.best_step.get(k) != r.best_step.get(clip_key)):
                    continue
                if _finite(clip):
                    pts.append((float(m["g"]), clip, fid))
        if pts:
            out[r.name] = sorted(pts)
    return out


def _fmt(value: Any) -> str:
    if value is None or value == MISSING:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def compare(specs: Sequence[str], out: str | Path, metric: str | None = None, goal: str | None = None,
            which: str = "final", api=None, echo: bool = True) -> dict:
    """Write DIR/compare.md, DIR/compare.csv and the FID-vs-CLIP-score figures; returns what it found."""
    from lit_diffusion.evaluation.plots import save_tradeoff

    if which not in ("final", "best"):
        raise ValueError(f"--which must be final or best, got {which!r}")
    if goal not in (None, "minimize", "maximize"):
        raise ValueError(f"--goal must be minimize or maximize, got {goal!r}")
    say = print if echo else (lambda *a, **k: None)
    runs, sweep_metric = collect_runs(specs, api, history=which == "best")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    if metric is None:
        if sweep_metric and sweep_metric.get("name"):
            metric, goal = sweep_metric["name"], goal or sweep_metric.get("goal")
        elif any(DEFAULT_METRIC in r.final for r in runs):
            metric = DEFAULT_METRIC
    if metric and goal is None:
        goal = "minimize" if tracking.lower_is_better(metric) else "maximize"

    params = differing_params(runs)
    scales, backends, metric_keys = guidance_metrics(runs)
    own_keys = sorted({k for r in runs for k in (*r.final, *r.best) if OWN_KEY.match(k)},
                      key=lambda k: (k.endswith("seconds"), not k.startswith("eval/fid"), k))
    value_keys = list(dict.fromkeys(([metric] if metric else []) + own_keys + metric_keys))
    lacking: dict[str, list[str]] = {}
    rows = []
    for r in runs:
        values = getattr(r, which)
        row = {"run": r.name, "status": r.status, **{k: r.params.get(k, MISSING) for k in params}}
        for k in value_keys:
            row[k] = values.get(k, MISSING)
            if k not in values:
                lacking.setdefault(r.name, []).append(k)
        if metric:
            row["best_step"] = r.best_step.get(metric, MISSING)
        row["source"] = r.source
        rows.append(row)

    best = None
    if metric:
        # a finished run: a failed one's figure is from before it stopped (W&B's engine ranks it worst), a running
        # or killed one's from before its end; a figure that broke down (NaN) is no score
        scored = [(r, getattr(r, which).get(metric)) for r in runs if r.status in FINISHED]
        scored = [(r, v) for r, v in scored if _finite(v)]
        for r, v in scored:
            if best is None or (v < best[1] if goal == "minimize" else v > best[1]):
                best = (r, v)

    columns = ["run", "status", *params, *(value_keys[:1] if metric else []), *(["best_step"] if metric else []),
               *value_keys[1 if metric else 0:], "source"]
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else _fmt(v)) for k, v in row.items()})

    figures, fronts = {}, {}
    for b in backends:
        points = tradeoff(runs, b, which)
        flat = [(name, g, c, f) for name, pts in points.items() for g, c, f in pts]
        mask = pareto_mask([(c, f) for _, _, c, f in flat])
        fronts[b] = [p for p, on in zip(flat, mask) if on]
        if points:
            figures[b] = save_tradeoff(points, out / f"fid_{b}_vs_clip_score.png",
                                       title=f"FID ({b} features) vs CLIP score ({which} values)",
                                       fid_label=f"FID ({b} features)", pareto=[(c, f) for _, _, c, f in fronts[b]])

    lines = [f"# Comparison of {len(runs)} runs", ""]
    if best:
        lines.append(f"Best run by `{metric}` ({goal}): **{best[0].name}** ({best[1]:.6g})")
    elif metric:
        lines.append(f"No run has `{metric}`.")
    lines += ["", f"Values: the {which} value of each metric in the run's summary.json; "
                  f"`{MISSING}` = the run did not log it.", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(_fmt(row.get(c))) for c in columns) + " |")
    for b, front in fronts.items():
        lines += ["", f"## FID ({b} features) vs CLIP score", "",
                  f"![FID vs CLIP score]({figures[b].name})" if b in figures else "", "",
                  "Pareto front (no other run and guidance has both higher CLIP score and lower FID):", ""]
        lines += [f"- {name} g={g:g}: CLIP score {c:.6g}, FID {f:.6g}" for name, g, c, f in
                  sorted(front, key=lambda p: p[2])]
    if lacking:
        lines += ["", "## Missing metrics", ""] + [f"- {n}: {', '.join(ks)}" for n, ks in lacking.items()]
    (out / "compare.md").write_text("\n".join(lines) + "\n")

    for name, keys in lacking.items():
        say(f"{name} lacks {', '.join(keys)}")
    if best:
        say(f"best run by {metric} ({goal}): {best[0].name} {best[1]:.6g}")
    say(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}" + "".join(f", {p}" for p in figures.values()))
    return {"runs": runs, "rows": rows, "columns": columns, "metric": metric, "goal": goal,
            "best": best[0].name if best else None, "lacking": lacking,
            "pareto": {b: [(n, g) for n, g, _, _ in f] for b, f in fronts.items()},
            "files": {"md": out / "compare.md", "csv": out / "compare.csv",
                      **{f"plot_{b}": p for b, p in figures.items()}}}


# -------------------------------------------------------------------------------------------------------- cli
def cmd_compare(args) -> None:
    compare(args.runs, args.out, metric=args.metric, goal=args.goal, which=args.which)


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="table and FID-vs-CLIP-score figure for run dirs, sweep dirs or W&B runs")
    p.add_argument("runs", nargs="+", help="run directories, sweep directories (runs/sweeps/NAME), "
                                           "or wandb:ENTITY/PROJECT[/SWEEP_ID] (online)")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.csv and the figures")
    p.add_argument("--metric", default=None, help="rank runs by this key (default: the sweep's metric, "
                                                  f"else {DEFAULT_METRIC})")
    p.add_argument("--goal", choices=("minimize", "maximize"), default=None,
                   help="default: the sweep's goal, else from the metric's name (fid, loss: minimize)")
    p.add_argument("--which", choices=("final", "best"), default="final",
                   help="final (as W&B's run summary) or best value of each metric")
    p.set_defaults(func=cmd_compare)
