"""The main job: data -> CLIP -> VAE -> latent diffusion -> evaluation -> report, in one command.

Each stage runs as its own `lit-diffusion fit` process (a fresh process per stage: W&B runs, DDP and memory
start clean), in the run group `NAME`. A stage whose finished checkpoint (`runs/NAME/clip.ckpt`, ...) exists is
skipped, and an interrupted stage resumes from its `last.ckpt`, so re-running the command continues the pipeline
where it stopped.

A checkpoint is only reused for the inputs that made it. Each stage records a fingerprint of them (its config
file's content, its overrides, the seed, the shards' identity, the content of every file an override names: the
tokenizer, the upstream checkpoints) beside its finished checkpoint (`runs/NAME/clip.fingerprint.json`) and, when
it starts, in its run directory (what `last.ckpt` was made with). Before anything trains, every recorded
fingerprint is compared with what the pipeline would pass now; any difference stops the run with the changed
keys and files, and how to retrain from that stage on.

With `encode:` in the config, the image-caption shards are encoded once after stage 2 (`lit-diffusion data encode`,
a subprocess like the stages) and the diffusion stage trains from the latent shards (`LatentDataModule`) without
running CLIP or the VAE per step. The encode is skipped when its manifest names the same CLIP and VAE weights and
source shards; the diffusion stage's fingerprint holds the manifest.

With `stages.ldm.phases: [{name: ldm_24, args: {...}}, {name: ldm_32, args: {...}}]` the diffusion stage trains in
phases, as Stable Diffusion, SD3 and PixArt train at a base resolution and then continue at a higher one: each
phase is a `fit` of the same stage config with its args on top of `stages.ldm.args`, in its own run directory
(`runs/NAME/ldm_24/`), and each after the first starts from the previous one's finished checkpoint
(`model.init_args.init_from`: the denoiser's weights only; steps, warm-up and optimizer start anew). An earlier
phase's finished checkpoint and record are `runs/NAME/PHASE.ckpt` and `PHASE.fingerprint.json`; the last phase's
are the stage's, `runs/NAME/ldm.ckpt` and `ldm.fingerprint.json`, which evaluation and samples read. A phase's
fingerprint holds the previous phase's checkpoint by content (`files`), so a changed phase makes the later ones
stale as a changed stage makes the later stages stale.
"""

from __future__ import annotations

import dataclasses
import filecmp
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lit_diffusion.stages.registry import LATENT_STAGES, OPTIONAL_STAGES, STAGES, configured_stages, stage_keys

log = logging.getLogger("lit_diffusion")
IMPORTABLE = ("clip", "vae")  # stages that `checkpoint:` can supply instead of training them
# `encode:` keys -> `lit-diffusion data encode` options (out: default runs/NAME/latents)
ENCODE_OPTIONS = {"out": None, "dtype": "--dtype", "flips": "--flips", "std": "--std", "batch_size": "--batch-size",
                  "device": "--device", "buckets": "--buckets", "image_size": "--image-size",
                  "image_embeddings": "--image-embeddings", "frames": "--frames",
                  "patch_features": "--patch-features"}
EVALUATION_KEYS = ("guidance", "num_samples", "features", "inception_weights", "sampler", "steps", "seed",
                   "image_guidance", "guidance_rescale", "clip_x0", "aspect_ratios", "batch_size", "device",
                   "compare", "diversity", "variations", "edits")
SAMPLES_KEYS = ("prompts", "guidance", "negative_prompt", "sampler", "steps", "seed", "aspect_ratios")
LATENT_DATA = "lit_diffusion.data.datamodule.LatentDataModule"
INIT_FROM = "model.init_args.init_from"  # the override that starts a phase from the previous one's checkpoint
RESERVED = (*STAGES, "eval", "latents")  # names under runs/NAME that a phase's run directory must not take


class StageInputsChanged(ValueError):
    """A finished (or interrupted) stage was made from other inputs than the pipeline would give it now."""


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    known = {"name", "root", "data", "stages", "evaluation", "samples", "wandb", "seed", "encode"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{path}: unknown pipeline keys {unknown}; known: {sorted(known)}")
    for stage in STAGES:
        spec = (cfg.get("stages") or {}).get(stage)
        if spec is None and stage in OPTIONAL_STAGES:
            continue
        if spec is None:
            raise ValueError(f"{path}: stages.{stage} is missing (each stage needs at least `config:`)")
        if spec.get("checkpoint") and stage not in IMPORTABLE:
            raise ValueError(f"{path}: stages.{stage}.checkpoint: only {list(IMPORTABLE)} can start from a "
                             f"checkpoint instead of being trained")
        if not spec.get("config") and not spec.get("checkpoint"):
            raise ValueError(f"{path}: stages.{stage} needs `config:` (train it) or `checkpoint:` (use it)")
        if spec.get("phases") is not None:
            _check_phases(path, stage, spec)
    for block, keys in (("evaluation", EVALUATION_KEYS), ("samples", SAMPLES_KEYS)):
        unknown = sorted(set(cfg.get(block) or {}) - set(keys))
        if unknown:
            raise ValueError(f"{path}: unknown {block} keys {unknown}; known: {sorted(keys)}")
    encode = cfg.get("encode")
    if encode is not None:
        if not isinstance(encode, dict):
            raise ValueError(f"{path}: encode must be a mapping ({{out: DIR, dtype: float16, ...}}), got {encode!r}")
        unknown = sorted(set(encode) - set(ENCODE_OPTIONS))
        if unknown:
            raise ValueError(f"{path}: unknown encode keys {unknown}; known: {sorted(ENCODE_OPTIONS)}")
    return cfg


def _check_phases(path: Path, stage: str, spec: dict) -> None:
    phases = spec["phases"]
    if stage != "ldm":
        raise ValueError(f"{path}: stages.{stage}.phases: only the diffusion stage (stages.ldm) trains in phases")
    if not isinstance(phases, list) or not phases:
        raise ValueError(f"{path}: stages.ldm.phases must be a list of {{name: NAME, args: {{...}}}}, got {phases!r}")
    if INIT_FROM in (spec.get("args") or {}):
        raise ValueError(f"{path}: stages.ldm.args sets {INIT_FROM}, which the pipeline sets for every phase after "
                         f"the first (the previous phase's checkpoint): give it in the first phase's args")
    names = set()
    for i, phase in enumerate(phases):
        where = f"{path}: stages.ldm.phases[{i}]"
        if not isinstance(phase, dict) or set(phase) - {"name", "args"} or not isinstance(phase.get("args") or {},
                                                                                          dict):
            raise ValueError(f"{where}: a phase is {{name: NAME, args: {{KEY: VALUE, ...}}}}, got {phase!r}")
        name = phase.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in RESERVED \
                or name in names:
            raise ValueError(f"{where}: name {name!r}: each phase needs its own name of letters, digits, _ - and ., "
                             f"not one of {list(RESERVED)} (its run directory is runs/NAME/<name>)")
        names.add(name)
        if i and INIT_FROM in (phase.get("args") or {}):
            raise ValueError(f"{where} ({name}): {INIT_FROM} is set by the pipeline: the phase starts from the "
                             f"previous phase's checkpoint")


@dataclass(frozen=True)
class Step:
    """One `fit` the pipeline runs: a stage, or one phase of the diffusion stage (`stages.ldm.phases`)."""

    stage: str  # clip, vae or ldm: whose config, upstream checkpoints and data it gets
    name: str  # its run directory (runs/NAME/<name>) and its name in messages: the stage's, or the phase's
    final: str  # the stem of its finished checkpoint and record: the stage's; an earlier phase's own name
    args: dict = field(default_factory=dict)  # the phase's args, on top of stages.<stage>.args
    init_from: str | None = None  # the previous phase's finished checkpoint, which this phase starts from


def training_steps(cfg: dict, root: Path) -> list[Step]:
    """The fits in order: one per stage, or one per phase of the diffusion stage; the last phase finishes as the
    stage does (runs/NAME/ldm.ckpt)."""
    steps = []
    for stage in configured_stages(cfg):
        phases = (cfg["stages"][stage] or {}).get("phases")
        if not phases:
            steps.append(Step(stage, stage, stage))
            continue
        previous = None
        for i, phase in enumerate(phases):
            final = stage if i == len(phases) - 1 else phase["name"]
            steps.append(Step(stage, phase["name"], final, dict(phase.get("args") or {}), previous))
            previous = str(root / f"{final}.ckpt")
    return steps


def _step_extra(step: Step, extras: dict[str, dict]) -> dict:
    """What the pipeline passes a step besides the data: its stage's upstream checkpoints, and the previous
    phase's checkpoint to start from."""
    return {**extras[step.stage], **({INIT_FROM: step.init_from} if step.init_from else {})}


def _arg(key: str, value) -> list[str]:
    """One LightningCLI override; dicts and lists go as JSON (a dict replaces the whole init arg)."""
    return [f"--{key}", value if isinstance(value, str) else json.dumps(value)]


def _ensure_data(cfg: dict, root: Path) -> dict:
    data = cfg.get("data") or {}
    if data.get("train_urls"):
        if not data.get("val_urls"):  # each stage would validate on its own config's shards, and evaluation fail
            raise ValueError("data.train_urls is given without data.val_urls: give both (the stages validate and "
                             "the pipeline evaluates on data.val_urls)")
        tokenizer = data.get("tokenizer")
        if not tokenizer and not cfg["stages"]["clip"].get("checkpoint"):  # an imported CLIP brings its own
            tokenizer = str(_run_tokenizer(data, root))
        return {"train_urls": data["train_urls"], "val_urls": data.get("val_urls"), "tokenizer": tokenizer,
                "made": False}
    if data.get("dataset", "shapes") == "moving_shapes":
        return _ensure_moving_shapes(data)
    if data.get("dataset", "shapes") != "shapes":
        raise ValueError(f"data.dataset: {data['dataset']!r} is not an embedded data set (shapes, moving_shapes); "
                         f"give your own shards as data.train_urls and data.val_urls")
    out = Path(data.get("out", "data/shapes"))
    info = out / "info.json"
    from lit_diffusion.data.shapes import canvas_size, parse_aspect_ratios, write_shapes

    wanted = {k: data.get(k, d) for k, d in (("train", 5000), ("val", 500), ("size", 32), ("seed", 0))}
    ratios, multiple = parse_aspect_ratios(data.get("aspect_ratios", "1:1")), int(data.get("multiple", 2))
    # non-square canvases (aspect buckets): as info.json records them
    wanted["canvases"] = ({r: list(canvas_size(r, wanted["size"], multiple)) for r in ratios}
                          if ratios != ("1:1",) else None)
    if info.is_file():
        have = json.loads(info.read_text())
        have = {**have.get("counts", {}), "size": have.get("image_size"), "seed": have.get("seed"),
                "canvases": have.get("canvases")}
        if all(have.get(k) == v for k, v in wanted.items()):
            log.info("data: using the shapes shards in %s", out)
            return {"train_urls": str(out / "train-*.tar"), "val_urls": str(out / "val-*.tar"),
                    "tokenizer": str(out / "tokenizer.json"), "made": False}
    log.info("data: drawing %d + %d shapes images into %s", wanted["train"], wanted["val"], out)
    write_shapes(out, train=wanted["train"], val=wanted["val"], size=wanted["size"],
                 shard_size=data.get("shard_size", 1000), seed=wanted["seed"], aspect_ratios=ratios,
                 multiple=multiple)
    return {"train_urls": str(out / "train-*.tar"), "val_urls": str(out / "val-*.tar"),
            "tokenizer": str(out / "tokenizer.json"), "made": True}


def _ensure_moving_shapes(data: dict) -> dict:
    """The embedded video data (`data: {dataset: moving_shapes, frames: 8, ...}`): drawn unless `out` holds it."""
    from lit_diffusion.data.moving_shapes import write_moving_shapes

    out = Path(data.get("out", "data/moving_shapes"))
    wanted = {k: data.get(k, d) for k, d in (("train", 5000), ("val", 500), ("size", 32), ("seed", 0), ("frames", 8),
                                              ("grow_probability", 0.0))}
    urls = {"train_urls": str(out / "train-*.tar"), "val_urls": str(out / "val-*.tar"),
            "tokenizer": str(out / "tokenizer.json")}
    info = out / "info.json"
    if info.is_file():
        have = json.loads(info.read_text())
        have = {**have.get("counts", {}), "size": have.get("image_size"),
                **{k: have.get(k) for k in ("seed", "frames", "grow_probability")}}
        if all(have.get(k) == v for k, v in wanted.items()):
            log.info("data: using the moving-shapes shards in %s", out)
            return {**urls, "made": False}
    log.info("data: drawing %d + %d moving-shapes clips into %s", wanted["train"], wanted["val"], out)
    write_moving_shapes(out, train=wanted["train"], val=wanted["val"], size=wanted["size"], frames=wanted["frames"],
                        shard_size=data.get("shard_size", 1000), seed=wanted["seed"],
                        grow_probability=wanted["grow_probability"])
    return {**urls, "made": True}


def place_given_checkpoints(cfg: dict, root: Path) -> None:
    """Stage 1 or 2 from elsewhere: `stages: {clip: {checkpoint: PATH}}` names a finished stage checkpoint (for
    example one written by `lit-diffusion import clip|vae` from published weights). It is checked (kind, safe load)
    and put where a finished stage's checkpoint goes (`runs/NAME/clip.ckpt`, hard-linked when it can be), so that
    stage counts as done and is not trained, and the later stages read it as they read a trained one."""
    from lit_diffusion.stages.base import load_stage_checkpoint

    for stage in IMPORTABLE:
        given = (cfg["stages"][stage] or {}).get("checkpoint")
        if not given:
            continue
        load_stage_checkpoint(given, stage)  # fails here, naming the file, rather than inside the next stage
        final = root / f"{stage}.ckpt"
        if final.is_file() and (os.path.samefile(final, given) or filecmp.cmp(final, given, shallow=False)):
            continue  # placed by an earlier run of this pipeline
        if final.is_file():  # trained here, or another file placed before: replacing it would lose it
            raise StageInputsChanged(
                f"[{stage}] {final} holds another {stage} checkpoint than the given {given} (trained or placed by an "
                f"earlier run of this pipeline); to use {given}, delete {final} and what was made from it, or choose "
                "another run name (`name:` in the pipeline config)")
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


def _one_line(stage: str, summary: dict, seconds: float, name: str | None = None) -> str:
    final = summary.get("final", {})
    figures = ", ".join(f"{k}={final[k]:.4g}" for k in stage_keys(stage, final) if k in final)
    return f"[{name or stage}] done in {seconds / 60:.1f} min: {figures or 'no figures logged'}"


def stage_overrides(stage: str, cfg: dict, data: dict, extra: dict, phase: dict | None = None) -> dict:
    """Every `--key value` the pipeline passes to a stage's `fit`, besides the run directory and the seed; `phase`:
    a phase's args, on top of the stage's."""
    overrides = {"data.class_path": data["class_path"]} if data.get("class_path") else {}  # before its init_args
    overrides["data.init_args.train_urls"] = data["train_urls"]
    if data.get("val_urls"):
        overrides["data.init_args.val_urls"] = data["val_urls"]
    return {**overrides, **extra, **(cfg["stages"][stage].get("args") or {}), **(phase or {})}


def _run_tokenizer(data: dict, root: Path) -> Path:
    """The run's own tokenizer (runs/NAME/tokenizer.json), trained on the captions of data.train_urls when missing;
    its inputs (the shards' identity, vocab_size, context_length) are recorded beside it, and a tokenizer of other
    inputs is refused as a stage's checkpoint is (CLIP's record holds the tokenizer's content)."""
    from lit_diffusion.data.tokenizer import train_from_shards

    path, record = root / "tokenizer.json", root / "tokenizer.inputs.json"
    inputs = {"train_urls": _shards_identity(data["train_urls"], "train"),
              "vocab_size": int(data.get("vocab_size", 8192)), "context_length": int(data.get("context_length", 77))}
    if path.is_file():
        if not record.is_file():
            log.warning("data: %s has no record of what it was trained on (%s): used as it is", path, record)
            return path
        before = json.loads(record.read_text())
        changed = [f"{k}: {_short(before.get(k))} -> {_short(v)}" for k, v in inputs.items() if before.get(k) != v]
        if changed:
            lines = "\n".join(f"  - data.{c}" for c in changed)
            raise StageInputsChanged(f"[tokenizer] {path} was trained on other inputs than the pipeline gives now:\n"
                                     f"{lines}\nTo train it again (and CLIP with it), delete it: rm {path} {record}")
        return path
    root.mkdir(parents=True, exist_ok=True)
    log.info("data: training a tokenizer on the captions of %s", data["train_urls"])
    train_from_shards(data["train_urls"], path, vocab_size=inputs["vocab_size"],
                      context_length=inputs["context_length"])
    record.write_text(json.dumps(inputs, indent=2) + "\n")
    return path


def _shards_identity(urls: str, split: str) -> str:
    """Names, sizes and hashes of the first and last 64 KiB of local shards (file mtimes are left out: rewriting the same shapes
    shards must not count as a change); remote URLs are known only by their names."""
    from lit_diffusion.data.shards import _REMOTE_PREFIXES, expand_urls
    from lit_diffusion.metrics.stats_cache import data_identity

    files = expand_urls(urls, split=split)
    local = [f for f in files if not f.startswith(_REMOTE_PREFIXES)]
    remote = sorted(set(files) - set(local))
    return data_identity(local, mtime=False) + (f"+{len(remote)} remote: {remote[0]}..." if remote else "")


def fingerprint(stage: str, cfg: dict, data: dict, extra: dict, phase: dict | None = None) -> dict:
    """What makes a stage's (or a phase's) checkpoint: plain JSON, compared key by key on a rerun. A phase's
    overrides hold its args and the previous phase's checkpoint, whose content its `files` hold."""
    from lit_diffusion.metrics.features import file_sha256

    config = Path(cfg["stages"][stage]["config"])
    if not config.is_file():
        raise FileNotFoundError(f"stages.{stage}.config: {config} not found")
    overrides = json.loads(json.dumps(stage_overrides(stage, cfg, data, extra, phase)))  # tuples -> lists
    encoded = not data.get("manifest") or Path(data["manifest"]).is_file()  # latent shards exist when expected
    return {
        "config_file": str(config),
        "config": yaml.safe_load(config.read_text()) or {},
        "overrides": overrides,
        "seed": cfg.get("seed"),
        "data": {split: _shards_identity(data[f"{split}_urls"], split) for split in ("train", "val")
                 if data.get(f"{split}_urls") and encoded},
        "files": {key: file_sha256(Path(value)) for key, value in overrides.items()  # the shards are under "data"
                  if isinstance(value, str) and not key.endswith("_urls") and Path(value).is_file()},
        **({"latents": _manifest(data["manifest"])} if data.get("manifest") else {}),
    }


def _manifest(path: str) -> dict | None:
    """A latent manifest as a fingerprint holds it: encoders, sources, every shard's size (None: not encoded)."""
    path = Path(path)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return {k: v for k, v in manifest.items() if k not in ("path", "skipped")}  # skipped: this run's count only


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


_UNSET = object()  # a key one fingerprint has and the other lacks


def _short(value) -> str:
    text = "<unset>" if value is _UNSET else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key whose value differs; a missing key reads as _UNSET."""
    return [(k, old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(set(old) | set(new))
            if old.get(k, _UNSET) != new.get(k, _UNSET)]


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """One line per input that differs between two fingerprints, naming the key or file."""
    changes = []
    if old.get("config_file") != new["config_file"]:
        changes.append(f"stage config file: {old.get('config_file')} -> {new['config_file']}")
    for key, x, y in _diff(_flat(old.get("config") or {}), _flat(new["config"])):
        changes.append(f"config {new['config_file']}: {key}: {_short(x)} -> {_short(y)}")
    for key, x, y in _diff(old.get("overrides") or {}, new["overrides"]):
        changes.append(f"override --{key}: {_short(x)} -> {_short(y)}")
    if old.get("seed") != new["seed"]:
        changes.append(f"seed: {old.get('seed')} -> {new['seed']}")
    unencoded = "latents" in new and new["latents"] is None  # its shards are gone too: one line says it
    for split, _, _ in [] if unencoded else _diff(old.get("data") or {}, new["data"]):
        urls = new["overrides"].get(f"data.init_args.{split}_urls")
        changes.append(f"data {split}: the {split} shards ({urls}) changed (names, sizes or contents)")
    if old.get("latents") != new.get("latents"):
        if unencoded:
            urls = new["overrides"].get("data.init_args.train_urls")
            changes.append(f"latents: the latent shards are not encoded yet ({urls})")
        else:
            changed = sorted(k for k, _, _ in _diff(old.get("latents") or {}, new["latents"]))
            changes.append(f"latents: the latent shards were encoded from other inputs (manifest keys "
                           f"{', '.join(changed)})")
    for key, x, y in _diff(old.get("files") or {}, new["files"]):
        path = new["overrides"].get(key) or (old.get("overrides") or {}).get(key)
        state = "is gone" if y is _UNSET else "is new" if x is _UNSET else "has other content"
        changes.append(f"file --{key}: {path} {state}")
    return changes


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _paths(root: Path, stage: str, run: str | None = None) -> dict[str, Path]:
    """A step's files: its finished checkpoint and record (`stage`: their stem) and run directory (`run`)."""
    run = run or stage
    return {"final": root / f"{stage}.ckpt", "made": root / f"{stage}.fingerprint.json",
            "run_dir": root / run, "started": root / run / "fingerprint.json",
            "last": root / run / "checkpoints" / "last.ckpt"}


def _step_paths(root: Path, step: Step) -> dict[str, Path]:
    return _paths(root, step.final, step.name)


ENCODE_RECORD = "pipeline_encode.json"  # in the latents folder: the `encode:` block that wrote it
_ENCODE_RECORDED = [k for k in ENCODE_OPTIONS if k not in ("out", "device")]  # what changes the shards' content


def _encode_spec(cfg: dict) -> dict:
    return {k: (cfg.get("encode") or {}).get(k) for k in _ENCODE_RECORDED}


def _made_by(root: Path, steps: list[Step]) -> list[str]:
    """What `steps` made and left on disk: finished checkpoints, their records, run directories."""
    return [str(p) for s in steps for key, p in _step_paths(root, s).items()
            if key in ("final", "made", "run_dir") and p.exists()]


def _retrain_hint(root: Path, later: list[Step], cfg: dict) -> str:
    doomed = _made_by(root, later)
    latents = _latents_dir(cfg, root) if cfg.get("encode") is not None else None
    if latents is not None and latents.exists() and any(s.stage not in LATENT_STAGES for s in later):
        doomed.append(str(latents))  # encoded by the CLIP and VAE that will be trained again
    return (f"To retrain {' and '.join(s.name for s in later)} with the new inputs, delete what they made: "
            f"rm -r {' '.join(doomed)}; or keep these runs and choose another run name (`name:` in the pipeline "
            f"config).")


def check_stage_inputs(cfg: dict, root: Path, data: dict[str, dict], extras: dict[str, dict]) -> None:
    """Before anything trains: every finished or interrupted stage must have been made from the inputs it would
    get now (`data`: each stage's data), and nothing may sit downstream of a stage that is about to train (it
    would be made from the old upstream); raises StageInputsChanged naming what differs and how to go on. A phase
    of the diffusion stage is checked as a stage is, its previous phase standing upstream of it."""
    steps = training_steps(cfg, root)
    retraining = None  # the finished checkpoint (stem) of the first step that will train now
    for i, step in enumerate(steps):
        paths = _step_paths(root, step)
        if (cfg["stages"].get(step.stage) or {}).get("checkpoint"):
            continue  # given (`checkpoint:`, placed by `place_given_checkpoints`): not made from anything upstream
        if retraining is not None:
            stale = [str(paths[k]) for k in ("final", "last") if paths[k].is_file()]
            if stale:
                raise StageInputsChanged(
                    f"[{step.name}] {stale[0]} was made from a {retraining}.ckpt that is missing and will be "
                    f"trained again now, so it would not match.\n{_retrain_hint(root, steps[i:], cfg)}")
            continue
        if paths["final"].is_file():
            record, made = paths["made"], f"{paths['final']} was made"
        elif paths["last"].is_file():
            record, made = paths["started"], f"the interrupted run {paths['last']} was started"
            retraining = step.final
        else:
            retraining = step.final
            continue
        if not record.is_file():  # placed by hand (e.g. trained elsewhere) or from an older version: trusted
            log.warning("[%s] %s has no record of what made it (%s): used as it is", step.name,
                        paths["final"] if record == paths["made"] else paths["last"], record)
            continue
        changes = fingerprint_changes(json.loads(record.read_text()), fingerprint(
            step.stage, cfg, data[step.stage], _step_extra(step, extras), step.args))
        if changes:
            lines = "\n".join(f"  - {c}" for c in changes)
            raise StageInputsChanged(f"[{step.name}] {made} with other inputs than the pipeline gives it now "
                                     f"(recorded in {record}):\n{lines}\n{_retrain_hint(root, steps[i:], cfg)}")
    _check_latents(cfg, root, steps, retraining)


def _check_latents(cfg: dict, root: Path, steps: list[Step], retraining: str | None) -> None:
    """The latent shards of an earlier run: made by the CLIP and VAE that stay (else they would be refused after
    those trained again) and by the same `encode:` block (a changed dtype, flips, size, ... would be skipped
    over, and the diffusion stage trained on the old shards)."""
    if cfg.get("encode") is None:
        return
    out = _latents_dir(cfg, root)
    if not (out / "manifest.json").is_file():
        return
    if retraining in STAGES and retraining not in LATENT_STAGES:
        raise StageInputsChanged(f"[encode] {out} was encoded by the {retraining}.ckpt that will be trained again "
                                 f"now, so it would not match.\nTo encode again, delete it: rm -r {out}")
    record = out / ENCODE_RECORD
    if not record.is_file():  # from a version that kept no record: trusted, as a stage's checkpoint is
        log.warning("[encode] %s has no record of the encode: block that wrote it (%s): used as it is", out, record)
        return
    before, now = json.loads(record.read_text()), _encode_spec(cfg)
    changed = [f"encode.{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in _ENCODE_RECORDED
               if before.get(k) != now.get(k)]
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        doomed = [str(out), *_made_by(root, [s for s in steps if s.stage in LATENT_STAGES])]
        raise StageInputsChanged(f"[encode] {out} was written by another encode: block than the pipeline gives "
                                 f"now:\n{lines}\nTo encode again and retrain what read it, delete them: rm -r "
                                 f"{' '.join(doomed)}")


class PipelineConfigError(ValueError):
    """The pipeline's data, its `encode:` block and a stage's config do not fit together."""


def _import(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_stage_data(cfg: dict, inputs: dict[str, dict], extras: dict[str, dict]) -> None:
    """Before anything trains: each stage to be trained must be able to read the data the pipeline gives it. Its
    data module (the config's, or LatentDataModule where `encode:` swaps it in) must take every `data.init_args`
    key the pipeline passes; only the diffusion stage reads latent shards, and only when `encode:` writes them;
    latent shards must hold what the stage's options ask of them (flipped latents, the posterior's std).
    Raises PipelineConfigError naming the stage, the key and the fix."""
    encode = cfg.get("encode")
    for step in training_steps(cfg, Path()):  # each phase of the diffusion stage with its args (paths unused)
        stage = step.stage
        spec = cfg["stages"][stage]
        if spec.get("checkpoint"):
            continue
        where = f"stages.{stage}{'' if step.name == stage else f' phase {step.name}'} ({spec['config']})"
        stage_cfg = yaml.safe_load(Path(spec["config"]).read_text()) or {}
        config_data = stage_cfg.get("data") or {}
        overrides = stage_overrides(stage, cfg, inputs[stage], _step_extra(step, extras), step.args)
        class_path = overrides.get("data.class_path") or config_data.get("class_path")
        if not class_path:
            continue
        if class_path == LATENT_DATA and stage not in LATENT_STAGES:
            raise PipelineConfigError(
                f"{where}: data.class_path is {LATENT_DATA}, but the {stage} stage trains on images: give it "
                f"lit_diffusion.data.datamodule.ImageCaptionDataModule")
        if class_path == LATENT_DATA and encode is None:
            raise PipelineConfigError(
                f"{where}: data.class_path is {LATENT_DATA} (latent shards), but the pipeline config has no "
                f"`encode:` block, so nothing writes them: add `encode: {{}}` (or `encode: {{dtype: float32}}`) to "
                f"the pipeline config, or give stages.{stage} a config reading images (ImageCaptionDataModule)")
        try:
            accepted = set(inspect.signature(_import(class_path).__init__).parameters) - {"self"}
        except (ImportError, AttributeError, ValueError) as err:
            raise PipelineConfigError(f"{where}: data.class_path {class_path} cannot be imported ({err})") from None
        init_args = dict(config_data.get("init_args") or {})
        if class_path != config_data.get("class_path"):  # swapped in: LightningCLI keeps the keys it also takes
            init_args = {k: v for k, v in init_args.items() if k in accepted}
        init_args.update({k.removeprefix("data.init_args."): v for k, v in overrides.items()
                          if k.startswith("data.init_args.")})
        for key in init_args:
            if key not in accepted:
                given = "the pipeline passes" if f"data.init_args.{key}" in overrides else "the config sets"
                raise PipelineConfigError(
                    f"{where}: {given} data.init_args.{key}, which {class_path.rpartition('.')[2]} does not take "
                    f"(it takes {', '.join(sorted(accepted))}): remove it from stages.{stage}.args or the config")
        if class_path != LATENT_DATA:
            continue
        model_args = {**((stage_cfg.get("model") or {}).get("init_args") or {}),
                      **{k.removeprefix("model.init_args."): v for k, v in overrides.items()
                         if k.startswith("model.init_args.")}}
        for option, value, flag in (("data.init_args.random_flip", init_args.get("random_flip"), "flips"),
                                    ("model.init_args.sample_posterior", model_args.get("sample_posterior"), "std")):
            if value and not (encode or {}).get(flag):
                raise PipelineConfigError(
                    f"{where}: {option} is true, which needs the {'flipped latents' if flag == 'flips' else 'posterior std'}"
                    f" in the latent shards: set `encode: {{{flag}: true}}` in the pipeline config, or {option}: false")
        condition = model_args.get("condition", "text")
        if (stage == "prior" or condition != "text") and not (encode or {}).get("image_embeddings"):
            needs = "the prior" if stage == "prior" else f"model.init_args.condition: {condition} (unCLIP's decoder)"
            raise PipelineConfigError(
                f"{where}: {needs} trains on CLIP image embeddings in the latent shards: set `encode: "
                f"{{image_embeddings: true}}` in the pipeline config")


def run_stage(stage: str, cfg: dict, root: Path, name: str, data: dict, extra: dict, step: Step | None = None) -> dict:
    """Train one stage (or, with `step`, one phase of it) unless its finished checkpoint exists; returns its figures
    and timing. An interrupted run resumes from its last.ckpt (`--ckpt_path`), whose weights Lightning restores
    after the module's `__init__`, so over those a phase's `init_from` loaded."""
    step = step or Step(stage, stage, stage)
    label = step.name
    paths = _step_paths(root, step)
    final_ckpt, run_dir, last = paths["final"], paths["run_dir"], paths["last"]
    if final_ckpt.is_file():
        log.info("[%s] %s exists: skipped", label, final_ckpt)
        return {"skipped": True, "ckpt": str(final_ckpt), "summary": _summary(run_dir),
                "seconds": (_summary(run_dir).get("pipeline") or {}).get("seconds"), "run_dir": str(run_dir)}
    spec = cfg["stages"][stage]
    argv = [sys.executable, "-m", "lit_diffusion", "fit", "--config", spec["config"],
            "--run.root", str(root), "--run.name", label, "--run.group", name,
            "--run.wandb", str(bool(cfg.get("wandb", True))).lower()]
    if cfg.get("seed") is not None:
        argv += ["--seed_everything", str(cfg["seed"])]
    for key, value in stage_overrides(stage, cfg, data, extra, step.args).items():
        argv += _arg(key, value)
    made_from = fingerprint(stage, cfg, data, extra, step.args)
    if last.is_file():
        log.info("[%s] resuming from %s", label, last)
        argv += ["--ckpt_path", str(last)]
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(paths["started"], made_from)  # what last.ckpt will be made from, checked on resume
    log.info("[%s] %s", label, " ".join(argv[2:]))
    t0 = time.perf_counter()
    env = {**os.environ, "LIT_DIFFUSION_RUN_NAME": label}
    proc = subprocess.run(argv, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {label} failed (exit {proc.returncode}); its run directory is {run_dir}; "
                           f"run the pipeline again to resume from {last}")
    if not last.is_file():
        raise RuntimeError(f"stage {label} finished without writing {last}")
    _write_json(paths["made"], made_from)  # before the checkpoint: a finished checkpoint always has its record
    tmp = final_ckpt.with_suffix(".ckpt.tmp")
    shutil.copyfile(last, tmp)
    os.replace(tmp, final_ckpt)  # the finished checkpoint appears whole or not at all
    summary = _summary(run_dir)
    print(_one_line(stage, summary, seconds, label), flush=True)
    return {"skipped": False, "ckpt": str(final_ckpt), "summary": summary, "seconds": seconds, "run_dir": str(run_dir)}


def train_stages(cfg: dict, root: Path, name: str, data: dict) -> dict[str, dict]:
    """CLIP -> VAE -> latent diffusion, each fed the finished checkpoints before it, after checking that every
    checkpoint kept from an earlier run was made from today's inputs."""
    clip, vae = str(root / "clip.ckpt"), str(root / "vae.ckpt")
    extras = {"clip": {"model.init_args.tokenizer_path": data["tokenizer"]},
              "vae": {"model.init_args.clip_ckpt": clip},
              "prior": {"model.init_args.clip_ckpt": clip},
              "ldm": {"model.init_args.clip_ckpt": clip, "model.init_args.vae_ckpt": vae}}
    inputs = {stage: data for stage in configured_stages(cfg)}
    if cfg.get("encode") is not None:
        for stage in set(inputs) & set(LATENT_STAGES):
            inputs[stage] = latent_data(cfg, root, data)
    check_stage_data(cfg, inputs, extras)
    check_stage_inputs(cfg, root, inputs, extras)
    results, phases, encoded = {}, [], False
    for step in training_steps(cfg, root):
        stage = step.stage
        if stage in LATENT_STAGES and cfg.get("encode") is not None and not encoded:  # before the first reader
            encode_latents(cfg, root, data)
            encoded = True
        result = run_stage(stage, cfg, root, name, inputs[stage], _step_extra(step, extras), step)
        if step.name == stage:
            results[stage] = result
            continue
        phases.append({"name": step.name, "init_from": step.init_from, **result})
        if step.final == stage:  # the last phase: the stage's result, with every phase's and their total time
            seconds = [p["seconds"] for p in phases if p["seconds"] is not None]
            results[stage] = {**result, "skipped": all(p["skipped"] for p in phases),
                              "seconds": sum(seconds) if seconds else None, "phases": phases}
    return results


def _latents_dir(cfg: dict, root: Path) -> Path:
    return Path((cfg.get("encode") or {}).get("out") or root / "latents")


def _encode_splits(data: dict) -> dict[str, list[str]]:
    """The image shards `encode:` encodes, per split, in the order `data encode` numbers its outputs."""
    from lit_diffusion.data.shards import expand_urls

    return {split: expand_urls(data[f"{split}_urls"], split=split) for split in ("train", "val")
            if data.get(f"{split}_urls")}


def latent_data(cfg: dict, root: Path, data: dict) -> dict:
    """What the diffusion stage reads with `encode:`: exactly the latent shards `data encode` writes for `data`'s
    splits (`OUT/train/000000.tar`, ..., one per image shard, whatever the image shards are named) through
    LatentDataModule, and the manifest its fingerprint holds."""
    from lit_diffusion.data.encode import split_pattern

    out = _latents_dir(cfg, root)
    splits = _encode_splits(data)
    return {"class_path": LATENT_DATA, "train_urls": split_pattern(out, "train", len(splits["train"])),
            "val_urls": split_pattern(out, "val", len(splits["val"])) if "val" in splits else None,
            "manifest": str(out / "manifest.json")}


def _encoder_hashes(root: Path) -> dict[str, str]:
    """`state_dict_hash` of the finished CLIP and VAE, loaded as `data encode` loads them."""
    from lit_diffusion.data.latents import state_dict_hash
    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    return {"clip": state_dict_hash(CLIPModule.from_checkpoint(root / "clip.ckpt").state_dict()),
            "vae": state_dict_hash(VAEModule.from_checkpoint(root / "vae.ckpt").state_dict())}


def encode_latents(cfg: dict, root: Path, data: dict) -> dict:
    """Stage 2.5: `lit-diffusion data encode` of the train and val image shards with the finished CLIP and VAE, in
    a subprocess (a rerun resumes a killed one at its first unfinished shard). Skipped when the manifest exists for
    the same encoder weights and sources; one of other encoders or sources stops the run naming the folder."""
    from lit_diffusion.data.encode import split_shard_names

    spec, out = cfg["encode"], _latents_dir(cfg, root)
    splits = _encode_splits(data)
    sources = [url for shards in splits.values() for url in shards]
    outputs = {split: split_shard_names(split, len(shards)) for split, shards in splits.items()}
    want = {**_encoder_hashes(root), "sources": sources, "splits": outputs}
    manifest = out / "manifest.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        have = {"clip": have.get("clip_hash"), "vae": have.get("vae_hash"), "sources": have.get("sources"),
                "splits": have.get("splits")}
        if have == want:
            log.info("[encode] %s exists for these CLIP and VAE weights and shards: skipped", manifest)
            return {"skipped": True, "manifest": str(manifest)}
        changed = ", ".join(k for k in want if have[k] != want[k])
        raise StageInputsChanged(f"[encode] {manifest} was made from other inputs ({changed}) than the pipeline "
                                 f"gives now. To encode again, delete it: rm -r {out}")
    argv = [sys.executable, "-m", "lit_diffusion", "data", "encode", "--clip", str(root / "clip.ckpt"),
            "--vae", str(root / "vae.ckpt"), "--out", str(out)]
    for split, shards in splits.items():
        argv += [f"--{split}", "::".join(shards)]
    for key, flag in ENCODE_OPTIONS.items():
        value = spec.get(key)
        if flag is None or value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    log.info("[encode] %s", " ".join(argv[2:]))
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, "LIT_DIFFUSION_RUN_NAME": "encode"})
    if proc.returncode != 0:
        raise RuntimeError(f"data encode failed (exit {proc.returncode}); run the pipeline again to resume it "
                           f"(complete shards in {out} are kept)")
    (out / ENCODE_RECORD).write_text(json.dumps(_encode_spec(cfg), indent=2, sort_keys=True) + "\n")
    print(f"[encode] done in {(time.perf_counter() - t0) / 60:.1f} min: {out}", flush=True)
    return {"skipped": False, "manifest": str(manifest)}


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
    data = _ensure_data(cfg, root)
    timings["data"] = time.perf_counter() - t0
    stages = train_stages(cfg, root, name, data)
    for stage in configured_stages(cfg):
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


def _eval_config(cfg: dict):
    from lit_diffusion.evaluation.evaluator import EvalConfig

    ev = dict(cfg.get("evaluation") or {})
    backends = ev.get("features", ["clip"])
    backends = [backends] if isinstance(backends, str) else list(backends)
    return EvalConfig(guidance=[float(g) for g in ev.get("guidance", [1, 3, 5])],
                      num_samples=int(ev.get("num_samples", 200)), backends=backends,
                      inception_weights=ev.get("inception_weights"), sampler=ev.get("sampler"),
                      steps=ev.get("steps"), seed=int(ev.get("seed", 0)),
                      image_guidance=None if ev.get("image_guidance") is None else float(ev["image_guidance"]),
                      guidance_rescale=None if ev.get("guidance_rescale") is None else float(ev["guidance_rescale"]),
                      clip_x0=None if ev.get("clip_x0") is None else float(ev["clip_x0"]),
                      cache_dir=str(Path(cfg.get("root", "runs")) / ".fid_cache"),
                      aspect_ratios=list(ev["aspect_ratios"]) if ev.get("aspect_ratios") else None)


def evaluate_final(cfg: dict, root: Path, data: dict) -> dict:
    """Evaluate ldm.ckpt on the val shards (one process; the in-loop callback does the same under DDP). With a prior
    (unCLIP) ldm.ckpt is its decoder: the figures are the full stack's (caption -> prior -> decoder), and
    `evaluate_unclip` adds the decoder fed the true embeddings, the text-conditioned model to compare with,
    diversity and variations. Without one, `evaluation.compare` and `evaluation.diversity` add another model of the
    same CLIP and VAE beside this one, and within-caption diversity (`evaluate_compare`)."""
    from lit_diffusion.evaluation.evaluator import evaluate_checkpoint

    ev = dict(cfg.get("evaluation") or {})
    ecfg = _eval_config(cfg)
    prior = root / "prior.ckpt" if "prior" in configured_stages(cfg) else None
    results, paths, ecfg = evaluate_checkpoint(root / "ldm.ckpt", data["val_urls"], ecfg, root / "eval",
                                               name=cfg.get("name", "model"),
                                               batch_size=int(ev.get("batch_size", 100)),
                                               device=eval_device(cfg), prior_ckpt=prior)
    plot = paths.get(f"plot_{ecfg.backends[0]}")
    out = {"results": results, "json": str(paths["json"]), "plot": str(plot) if plot else None,
           "config": dict(vars(ecfg))}
    if prior is not None:
        out["unclip"] = evaluate_unclip(cfg, root, data, results)
    elif ev.get("compare") or ev.get("diversity"):
        out["compare"] = evaluate_compare(cfg, root, data)
    return out


def _load_compare(cfg: dict, model, model_path: Path, device: str) -> tuple[object, str | None]:
    """(`evaluation.compare`'s model, None), or (None, why not): it names no file, or a checkpoint trained with
    another CLIP or VAE than `model` (then figures side by side would compare encoders too). Said in the log and
    the report; the run's own evaluation and report are kept either way."""
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    compare = (cfg.get("evaluation") or {}).get("compare")
    if not compare:
        return None, None
    if not Path(compare).is_file():
        note = (f"evaluation.compare: {compare} does not exist: no model beside this one (run the pipeline that "
                f"writes it, with the same seed)")
        log.warning(note)
        return None, note
    other = LatentDiffusionModule.from_checkpoint(compare, map_location=device)
    theirs, ours = other.encoder_hashes(), model.encoder_hashes()
    if theirs != ours:
        note = (f"evaluation.compare: {compare} was trained with another CLIP or VAE than {model_path} "
                f"(state_dict_hash {theirs} vs {ours}): compare models of the same seed and stage configs (their CLIP "
                f"and VAE train identically)")
        log.error(note)
        return None, note
    return other, None


def _val_batch(data: dict, image_size: int, n: int) -> dict:
    """The first n val samples in one batch (images in [-1, 1], captions, attrs, keys)."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    dm = ImageCaptionDataModule(train_urls=None, val_urls=data["val_urls"], image_size=image_size, batch_size=n,
                                num_workers=0)
    return next(iter(dm.eval_dataloader(n)))


def _distinct_captions(batch: dict, n: int) -> tuple[list[str], list[dict]]:
    """The distinct captions among a val batch's first n (a repeated caption would be sampled with the same
    seeds: the same images counted again), and the shapes attributes of those that have them."""
    first = {}
    for caption, a in zip(batch["caption"][:n], list(batch.get("attrs") or [None] * n)[:n]):
        first.setdefault(caption, a)
    return list(first), [a for a in first.values() if a and a.get("objects")]


def _diversity(generators: dict, captions: list[str], shapes: list[dict], clip, per_caption: int) -> dict:
    """For each system's `generate`: CLIP's within-caption diversity over `captions` and, with shapes attributes,
    the spread of positions beside the data's (`evaluation/diversity.py`), from the same samples."""
    from lit_diffusion.evaluation.diversity import position_spread
    from lit_diffusion.evaluation.unclip_metrics import cached, within_caption_diversity

    import torch

    out = {}
    with torch.inference_mode():
        for key, generate in generators.items():
            generate = cached(generate)
            out[key] = within_caption_diversity(generate, captions, clip, per_caption)
            if shapes:
                out[key]["positions"] = position_spread(generate, shapes, per_caption)
    return out


def evaluate_compare(cfg: dict, root: Path, data: dict) -> dict:
    """A text-conditioned model beside another trained on the same CLIP and VAE (REPA against the same recipe without
    it, say), on the same val captions and seeds (one process):
    - `results`: `evaluation.compare`'s evaluation (the same figures as ldm.ckpt's), when it names a checkpoint of
      the same CLIP and VAE (else `note` says why there is none);
    - `diversity` (`evaluation.diversity: {captions, per_caption, guidance}`): for each model, the mean pairwise CLIP
      distance of one caption's samples and the within-caption spread of its objects' positions beside the data's
      (`evaluation/diversity.py`), over the distinct captions among the first `captions` val ones."""
    from lit_diffusion.evaluation.evaluator import evaluate_checkpoint
    from lit_diffusion.evaluation.unclip_metrics import unclip_generate
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    ev = dict(cfg.get("evaluation") or {})
    device = eval_device(cfg)
    model_path = root / "ldm.ckpt"
    model = LatentDiffusionModule.from_checkpoint(model_path, map_location=device)
    other, note = _load_compare(cfg, model, model_path, device)
    out: dict = {"ckpt": ev.get("compare") if other is not None else None, "note": note}
    if other is not None:
        out["results"], _, _ = evaluate_checkpoint(ev["compare"], data["val_urls"], _eval_config(cfg),
                                                   root / "eval" / "compare", name="compared",
                                                   batch_size=int(ev.get("batch_size", 100)), device=device)
    spec = ev.get("diversity")
    if spec:
        spec = {} if spec is True else dict(spec)
        n, per_caption = int(spec.get("captions", 50)), int(spec.get("per_caption", 8))
        g = float(spec.get("guidance", 3))
        captions, shapes = _distinct_captions(_val_batch(data, int(model.hparams.image_size), n), n)
        sampler = {"sampler": ev.get("sampler"), "steps": ev.get("steps")}
        generators = {key: unclip_generate(m, None, guidance=g, **sampler)
                      for key, m in (("model", model), ("compare", other)) if m is not None}
        out["diversity"] = {"guidance": g, "per_caption": per_caption,
                            **_diversity(generators, captions, shapes, model.clip, per_caption)}
    return out


def evaluate_unclip(cfg: dict, root: Path, data: dict, stack: dict) -> dict:
    """unCLIP beside the text-conditioned model, on the same val captions and seeds (one process):
    - `systems`: the evaluation's figures for the stack (`stack`, given), the decoder fed each val image's true
      CLIP embedding (the upper bound of any prior), and `evaluation.compare`, a text-conditioned ldm checkpoint
      (shapes_unclip.yaml names runs/shapes_flow/ldm.ckpt), which must hold the same CLIP and VAE (else left out,
      and `note` says why);
    - `diversity` (`evaluation.diversity: {captions, per_caption, guidance}`): the mean pairwise distance of the
      CLIP image embeddings of one caption's samples, and the spread of its objects' positions beside the data's,
      for the stack and the text model, over the distinct captions among the first `captions` val ones;
    - `variations` (`evaluation.variations: {images, per_image, guidance}`): each val image's embedding -> the
      decoder with the empty caption: kept colour, shape and size, CLIP similarity to the source, spread;
    - `edits` (only with `evaluation.edits: {images, guidance}`): text-diff edits of one-object val images, one per
      attribute (colour, shape, size), judged against the new caption (`evaluation/edits.py`)."""
    from lit_diffusion.evaluation.evaluator import evaluate_checkpoint, load_prior_for
    from lit_diffusion.evaluation.unclip_metrics import decoder_variations, unclip_generate, variation_metrics
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    import torch

    ev = dict(cfg.get("evaluation") or {})
    device = eval_device(cfg)
    batch_size = int(ev.get("batch_size", 100))
    decoder_path = root / "ldm.ckpt"
    decoder = LatentDiffusionModule.from_checkpoint(decoder_path, map_location=device)
    decoder.use_image_guidance(_eval_config(cfg).image_guidance)  # as the stack's evaluation samples
    prior = load_prior_for(decoder, decoder_path, root / "prior.ckpt", device)
    systems = {"unclip": stack}
    results, _, _ = evaluate_checkpoint(decoder_path, data["val_urls"], _eval_config(cfg), root / "eval" / "true",
                                        name="decoder, true embeddings", batch_size=batch_size, device=device)
    systems["decoder_true_embedding"] = results
    compare = ev.get("compare")
    text, note = _load_compare(cfg, decoder, decoder_path, device)
    if text is not None:
        text_config = dataclasses.replace(_eval_config(cfg), image_guidance=None)  # a text model has no image branch
        results, _, _ = evaluate_checkpoint(compare, data["val_urls"], text_config, root / "eval" / "text",
                                            name="text-conditioned", batch_size=batch_size, device=device)
        systems["text"] = results
    sampler = {"sampler": ev.get("sampler"), "steps": ev.get("steps")}
    div_spec, var_spec = dict(ev.get("diversity") or {}), dict(ev.get("variations") or {})
    n_captions, n_images = int(div_spec.get("captions", 50)), int(var_spec.get("images", 100))
    edit_spec = dict(ev.get("edits") or {})
    n_edits = int(edit_spec.get("images", 50)) if edit_spec else 0
    n_read = max(n_captions, n_images, 4 * n_edits)  # about half the val images hold one object
    batch = _val_batch(data, int(decoder.hparams.image_size), n_read)
    captions, shapes = _distinct_captions(batch, n_captions)
    images = ((batch["image"][:n_images] + 1) / 2).clamp(0, 1)
    attrs = list(batch.get("attrs") or [None] * len(batch["caption"]))[:n_images]
    per_caption, g_div = int(div_spec.get("per_caption", 8)), float(div_spec.get("guidance", 3.0))
    generators = {"unclip": unclip_generate(decoder, prior, guidance=g_div, **sampler)}
    if text is not None:
        generators["text"] = unclip_generate(text, None, guidance=g_div, **sampler)
    diversity = _diversity(generators, captions, shapes, decoder.clip, per_caption)
    with torch.inference_mode():
        g_var = float(var_spec.get("guidance", 3.0))
        variations = variation_metrics(decoder_variations(decoder, guidance=g_var, **sampler), images.to(device),
                                       attrs, decoder.clip, per_image=int(var_spec.get("per_image", 4)))
        edits = None
        if n_edits:
            from lit_diffusion.evaluation.edits import edit_accuracy, unclip_edit
            from lit_diffusion.unclip import EDIT_THETAS, UnCLIP

            g_edit = float(edit_spec.get("guidance", 3.0))
            all_attrs = list(batch.get("attrs") or [None] * len(batch["caption"]))
            edits = edit_accuracy(unclip_edit(UnCLIP(prior, decoder, decoder_source=str(decoder_path)), g_edit),
                                  ((batch["image"] + 1) / 2).clamp(0, 1), all_attrs, list(batch["key"]),
                                  decoder.clip, images_limit=n_edits, thetas=EDIT_THETAS)
            edits = {**{k: v for k, v in edits.items() if k != "records"}, "guidance": g_edit}
    return {"systems": systems, "compare": compare if text is not None else None, "note": note,
            "diversity": {**diversity, "guidance": g_div, "per_caption": per_caption},
            # the empty caption: the model's default image_guidance does not apply (`LatentDiffusionModule.sample`)
            "variations": {**variations, "guidance": g_var},
            **({"edits": edits} if edits else {})}


def sample_grid(cfg: dict, root: Path) -> str:
    from lit_diffusion.callbacks.sample_grid import SampleGrid
    import torch

    from lit_diffusion.evaluation.plots import save_grid, save_video_grid
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    spec = cfg.get("samples") or {}
    if "prior" in configured_stages(cfg):  # unCLIP: the grid of the stack, caption -> prior -> decoder
        from lit_diffusion.unclip import UnCLIP

        model = UnCLIP.from_checkpoints(root / "ldm.ckpt", root / "prior.ckpt", map_location=eval_device(cfg))
    else:
        model = LatentDiffusionModule.from_checkpoint(root / "ldm.ckpt", map_location=eval_device(cfg))
    grid = SampleGrid(prompts=spec.get("prompts", SampleGrid().prompts), guidance=spec.get("guidance", [1, 3, 5]),
                      negative_prompt=spec.get("negative_prompt"), sampler=spec.get("sampler"),
                      steps=spec.get("steps"), seed=int(spec.get("seed", 0)),
                      aspect_ratios=spec.get("aspect_ratios", ("1:1",)))
    rows, labels = grid.grid(model)
    if isinstance(rows[0], torch.Tensor) and rows[0].ndim == 5:  # a video model's clips: samples.png and .gif
        out = save_video_grid(rows, labels, root / "samples.png", col_titles=grid.col_titles(),
                              title="lit_diffusion samples")[0]
    else:
        out = save_grid(rows, labels, root / "samples.png", col_titles=grid.col_titles(),
                        title="lit_diffusion samples")
    return str(out)
