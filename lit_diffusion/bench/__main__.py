"""`python -m lit_diffusion.bench memory-child|latents-child ...`: the subprocesses of the memory benchmarks."""

import argparse

from lit_diffusion.bench.memory import memory_child


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_diffusion.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    child = sub.add_parser("memory-child")
    child.add_argument("--urls", required=True)
    child.add_argument("--steps", type=int, required=True)
    child.add_argument("--image-size", type=int, default=16)
    child.add_argument("--batch-size", type=int, default=16)
    child.add_argument("--num-workers", type=int, default=1)
    child.add_argument("--threads", type=int, default=1)
    child.add_argument("--out", required=True)
    latents = sub.add_parser("latents-child")
    latents.add_argument("--spec", required=True)
    latents.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "latents-child":
        from lit_diffusion.bench.latents import latents_child

        return latents_child(args.spec, args.out)
    memory_child(args.urls, args.steps, args.image_size, args.batch_size, args.num_workers, args.out, args.threads)


if __name__ == "__main__":
    main()
