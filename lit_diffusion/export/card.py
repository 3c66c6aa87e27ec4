"""A Hugging Face model card (README.md) for an exported folder, and its upload to the Hub.

`write_model_card(folder, ckpt, run_dir)` writes `folder/README.md`: the Hub's YAML front matter (library, pipeline
tag, tags, a licence left for the owner to choose), then what the model is (read from the stage checkpoint's saved
hyper-parameters, `torch.load(weights_only=True)`), the training data (the run's report.json `data` block and the
latent manifest with every shard's sample count), each stage's config (its fingerprint, else report.json), the final
evaluation (report.json), the sample grid (`samples.png`, copied into the folder) and how to load it. The run folder
defaults to the checkpoint's folder when that holds report.json. Without one, each section that needs it says that
it is not available and why: the card never invents a figure.

`push_to_hub(folder, repo_id)` creates the repo (exist_ok) and uploads the folder in two commits: every file but
README.md in one (a commit is atomic on the Hub, so the weights and configs appear together or not at all), then
README.md alone, so the repo never shows a card for weights it does not hold yet. The uploaded card has the repo id
in its loading example in place of the local folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path

from lit_diffusion.evaluation.report import _fmt  # a figure as report.md writes it (4 significant digits)
from lit_diffusion.export import ExportError

log = logging.getLogger("lit_diffusion")

CARD = "README.md"
SAMPLES = "samples.png"
# the Hub's licence field is the owner's choice: `other` is a valid id that the Hub accepts, and license_name says
# that it is still to be chosen (https://hf.co/docs/hub/repositories-licenses)
LICENSE = "other"
LICENSE_NAME = "not-chosen-yet"
LICENSE_COMMENT = ("# license: chosen by the owner before publishing: an id from "
                   "https://hf.co/docs/hub/repositories-licenses, or keep `other` and set license_name and "
                   "license_link (e.g. LICENSE)")
# the loading example's folder line; push_to_hub writes the repo id there in the uploaded card
LOCAL_MARK = "# the exported folder; on the Hub: its repo id"
# caption accuracy's breakdown, in the order report.md shows it (metrics.caption_accuracy KINDS, ATTRIBUTES;
# written out here so writing a card does not import the metrics)
CAPTION_DETAIL = ("one_object", "two_objects", "count", "colors", "shapes", "sizes", "relation")

# what an exported folder holds -> (kind, library_name, pipeline_tag)
FOLDER_KINDS = {
    "pipeline": ("diffusers", "text-to-image"),
    "diffusers": ("diffusers", None),  # a component (the VAE's AutoencoderKL): no pipeline of its own
    "transformers": ("transformers", "zero-shot-image-classification"),
    "open_clip": ("open_clip", "zero-shot-image-classification"),
}


# ---------------------------------------------------------------------------------------------------- the folder
def folder_kind(folder: Path) -> str:
    """`pipeline` (model_index.json), `diffusers` (a diffusers model's config.json), `transformers` (another
    config.json) or `open_clip` (open_clip_config.json); an error naming the folder for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder: export the checkpoint first (lit-diffusion export --out DIR)")
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{folder / 'config.json'} is not JSON: {err}") from None
        return "diffusers" if "_class_name" in config or "_diffusers_version" in config else "transformers"
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    raise ExportError(f"{folder} holds no model_index.json, config.json or open_clip_config.json: it is not an "
                      f"exported model folder (lit-diffusion export --out {folder})")


# ---------------------------------------------------------------------------------------------------- reading
def read_checkpoint(ckpt: Path) -> dict:
    """What a card says about a stage checkpoint: its kind, saved hyper-parameters, lit_diffusion block (without
    embedded state), parameter counts by top-level module, step and epoch, and whether it holds EMA weights. Read
    with `weights_only=True`: no code runs from the file."""
    import torch

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ExportError(f"checkpoint not found: {ckpt}")
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # unsafe globals, corrupt zip
        raise ExportError(f"cannot read {ckpt} safely (weights_only=True): {type(err).__name__}: {err}") from None
    block = raw.get("lit_diffusion") if isinstance(raw, dict) else None
    if not isinstance(block, dict) or "kind" not in block:
        raise ExportError(f"{ckpt} is not a lit_diffusion stage checkpoint (it has no `lit_diffusion` block)")
    params: dict[str, int] = {}
    for key, value in (raw.get("state_dict") or {}).items():
        if isinstance(value, torch.Tensor):
            top = key.split(".", 1)[0]
            params[top] = params.get(top, 0) + value.numel()
    hp = {k: v for k, v in (raw.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    return {"path": str(ckpt), "kind": block["kind"], "hparams": hp, "block": block, "params": params,
            "global_step": raw.get("global_step"), "epoch": raw.get("epoch"),
            "ema": "averaging_state" in raw or "current_model_state" in raw}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as err:
        log.warning("model card: %s is not JSON (%s): left out", path, err)
        return None


def _run_dir(ckpt: Path, run_dir: Path | None) -> tuple[Path | None, str | None]:
    """The run folder, or None and why there is none."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if (run_dir / "report.json").is_file():
            return run_dir, None
        return None, f"the run folder given, `{run_dir}`, holds no report.json"
    if (ckpt.parent / "report.json").is_file():
        return ckpt.parent, None
    return None, (f"no run folder was given and the checkpoint's folder `{ckpt.parent}` holds no report.json "
                  f"(pass the pipeline's run folder, runs/NAME, as run_dir)")


def _manifest(run_dir: Path, report: dict, stage: str) -> tuple[dict | None, str | None]:
    """The latent manifest the diffusion stage read (its shards and sample counts) and where it came from:
    runs/NAME/latents/manifest.json (or the pipeline's `encode.out`), else the copy in the stage's fingerprint."""
    encode_out = ((report.get("pipeline_config") or {}).get("encode") or {}).get("out")
    for path in [Path(encode_out) / "manifest.json"] if encode_out else []:
        if path.is_file():
            return _read_json(path), str(path)
    path = run_dir / "latents" / "manifest.json"
    if path.is_file():
        return _read_json(path), os.path.relpath(path, run_dir)
    fingerprint = _read_json(run_dir / f"{stage}.fingerprint.json") or {}
    if isinstance(fingerprint.get("latents"), dict):
        return fingerprint["latents"], f"{stage}.fingerprint.json"
    return None, None


# ---------------------------------------------------------------------------------------------------- formatting
def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _args(d: dict | None) -> str:
    if not d:
        return "defaults"
    return ", ".join(f"{k} {json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in d.items()
                     if v is not None)


def _not_available(why: str) -> list[str]:
    return [f"*Not available:* {why}.", ""]


NO_REPORT = "no pipeline report for this checkpoint (see the note at the top)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=110).rstrip()


def _details(summary: str, body: str, lang: str = "yaml") -> list[str]:
    return ["<details>", f"<summary>{summary}</summary>", "", f"```{lang}", body, "```", "", "</details>", ""]


# ---------------------------------------------------------------------------------------------------- sections
def _denoiser(hp: dict) -> tuple[str, str, dict]:
    """(tag, name, config) of an ldm checkpoint's denoiser."""
    if hp.get("dit"):
        return "dit", "DiT", dict(hp["dit"])
    return "unet", "U-Net", dict(hp.get("unet") or {})


def _objective(info: dict) -> str:
    hp, block = info["hparams"], info["block"]
    objective = block.get("objective") or hp.get("objective")
    schedule = block.get("schedule") or hp.get("flow" if objective == "flow" else "schedule")
    if objective == "flow":
        return f"rectified flow (the network predicts the velocity eps - x0); {_args(schedule)}"
    if objective == "ddpm":
        prediction = block.get("prediction") or hp.get("prediction") or "eps"
        return f"DDPM, the network predicts {prediction}; noise schedule: {_args(schedule)}"
    return str(objective)


def _ldm_rows(info: dict) -> list[list[str]]:
    hp, block, params = info["hparams"], info["block"], info["params"]
    net, name, cfg = _denoiser(hp)
    frozen = block.get("frozen") or {}
    clip_hp = (frozen.get("clip") or {}).get("hyper_parameters") or {}
    vae_block = (frozen.get("vae") or {}).get("lit_diffusion") or {}
    vae_cfg = vae_block.get("config") or ((frozen.get("vae") or {}).get("hyper_parameters") or {}).get("arch") or {}
    condition = hp.get("condition", "text")
    what = {"text": "text-to-image latent diffusion",
            "text+image_embedding": "unCLIP decoder: latent diffusion conditioned on a caption and a CLIP image "
                                    "embedding (a prior turns captions into embeddings)",
            "image_embedding": "unCLIP decoder conditioned on a CLIP image embedding only"}.get(condition, condition)
    frames = int(hp.get("frames") or 1)
    if frames > 1:
        what = f"text-to-video latent diffusion, {frames} frames"
    size = hp.get("image_size")
    latent = f"{block.get('latent_channels', '?')} x {block.get('latent_size', '?')} x {block.get('latent_size', '?')}"
    text = clip_hp.get("text") or {}
    rows = [["model", what],
            ["denoiser", f"{name}, {_count(params.get(net))} parameters: {_args(cfg)}"],
            ["objective", _objective(info)],
            ["loss weighting", str(hp.get("loss_weighting", "plain"))
             + (f" (gamma {hp.get('min_snr_gamma')})" if str(hp.get("loss_weighting", "")).startswith("min_snr")
                else "")],
            ["image size", f"{size} x {size} px, latents {latent}"],
            ["text encoder", f"the CLIP of stage 1, frozen, {_count(params.get('clip'))} parameters with its "
                             f"image tower: text width {text.get('width')}, {text.get('layers')} layers, "
                             f"{text.get('heads')} heads, {text.get('context_length')} tokens, vocabulary "
                             f"{text.get('vocab_size')}, embedding {clip_hp.get('embed_dim')}"
                             + ("; its pooled embedding is also added to the timestep embedding"
                                if hp.get("pooled_text") else "")],
            ["autoencoder", f"the VAE of stage 2, frozen, {_count(params.get('vae'))} parameters: "
                            f"{_args(vae_cfg)}; latent scale {_fmt(vae_block.get('scale_factor'))}, mean "
                            f"{_fmt(vae_block.get('latent_mean'))}"],
            ["classifier-free guidance", f"the caption dropped with probability {hp.get('p_uncond')} in training"
             + (f", the image embedding with {hp.get('p_uncond_image')}" if condition != "text" else "")],
            ["sampling defaults", f"{hp.get('sampler')}, {hp.get('sample_steps')} steps, guidance "
                                  f"{hp.get('guidance')}"]]
    return rows


def _stage_rows(info: dict) -> list[list[str]]:
    """A CLIP, VAE or prior checkpoint: its architecture fields as saved."""
    hp = info["hparams"]
    skip = {"lr", "weight_decay", "betas", "warmup_steps", "zeroshot", "hard_negatives", "binding_negatives", "tokenizer_path",
            "tokenizer_json", "clip_ckpt", "init_from", "rfid_backend", "inception_weights"}
    rows = [["stage", info["kind"]]]
    rows += [[k, _args(v) if isinstance(v, dict) else str(v)] for k, v in hp.items() if k not in skip]
    return rows


def _model_section(info: dict, report: dict | None, folder_type: str) -> list[str]:
    hp = info["hparams"]
    rows = _ldm_rows(info) if info["kind"] == "ldm" else _stage_rows(info)
    total = sum(info["params"].values())
    parts = ", ".join(f"{k} {_count(v)}" for k, v in info["params"].items())
    rows.append(["parameters", f"{_count(total)} in all ({parts})"])
    train = f"{info['global_step']} optimizer steps ({info['epoch']} epochs)"
    if "lr" in hp:
        train += (f", AdamW lr {hp['lr']} (warm-up {hp.get('warmup_steps')} steps), betas {hp.get('betas')}, "
                  f"weight decay {hp.get('weight_decay')}")
    stage_cfg = (((report or {}).get("stages") or {}).get(info["kind"]) or {}).get("config") or {}
    batch = ((stage_cfg.get("data") or {}).get("init_args") or {}).get("batch_size")
    if batch:
        devices = (stage_cfg.get("trainer") or {}).get("devices")
        train += f", batch {batch} per device ({devices} device{'s' if devices not in (1, '1') else ''})"
    rows.append(["training", train])
    if info["ema"]:
        decay = None
        for cb in (stage_cfg.get("trainer") or {}).get("callbacks") or []:
            if isinstance(cb, dict) and "WeightAveraging" in str(cb.get("class_path")):
                decay = (cb.get("init_args") or {}).get("decay")
        rows.append(["weights", "the EMA average" + (f" (decay {decay})" if decay is not None else "")
                     + ", which sampling and evaluation use"])
    lines = ["## Model", ""]
    lines += _table(["", ""], rows)
    lines += [f"Read from `{Path(info['path']).name}` (saved hyper-parameters and tensor shapes). "
              f"This folder is its {folder_type} export.", ""]
    return lines


def _data_section(run_dir: Path | None, report: dict | None, stage: str) -> list[str]:
    lines = ["## Training data", ""]
    if report is None:
        return lines + _not_available(f"{NO_REPORT}: the card does not know which shards trained the model")
    data = report.get("data") or {}
    made = (report.get("pipeline_config") or {}).get("data") or {}
    lines += [f"- image shards: train `{data.get('train_urls')}`, val `{data.get('val_urls')}`"
              + (f"; tokenizer `{data['tokenizer']}`" if data.get("tokenizer") else "")]
    if data.get("made") or made.get("train"):
        lines += [f"- made by the pipeline (`lit-diffusion data`): {_args(made)}"]
    lines.append("")
    manifest, source = _manifest(run_dir, report, stage)
    if manifest is None:
        lines += [f"No latent manifest in `{run_dir}` (the stage read the image shards, or the latents are gone): "
                  f"the sample counts per shard are not recorded.", ""]
        return lines
    shards = manifest.get("shards") or []
    lines += [f"The diffusion stage trained on latent shards encoded from those images by the frozen CLIP and VAE "
              f"(`{source}`): {manifest.get('samples', sum(s.get('samples', 0) for s in shards))} samples, "
              f"{manifest.get('image_size')} px, latents {manifest.get('shapes', {}).get('latent')}, "
              f"{manifest.get('dtype')}"
              + (", with CLIP image embeddings" if manifest.get("image_embeddings") else "")
              + (", posterior std kept" if manifest.get("std") else "") + ".", ""]
    splits = {name: split for split, names in (manifest.get("splits") or {}).items() for name in names}
    rows = [[split_of(s, splits), f"`{s.get('name')}`", str(s.get("samples")), f"`{s.get('source')}`"]
            for s in shards]
    lines += _table(["split", "shard", "samples", "encoded from"], rows)
    totals: dict[str, int] = {}
    for shard in shards:
        split = split_of(shard, splits)
        totals[split] = totals.get(split, 0) + int(shard.get("samples") or 0)
    lines += ["Samples per split: " + ", ".join(f"{k} {v}" for k, v in totals.items()) + ".", ""]
    return lines


def split_of(shard: dict, splits: dict) -> str:
    name = str(shard.get("name"))
    return splits.get(name) or name.split("/", 1)[0]


def _stages_section(run_dir: Path | None, report: dict | None) -> list[str]:
    lines = ["## Training stages", ""]
    if report is None:
        return lines + _not_available(f"{NO_REPORT}: no stage configs or figures")
    stages = report.get("stages") or {}
    rows = []
    for name, stage in stages.items():
        seconds = stage.get("seconds")
        time = "given checkpoint (trained before this run)" if stage.get("skipped") else (
            f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "?")
        figures = ", ".join(f"{k} = {_fmt(v)}" for k, v in (stage.get("figures") or {}).items() if v is not None)
        rows.append([name, time, figures or "none recorded"])
    lines += _table(["stage", "time", "final figures"], rows)
    lines += ["Each stage's config as given (its fingerprint: the config file, the pipeline's overrides and the "
              "seed), else the full config the trainer saved:", ""]
    for name, stage in stages.items():
        fingerprint = _read_json(run_dir / f"{name}.fingerprint.json")
        if fingerprint and fingerprint.get("config") is not None:
            shown = {k: fingerprint[k] for k in ("config_file", "seed", "config", "overrides") if k in fingerprint}
            lines += _details(f"{name} (from <code>{name}.fingerprint.json</code>)", _yaml(shown))
        elif stage.get("config"):
            lines += _details(f"{name} (from report.json)", _yaml(stage["config"]))
        else:
            lines += [f"- {name}: no config in this run (a given checkpoint: `{stage.get('ckpt')}`)", ""]
    if report.get("pipeline_config"):
        lines += _details("the pipeline config (<code>lit-diffusion pipeline</code>)", _yaml(report["pipeline_config"]))
    return lines


def eval_rows(results: dict, guidance, backends) -> list[list[str]]:
    """The evaluation table's rows: guidance, FID per backend, CLIP score, caption accuracy."""
    return [[f"{g:g}", *[_fmt(results.get(f"eval/fid_{b}_g{float(g):.1f}")) for b in backends],
             _fmt(results.get(f"eval/clip_score_g{float(g):.1f}")),
             _fmt(results.get(f"eval/caption_acc_g{float(g):.1f}"))] for g in guidance]


def _eval_section(report: dict | None, info: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    if report is None:
        return lines + _not_available(f"{NO_REPORT}: no evaluation figures")
    evaluation = report.get("evaluation") or {}
    results, config = evaluation.get("results"), evaluation.get("config") or {}
    if info["kind"] != "ldm":
        return lines + ["The pipeline's final evaluation is of the diffusion model (ldm.ckpt); this stage's own "
                        "figures are in Training stages above.", ""]
    if not results:
        return lines + _not_available("report.json holds no final evaluation (the pipeline stopped before it)")
    ckpt = ((report.get("stages") or {}).get("ldm") or {}).get("ckpt")
    if ckpt and not _same_file(ckpt, info["path"]):
        lines += [f"**Note:** these figures are report.json's, measured on `{ckpt}`; this card's weights come from "
                  f"`{info['path']}`.", ""]
    guidance = config.get("guidance") or [1, 3, 5]
    backends = config.get("backends") or ["clip"]
    lines += [f"{int(results.get('eval/num_samples', config.get('num_samples') or 0))} val captions, one sample each "
              f"(seed {config.get('seed')}), sampler {config.get('sampler') or 'the model default'}, "
              f"{config.get('steps') or 'default'} steps, at each guidance scale:", ""]
    lines += _table(["guidance", *[f"FID ({b})" for b in backends], "CLIP score", "caption accuracy"],
                    eval_rows(results, guidance, backends))
    detail = [k for k in CAPTION_DETAIL if any(f"eval_detail/caption_{k}_g{float(g):.1f}" in results
                                               for g in guidance)]
    if detail:
        lines += ["Caption accuracy by caption kind, and of each attribute over all captions:", ""]
        lines += _table(["guidance", *[k.replace("_", " ") for k in detail]],
                        [[f"{g:g}", *[_fmt(results.get(f"eval_detail/caption_{k}_g{float(g):.1f}")) for k in detail]]
                         for g in guidance])
    unclip = (evaluation.get("unclip") or {}).get("systems") or {}
    if unclip:
        names = {"unclip": "unCLIP (caption -> prior -> decoder)", "decoder_true_embedding":
                 "decoder fed the true image embedding", "text": "text-conditioned model (same CLIP and VAE)"}
        rows = [[names.get(k, k), *row] for k, res in unclip.items() for row in eval_rows(res, guidance, backends)]
        lines += ["The unCLIP stack beside its decoder fed true embeddings and a text-conditioned model:", ""]
        lines += _table(["system", "guidance", *[f"FID ({b})" for b in backends], "CLIP score", "caption accuracy"],
                        rows)
    lines += [f"FID ({', '.join(backends)}): the Frechet distance between the features of the samples and of the val "
              f"images" + (", with this run's own CLIP as the feature extractor: not comparable with published "
                           "(Inception) FIDs" if "clip" in backends else "")
              + ". CLIP score: 100 x cosine of the sample's and the caption's embeddings in this run's CLIP. Caption "
              "accuracy: the fraction of samples whose objects' count, colours, shapes, sizes and relation all match "
              "the caption, judged from the pixels (`metrics/caption_accuracy.py`, for the shapes captions).", ""]
    return lines


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _samples_section(folder: Path, run_dir: Path | None, report: dict | None) -> list[str]:
    lines = ["## Samples", ""]
    if report is None:
        return lines + _not_available(f"{NO_REPORT}: no sample grid")
    source = Path(report["samples"]) if report.get("samples") else run_dir / SAMPLES
    if not source.is_file():
        source = run_dir / SAMPLES
    if not source.is_file():
        return lines + _not_available(f"the run's sample grid `{report.get('samples') or run_dir / SAMPLES}` "
                                      f"does not exist")
    if not (folder / SAMPLES).exists() or not _same_file(source, folder / SAMPLES):
        shutil.copyfile(source, folder / SAMPLES)
    spec = (report.get("pipeline_config") or {}).get("samples") or {}
    lines += [f"![samples]({SAMPLES})", ""]
    if spec:
        lines += [f"One row per prompt ({'; '.join(repr(p) for p in spec.get('prompts') or [])}), one column per "
                  f"guidance scale ({', '.join(f'{g:g}' for g in spec.get('guidance') or [])})"
                  + (f", negative prompt {spec['negative_prompt']!r}" if spec.get("negative_prompt") else "")
                  + (f", seed {spec['seed']}" if "seed" in spec else "") + ".", ""]
    return lines


# our sampler -> the diffusers scheduler that steps exactly as it (export/pipeline.py `scheduler_for`)
EXACT_SCHEDULERS = {("flow", "euler"): "FlowMatchEulerDiscreteScheduler", ("ddpm", "ddim"): "DDIMScheduler",
                    ("flow", "heun"): "LitDiffusionFlowHeunScheduler", ("ddpm", "dpmpp_2m"): "DPMSolverMultistepScheduler"}


def _scheduler_note(folder: Path, info: dict) -> str:
    """Whether the pipeline's scheduler samples as the checkpoint's default sampler (the evaluation's)."""
    hp = info["hparams"]
    index = _read_json(folder / "model_index.json") or {}
    scheduler = index.get("scheduler")
    scheduler = scheduler[1] if isinstance(scheduler, list) and len(scheduler) == 2 else None
    objective = info["block"].get("objective") or hp.get("objective")
    sampler = hp.get("sampler")
    if scheduler is None:
        return ""
    exact = EXACT_SCHEDULERS.get((objective, sampler)) == scheduler and not (sampler == "ddim" and hp.get("eta"))
    if exact:
        return (f"Its scheduler, `{scheduler}`, steps as the checkpoint's default sampler `{sampler}` (the one the "
                f"evaluation and samples.png used).")
    return (f"Its scheduler is diffusers' `{scheduler}`; the checkpoint's default sampler, which made the evaluation "
            f"figures and samples.png, is lit_diffusion's `{sampler}`, which that scheduler does not reproduce step "
            f"for step, so the pipeline's images differ from the evaluated ones (`lit-diffusion sample` below uses "
            f"`{sampler}`).")


def _usage_section(folder: Path, folder_type: str, info: dict, report: dict | None) -> list[str]:
    hp = info["hparams"]
    local = f'"./{folder.name}"'
    if folder_type == "pipeline":
        spec = ((report or {}).get("pipeline_config") or {}).get("samples") or {}
        prompt = (spec.get("prompts") or ["a caption like the training captions"])[0]
        negative = spec.get("negative_prompt")
        frames = int(hp.get("frames") or 1)
        decoder = "image_embedding" in str(hp.get("condition") or "")
        text = not decoder or "text" in str(hp.get("condition"))
        # a decoder samples from a caption through the exported prior, else varies an image (or takes embeddings)
        variation = decoder and not (folder / "prior").is_dir()
        code = ["import torch", "from diffusers import DiffusionPipeline"]
        code += ["from PIL import Image"] if variation else []
        code += ["", f"model_id = {local}  {LOCAL_MARK}",
                 "pipe = DiffusionPipeline.from_pretrained(model_id, trust_remote_code=True)",
                 "out = pipe("]
        if variation and (folder / "image_encoder").is_dir():
            code.append('    image=Image.open("photo.png"),  # variations of this image (its CLIP image embedding)')
        elif variation:
            code.append("    image_embeds=embeddings,  # [B, E] CLIP image embeddings, L2-normalised")
        if text:
            code.append(f"    prompt={prompt!r},")
            code.append(f"    negative_prompt={negative!r}," if negative else "    negative_prompt=None,")
        code += [f"    guidance_scale={float(hp.get('guidance', 3.0))},",
                 f"    num_inference_steps={int(hp.get('sample_steps', 50))},"]
        code += [f"    num_frames={frames},"] if frames > 1 else []
        code += ["    generator=torch.Generator().manual_seed(0),", ")"]
        if frames > 1:  # a clip: a list of frames, saved as an animated GIF
            code += ["clip = out.frames[0]",
                     'clip[0].save("sample.gif", save_all=True, append_images=clip[1:], duration=125, loop=0)']
        else:
            code += ['out.images[0].save("sample.png")']
        note = ("`trust_remote_code=True` runs the pipeline, denoiser and scheduler code shipped in this folder: "
                "read it first. The guidance scale and steps above are the checkpoint's own sampling defaults.")
        note += " " + _scheduler_note(folder, info)
    elif folder_type == "diffusers":
        code = ["from diffusers import AutoencoderKL", "", f"model_id = {local}  {LOCAL_MARK}",
                "vae = AutoencoderKL.from_pretrained(model_id)"]
        note = "config.json holds the latent scaling_factor and shift_factor the diffusion model was trained with."
    elif folder_type == "transformers":
        code = ["from transformers import AutoTokenizer, CLIPModel", "", f"model_id = {local}  {LOCAL_MARK}",
                "model = CLIPModel.from_pretrained(model_id)", "tokenizer = AutoTokenizer.from_pretrained(model_id)",
                'tokens = tokenizer(["a large red circle"], padding="max_length", truncation=True, '
                'return_tensors="pt")']
        note = "The tokenizer gives this CLIP's own token ids (padded to its context length)."
    else:
        code = ["import open_clip", "", f"model_id = {local}  {LOCAL_MARK}",
                'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + model_id)',
                'tokenizer = open_clip.get_tokenizer("local-dir:" + model_id)']
        note = 'From the Hub: `"hf-hub:" + repo_id` instead of `"local-dir:"`.'
    lines = ["## How to use", "", "```python", *code, "```", "", note, ""]
    if info["kind"] == "ldm":
        spec = ((report or {}).get("pipeline_config") or {}).get("samples") or {}
        prompt = (spec.get("prompts") or ["a caption like the training captions"])[0]
        prior = " --prior prior.ckpt" if hp.get("condition", "text") != "text" else ""
        lines += ["With lit_diffusion and the stage checkpoint itself:", "", "```bash",
                  f"lit-diffusion sample --ckpt {Path(info['path']).name}{prior} --prompt {shlex.quote(prompt)} "
                  f"--guidance {hp.get('guidance', 3.0)} --steps {hp.get('sample_steps', 50)} --out samples.png",
                  "```", ""]
    return lines


def _files_section(folder: Path) -> list[str]:
    rows = [[f"`{p}`", _size((folder / p).stat().st_size)] for p in _folder_files(folder) if p != CARD]
    return ["## Files", "", *_table(["file", "size"], rows)]


def _size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _folder_files(folder: Path) -> list[str]:
    """The folder's files as repo paths, sorted; hidden files and folders (.git, .cache) left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


# ---------------------------------------------------------------------------------------------------- the card
def _front_matter(folder_type: str, info: dict) -> str:
    from huggingface_hub import ModelCardData

    library, pipeline_tag = FOLDER_KINDS[folder_type]
    hp = info["hparams"]
    tags = ["lit-diffusion"]
    if info["kind"] == "ldm":
        tags += ["text-to-image", "latent-diffusion", _denoiser(hp)[0]]
        objective = info["block"].get("objective") or hp.get("objective")
        tags += {"flow": ["rectified-flow"], "ddpm": ["ddpm"]}.get(objective, [])
        if hp.get("condition", "text") != "text":
            tags.append("unclip")
        if int(hp.get("frames") or 1) > 1:
            tags.append("text-to-video")
    else:
        tags += {"vae": ["latent-diffusion", "autoencoder", "vae"], "clip": ["clip"],
                 "prior": ["unclip", "diffusion-prior"]}.get(info["kind"], [info["kind"]])
    data = ModelCardData(library_name=library, pipeline_tag=pipeline_tag, license=LICENSE,
                         license_name=LICENSE_NAME, tags=tags)
    lines = []
    for line in data.to_yaml().splitlines():
        if line.startswith("license:"):
            lines.append(LICENSE_COMMENT)
        lines.append(line)
    return "\n".join(lines)


def _origin(report: dict | None) -> str:
    """Whether every stage was trained from scratch in this run, as far as report.json records it."""
    if report is None:
        return "Where its stages started from is not recorded here (no report.json)."
    notes = []
    for name, stage in (report.get("stages") or {}).items():
        init = (((stage.get("config") or {}).get("model") or {}).get("init_args") or {}).get("init_from")
        given = (((report.get("pipeline_config") or {}).get("stages") or {}).get(name) or {}).get("checkpoint")
        if stage.get("skipped") and stage.get("config") is None:
            notes.append(f"{name} was given as a finished checkpoint (`{given or stage.get('ckpt')}`), not trained "
                         f"in this run")
        elif init:
            notes.append(f"{name} started from `{init}`")
    if not notes:
        return "Every stage was trained from scratch in this run (no stage started from other weights)."
    return "Not every stage was trained in this run: " + "; ".join(notes) + "."


def card_text(folder: Path, ckpt: Path, run_dir: Path | None = None) -> str:
    """The card's text (front matter and body); `write_model_card` writes it and copies the sample grid."""
    folder, ckpt = Path(folder), Path(ckpt)
    folder_type = folder_kind(folder)
    info = read_checkpoint(ckpt)
    run_dir, why = _run_dir(ckpt, run_dir)
    report = _read_json(run_dir / "report.json") if run_dir else None
    if run_dir is not None and report is None:
        why = f"`{run_dir / 'report.json'}` could not be read"
    name = (report or {}).get("name") or ckpt.stem
    hp = info["hparams"]
    if info["kind"] == "ldm":
        title = f"{name}: a {_denoiser(hp)[1]} latent diffusion model trained with lit_diffusion"
        intro = ("A latent diffusion model built in stages by lit_diffusion's `pipeline`: a CLIP (stage 1) encodes "
                 "the captions, a VAE (stage 2) maps images to latents, and the denoiser (stage 3) learns to "
                 "generate latents from captions. The CLIP and the VAE are frozen inside the diffusion checkpoint "
                 "and exported with it.")
    else:
        title = f"{name}: the {info['kind']} stage of a lit_diffusion latent diffusion model"
        intro = f"The {info['kind']} stage of a model trained by lit_diffusion's `pipeline`."
    intro += " " + _origin(report)
    missing = [] if report is not None else [
        f"> **Sections not available:** training data, training stages, evaluation and samples: {why}. "
        f"They come only from a pipeline run's report.json, so this card states no figures.", ""]
    body = [f"# {title}", "", intro, "", *missing,
            *_model_section(info, report, folder_type),
            *_data_section(run_dir, report, info["kind"]),
            *_stages_section(run_dir, report),
            *_eval_section(report, info),
            *_samples_section(folder, run_dir, report),
            *_usage_section(folder, folder_type, info, report),
            *_files_section(folder),
            "## Licence", "",
            f"Not chosen yet: the front matter says `license: {LICENSE}` with `license_name: {LICENSE_NAME}` until "
            f"the owner sets it. The training data's own terms apply to the model too.", ""]
    return f"---\n{_front_matter(folder_type, info)}\n---\n\n" + "\n".join(body)


def write_model_card(folder: Path, ckpt: Path, run_dir: Path | None = None) -> Path:
    """Write `folder/README.md`, the model card of the exported `folder` made from the stage checkpoint `ckpt`
    and the pipeline run `run_dir` (default: `ckpt`'s folder when it holds report.json), copying the run's
    samples.png into `folder`. The card is parsed back with `huggingface_hub.ModelCard.load` to check its front
    matter. Returns the card's path."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    text = card_text(folder, Path(ckpt), run_dir)
    path = folder / CARD
    path.write_text(text)  # as rendered: ModelCard.save would drop the front matter's comment on the licence
    card = ModelCard.load(path)  # the front matter parses, with the fields the Hub reads
    library, pipeline_tag = FOLDER_KINDS[folder_kind(folder)]
    if card.data.library_name != library or card.data.pipeline_tag != pipeline_tag or "lit-diffusion" not in (
            card.data.tags or []):
        raise ExportError(f"{path}: the front matter did not parse back as written: {card.data.to_dict()}")
    return path


# ---------------------------------------------------------------------------------------------------- the Hub
def _with_repo_id(text: str, repo_id: str) -> str:
    """The card with `repo_id` in its loading example in place of the local folder."""
    return re.sub(rf'^(\s*\w+ = )"[^"\n]*"  {re.escape(LOCAL_MARK)}$', lambda m: f'{m.group(1)}"{repo_id}"', text,
                  flags=re.M)


def push_to_hub(folder: Path, repo_id: str, api=None, token: str | None = None, private: bool = False) -> list[str]:
    """Create the model repo `repo_id` (exist_ok; `private` applies only when it is created) and upload `folder`:
    every file but README.md in one commit, then README.md (with the repo id in its loading example) in a second,
    so the repo never shows a card for weights it does not hold. Hidden files and folders are not uploaded.
    `api`: an `huggingface_hub.HfApi` (default: a new one with `token`). Returns the uploaded paths in upload order.
    A folder that is not an exported model (no model_index.json, config.json or open_clip_config.json) is
    refused, naming it."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    kind = folder_kind(folder)
    files = [p for p in _folder_files(folder) if p != CARD]
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    card = folder / CARD
    if not card.is_file():
        log.warning("push_to_hub: %s has no README.md: the repo will have no model card (write_model_card)", folder)
    elif f"license_name: {LICENSE_NAME}" in card.read_text():
        log.warning("push_to_hub: %s still has the placeholder licence (license: %s, license_name: %s)", card,
                    LICENSE, LICENSE_NAME)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in files]
    api.create_commit(repo_id, operations, commit_message=f"Upload the {kind} exported by lit_diffusion",
                      token=token, repo_type="model")
    if card.is_file():
        text = _with_repo_id(card.read_text(), repo_id)
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=text.encode())],
                          commit_message="Model card", token=token, repo_type="model")
        files.append(CARD)
    return files
