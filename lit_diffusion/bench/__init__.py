"""`lit-diffusion bench`: each part of the framework against a plain baseline timed in the same run.

Every figure is a ratio framework / baseline from runs interleaved with the baseline's (alternating order), taking
medians, so a busy machine slows both sides alike; both absolute numbers are reported next to it. A module per section:
  data      DataModule samples/s vs a raw webdataset + PIL loop (bench.data)                     target >= 0.9
  train     steps/s of Lightning `fit` vs a hand-written loop, per stage (bench.train)            target >= 0.95
            (clip, vae, ldm: U-Net + DDPM, ldm_dit: DiT + rectified flow)
  sampling  each sampler's loop vs the bare U-Net forwards it performs; batched CFG vs 2 calls  target <= 1.05
  eval      second in-loop evaluation (real statistics cached) vs the first (bench.evaluation)   target <= 0.6
  memory    peak RSS of training on 10x the shards vs 1x, same steps (streaming, not loading)  target <= 1.10
  latents   LDM steps/s from latent shards vs online encoding; their loader vs raw webdataset; 10x RSS; bytes
  video     VideoDataModule clips/s vs a raw webdataset + PyAV loop on mp4 shards; 10x RSS          target >= 0.9
bench.common holds what they share (settings, rows, the table, stage building); bench.flops counts model FLOPs per
training step (FlopCounterMode), for MFU on a GPU. This module runs the sections and holds the CLI.

Heavy imports (torch, lightning) happen inside the functions, so `lit-diffusion --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from lit_diffusion.bench.common import CONFIG_DIR, Settings, build_stage, format_table, machine_info, make_shapes
from lit_diffusion.bench.evaluation import bench_eval, eval_notes, randomise_output
from lit_diffusion.bench.flops import base_config_estimate, peak_flops_for
from lit_diffusion.bench.memory import bench_memory
from lit_diffusion.bench.sampling import bench_sampling
from lit_diffusion.bench.train import bench_train

SECTIONS = ("data", "train", "sampling", "eval", "memory", "latents", "video")


def run_bench(what: str = "all", quick: bool = False, json_out: str | None = None, device: str | None = None,
              precision: str = "32-true", data_dir: str | None = None, clip_ckpt: str | None = None,
              vae_ckpt: str | None = None, work_dir: str | None = None, repeats: int | None = None,
              inception_weights: str | None = None, peak_tflops: float | None = None,
              settings: Settings | None = None, threads: int | None = None) -> dict:
    """Run the `what` benchmark(s) ("all" or one of SECTIONS); -> the report (also written to `json_out`).

    `threads`: torch intra-op threads while measuring; default 1 on CPU: on a shared machine more threads than
    free cores make OpenMP spin-wait, and small-op loops (samplers, Lightning hooks) then slow down by 10x+."""
    import torch

    sections = SECTIONS if what == "all" else (what,)
    if any(s not in SECTIONS for s in sections):
        raise ValueError(f"bench: unknown benchmark {what!r}; choose all or one of {', '.join(SECTIONS)}")
    settings = settings or Settings(quick=quick, repeats=repeats)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    if threads or device == "cpu":
        torch.set_num_threads(threads or 1)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lit_diffusion_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(device), "settings": dict(vars(settings)), "rows": [], "details": {},
              "notes": []}
    try:
        with _quiet():
            _run_sections(report, sections, settings, work, device, precision, data_dir, clip_ckpt, vae_ckpt,
                          inception_weights, peak_tflops)
    finally:
        torch.set_num_threads(threads_before)
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["notes"] += _notes(report)
    report["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2, default=str))
    return report


def _run_sections(report: dict, sections, settings: Settings, work: Path, device: str, precision: str,
                  data_dir: str | None, clip_ckpt: str | None, vae_ckpt: str | None, inception_weights: str | None,
                  peak_tflops: float | None) -> None:
    shapes_dir = Path(data_dir) if data_dir else None
    if shapes_dir is None and set(sections) - {"memory", "video"}:
        shapes_dir = make_shapes(work / "shapes", settings)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops_for(report["machine"].get("gpu"))
    ldm = None
    for section in sections:
        start = time.perf_counter()
        if section == "data":
            from lit_diffusion.bench.data import bench_data_section  # imports torch and webdataset at once

            rows, details = bench_data_section(shapes_dir, settings)
        elif section == "train":
            rows, details = bench_train(shapes_dir, work, device, settings, precision, clip_ckpt, vae_ckpt,
                                        peak_flops=peak)
            # the GPU-scale configs, sized on the meta device: U-Net (base.yaml), DiT-B/2, DiT-XL/2 (base_dit_*.yaml)
            details["ldm_gpu_config_estimates"] = {path.name: base_config_estimate(path)
                                                   for path in sorted((CONFIG_DIR / "ldm").glob("base*.yaml"))}
        elif section in ("sampling", "eval"):
            ldm = ldm or build_stage("ldm", shapes_dir, work, settings.quick, clip_ckpt, vae_ckpt)[0]
            if section == "sampling":
                rows, details = bench_sampling(ldm, device, settings)
            else:
                randomise_output(ldm)  # the bench's U-Net is always freshly initialised
                weights = inception_weights
                if weights is None:
                    from lit_diffusion.metrics.features import save_random_inception_weights

                    weights = str(save_random_inception_weights(work / "inception_random.pth"))
                    report["notes"].append("eval inception backend: random InceptionV3 weights (timing only)")
                rows, details = bench_eval(ldm.to(device), shapes_dir, work, settings, ("clip", "inception"),
                                           weights)
        elif section == "latents":
            from lit_diffusion.bench.latents import bench_latents

            rows, details = bench_latents(shapes_dir, work, device, settings)
        elif section == "video":
            from lit_diffusion.bench.video import bench_video

            rows, details = bench_video(work, settings)
        else:
            rows, details = bench_memory(work, settings)
        details["bench_seconds"] = time.perf_counter() - start
        report["rows"] += rows
        report["details"][section] = details


@contextmanager
def _quiet():
    """Lightning's per-fit banners and warnings (no logger, eval-mode frozen stages, ...) would bury the table."""
    import logging

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lit_diffusion")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _notes(report: dict) -> list[str]:
    notes = eval_notes(report["details"].get("eval", {}))
    if report["machine"]["device"] == "cpu":
        notes.append("CPU run: the GPU path (bf16-mixed, compile, channels_last, fused AdamW, flash SDPA) is not "
                     "timed here; MFU needs a GPU")
    return notes


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from lit_diffusion.runtime.arguments import positive_count
    p.add_argument("what", nargs="?", default="all", choices=("all", *SECTIONS), help="which benchmark (default all)")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--quick", action="store_true", help="tiny models and few repeats (a smoke run)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--precision", default="32-true", help="training precision for both sides, e.g. bf16-mixed")
    p.add_argument("--data", default=None, help="a shapes folder (train-*.tar, val-*.tar, tokenizer.json) to use "
                                                "instead of drawing one")
    p.add_argument("--clip-ckpt", default=None, help="CLIP checkpoint for the LDM (default: an untrained one)")
    p.add_argument("--vae-ckpt", default=None, help="VAE checkpoint for the LDM (default: an untrained one)")
    p.add_argument("--repeats", type=positive_count, default=None, help="interleaved repeats per measurement")
    p.add_argument("--inception-weights", default=None, help="InceptionV3 file for the eval bench (default: random)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--threads", type=positive_count, default=None,
                   help="torch threads while measuring (default: 1 on CPU)")
    p.add_argument("--work-dir", default=None, help="keep generated data and checkpoints here")


def cmd_bench(args) -> None:
    report = run_bench(args.what, quick=args.quick, json_out=args.json, device=args.device,
                       precision=args.precision, data_dir=args.data, clip_ckpt=args.clip_ckpt,
                       vae_ckpt=args.vae_ckpt, work_dir=args.work_dir, repeats=args.repeats,
                       inception_weights=args.inception_weights, peak_tflops=args.peak_tflops,
                       threads=args.threads)
    print(format_table(report))


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against plain baselines (ratios, JSON)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
