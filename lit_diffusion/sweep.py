"""`lit-diffusion sweep sweeps/X.yaml --count N`: run a W&B sweep YAML without a W&B server.

The same YAML runs online with `wandb sweep sweeps/X.yaml` + `wandb agent ID`. Offline, W&B's own open-source sweep
engine (`sweeps`: grid, random, bayes) proposes each run from the runs so far; the YAML's `command` is expanded the
way `wandb agent` expands it and run as a subprocess, one run after another, each with
`--run.root SWEEP_DIR --run.name run-NNN --run.group SWEEP_NAME` appended, so the runs share one folder and one W&B
group. Each run's `summary.json` feeds the metric back (bayes needs it), and `SWEEP_DIR/sweep.json` records the
config, every run's parameters, status and metric after each run, so a sweep can be resumed by running it again.

The metric of a run is the final value in its summary.json, which is what W&B keeps as the run summary; the
best value over the run is passed to the engine as history, as the W&B controller sees it (bayes optimises the
extremum of summary and history).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


# the macros `wandb agent` expands in a sweep command (wandb/wandb_agent.py, wandb/sdk/launch/sweeps/utils.py)
ARG_MACROS = ("args", "args_no_hyphens", "args_no_equals", "args_no_boolean_flags", "args_json",
              "args_json_file", "args_append_hydra", "args_override_hydra")
MACROS = ("env", "interpreter", "program", *ARG_MACROS)
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR_NAME = "[A-Z0-9_]*"  # the names wandb's agent expands (its SWEEP_COMMAND_ENV_VAR_REGEX)
ENVVAR = re.compile(rf"\$\{{envvar:({ENVVAR_NAME})\}}")
# keys a single parameter may hold (the union over the schema's parameter definitions)
PARAMETER_KEYS = ("value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma", "a", "b",
                  "parameters")


class SweepConfigError(ValueError):
    """A sweep YAML that the sweeps schema (or the command macros) rejects; the message names file and key."""


def _import_sweeps():
    # sweeps 0.2 declares pydantic-v1 config keys; pydantic 2 warns about them on import
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
        from sweeps.config import schema
    return sweeps, schema


# ----------------------------------------------------------------------------------------------------- config
def _schema_errors(config: Any) -> list[str]:
    from jsonschema.exceptions import best_match

    _, schema = _import_sweeps()
    messages = []
    for error in sorted(schema.validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        where = ".".join(map(str, path)) or "(top level)"
        in_parameter = len(path) >= 2 and path[0] == "parameters" and isinstance(error.instance, dict)
        if in_parameter and error.validator == "anyOf":
            unknown = sorted(set(error.instance) - set(PARAMETER_KEYS))
            hint = (f"unknown key(s) {unknown}" if unknown else
                    (best_match(error.context).message if error.context else error.message))
            messages.append(f"parameters.{path[1]}: {hint}; a parameter takes `value`, `values` (+ `probabilities`), "
                            "or `min`/`max` (+ `distribution`, `q`), or `distribution` with `mu`/`sigma`")
        else:
            messages.append(f"{where}: {error.message}")
    return messages


def validate_sweep_config(config: Any, source: str = "sweep config") -> dict:
    """Check a sweep config against the sweeps JSON schema and our command macros; returns it (unchanged).

    Raises SweepConfigError naming `source` and each offending key.
    """
    if not isinstance(config, dict):
        raise SweepConfigError(f"{source}: a sweep config must be a mapping, got {type(config).__name__}")
    sweeps, _ = _import_sweeps()
    messages = _schema_errors(config)
    if not messages:
        # min < max, probabilities summing to one, deprecated distributions: checks jsonschema cannot express
        try:
            messages = [m for m in sweeps.schema_violations_from_proposed_config(config)]
        except ValueError as err:
            messages = [str(err)]
    if not messages and config["method"] == "bayes" and "metric" not in config:
        messages.append("metric: method bayes needs a metric {name, goal}")
    command = config.get("command", DEFAULT_COMMAND)
    macros = [c[2:-1] for c in map(str, command) if c.startswith("${") and c.endswith("}")]
    unknown = [m for m in macros if m not in MACROS and not m.startswith("envvar:")]
    names = [m for c in map(str, command) for m in re.findall(r"\$\{envvar:([^}]*)\}", c)]
    unexpanded = [n for n in names if not re.fullmatch(ENVVAR_NAME, n)]
    if unexpanded:  # wandb's agent leaves these as they are: the run would get the literal text
        messages.append(f"command: ${{envvar:{unexpanded[0]}}}: wandb expands only names of A-Z, 0-9 and _")
    if unknown:
        messages.append(f"command: unknown macro(s) {', '.join('${' + m + '}' for m in unknown)}; "
                        f"known: {', '.join('${' + m + '}' for m in MACROS)}, ${{envvar:NAME}}")
    if not any(m in ARG_MACROS for m in macros):
        messages.append("command: no ${args} (or ${args_no_hyphens}, ...) macro, so the parameters never reach "
                        "the program")
    if "program" in macros and not config.get("program"):
        messages.append("program: the command uses ${program} but the config names no program")
    if messages:
        raise SweepConfigError(f"{source}: invalid sweep config:\n  " + "\n  ".join(messages))
    return config


def load_sweep_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_sweep_config(config, str(path))


# ---------------------------------------------------------------------------------------------------- command
def _plain(value: Any) -> Any:
    """numpy scalars (the engine's proposals) -> python, so params print and serialise like W&B's."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def command_args(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """The argument macros exactly as `wandb agent` formats them (sdk/launch/sweeps/utils.create_sweep_command_args)."""
    out: dict[str, list[str]] = {m: [] for m in ARG_MACROS if m != "args_json_file"}
    for key, value in params.items():
        flag = f"{key}={value}"
        out["args"].append("--" + flag)
        out["args_no_hyphens"].append(flag)
        out["args_no_equals"] += [f"--{key}", str(value)]
        out["args_append_hydra"].append("+" + flag)
        out["args_override_hydra"].append("++" + flag)
        if isinstance(value, bool):
            if value:
                out["args_no_boolean_flags"].append("--" + key)
        else:
            out["args_no_boolean_flags"].append("--" + flag)
    out["args_json"] = [json.dumps(dict(params))]
    return out


def expand_command(config: Mapping, params: Mapping[str, Any], interpreter: str | None = None,
                   args_json_file: str | Path | None = None) -> list[str]:
    """The sweep's command for one run, its macros expanded like `wandb agent` does.

    `${interpreter}` is this Python (the agent writes `python`), so the run sees the same installed packages.
    """
    variables = command_args(params)
    variables["interpreter"] = [interpreter or sys.executable]
    variables["program"] = [str(config["program"])] if config.get("program") else []
    variables["env"] = ["/usr/bin/env"] if os.name != "nt" and Path("/usr/bin/env").exists() else []
    if args_json_file is not None:
        variables["args_json_file"] = [str(args_json_file)]
    command = []
    for chunk in map(str, config.get("command", DEFAULT_COMMAND)):
        if ENVVAR.search(chunk):  # anywhere in the chunk, an unset variable as its name (as wandb's agent)
            command.append(ENVVAR.sub(lambda m: os.environ.get(m[1], m[1]), chunk))
        elif chunk.startswith("${envvar:"):  # a name wandb does not expand (refused by validation): as it is
            command.append(chunk)
        elif chunk.startswith("${") and chunk.endswith("}"):
            command += variables.get(chunk[2:-1], [])
        else:
            command.append(chunk)
    return command


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any] | None) -> list[str]:
    """`key=value` (or a {key: value} dict) -> `--key=value`, LightningCLI's dotted override form."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"--{k}={v}" for k, v in overrides.items()]
    out = []
    for item in overrides:
        item = str(item)
        if item.startswith("-"):
            out.append(item)
        elif "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. trainer.max_steps=10")
        else:
            out.append("--" + item)
    return out


# ------------------------------------------------------------------------------------------------------ state
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_summary(run_directory: str | Path) -> dict | None:
    path = Path(run_directory) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def metric_of(summary: Mapping | None, name: str) -> tuple[float | None, float | None]:
    """(final, best) value of a metric in a summary.json, None where missing or not finite."""
    def finite(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    if not summary:
        return None, None
    final = finite((summary.get("final") or {}).get(name))
    best = finite((summary.get("best") or {}).get(name))
    return final, (best if best is not None else final)


def better(a: float, b: float, goal: str) -> bool:
    return a > b if goal == "maximize" else a < b


def best_run(runs: list[dict], goal: str) -> dict | None:
    """The best finished run: a failed one's figure is from before it stopped (W&B's engine ranks it worst)."""
    scored = [r for r in runs if r.get("metric") is not None and r.get("status") == "finished"]
    if not scored:
        return None
    best = scored[0]
    for r in scored[1:]:
        if better(r["metric"], best["metric"], goal):
            best = r
    return best


def _engine_run(record: dict, metric_name: str | None):
    """A sweep.json run record -> the engine's SweepRun (state, config, summary and best-so-far as history)."""
    sweeps, _ = _import_sweeps()
    state = {"finished": "finished", "failed": "failed", "killed": "killed"}.get(record["status"], "crashed")
    summary, history = {}, []
    if metric_name and record.get("metric") is not None:
        summary[metric_name] = record["metric"]
        history.append({metric_name: record.get("metric_best", record["metric"])})
    return sweeps.SweepRun(name=record["name"], state=state,
                           config={k: {"value": v} for k, v in record["params"].items()},
                           summaryMetrics=summary, sampledHistory=history)


def propose(config: dict, records: list[dict], seed: int = 0) -> dict | None:
    """The next run's parameters from the sweeps engine, or None when a grid is exhausted."""
    import random

    import numpy as np

    sweeps, _ = _import_sweeps()
    metric_name = (config.get("metric") or {}).get("name")
    runs = [_engine_run(r, metric_name) for r in records]
    # random search draws from python's global generator, bayes from numpy's: both seeded per proposal (so a
    # resumed sweep proposes what an uninterrupted one would have) and restored afterwards
    saved = random.getstate(), np.random.get_state()
    random.seed(seed * 1_000_003 + len(records))
    np.random.seed((seed * 1_000_003 + len(records)) % 2**32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suggestion = sweeps.next_run(config, runs, validate=True)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    if suggestion is None:
        return None
    return {k: _plain(v["value"]) for k, v in suggestion.config.items()}


# -------------------------------------------------------------------------------------------------------- run
def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_sweep(sweep_file: str | Path | Mapping, count: int | None = None, root: str | Path = "runs/sweeps",
              name: str | None = None, overrides: Iterable[str] | Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None, cwd: str | Path | None = None, seed: int = 0,
              run_timeout: float | None = None, dry_run: bool = False, echo: bool = True) -> dict:
    """Run `count` more runs of a sweep (a grid: by default all that remain), one after another.

    sweep_file: a sweep YAML, or the sweep config itself as a dict (e.g. a shipped YAML with a smaller grid).
    overrides: extra `key=value` (or {key: value}) appended to every run's command, e.g. trainer.max_steps=10.
    env: extra environment for the runs. cwd: where the command runs (its relative paths resolve there; `root`
    stays relative to this process's folder).
    Returns the sweep state, also written to ROOT/NAME/sweep.json.
    """
    if isinstance(sweep_file, Mapping):
        config = validate_sweep_config(json.loads(json.dumps(sweep_file)), "sweep config")
        sweep_file = Path(str(config.get("name") or "sweep"))
    else:
        sweep_file = Path(sweep_file)
        config = load_sweep_config(sweep_file)
    method = config["method"]
    if count is not None and count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if count is None and method != "grid":
        raise ValueError(f"{sweep_file}: method {method} proposes runs without end; pass --count N")
    name = name or config.get("name") or sweep_file.stem
    sweep_dir = Path(root) / name
    if cwd is not None:  # the runs write where this process reads, not under cwd
        sweep_dir = sweep_dir.absolute()
    extra_args = parse_overrides(overrides)
    swept = {str(k) for k in (config.get("parameters") or {})}
    clash = sorted(k for k in swept if any(a.startswith((f"--{k}=", f"--{k} ")) or a == f"--{k}" for a in extra_args))
    if clash:  # the last value wins on the command line: every run would use the --set one
        raise ValueError(f"--set {', '.join(clash)}: the sweep varies {'it' if len(clash) == 1 else 'them'} "
                         f"({sweep_file}'s parameters); set it in the sweep file instead")
    metric = config.get("metric") or {}
    metric_name, goal = metric.get("name"), metric.get("goal", "minimize")
    say = print if echo else (lambda *a, **k: None)

    state_path = sweep_dir / "sweep.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and json.dumps(state.get("config"), sort_keys=True) != json.dumps(config, sort_keys=True):
        raise ValueError(f"{state_path} belongs to a sweep with a different config; pick another --name or --root")
    if state is None:
        state = {"name": name, "file": str(sweep_file), "method": method, "metric": metric or None,
                 "config": config, "sweep_dir": str(sweep_dir), "runs": []}
    elif state.get("runs") and state.get("overrides", []) != extra_args:
        # the runs so far were trained with the other overrides: ranking them beside new ones compares two setups
        before, now = (" ".join(a) or "(none)" for a in (state.get("overrides") or [], extra_args))
        raise ValueError(f"{state_path}: its runs were made with --set {before}, not {now}; repeat the same --set, "
                         "or pick another --name or --root")
    state["overrides"] = extra_args
    records: list[dict] = state["runs"]

    if dry_run:
        pending = [dict(r) for r in records]
        for i in range(count or 10_000):
            params = propose(config, pending, seed)
            if params is None:
                break
            run_name = f"run-{len(pending):03d}"
            pending.append({"name": run_name, "params": params, "status": "running"})
            cmd = expand_command(config, params) + extra_args + [
                f"--run.root={sweep_dir}", f"--run.name={run_name}", f"--run.group={name}"]
            say(f"{run_name}: {subprocess.list2cmdline(cmd)}")
        return state

    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "logs").mkdir(exist_ok=True)
    run_env = {**os.environ, **(env or {})}
    run_env.pop("LIT_DIFFUSION_RUN_NAME", None)  # each run names itself through --run.name
    started = 0
    while count is None or started < count:
        params = propose(config, records, seed)
        if params is None:
            say(f"[{name}] grid exhausted after {len(records)} runs")
            break
        run_name = f"run-{len(records):03d}"
        log_path = sweep_dir / "logs" / f"{run_name}.log"
        cmd = expand_command(config, params, args_json_file=sweep_dir / "logs" / f"{run_name}.args.json")
        if "${args_json_file}" in config.get("command", []):
            (sweep_dir / "logs" / f"{run_name}.args.json").write_text(json.dumps(params))
        cmd += extra_args + [f"--run.root={sweep_dir}", f"--run.name={run_name}", f"--run.group={name}"]
        record = {"name": run_name, "params": params, "status": "running", "run_dir": str(sweep_dir / run_name),
                  "log": str(log_path), "command": cmd, "returncode": None, "metric": None, "metric_best": None,
                  "seconds": None}
        records.append(record)
        _write_json(state_path, state)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        say(f"[{name}] {run_name} ({started + 1}{'/' + str(count) if count else ''}): {shown}")
        t0 = time.perf_counter()
        try:
            with open(log_path, "w") as out:
                proc = subprocess.run(cmd, cwd=cwd, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=run_timeout)
            record["returncode"] = proc.returncode
            record["status"] = "finished" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            record["status"], record["error"] = "failed", f"timed out after {run_timeout} s"
        except OSError as err:  # the program could not be started at all
            record["status"], record["error"] = "failed", f"could not start {cmd[0]!r}: {err}"
        except KeyboardInterrupt:
            record["status"] = "killed"
            record["seconds"] = round(time.perf_counter() - t0, 3)
            _write_json(state_path, state)
            raise
        record["seconds"] = round(time.perf_counter() - t0, 3)
        summary = read_summary(record["run_dir"])
        if metric_name:
            record["metric"], record["metric_best"] = metric_of(summary, metric_name)
        if record["status"] == "failed":
            record.setdefault("error", f"exit code {record['returncode']}")
            record["log_tail"] = _tail(log_path)
            say(f"[{name}] {run_name} FAILED ({record['error']}); log {log_path}:\n"
                f"{record['log_tail'] or '(no output)'}")
        elif metric_name and record["metric"] is None:
            last = ((summary or {}).get("final") or {}).get(metric_name)
            where = f"{record['run_dir']}/summary.json"
            record["note"] = (f"finished with {metric_name} = {last} (not a figure), in {where}" if last is not None
                              else f"finished without {metric_name} in {where}")
            say(f"[{name}] {run_name} {record['note']}")
        else:
            shown = f", {metric_name}={record['metric']:.6g}" if metric_name else ""
            say(f"[{name}] {run_name} finished in {record['seconds']:.1f} s{shown}")
        started += 1
        best = best_run(records, goal)
        state["best"] = {"name": best["name"], "metric": best["metric"], "params": best["params"]} if best else None
        _write_json(state_path, state)
        target = metric.get("target")
        if (target is not None and record["metric"] is not None and record["status"] == "finished"
                and not better(target, record["metric"], goal)):
            say(f"[{name}] {run_name} reached the target {metric_name}={target}; stopping")
            break

    failed = [r["name"] for r in records if r["status"] != "finished"]
    state["failed"] = failed
    _write_json(state_path, state)
    best = state.get("best")
    if best:
        say(f"[{name}] best run by {metric_name} ({goal}): {best['name']} {best['metric']:.6g}")
    if failed:
        say(f"[{name}] runs that did not finish: {', '.join(failed)}")
    say(f"[{name}] state: {state_path}")
    return state


# -------------------------------------------------------------------------------------------------------- cli
def cmd_sweep(args) -> None:
    state = run_sweep(args.config, count=args.count, root=args.root, name=args.name, overrides=args.set,
                      seed=args.seed, run_timeout=args.run_timeout, dry_run=args.dry_run)
    if not args.dry_run and state["runs"] and all(r["status"] != "finished" for r in state["runs"]):
        raise SystemExit(1)


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a W&B sweep YAML offline (grid, random, bayes) with W&B's sweep engine")
    p.add_argument("config", help="sweep YAML (sweeps/*.yaml); the same file works with `wandb sweep`")
    p.add_argument("--count", type=int, default=None, help="runs to start now (default: the rest of a grid)")
    p.add_argument("--root", default="runs/sweeps", help="the sweep folder is ROOT/NAME")
    p.add_argument("--name", default=None, help="sweep name and W&B group (default: the YAML's name or file stem); "
                                                "an existing sweep of that name is continued")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run, e.g. --set trainer.max_steps=10 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random and bayes proposals")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before a run is stopped and failed")
    p.add_argument("--dry-run", action="store_true", help="print the commands the sweep would run")
    p.set_defaults(func=cmd_sweep)
