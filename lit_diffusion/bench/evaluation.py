"""eval: the second in-loop evaluation of one Evaluator (real statistics cached in memory) against its first
(target <= 0.6); a third run with a fresh Evaluator reads them from the disk cache."""

from __future__ import annotations

from pathlib import Path

from lit_diffusion.bench.common import Settings, median, row, timed
from lit_diffusion.bench.flops import denoiser_network


def bench_eval(module, shapes_dir: Path, work: Path, settings: Settings, backends=("clip",),
               inception_weights: str | None = None) -> tuple[list[dict], dict]:
    """Evaluator.run twice per fresh Evaluator (1st computes the real statistics, 2nd reuses them from memory),
    then once more with a new Evaluator (from the disk cache); real set = generated set = eval_samples."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator

    module = module.eval()
    n = settings.eval_samples
    dm = ImageCaptionDataModule(train_urls=None, val_urls=str(shapes_dir / "val-*.tar"),
                                image_size=settings.image_size, batch_size=n, num_workers=0)
    rows, details = [], {}
    # untimed warm-up: first-call costs (allocator, kernels, tokenizer caches) would flatter the ratio
    Evaluator(EvalConfig(guidance=[3.0], num_samples=n, backends=["clip"], sampler="ddim", steps=settings.eval_steps,
                         resolution=settings.image_size, caption_accuracy=False), module.clip).run(
        module, dm.eval_dataloader(n))
    for backend in backends:
        runs = {"first": [], "second": [], "disk": []}
        generate = {"first": [], "second": []}
        sources = []
        for r in range(settings.repeats):
            cfg = EvalConfig(guidance=[3.0], num_samples=n, backends=[backend], inception_weights=inception_weights,
                             sampler="ddim", steps=settings.eval_steps, cache_dir=str(work / f"fid_cache_{r}"),
                             data_id=f"bench-{r}", resolution=settings.image_size,
                             caption_accuracy=False)  # what the cache saves: no judge (nor its first-run VAE ceiling)
            evaluator = Evaluator(cfg, module.clip)
            for kind in ("first", "second"):
                evaluator.run(module, dm.eval_dataloader(n))
                runs[kind].append(evaluator.timings[-1]["seconds"])
                generate[kind].append(evaluator.timings[-1]["generate_seconds"])
            again = Evaluator(cfg, module.clip)
            again.run(module, dm.eval_dataloader(n))
            runs["disk"].append(again.timings[-1]["seconds"])
            sources.append([t["real_stats"][backend] for t in (*evaluator.timings, *again.timings)])
        first, second = median(runs["first"]), median(runs["second"])
        # a fixed cost of every evaluation that no cache removes: the Frechet distance given the real side's root
        from lit_diffusion.metrics.fid import frechet_distance

        real = evaluator.real_stats[backend]
        frechet_seconds, _ = timed(lambda: frechet_distance(real.mu, real.sigma, real.mu, real.sigma,
                                                            root1=real.root), "cpu")
        rows.append(row("eval", f"{backend} features, {n} samples", "s/eval", second, first, "<=", 0.6,
                        framework_label="2nd evaluation (cached real stats)", baseline_label="1st evaluation"))
        details[backend] = {"seconds": runs, "generate_seconds": generate, "real_stats_sources": sources,
                            "disk_over_first": median(runs["disk"]) / first, "num_samples": n,
                            "frechet_distance_seconds": frechet_seconds, "feature_dim": int(real.mu.numel()),
                            "sampler_steps": settings.eval_steps, "guidance": [3.0]}
    return rows, details



def randomise_output(module) -> None:
    """The denoiser's zero-initialised output layers make every sample alike; small random weights instead, so the
    evaluation's generated images vary like a trained model's (timing is unaffected)."""
    import torch

    with torch.no_grad():
        for p in denoiser_network(module).parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)


def eval_notes(details: dict) -> list[str]:
    """Where the 0.6 target is out of reach: the work no cache removes is already more than 0.6 of the first run."""
    notes = []
    for backend, d in ((b, details.get(b)) for b in ("clip", "inception")):
        if not d:
            continue
        first = median(d["seconds"]["first"])
        gen = median(d["generate_seconds"]["second"])  # sampling + generated-image features + CLIP score
        fixed = (gen + d["frechet_distance_seconds"]) / first
        if fixed > 0.6:
            notes.append(f"eval {backend}: work no cache can remove (generation and its features {gen:.2f} s, the "
                         f"{d['feature_dim']}-d Frechet distance {d['frechet_distance_seconds']:.2f} s) is "
                         f"{fixed:.0%} of the first evaluation ({first:.2f} s), so the 2nd/1st ratio cannot reach "
                         f"0.6 at {d['num_samples']} samples")
    return notes
