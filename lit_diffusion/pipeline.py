"""The main job: data -> CLIP -> VAE -> latent diffusion -> evaluation -> report, in one command.

Each stage runs as its own `lit-diffusion fit` process (a fresh process per stage: W&B runs, DDP and memory
start clean), in the run group `NAME`. A stage whose finished checkpoint (`runs/NAME/clip.ckpt`, ...) exists is
skipped, and an interrupted stage resumes from its `last.ckpt`, so re-running the command continues the pipeline
where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lit_diffusion.stages.registry import STAGE_KEYS, STAGES

log = logging.getLogger("lit_diffusion")
IMPORTABLE = ("clip", "vae")  # stages that `checkpoint:` can supply instead of training them



def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    known = {"name", "root", "data", "stages", "evaluation", "samples", "wandb", "seed"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{path}: unknown pipeline keys {unknown}; known: {sorted(known)}")
    for stage in STAGES:
        spec = (cfg.get("stages") or {}).get(stage)
        if spec is None:
            raise ValueError(f"{path}: stages.{stage} is missing (each stage needs at least `config:`)")
        if spec.get("checkpoint") and stage not in IMPORTABLE:
            raise ValueError(f"{path}: stages.{stage}.checkpoint: only {list(IMPORTABLE)} can start from a "
                             f"checkpoint instead of being trained")
        if not spec.get("config") and not spec.get("checkpoint"):
            raise ValueError(f"{path}: stages.{stage} needs `config:` (train it) or `checkpoint:` (use it)")
    return cfg


def _arg(key: str, value) -> list[str]:
    """One LightningCLI override; dicts and lists go as JSON (a dict replaces the whole init arg)."""
    return [f"--{key}", value if isinstance(value, str) else json.dumps(value)]


def _ensure_data(cfg: dict) -> dict:
    data = cfg.get("data") or {}
    if data.get("train_urls"):
        tokenizer = data.get("tokenizer")
        if not tokenizer and not cfg["stages"]["clip"].get("checkpoint"):  # an imported CLIP brings its own
            from lit_diffusion.data.tokenizer import train_from_shards

            tokenizer = str(Path(cfg.get("root", "runs")) / cfg.get("name", "pipeline") / "tokenizer.json")
            if not Path(tokenizer).is_file():
                log.info("data: training a tokenizer on the captions of %s", data["train_urls"])
                train_from_shards(data["train_urls"], tokenizer, vocab_size=int(data.get("vocab_size", 8192)),
                                  context_length=int(data.get("context_length", 77)))
        return {"train_urls": data["train_urls"], "val_urls": data.get("val_urls"), "tokenizer": tokenizer,
                "made": False}
    out = Path(data.get("out", "data/shapes"))
    info = out / "info.json"
    wanted = {k: data.get(k, d) for k, d in (("train", 5000), ("val", 500), ("size", 32), ("seed", 0))}
    if info.is_file():
        have = json.loads(info.read_text())
        have = {**have.get("counts", {}), "size": have.get("image_size"), "seed": have.get("seed")}
        if all(have.get(k) == v for k, v in wanted.items()):
            log.info("data: using the shapes shards in %s", out)
            return {"train_urls": str(out / "train-*.tar"), "val_urls": str(out / "val-*.tar"),
                    "tokenizer": str(out / "tokenizer.json"), "made": False}
    from lit_diffusion.data.shapes import write_shapes

    log.info("data: drawing %d + %d shapes images into %s", wanted["train"], wanted["val"], out)
    write_shapes(out, train=wanted["train"], val=wanted["val"], size=wanted["size"],
                 shard_size=data.get("shard_size", 1000), seed=wanted["seed"])
    return {"train_urls": str(out / "train-*.tar"), "val_urls": str(out / "val-*.tar"),
            "tokenizer": str(out / "tokenizer.json"), "made": True}


def place_given_checkpoints(cfg: dict, root: Path) -> None:
    """Stage 1 or 2 from elsewhere: `stages: {clip: {checkpoint: PATH}}` names a finished stage checkpoint (for
    example one written by `lit-diffusion import clip|vae` from published weights). It is checked (kind, safe load)
    and put where a finished stage's checkpoint goes (`runs/NAME/clip.ckpt`, hard-linked when it can be), so that
    stage counts as done and is not trained, and the later stages read it as they read a trained one."""
    from lit_diffusion.stages.common import load_stage_checkpoint

    for stage in IMPORTABLE:
        given = (cfg["stages"][stage] or {}).get("checkpoint")
        if not given:
            continue
        load_stage_checkpoint(given, stage)  # fails here, naming the file, rather than inside the next stage
        final = root / f"{stage}.ckpt"
        if final.is_file() and os.path.samefile(final, given):
            continue
        tmp = final.with_suffix(".ckpt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(given, tmp)
        except OSError:  # another file system
            shutil.copyfile(given, tmp)
        os.replace(tmp, final)
        log.info("[%s] %s -> %s: this stage is not trained", stage, given, final)


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _one_line(stage: str, summary: dict, seconds: float) -> str:
    final = summary.get("final", {})
    figures = ", ".join(f"{k}={final[k]:.4g}" for k in STAGE_KEYS[stage] if k in final)
    return f"[{stage}] done in {seconds / 60:.1f} min: {figures or 'no figures logged'}"


def run_stage(stage: str, cfg: dict, root: Path, name: str, data: dict, extra: dict) -> dict:
    """Train one stage unless its finished checkpoint exists; returns its figures and timing."""
    final_ckpt = root / f"{stage}.ckpt"
    run_dir = root / stage
    if final_ckpt.is_file():
        log.info("[%s] %s exists: skipped", stage, final_ckpt)
        return {"skipped": True, "ckpt": str(final_ckpt), "summary": _summary(run_dir),
                "seconds": (_summary(run_dir).get("pipeline") or {}).get("seconds")}
    spec = cfg["stages"][stage]
    argv = [sys.executable, "-m", "lit_diffusion", "fit", "--config", spec["config"],
            "--run.root", str(root), "--run.name", stage, "--run.group", name,
            "--run.wandb", str(bool(cfg.get("wandb", True))).lower()]
    if cfg.get("seed") is not None:
        argv += ["--seed_everything", str(cfg["seed"])]
    argv += ["--data.init_args.train_urls", data["train_urls"]]
    if data.get("val_urls"):
        argv += ["--data.init_args.val_urls", data["val_urls"]]
    for key, value in {**extra, **(spec.get("args") or {})}.items():
        argv += _arg(key, value)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("[%s] resuming from %s", stage, last)
        argv += ["--ckpt_path", str(last)]
    log.info("[%s] %s", stage, " ".join(argv[2:]))
    t0 = time.perf_counter()
    env = {**os.environ, "LIT_DIFFUSION_RUN_NAME": stage}
    proc = subprocess.run(argv, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); its run directory is {run_dir}; "
                           f"run the pipeline again to resume from {last}")
    if not last.is_file():
        raise RuntimeError(f"stage {stage} finished without writing {last}")
    tmp = final_ckpt.with_suffix(".ckpt.tmp")
    shutil.copyfile(last, tmp)
    os.replace(tmp, final_ckpt)  # the finished checkpoint appears whole or not at all
    summary = _summary(run_dir)
    print(_one_line(stage, summary, seconds), flush=True)
    return {"skipped": False, "ckpt": str(final_ckpt), "summary": summary, "seconds": seconds}


def run_pipeline(config_path: str | Path, overrides: dict | None = None) -> dict:
    cfg = load_config(config_path)
    for key, value in (overrides or {}).items():
        cfg[key] = value
    name = cfg.get("name") or Path(config_path).stem
    root = Path(cfg.get("root", "runs")) / name
    root.mkdir(parents=True, exist_ok=True)
    place_given_checkpoints(cfg, root)
    t_start = time.perf_counter()
    timings: dict[str, float | None] = {}
    t0 = time.perf_counter()
    data = _ensure_data(cfg)
    timings["data"] = time.perf_counter() - t0
    stages: dict[str, dict] = {}
    stages["clip"] = run_stage("clip", cfg, root, name, data, {"model.init_args.tokenizer_path": data["tokenizer"]})
    stages["vae"] = run_stage("vae", cfg, root, name, data, {"model.init_args.clip_ckpt": str(root / "clip.ckpt")})
    stages["ldm"] = run_stage("ldm", cfg, root, name, data, {"model.init_args.clip_ckpt": str(root / "clip.ckpt"),
                                                            "model.init_args.vae_ckpt": str(root / "vae.ckpt")})
    for stage in STAGES:
        timings[stage] = stages[stage]["seconds"]

    t0 = time.perf_counter()
    evaluation = evaluate_final(cfg, root, data)
    timings["evaluation"] = time.perf_counter() - t0
    grid = sample_grid(cfg, root)
    timings["total"] = time.perf_counter() - t_start

    from lit_diffusion.evaluation.report import write_report

    report = write_report(root, name, cfg, data, stages, evaluation, grid, timings)
    print(f"report: {report['md']}\n        {report['json']}\nsamples: {grid}\nplot: {evaluation.get('plot')}",
          flush=True)
    return report


def eval_device(cfg: dict) -> str:
    """`evaluation.device` (default cpu: the figures of the shapes pipeline are measured there; base.yaml says cuda)."""
    return str((cfg.get("evaluation") or {}).get("device", "cpu"))


def evaluate_final(cfg: dict, root: Path, data: dict) -> dict:
    """Evaluate ldm.ckpt on the val shards (one process; the in-loop callback does the same under DDP)."""
    from lit_diffusion.evaluation.evaluator import EvalConfig, evaluate_checkpoint

    ev = dict(cfg.get("evaluation") or {})
    backends = ev.get("features", ["clip"])
    backends = [backends] if isinstance(backends, str) else list(backends)
    ecfg = EvalConfig(guidance=[float(g) for g in ev.get("guidance", [1, 3, 5])],
                      num_samples=int(ev.get("num_samples", 200)), backends=backends,
                      inception_weights=ev.get("inception_weights"), sampler=ev.get("sampler"),
                      steps=ev.get("steps"), seed=int(ev.get("seed", 0)),
                      cache_dir=str(Path(cfg.get("root", "runs")) / ".fid_cache"))
    results, paths, ecfg = evaluate_checkpoint(root / "ldm.ckpt", data["val_urls"], ecfg, root / "eval",
                                               name=cfg.get("name", "model"),
                                               batch_size=int(ev.get("batch_size", 100)),
                                               device=eval_device(cfg))
    plot = paths.get(f"plot_{backends[0]}")
    return {"results": results, "json": str(paths["json"]), "plot": str(plot) if plot else None,
            "config": dict(vars(ecfg))}


def sample_grid(cfg: dict, root: Path) -> str:
    from lit_diffusion.callbacks.sample_grid import SampleGrid
    from lit_diffusion.evaluation.plots import save_grid
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    spec = cfg.get("samples") or {}
    model = LatentDiffusionModule.from_checkpoint(root / "ldm.ckpt", map_location=eval_device(cfg))
    grid = SampleGrid(prompts=spec.get("prompts", SampleGrid().prompts), guidance=spec.get("guidance", [1, 3, 5]),
                      negative_prompt=spec.get("negative_prompt"), sampler=spec.get("sampler"),
                      steps=spec.get("steps"), seed=int(spec.get("seed", 0)))
    rows, labels = grid.grid(model)
    out = save_grid(rows, labels, root / "samples.png", col_titles=[f"guidance {g:g}" for g in grid.guidance],
                    title="lit_diffusion samples")
    return str(out)
