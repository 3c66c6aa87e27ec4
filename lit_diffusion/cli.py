"""The one entry point, `lit-diffusion` (also `python -m lit_diffusion`, and the script `fabric run` launches).

fit | validate | test    LightningCLI on a stage config (`--config configs/clip/shapes.yaml --trainer.max_steps 10`)
data shapes | moving-shapes | convert   make WebDataset shards (the embedded image or video data, or yours)
data encode             latent shards: every image and caption through the frozen VAE and CLIP, once
clip query              rank images for a caption with a CLIP checkpoint
sample                  images from a latent-diffusion checkpoint (guidance, negative prompts, samplers)
evaluate                FID, CLIP score and caption accuracy of a checkpoint across guidance scales
toy                     the 2-D spiral that the DDPM/DDIM papers draw
sweep | compare         offline W&B sweeps and the comparison of their runs
pipeline                the main job: CLIP -> VAE -> latent diffusion -> evaluation -> report
import vae | clip       a stage checkpoint from published weights (diffusers / SD VAE; OpenAI, open_clip, HF CLIP)
bench                   benchmarks against plain baselines
export                  a checkpoint to diffusers (VAE), transformers or open_clip (CLIP)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lit_diffusion.runtime.arguments import comma_floats, finite_float, number_at_least, positive_count, whole_number

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _new_output(path, option: str) -> None:
    """Refuse an output file that would overwrite earlier work (an export's folder: `export.check_new_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give the file to write")
    elif path.exists():
        raise ValueError(f"{option} {path} exists; remove it or choose another path")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------------- data
def _aspect_ratios(text: str) -> tuple[str, ...]:
    from lit_diffusion.data.shapes import parse_aspect_ratios

    try:
        return parse_aspect_ratios(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_data_shapes(args) -> None:
    from lit_diffusion.data.shapes import canvas_size, write_shapes

    for ratio in args.aspect_ratios:  # a canvas too small at this --size: name the option, before writing anything
        try:
            canvas_size(ratio, args.size, args.multiple)
        except ValueError as err:
            raise ValueError(f"--aspect-ratios {ratio} with --size {args.size}: {err}") from None
    summary = write_shapes(args.out, train=args.train, val=args.val, size=args.size, shard_size=args.shard_size,
                           seed=args.seed, aspect_ratios=args.aspect_ratios, multiple=args.multiple)
    _print_json(summary)


def cmd_data_moving_shapes(args) -> None:
    from lit_diffusion.data.moving_shapes import write_moving_shapes

    _print_json(write_moving_shapes(args.out, train=args.train, val=args.val, size=args.size, frames=args.frames,
                                    shard_size=args.shard_size, seed=args.seed,
                                    grow_probability=args.grow_probability))


def cmd_data_convert(args) -> None:
    from lit_diffusion.data.convert import convert

    summary = convert(args.inputs, args.out, prefix=args.prefix, shard_size=args.shard_size, path_key=args.path_key,
                      caption_key=args.caption_key, overwrite=args.overwrite)
    _print_json(summary)


def cmd_data_tokenizer(args) -> None:
    from lit_diffusion.data.tokenizer import train_from_shards

    _new_output(args.out, "--out")
    tok = train_from_shards(args.data, args.out, vocab_size=args.vocab_size, context_length=args.context_length,
                            max_captions=args.max_captions)
    _print_json({"out": args.out, "vocab_size": tok.vocab_size, "context_length": tok.context_length})


def _distributed_from_env(device: str):
    """Join the launcher's process group (torchrun / `fabric run`: RANK, WORLD_SIZE, LOCAL_RANK; SLURM `srun`:
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR and MASTER_PORT set by the job script); returns
    this process's torch device."""
    import os

    import torch
    import torch.distributed as dist

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if int(env.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} but MASTER_ADDR / MASTER_PORT are not set: start "
                             f"with torchrun or `fabric run`, or export them in the SLURM job script")
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)


def _not_into_the_inputs(urls, out) -> None:
    """Latent shards written into a folder of the image shards they are read from would mix with them."""
    from lit_diffusion.data.shards import expand_urls

    given = urls.items() if isinstance(urls, dict) else [(None, urls)]
    folders = {Path(u).resolve().parent for split, spec in given for u in expand_urls(spec, split=split)
               if "://" not in u and not u.startswith("pipe:")}
    if Path(out).resolve() in folders:
        raise ValueError(f"--out {out} is the folder of the shards it encodes: give the latents a folder of their own")


def cmd_data_encode(args) -> None:
    import torch
    import torch.distributed as dist

    from lit_diffusion.data.encode import encode_shards
    from lit_diffusion.stages.encoders import frozen_encoders

    if (args.data is None) == (args.train is None):
        raise ValueError("data encode: give --data (one set of shards) or --train [--val] (splits), not both")
    if args.val is not None and args.train is None:
        raise ValueError("data encode: --val needs --train")
    urls = args.data if args.data is not None else {"train": args.train, **({"val": args.val} if args.val else {})}
    _not_into_the_inputs(urls, args.out)
    device = _distributed_from_env(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image_size = args.image_size
    if image_size is None:  # the size the VAE was trained at, from its data module's saved hyperparameters
        from lit_diffusion.stages.base import load_stage_checkpoint

        ckpt = load_stage_checkpoint(args.vae, "vae")  # a missing, damaged or other stage's file: one clear line
        image_size = (ckpt.get("datamodule_hyper_parameters") or {}).get("image_size")
        if image_size is None:
            raise ValueError(f"{args.vae} does not say what image size the VAE was trained at: pass --image-size")
    encoders = frozen_encoders(args.clip, args.vae, device, std=args.std)

    buckets = None
    if args.buckets:
        from lit_diffusion.data.buckets import BucketConfig

        try:
            buckets = BucketConfig(**{"base_size": image_size, **json.loads(args.buckets)})
        except (TypeError, ValueError) as err:
            raise ValueError(f"--buckets {args.buckets}: {err}") from None
    manifest = encode_shards(urls, args.out, encoders.encode_images, encoders.encode_captions,
                             image_size=image_size, clip_hash=encoders.clip_hash, vae_hash=encoders.vae_hash,
                             latent_scale=encoders.latent_scale, dtype=args.dtype, flips=args.flips, std=args.std,
                             batch_size=args.batch_size, buckets=buckets, image_embeddings=args.image_embeddings,
                             embed_images=encoders.embed_images, clip_image_size=encoders.clip_image_size,
                             frames=args.frames, patch_features=args.patch_features,
                             encode_patches=encoders.patch_features)
    if manifest is not None:
        _print_json({k: manifest[k] for k in ("samples", "skipped", "dtype", "shapes", "clip_hash", "vae_hash")}
                    | {"shards": len(manifest["shards"]), "out": str(args.out)})
    if dist.is_initialized():
        dist.destroy_process_group()


def add_data(sub) -> None:
    data = sub.add_parser("data", help="make WebDataset shards").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("shapes", help="draw the embedded default data: captioned shapes")
    p.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar and tokenizer.json")
    p.add_argument("--train", type=whole_number(0), default=5000, help="training samples")
    p.add_argument("--val", type=whole_number(0), default=500, help="validation samples")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (of a non-square canvas: sqrt(W * H))")
    p.add_argument("--aspect-ratios", type=_aspect_ratios, default=("1:1",), metavar="W:H,...",
                   help="canvas aspect ratios, one drawn per sample, e.g. 1:1,3:2,2:3,2:1,1:2 (default: 1:1)")
    p.add_argument("--multiple", type=int, default=2,
                   help="round non-square canvases' sides to multiples of this (8: the sizes a f=4 VAE and a U-Net "
                        "with one downsampling take as they are)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("moving-shapes", help="draw the embedded video data: captioned clips of moving shapes")
    p.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar and tokenizer.json")
    p.add_argument("--train", type=whole_number(0), default=5000, help="training clips")
    p.add_argument("--val", type=whole_number(0), default=500, help="validation clips")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels")
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--grow-probability", type=float, default=0.0,
                   help="chance that an object also grows (small to large) or shrinks over the clip")
    p.add_argument("--shard-size", type=int, default=1000, help="clips per shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_moving_shapes)
    p = data.add_parser("convert", help="an image folder with .txt captions, or a CSV/JSONL of (path, caption)")
    p.add_argument("inputs", nargs="+", help="image folder(s), .csv or .jsonl files")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train", help="shard name prefix (train, val)")
    p.add_argument("--shard-size", type=positive_count, default=1000)
    p.add_argument("--path-key", default="path", help="CSV / JSONL: the column of image paths")
    p.add_argument("--caption-key", default="caption", help="CSV / JSONL: the column of captions")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of this prefix already in --out")
    p.set_defaults(func=cmd_data_convert)
    p = data.add_parser("tokenizer", help="train a BPE tokenizer on the captions of shards")
    p.add_argument("--data", required=True, help="training shards (brace pattern, glob, folder)")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=positive_count, default=8192)
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--max-captions", type=positive_count, default=200_000)
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("encode", help="image-caption shards -> latent shards (VAE latents, CLIP text features), "
                                       "once, on every rank of torchrun / fabric run / srun; a rerun resumes")
    p.add_argument("--clip", required=True, help="CLIP checkpoint (stage 1)")
    p.add_argument("--vae", required=True, help="VAE checkpoint (stage 2)")
    p.add_argument("--data", default=None, help="image-caption shards (brace pattern, glob, folder, list with ::); "
                                                "each output shard is named after its input shard")
    p.add_argument("--train", default=None, help="instead of --data: the train split's shards -> OUT/train/NNNNNN.tar "
                                                 "(any input names and layouts)")
    p.add_argument("--val", default=None, help="with --train: the val split's shards -> OUT/val/NNNNNN.tar")
    p.add_argument("--out", required=True, help="folder for the latent shards and manifest.json")
    p.add_argument("--flips", action="store_true", help="also the latents of the mirrored images (flip augmentation)")
    p.add_argument("--std", action="store_true", help="also the posterior std (training can sample the posterior)")
    p.add_argument("--image-embeddings", action="store_true",
                   help="also each image's CLIP image embedding and their train mean/std (unCLIP's prior)")
    p.add_argument("--patch-features", action="store_true",
                   help="also each image's CLIP patch tokens (after the last block and ln_post), in --dtype: REPA's "
                        "target (model.init_args.repa) when training from latent shards")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=positive_count, default=None,
                   help="pixels (default: the size the VAE trained at); with --buckets, their base size")
    p.add_argument("--buckets", default=None, help='aspect buckets as JSON, e.g. \'{"step": 8}\' or '
                                                   '\'{"sizes": [[32, 32], [24, 48]], "step": 8}\' (data.buckets.'
                                                   'BucketConfig fields): each image encoded at its bucket\'s size')
    p.add_argument("--frames", type=positive_count, default=None,
                   help="video-caption shards: each clip's first N frames through the VAE frame by frame, latents "
                        "[N, C, h, w] (the video diffusion stage's model.init_args.frames)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.set_defaults(func=cmd_data_encode)


def _setup_logging() -> None:
    """Our own messages at INFO on stderr. No root handler (Lightning keeps its own): no duplicate lines."""
    ours = logging.getLogger("lit_diffusion")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s lit_diffusion: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def _usage_error(err: BaseException | None):
    """The UsageError that `err` is or was caused by (jsonargparse wraps the error of a class it instantiates, a
    stage's refused checkpoint, in a ValueError of its own), else None."""
    from lit_diffusion.errors import UsageError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UsageError):
            return err
        seen.add(id(err))
        # `raise ... from None` hides the context: an error raised while handling a UsageError is not one
        err = err.__cause__ if err.__cause__ is not None or err.__suppress_context__ else err.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lit_diffusion.runtime.launch import apply_launcher_env
        from lit_diffusion.runtime.lightning_cli import run_lightning_cli

        try:
            run_lightning_cli(apply_launcher_env(argv))
        except Exception as err:  # a UsageError, also from inside Lightning's fit or wrapped by jsonargparse's
            # instantiation of the classes, is one line; any other error keeps its traceback: it may be a bug
            usage = _usage_error(err)
            if usage is None:
                raise
            print(f"lit-diffusion {argv[0]}: error: {usage}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    parser = argparse.ArgumentParser(prog="lit-diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `lit-diffusion {name} --help`)")
    add_data(sub)
    for extra in _EXTRA_COMMANDS:
        extra(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError) as err:
        # user errors (a missing input, a file where a folder goes, ...): one clear line, no traceback
        print(f"lit-diffusion {args.cmd}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# -------------------------------------------------------------------------------------------------- sampling
def cmd_sample(args) -> None:
    import torch

    from lit_diffusion.evaluation.evaluator import AspectRatioError, sample_size
    from lit_diffusion.evaluation.plots import save_grid, save_video_grid
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    if args.aspect is not None and (args.height is not None or args.width is not None):
        raise ValueError(f"--aspect {args.aspect} and --height/--width both give the size: give one of them")
    if Path(args.out).is_dir():  # found before sampling, not when the grid is saved
        raise ValueError(f"--out {args.out} is a folder; give the image file to write (e.g. samples.png)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LatentDiffusionModule.from_checkpoint(args.ckpt, map_location=device)
    unclip_options = [flag for flag, value in (("--prior", args.prior), ("--image", args.image),
                                               ("--interpolate", args.interpolate), ("--edit", args.edit))
                      if value is not None]
    unclip_only = unclip_options + [flag for flag, value in (("--from", args.from_caption), ("--thetas", args.thetas),
                                                             ("--prior-guidance", args.prior_guidance))
                                    if value is not None]
    if unclip_only and not model.image_conditioned:
        raise ValueError(f"{', '.join(unclip_only)}: {args.ckpt} is not an unCLIP decoder (it is conditioned on "
                         f"text only, condition: {model.hparams.condition}); these options need a decoder trained "
                         f"with condition text+image_embedding or image_embedding")
    try:  # this model's default in every mode (edits too); refused for a text model
        model.use_image_guidance(args.image_guidance)
    except ValueError as err:
        raise ValueError(f"--image-guidance: {err}") from None
    if model.image_conditioned and not unclip_options:
        raise ValueError(f"{args.ckpt} is an unCLIP decoder (condition: {model.hparams.condition}): it decodes CLIP "
                         f"image embeddings, so give where they come from: {UNCLIP_SOURCES}")
    height, width, size_note = args.height, args.width, ""
    if args.aspect is not None:
        try:
            height, width = sample_size(model, args.aspect)
        except AspectRatioError as err:
            raise ValueError(f"--aspect {err}") from None
        size_note = f", {width}x{height} px ({args.aspect})"
    elif height is not None or width is not None:
        try:
            model.latent_shape(height, width)  # the model's own check, before any sampling
        except ValueError as err:
            given = " ".join(f"--{k} {v}" for k, v in (("height", height), ("width", width)) if v is not None)
            raise ValueError(f"{given}: {err}") from None
        base = int(model.hparams.image_size)
        size_note = f", {width or base}x{height or base} px"
    if unclip_options:
        _sample_unclip(args, model, height, width, size_note, device)
        return
    if not args.prompt:
        raise ValueError("--prompt is required: a caption (repeat for more rows)")
    video = int(getattr(model.hparams, "frames", 1)) > 1
    if args.frames is not None and not video:
        raise ValueError(f"--frames {args.frames}: {args.ckpt} is an image model (model.init_args.frames 1); "
                         f"--frames sets a video model's clip length, or --interpolate's frame count")
    frames = {"frames": args.frames} if video and args.frames is not None else {}
    guidance = model.hparams.guidance if args.guidance is None else args.guidance
    if guidance == 1 and (args.negative_prompt or args.guidance_rescale):
        logging.getLogger("lit_diffusion").warning(
            "guidance 1 samples the conditional branch alone: --negative-prompt and --guidance-rescale do nothing")
    rows, labels = [], []
    seeds = [args.seed + j for j in range(args.num)]  # column j: one seed for every prompt, as its title says
    for prompt in args.prompt:
        images = model.sample([prompt] * args.num, negative_prompts=args.negative_prompt, guidance=guidance,
                              sampler=args.sampler, steps=args.steps, seed=seeds, eta=args.eta,
                              guidance_rescale=args.guidance_rescale, clip_x0=args.clip_x0, progress=True,
                              height=height, width=width, **frames)
        rows.append(images.cpu())
        labels.append(prompt + (f"\n(negative: {args.negative_prompt})" if args.negative_prompt else ""))
    titles = [f"seed {seed}" for seed in seeds]
    title = (f"{args.sampler or model.hparams.sampler}, {args.steps or model.hparams.sample_steps} steps, "
             f"guidance {guidance:g}{size_note}")
    if video and args.frames == 1:  # a video model's one-frame clip is an image (joint image+video training)
        video = False
    if video:  # OUT (each clip's frames side by side) and OUT with .gif (animated)
        print("\n".join(map(str, save_video_grid(rows, labels, args.out, col_titles=titles, title=title))))
        return
    print(save_grid(rows, labels, args.out, col_titles=titles, title=title))


UNCLIP_SOURCES = ("--prior PRIOR.ckpt with --prompt, --image PATH [PATH ...] (variations), --interpolate A B, or "
                  "--edit NEW --from OLD --image PATH")


def _sample_unclip(args, model, height, width, size_note: str, device) -> None:
    """`sample` with an unCLIP decoder: captions through a prior, variations or interpolations of images, or text-diff
    edits (DALL-E 2 sec. 3); one grid as the text-to-image path writes it, a row per caption or input image."""
    import torch

    from lit_diffusion.evaluation.plots import save_grid
    from lit_diffusion.stages.prior import DiffusionPriorModule
    from lit_diffusion.unclip import EDIT_SAMPLERS, EDIT_THETAS, UnCLIP, load_image

    mode = ("edit" if args.edit is not None else "interpolate" if args.interpolate is not None
            else "variations" if args.image is not None else "prior")
    given = {"--prior": args.prior, "--image": args.image, "--interpolate": args.interpolate, "--prompt": args.prompt,
             "--from": args.from_caption, "--frames": args.frames, "--thetas": args.thetas,
             "--prior-guidance": args.prior_guidance}
    takes = {"prior": {"--prior", "--prompt", "--prior-guidance"}, "variations": {"--image"},
             "interpolate": {"--interpolate", "--frames"}, "edit": {"--image", "--from", "--thetas"}}[mode]
    extra = [flag for flag, value in given.items() if value is not None and flag not in takes]
    if extra:
        what = {"prior": "--prior (captions through the prior)", "variations": "--image (variations)",
                "interpolate": "--interpolate", "edit": "--edit"}[mode]
        raise ValueError(f"{what} does not take {', '.join(extra)}; give one of {UNCLIP_SOURCES}")
    if mode == "prior" and not args.prompt:
        raise ValueError("--prior needs --prompt: the captions whose image embeddings it samples")
    if mode == "edit":
        if args.from_caption is None:
            raise ValueError("--edit NEW needs --from OLD: the caption of the image as it is (the edit moves along "
                             "CLIP's text(NEW) - text(OLD))")
        if args.image is None or len(args.image) != 1:
            raise ValueError("--edit needs one --image PATH: the image to edit")
        fixed = [f for f, v in (("--sampler", args.sampler), ("--eta", args.eta), ("--clip-x0", args.clip_x0))
                 if v is not None]
        if fixed:
            raise ValueError(f"--edit decodes the inverted image with {EDIT_SAMPLERS[model.objective]} "
                             f"(deterministic, no clipping), the sampler its inversion runs backwards: drop "
                             f"{', '.join(fixed)}")
    prior = None
    if mode == "prior":
        prior = DiffusionPriorModule.from_checkpoint(args.prior, map_location=device)
    unclip = UnCLIP(prior, model, prior_source=str(args.prior), decoder_source=str(args.ckpt))
    h = model.hparams
    size = (height or int(h.image_size), width or int(h.image_size))
    guidance = h.guidance if args.guidance is None else args.guidance
    # --image-guidance given in the call, not only as the model's default: with the empty caption (variations,
    # interpolations) only a call's image_guidance replaces --guidance
    decoder = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance_rescale=args.guidance_rescale,
                   clip_x0=args.clip_x0, progress=True, height=height, width=width, image_guidance=args.image_guidance)
    sampler, steps = args.sampler or h.sampler, args.steps or h.sample_steps
    seeds = [f"seed {args.seed + j}" for j in range(args.num)]
    negative = f"\n(negative: {args.negative_prompt})" if args.negative_prompt else ""
    rows, labels = [], []
    if mode == "prior":
        for prompt in args.prompt:  # column j: one seed for every prompt, as its title says
            rows.append(unclip.generate([prompt] * args.num, negative_prompts=args.negative_prompt,
                                        seed=[args.seed + j for j in range(args.num)],
                                        guidance=guidance, prior_guidance=args.prior_guidance, **decoder).cpu())
            labels.append(prompt + negative)
        col_titles = seeds
        prior_guidance = prior.hparams.guidance if args.prior_guidance is None else args.prior_guidance
        what = f"unCLIP, prior guidance {prior_guidance:g}"
    elif mode == "variations":
        images = torch.stack([load_image(path, *size) for path in args.image])
        out = unclip.variations(images, per_image=args.num, seed=args.seed, guidance=guidance,
                                negative_prompts=args.negative_prompt, **decoder).cpu()
        rows = [torch.cat([image[None], variations]) for image, variations in zip(images, out)]
        labels = [Path(path).name + negative for path in args.image]
        col_titles = ["input", *seeds]
        what = "variations"
    elif mode == "interpolate":
        frames = 5 if args.frames is None else args.frames
        a, b = (load_image(path, *size) for path in args.interpolate)
        rows = [unclip.interpolate(a, b, frames=frames, seed=args.seed, guidance=guidance,
                                   negative_prompts=args.negative_prompt, **decoder).cpu()]
        labels = [f"{Path(args.interpolate[0]).name}\nto {Path(args.interpolate[1]).name}" + negative]
        col_titles = [f"theta {t:.2f}" for t in torch.linspace(0, 1, frames).tolist()]
        what = f"interpolation, seed {args.seed}"
    else:
        thetas = EDIT_THETAS if args.thetas is None else tuple(args.thetas)
        image = load_image(args.image[0], *size)
        frames = unclip.edit(image, args.from_caption, args.edit, thetas=thetas, guidance=guidance, steps=args.steps,
                             guidance_rescale=args.guidance_rescale, negative_prompts=args.negative_prompt).cpu()
        rows = [torch.cat([image[None], frames])]
        labels = [f"{args.from_caption}\nto {args.edit}" + negative]
        col_titles = ["input", *(f"theta {t:g}" for t in thetas)]
        sampler = EDIT_SAMPLERS[model.objective]
        what = "text diff from the inverted image"
    out = save_grid(rows, labels, args.out, col_titles=col_titles,
                    title=f"{what}: {sampler}, {steps} steps, guidance {guidance:g}{size_note}")
    print(out)


def _aspect_ratio(text: str) -> str:
    """One aspect ratio W:H, reduced ("4:2" -> "2:1")."""
    ratios = _aspect_ratios(text)
    if len(ratios) != 1:
        raise argparse.ArgumentTypeError(f"expected one aspect ratio W:H such as 3:2, got {text!r}")
    return ratios[0]


ASPECT_HELP = ("at the checkpoint's base area (image_size**2 px): the ideal sides image_size * sqrt(W/H) and "
               "image_size * sqrt(H/W) are each rounded down and up to the multiple the model needs (VAE factor x "
               "2**U-Net downsamplings, or x DiT patch); of those sizes the nearest W:H in log aspect ratio, then the "
               "area nearest image_size**2 (1:1 is image_size x image_size)")


def _add_guidance_rescale_and_clip_x0(p) -> None:
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="0..1: blend in the guided output rescaled to the conditional one's std (Lin et al. 2024; "
                        "0 = plain guidance; default: the checkpoint's)")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp each step's predicted x0 (scaled latents) to [-v, v] (0 = off; default: the "
                        "checkpoint's)")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="images from a latent-diffusion checkpoint",
                       description="Text to image; with an unCLIP decoder as --ckpt: " + UNCLIP_SOURCES + ".")
    p.add_argument("--ckpt", required=True, help="ldm checkpoint (stage 3); with the unCLIP options, the decoder")
    p.add_argument("--prompt", action="append", default=None, help="a caption; repeat for more rows")
    p.add_argument("--negative-prompt", default=None, help="pushed away from (replaces the empty prompt in CFG; "
                                                           "with --prior, in the prior's guidance too)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (1 = none; default: the checkpoint's)")
    p.add_argument("--sampler", default=None, help="ddim | ddpm | dpmpp_2m (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_count, default=None)
    p.add_argument("--eta", type=number_at_least(0), default=None, help="DDIM eta (0 = deterministic)")
    _add_guidance_rescale_and_clip_x0(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the checkpoint's image_size); a "
                                                            "multiple of what the model needs, which an error names")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the checkpoint's image_size)")
    p.add_argument("--aspect", type=_aspect_ratio, default=None, metavar="W:H",
                   help="instead of --height/--width: the size of this aspect ratio, e.g. 3:2, " + ASPECT_HELP)
    p.add_argument("--num", type=positive_count, default=4,
                   help="images per prompt (with --image: variations per image)")
    unclip = p.add_argument_group("unCLIP (DALL-E 2): --ckpt is the decoder, one of these gives its image embeddings")
    unclip.add_argument("--prior", default=None, metavar="PRIOR.ckpt",
                        help="captions (--prompt) through this prior to CLIP image embeddings, then the decoder")
    unclip.add_argument("--prior-guidance", type=float, default=None,
                        help="the prior's guidance scale (default: the prior checkpoint's)")
    unclip.add_argument("--image-guidance", type=float, default=None,
                        help="the decoder's guidance scale for the image embedding, apart from the caption's "
                             "(--guidance then guides the caption on top of it; a third forward per step); with the "
                             "empty caption (--image, --interpolate) the only scale; default: the checkpoint's, else "
                             "one scale for both")
    unclip.add_argument("--image", nargs="+", default=None, metavar="PATH",
                        help="variations: each image's CLIP embedding decoded --num times, one seed each; with "
                             "--edit, the image to edit. Read as RGB, resized and centre-cropped to the sample size")
    unclip.add_argument("--interpolate", nargs=2, default=None, metavar=("A", "B"),
                        help="slerp between the CLIP embeddings of images A and B, the same noise in every frame")
    p.add_argument("--frames", type=positive_count, default=None,
                   help="a video checkpoint: frames per clip (default: its own; writes OUT and OUT.gif); "
                        "--interpolate: frames from A to B (default 5)")
    unclip.add_argument("--edit", default=None, metavar="NEW",
                        help="text diff: move --image's embedding towards CLIP's text(NEW) - text(OLD), decoded "
                             "from the image's inverted latent (needs --from)")
    unclip.add_argument("--from", dest="from_caption", default=None, metavar="OLD",
                        help="--edit: the caption of the image as it is")
    unclip.add_argument("--thetas", type=comma_floats, default=None,
                        help="--edit: slerp weights towards the text diff (default 0,0.1,0.2,0.3,0.4,0.5)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)


def cmd_evaluate(args) -> None:
    from lit_diffusion.evaluation.evaluator import AspectRatioError, EvalConfig, describe_fid_reals, evaluate_checkpoint

    cfg = EvalConfig(guidance=args.guidance, num_samples=args.num_samples, backends=args.features.split(","),
                     inception_weights=args.inception_weights, sampler=args.sampler, steps=args.steps,
                     guidance_rescale=args.guidance_rescale, clip_x0=args.clip_x0, seed=args.seed,
                     cache_dir=args.cache_dir, save_images=args.save_images, aspect_ratios=args.aspect_ratios,
                     image_guidance=args.image_guidance)
    if args.aspect_ratios and args.save_images:
        raise ValueError("--save-images with --aspect-ratios is not supported: the saved images would not be exactly "
                         "what FID saw (the centre squares of the non-square ones)")
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a folder; give the JSON file to write")
    out_dir = Path(args.json).parent if args.json else Path(".")
    try:  # with --json, its plots are named after it: a run's own eval_final.json and plots stay
        results, paths, _ = evaluate_checkpoint(args.ckpt, args.data, cfg, out_dir, name=Path(args.ckpt).stem,
                                                batch_size=args.batch_size, num_workers=args.num_workers,
                                                image_size=args.image_size, device=args.device,
                                                prior_ckpt=args.prior, json_path=args.json)
    except AspectRatioError as err:
        raise ValueError(f"--aspect-ratios {err}") from None
    reals = describe_fid_reals(results)  # with --aspect-ratios: which real images each ratio's FID compared against
    extra = {"fid_real_per_aspect_ratio": reals} if reals else {}
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "data": args.data, **results, **extra},
                                              indent=2))
    _print_json({**results, **extra, "files": {k: str(v) for k, v in paths.items()}})


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="FID, CLIP score and caption accuracy of an ldm checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prior", default=None, metavar="PRIOR.ckpt",
                   help="unCLIP: the prior that gives each caption's CLIP image embedding (caption -> prior -> "
                        "decoder; it must use the decoder's CLIP). A decoder checkpoint without --prior is evaluated "
                        "with the true image embeddings of the val images (the decoder's upper bound)")
    p.add_argument("--data", required=True, help="evaluation shards (brace pattern, glob, folder)")
    p.add_argument("--num-samples", type=positive_count, default=500)
    p.add_argument("--guidance", type=comma_floats, default=[1.0, 3.0, 5.0], help="e.g. 1,3,5")
    p.add_argument("--aspect-ratios", type=_aspect_ratios, default=None, metavar="W:H,...",
                   help="e.g. 1:1,2:1,1:2: every caption generated at each ratio (instead of the base size only), "
                        + ASPECT_HELP + "; every figure overall and per ratio (keys + _ar{W:H}, e.g. "
                        "eval/fid_clip_g3.0_ar2:1). A ratio's FID compares centre squares against the real val "
                        "images of that ratio (KEY.json aspect_ratio, else the image's own width:height within a "
                        "pixel) when the data says every image's ratio and holds 2 of it, else against all of them; "
                        "the output's fid_real_per_aspect_ratio says which. Not with --save-images")
    p.add_argument("--features", default="clip", help="FID features: clip, inception or clip,inception")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05 weights file")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=positive_count, default=None)
    _add_guidance_rescale_and_clip_x0(p)
    p.add_argument("--image-guidance", type=float, default=None,
                   help="unCLIP's decoder: the image embedding's own guidance scale, --guidance then the caption's "
                        "on top of it (default: the checkpoint's, else one scale for both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--image-size", type=positive_count, default=None)
    p.add_argument("--cache-dir", default="runs/.fid_cache", help="real statistics cache")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="write the evaluated images (uint8 PNG, exactly what the metrics saw) to DIR/g{guidance}/"
                        "KEY.png and the real ones to DIR/real/KEY.png, to recompute FID offline (torch-fidelity)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    p.set_defaults(func=cmd_evaluate)


def cmd_toy(args) -> None:
    from lit_diffusion.stages.toy import run_toy

    _print_json(run_toy(args.config, args.out))


def add_toy(sub) -> None:
    p = sub.add_parser("toy", help="DDPM vs DDIM on a 2-D spiral, with a plot of the learned field")
    p.add_argument("--config", default="configs/toy/spiral.yaml")
    p.add_argument("--out", default="runs/toy")
    p.set_defaults(func=cmd_toy)


def cmd_clip_query(args) -> None:
    from lit_diffusion.evaluation.clip_query import query

    for rank, (source, score) in enumerate(query(args.ckpt, args.images, args.text, top_k=args.top_k), 1):
        print(f"{rank:3d}  {score:+.4f}  {source}")


def add_clip(sub) -> None:
    clip = sub.add_parser("clip", help="use a CLIP checkpoint").add_subparsers(dest="clip_cmd", required=True)
    p = clip.add_parser("query", help='rank images for a caption; "+red -blue" adds and subtracts embeddings')
    p.add_argument("--ckpt", required=True, help="CLIP checkpoint (stage 1)")
    p.add_argument("--images", required=True, help="an image folder, or an image file or URL")
    p.add_argument("--text", required=True, help='e.g. "a large red circle" or "a large red circle +blue -red"')
    p.add_argument("--top-k", type=positive_count, default=5)
    p.set_defaults(func=cmd_clip_query)


def cmd_pipeline(args) -> None:
    from lit_diffusion.pipeline import run_pipeline

    overrides = {}
    if args.name:
        overrides["name"] = args.name
    if args.root:
        overrides["root"] = args.root
    run_pipeline(args.config, overrides)


def add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="the main job: data, CLIP, VAE, latent diffusion, evaluation, report")
    p.add_argument("--config", default="configs/pipeline/shapes.yaml")
    p.add_argument("--name", default=None, help="run group name (default: the config's)")
    p.add_argument("--root", default=None, help="runs folder (default: the config's, runs/)")
    p.set_defaults(func=cmd_pipeline)


def cmd_import(args) -> None:
    _new_output(args.out, "--out")
    try:
        from lit_diffusion.pretrained.weights import save_stage_checkpoint

        if args.kind == "vae":
            from lit_diffusion.pretrained.vae import load_pretrained_vae, measure_latent_scale

            module = load_pretrained_vae(args.source, scale_factor=args.scale_factor, shift_factor=args.shift_factor,
                                         norm_groups=args.norm_groups)
            if args.measure_on:
                measure_latent_scale(module, args.measure_on, args.image_size, args.max_images)
            summary = {"config": module.hparams.arch, "scale_factor": float(module.scale_factor),
                       "latent_mean": float(module.latent_mean)}
        else:
            from lit_diffusion.pretrained.clip import load_pretrained_clip

            module = load_pretrained_clip(args.source, quick_gelu=args.quick_gelu, text_heads=args.text_heads,
                                          vision_heads=args.vision_heads)
            summary = {"vision": module.hparams.vision, "text": module.hparams.text,
                       "embed_dim": module.hparams.embed_dim, "tokenizer": repr(module.tokenizer)}
    except ImportError as err:  # the optional extra is missing: its message says what to install
        raise ValueError(str(err)) from None
    out = save_stage_checkpoint(module, args.out, args.source)
    params = sum(p.numel() for p in module.parameters())
    _print_json({"out": str(out), "kind": args.kind, "source": str(args.source), "parameters": params, **summary})


def add_import(sub) -> None:
    imp = sub.add_parser("import", help="a stage checkpoint from published weights on disk")
    kinds = imp.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("vae", help="a diffusers AutoencoderKL folder, or an SD / LDM .ckpt / .safetensors file")
    p.add_argument("source", help="folder (config.json + diffusion_pytorch_model.safetensors) or weight file")
    p.add_argument("--out", required=True, help="the stage-2 checkpoint to write (vae.ckpt)")
    p.add_argument("--scale-factor", type=float, default=None,
                   help="latent scale (default: the published one: the diffusers config's, 0.13025 for SDXL "
                        "checkpoints, else SD 1.x's 0.18215)")
    p.add_argument("--shift-factor", type=float, default=None, help="latent shift (SD3 / FLUX; default: config's)")
    p.add_argument("--norm-groups", type=int, default=None,
                   help="GroupNorm groups, which a single file does not record (default: the config's, else 32)")
    p.add_argument("--measure-on", default=None, help="shards: measure the latent mean and scale on these images "
                                                      "instead of taking the published scale")
    p.add_argument("--image-size", type=int, default=256, help="image size for --measure-on")
    p.add_argument("--max-images", type=int, default=2000, help="images for --measure-on")
    p.set_defaults(func=cmd_import)
    p = kinds.add_parser("clip", help="an OpenAI / open_clip weight file, or a Hugging Face CLIP folder")
    p.add_argument("source", help="weight file (.pt, .bin, .safetensors) or folder (config.json + weights + "
                                  "tokenizer files; a diffusers pipeline folder's text_encoder/ too)")
    p.add_argument("--out", required=True, help="the stage-1 checkpoint to write (clip.ckpt)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="open_clip / OpenAI files: the activation (OpenAI's weights and *-quickgelu models: "
                        "--quick-gelu); default: open_clip_config.json beside the file, or OpenAI's files' own")
    p.add_argument("--text-heads", type=int, default=None, help="open_clip files: heads (default width / 64)")
    p.add_argument("--vision-heads", type=int, default=None, help="open_clip files: heads (default width / 64)")
    p.set_defaults(func=cmd_import)


_EXTRA_COMMANDS: list = [add_clip, add_sample, add_evaluate, add_toy, add_pipeline, add_import]


def add_sweep(sub) -> None:
    from lit_diffusion.sweep import add_sweep as add

    add(sub)


def add_compare(sub) -> None:
    from lit_diffusion.evaluation.compare import add_compare as add

    add(sub)


_EXTRA_COMMANDS += [add_sweep, add_compare]


def add_bench(sub) -> None:
    from lit_diffusion.bench import add_bench as add  # imports torch only when a benchmark runs

    add(sub)


_EXTRA_COMMANDS += [add_bench]


# ---------------------------------------------------------------------------------------------------- export
EXPORT_TARGETS = ("diffusers", "transformers", "open_clip")


def cmd_export(args) -> None:
    from pathlib import Path

    from lit_diffusion.export import check_new_folder

    check_new_folder(args.out, "--out")  # before the checkpoint loads (every exporter checks it again)
    try:
        if args.to == "diffusers":  # an ldm.ckpt becomes a whole pipeline, a vae.ckpt an AutoencoderKL
            from lit_diffusion.export.pipeline import export_diffusers_checkpoint

            summary = export_diffusers_checkpoint(args.ckpt, args.out, prior=args.prior)
        else:
            if args.prior:
                raise ValueError(f"--prior goes with --to diffusers (an unCLIP decoder's pipeline), not --to {args.to}")
            from lit_diffusion.export.clip import export_clip_checkpoint

            summary = export_clip_checkpoint(args.ckpt, args.to, args.out)
        if summary.get("kind") == "pipeline":
            from lit_diffusion.export.card import write_model_card

            run_dir = Path(args.run_dir) if args.run_dir else None
            summary["card"] = str(write_model_card(Path(args.out), Path(args.ckpt), run_dir))
        if args.push_to_hub:
            from lit_diffusion.export.card import push_to_hub

            summary["pushed"] = {"repo": args.push_to_hub, "files": push_to_hub(Path(args.out), args.push_to_hub,
                                                                                 private=args.private)}
    except ImportError as err:  # the optional extra is missing: its message says what to install
        raise ValueError(str(err)) from None
    _print_json({"ckpt": str(args.ckpt), **summary})


def add_export(sub) -> None:
    p = sub.add_parser("export", help="a stage checkpoint in a published format (diffusers pipeline or VAE; "
                                      "transformers or open_clip CLIP), the inverse of `import`")
    p.add_argument("--ckpt", required=True, help="ldm.ckpt (a pipeline) or vae.ckpt for --to diffusers; clip.ckpt "
                                                 "for transformers / open_clip")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS,
                   help="diffusers: a pipeline folder with its model card (from ldm.ckpt; load it with "
                        "DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)) or an AutoencoderKL folder "
                        "(from vae.ckpt); transformers: a CLIPModel folder with its tokenizer; open_clip: a "
                        "checkpoint with its model config (and tokenizer files)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--prior", default=None, metavar="PRIOR_CKPT",
                   help="with --to diffusers and an unCLIP decoder's ldm.ckpt: also export this prior (prior.ckpt, the "
                        "decoder's CLIP), so the pipeline turns captions into image embeddings itself (else it takes "
                        "image_embeds or an image)")
    p.add_argument("--run-dir", default=None, help="the training run whose report.json, data and samples the model "
                                                   "card describes (default: the checkpoint's folder, if it has one)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the folder to this Hugging Face Hub repo (owner/name; created if missing)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=cmd_export)


_EXTRA_COMMANDS += [add_export]
