"""runs/NAME/report.md and report.json: every stage's figures, timings and configs, and the evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from lit_diffusion.metrics.caption_accuracy import ATTRIBUTES, KINDS, RELATION_WORDS
from lit_diffusion.stages.registry import STAGES, stage_keys


def _fmt(value) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _minutes(seconds) -> str:
    return "skipped (done before)" if seconds is None else f"{seconds / 60:.1f} min"


def _phase(result: dict, keys) -> dict:
    """One phase of a stage trained in phases, as the report shows it."""
    final = result["summary"].get("final") or {}
    return {"name": result["name"], "ckpt": result["ckpt"], "init_from": result.get("init_from"),
            "skipped": result["skipped"], "seconds": result["seconds"], "figures": {k: final.get(k) for k in keys}}


SYSTEMS = {"text": "text-conditioned (evaluation.compare)", "unclip": "unCLIP: caption -> prior -> decoder",
           "decoder_true_embedding": "decoder fed the true image embedding (upper bound)"}


def _unclip_lines(unclip: dict, guidance, backends) -> list[str]:
    """The unCLIP section: the stack, the decoder with true embeddings and the text model side by side; diversity;
    variations."""
    lines = ["", "## unCLIP beside the text-conditioned model", "",
             "| system | guidance | caption accuracy | one object | two objects | relation (all captions) | "
             + " | ".join(f"FID ({b})" for b in backends) + " | CLIP score |",
             "|" + "---|" * (7 + len(backends))]
    for key, label in SYSTEMS.items():
        results = unclip["systems"].get(key)
        if results is None:
            continue
        for g in guidance:
            d = f"_g{g:.1f}"
            row = [label, f"{g:g}", _fmt(results.get(f"eval/caption_acc{d}")),
                   _fmt(results.get(f"eval_detail/caption_one_object{d}")),
                   _fmt(results.get(f"eval_detail/caption_two_objects{d}")),
                   _fmt(results.get(f"eval_detail/caption_relation{d}")),
                   *[_fmt(results.get(f"eval/fid_{b}{d}")) for b in backends], _fmt(results.get(f"eval/clip_score{d}"))]
            lines.append("| " + " | ".join(row) + " |")
    if unclip.get("compare") is None:
        lines += ["", "No text-conditioned model to compare with: "
                  + (unclip.get("note") or "`evaluation.compare` names none") + "."]
    lines += _diversity_lines(unclip["diversity"], SYSTEMS)
    var = unclip["variations"]
    lines += ["", f"Variations at guidance {var['guidance']:g} ({int(var['sources'])} val images, "
                  f"{int(var['variations'])} variations): colour kept {_fmt(var.get('acc_colors'))}, shape "
                  f"{_fmt(var.get('acc_shapes'))}, size {_fmt(var.get('acc_sizes'))}, whole caption "
                  f"{_fmt(var.get('acc_correct'))} (the sources themselves: {_fmt(var.get('source_acc_correct'))}); "
                  f"CLIP image similarity to the source {_fmt(var.get('similarity'))}, spread "
                  f"{_fmt(var.get('spread'))}."]
    if unclip.get("edits"):
        ed = unclip["edits"]
        lines += ["", f"Text-diff edits at guidance {ed['guidance']:g}, theta {ed['theta']:g} ({ed['images']} "
                      f"one-object val images, {ed['edits']} edits): "
                  + "; ".join(f"{a} success {_fmt(s['success'])}, kept {_fmt(s['kept'])}, correct "
                              f"{_fmt(s['correct'])}, placed {_fmt(s['placed'])}, similarity {_fmt(s['similarity'])}"
                              for a, s in [*ed["attributes"].items(), ("overall", ed["overall"])]) + "."]
    return lines


def _diversity_lines(div: dict, labels: dict) -> list[str]:
    """Within-caption diversity per system: CLIP's (mean pairwise distance of the image embeddings of one caption's
    samples) and of positions beside the data's on the same captions (`evaluation/diversity.py`)."""
    systems = [(labels[k], v) for k, v in div.items() if k in labels and isinstance(v, dict)]
    lines = ["", f"Within-caption diversity at guidance {div['guidance']:g}, {div['per_caption']} samples per caption "
                 "(standard errors over captions): CLIP, the mean pairwise distance of their CLIP image embeddings; "
                 "positions, the mean pairwise distance of each object's centroid (units of the image's side), the "
                 "data's own placements of the same captions, and the model's minus the data's paired by caption "
                 "(below 0: fewer places than the data).", "",
             "| system | captions | CLIP | positions | the data | minus the data | one object | two objects | "
             "objects found |", "|" + "---|" * 9]
    for label, v in systems:
        pos = v.get("positions") or {}
        data = pos.get("data") or {}
        lines.append(f"| {label} | {v['captions']} | {_fmt(v['diversity'])} ({_fmt(v['diversity_se'])}) | "
                     f"{_fmt(pos.get('spread'))} ({_fmt(pos.get('spread_se'))}) | {_fmt(data.get('spread'))} | "
                     f"{_fmt(pos.get('minus_data'))} ({_fmt(pos.get('minus_data_se'))}) | "
                     f"{_fmt(pos.get('spread_one_object'))} | {_fmt(pos.get('spread_two_objects'))} | "
                     f"{_fmt(pos.get('found'))} |")
    return lines


def _relation_word_lines(results: dict, guidance) -> list[str]:
    """Two-object captions by relation word: the caption right, and the two objects in that relation."""
    if not any(f"eval_detail/caption_relation_{w}_g{g:.1f}" in results for w in RELATION_WORDS for g in guidance):
        return []
    lines = ["", "Two-object captions by relation word, the caption right / the two objects in that relation:", "",
             "| guidance | " + " | ".join(RELATION_WORDS.values()) + " |", "|" + "---|" * (len(RELATION_WORDS) + 1)]
    for g in guidance:
        lines.append(f"| {g:g} | " + " | ".join(
            f"{_fmt(results.get(f'eval_detail/caption_relation_{w}_g{g:.1f}'))} / "
            f"{_fmt(results.get(f'eval_detail/caption_relation_{w}_placed_g{g:.1f}'))}" for w in RELATION_WORDS) + " |")
    return lines


def _compare_lines(compare: dict, results: dict, guidance, backends) -> list[str]:
    """This model beside `evaluation.compare`'s, and their diversity."""
    lines = []
    if compare.get("results") is not None:
        other = compare["results"]
        lines += ["", f"## Beside `{compare['ckpt']}`", "",
                  "| model | guidance | caption accuracy | one object | two objects | "
                  + " | ".join(f"{w} placed" for w in RELATION_WORDS.values()) + " | "
                  + " | ".join(f"FID ({b})" for b in backends) + " | CLIP score |",
                  "|" + "---|" * (6 + len(RELATION_WORDS) + len(backends))]
        for label, res in (("this run", results), ("compared", other)):
            for g in guidance:
                d = f"_g{g:.1f}"
                row = [label, f"{g:g}", _fmt(res.get(f"eval/caption_acc{d}")),
                       _fmt(res.get(f"eval_detail/caption_one_object{d}")),
                       _fmt(res.get(f"eval_detail/caption_two_objects{d}")),
                       *[_fmt(res.get(f"eval_detail/caption_relation_{w}_placed{d}")) for w in RELATION_WORDS],
                       *[_fmt(res.get(f"eval/fid_{b}{d}")) for b in backends], _fmt(res.get(f"eval/clip_score{d}"))]
                lines.append("| " + " | ".join(row) + " |")
    if compare.get("note"):
        lines += ["", f"No model beside this one: {compare['note']}."]
    if compare.get("diversity"):
        lines += ["", "## Within-caption diversity"]
        lines += _diversity_lines(compare["diversity"], {"model": "this run", "compare": "compared"})
    return lines


def _vae_ceiling_lines(results: dict, judge: str, what: str) -> list[str]:
    """The judge (`caption` or `motion`) on the real val images or clips sent through the VAE, if evaluated."""
    if results.get(f"eval/{judge}_acc_vae") is None:
        return []
    return ["", f"The real val {what} sent through the VAE and back pass the judge in "
                f"{_fmt(results[f'eval/{judge}_acc_vae'])} of the {what} (one object "
                f"{_fmt(results.get(f'eval_detail/{judge}_vae_one_object'))}, two objects "
                f"{_fmt(results.get(f'eval_detail/{judge}_vae_two_objects'))}): the most a denoiser over these "
                "latents can reach."]


def _video_lines(results: dict, guidance) -> list[str]:
    """A video model's table: motion caption accuracy overall and by attribute and caption kind, CLIP score, FID
    of single frames and the Frechet distance of the clips' video-CLIP embeddings; then each attribute's accuracy
    within each caption kind (what the two-object captions get wrong)."""
    from lit_diffusion.metrics.motion_accuracy import ATTRIBUTES as MOTION

    detail = (*KINDS, *MOTION)
    header = ["guidance", "motion caption accuracy", *(k.replace("_", " ") for k in detail), "CLIP score",
              "FID (frames)", "Frechet clip distance"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in guidance:
        row = [f"{g:g}", _fmt(results.get(f"eval/motion_acc_g{g:.1f}")),
               *(_fmt(results.get(f"eval_detail/motion_{k}_g{g:.1f}")) for k in detail),
               _fmt(results.get(f"eval/clip_score_g{g:.1f}")), _fmt(results.get(f"eval/fid_frames_g{g:.1f}")),
               _fmt(results.get(f"eval/fcd_g{g:.1f}"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += _vae_ceiling_lines(results, "motion", "clips")
    # where the captions of each kind fail: a two-object caption is right only if every attribute is
    rows = [f"| {g:g} | {kind.replace('_', ' ')} | " + " | ".join(
                _fmt(results.get(f"eval_detail/motion_{kind}_{k}_g{g:.1f}")) for k in MOTION) + " |"
            for g in guidance for kind in KINDS if f"eval_detail/motion_{kind}_g{g:.1f}" in results]
    if rows:  # no clip judged (data without attributes): no table
        lines += ["", "| guidance | caption kind | " + " | ".join(MOTION) + " |", "|" + "---|" * (len(MOTION) + 2),
                  *rows]
    return lines


def write_report(root: Path, name: str, cfg: dict, data: dict, stages: dict, evaluation: dict, grid: str,
                 timings: dict) -> dict:
    results = evaluation["results"]
    ran = [s for s in STAGES if s in stages]  # the stages this pipeline ran, in order (the prior is optional)
    finals = {s: stages[s]["summary"].get("final") or {} for s in ran}
    stage_figures = {s: {k: finals[s].get(k) for k in stage_keys(s, finals[s])} for s in ran}
    stage_configs = {}
    for s in ran:
        path = Path(stages[s].get("run_dir") or root / s) / "config.yaml"  # in phases: the last phase's
        stage_configs[s] = yaml.safe_load(path.read_text()) if path.is_file() else None
    phases = {s: [_phase(p, stage_keys(s, p["summary"].get("final") or {})) for p in stages[s].get("phases") or []]
              for s in ran}
    report = {
        "name": name,
        "data": data,
        "stages": {s: {"ckpt": stages[s]["ckpt"], "skipped": stages[s]["skipped"], "seconds": stages[s]["seconds"],
                       "figures": stage_figures[s], "best": (stages[s]["summary"].get("best") or {}),
                       "config": stage_configs[s], **({"phases": phases[s]} if phases[s] else {})}
                   for s in ran},
        "evaluation": {"results": results, "config": evaluation["config"], "json": evaluation["json"],
                       "plot": evaluation["plot"],
                       **{k: evaluation[k] for k in ("unclip", "compare") if k in evaluation}},
        "samples": grid,
        "timings_seconds": timings,
        "pipeline_config": cfg,
    }
    json_path = root / "report.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, json_path)

    guidance = evaluation["config"]["guidance"]
    backends = evaluation["config"]["backends"]
    lines = [f"# lit_diffusion pipeline report: {name}", "",
             f"Data: train `{data['train_urls']}`, val `{data['val_urls']}`.", "",
             "## Stages", "", "| stage | time | figures |", "|---|---|---|"]
    for s in ran:
        figures = ", ".join(f"{k} = {_fmt(v)}" for k, v in stage_figures[s].items())
        lines.append(f"| {s} | {_minutes(stages[s]['seconds'])} | {figures} |")
        for phase in phases[s]:  # the chain: each phase and the checkpoint it started from
            start = f"from `{os.path.relpath(phase['init_from'], root)}`, " if phase["init_from"] else ""
            figures = ", ".join(f"{k} = {_fmt(v)}" for k, v in phase["figures"].items())
            lines.append(f"| {s} phase {phase['name']} | {_minutes(phase['seconds'])} | {start}{figures} |")
    lines += ["", f"## Evaluation ({int(results.get('eval/num_samples', 0))} val captions, "
                  f"sampler {evaluation['config']['sampler'] or 'model default'}, "
                  f"{evaluation['config']['steps'] or 'default'} steps)", ""]
    if any(f"eval/fcd_g{g:.1f}" in results for g in guidance):  # a video model (`evaluation.video`)
        lines += _video_lines(results, guidance)
    else:
        header = ["guidance", *[f"FID ({b})" for b in backends], "CLIP score", "caption accuracy"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for g in guidance:
            row = [f"{g:g}", *[_fmt(results.get(f"eval/fid_{b}_g{g:.1f}")) for b in backends],
                   _fmt(results.get(f"eval/clip_score_g{g:.1f}")), _fmt(results.get(f"eval/caption_acc_g{g:.1f}"))]
            lines.append("| " + " | ".join(row) + " |")
    detail = (*KINDS, *ATTRIBUTES)
    if any(f"eval_detail/caption_{k}_g{g:.1f}" in results for k in detail for g in guidance):
        lines += ["", "Caption accuracy by caption kind, and of each attribute over all captions:", "",
                  "| guidance | " + " | ".join(k.replace("_", " ") for k in detail) + " |",
                  "|" + "---|" * (len(detail) + 1)]
        for g in guidance:
            lines.append(f"| {g:g} | " + " | ".join(_fmt(results.get(f"eval_detail/caption_{k}_g{g:.1f}"))
                                                    for k in detail) + " |")
        lines += _vae_ceiling_lines(results, "caption", "images")
    lines += _relation_word_lines(results, guidance)
    if "unclip" in evaluation:
        lines += _unclip_lines(evaluation["unclip"], guidance, backends)
    if "compare" in evaluation:
        lines += _compare_lines(evaluation["compare"], results, guidance, backends)
    lines += ["", "## Timings", ""]
    lines += [f"- {k}: {_minutes(v)}" for k, v in timings.items()]
    rel = lambda p: os.path.relpath(p, root) if p else None  # noqa: E731
    lines += ["", "## Files", "", f"- samples: `{rel(grid)}`", f"- FID vs CLIP score: `{rel(evaluation['plot'])}`",
              f"- evaluation JSON: `{rel(evaluation['json'])}`", "- checkpoints: " + ", ".join(
                  f"`{rel(stages[s]['ckpt'])}`" for s in ran), ""]
    if grid:
        lines += [f"![samples]({rel(grid)})", ""]
    if evaluation["plot"]:
        lines += [f"![FID vs CLIP score]({rel(evaluation['plot'])})", ""]
    md_path = root / "report.md"
    md_path.write_text("\n".join(lines))
    return {"md": str(md_path), "json": str(json_path), "report": report}
