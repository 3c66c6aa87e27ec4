"""The one entry point, `lit-diffusion` (also `python -m lit_diffusion`, and the script `fabric run` launches).

fit | validate | test    LightningCLI on a stage config (`--config configs/clip/shapes.yaml --trainer.max_steps 10`)
data shapes | convert   make WebDataset shards (the embedded default data, or from your images)
clip query              rank images for a caption with a CLIP checkpoint
sample                  images from a latent-diffusion checkpoint (guidance, negative prompts, samplers)
evaluate                FID, CLIP score and caption accuracy of a checkpoint across guidance scales
toy                     the 2-D spiral that the DDPM/DDIM papers draw
sweep | compare         offline W&B sweeps and the comparison of their runs
pipeline                the main job: CLIP -> VAE -> latent diffusion -> evaluation -> report
bench                   benchmarks against plain baselines
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,3,5, got {text!r}") from None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------------- data
def cmd_data_shapes(args) -> None:
    from lit_diffusion.data.shapes import write_shapes

    summary = write_shapes(args.out, train=args.train, val=args.val, size=args.size, shard_size=args.shard_size,
                           seed=args.seed)
    _print_json(summary)


def cmd_data_convert(args) -> None:
    from lit_diffusion.data.convert import convert

    summary = convert(args.inputs, args.out, prefix=args.prefix, shard_size=args.shard_size)
    _print_json(summary)


def add_data(sub) -> None:
    data = sub.add_parser("data", help="make WebDataset shards").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("shapes", help="draw the embedded default data: captioned shapes")
    p.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar and tokenizer.json")
    p.add_argument("--train", type=int, default=5000, help="training samples")
    p.add_argument("--val", type=int, default=500, help="validation samples")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("convert", help="an image folder with .txt captions, or a CSV/JSONL of (path, caption)")
    p.add_argument("inputs", nargs="+", help="image folder(s), .csv or .jsonl files")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="train", help="shard name prefix (train, val)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.set_defaults(func=cmd_data_convert)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lit_diffusion.launch import apply_launcher_env
        from lit_diffusion.lightning_cli import run_lightning_cli

        run_lightning_cli(apply_launcher_env(argv))
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
    except (FileNotFoundError, ValueError) as err:
        # user errors: one clear line, no traceback
        print(f"lit-diffusion {args.cmd}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


_EXTRA_COMMANDS: list = []
