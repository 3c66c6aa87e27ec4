"""Make the Trainer follow the launcher: `fabric run`, plain `torchrun`, or SLURM `srun`.

`fabric run --accelerator cpu --devices 1 --num-nodes 2 ...` starts our script through torchrun and sets
`LT_ACCELERATOR`, `LT_DEVICES`, `LT_NUM_NODES`, `LT_STRATEGY` and `LT_PRECISION`. Lightning's Trainer finds the
process group from torchrun's (or SLURM's) variables by itself, but it still needs devices and nodes that
match, or it refuses to start; we append them as `--trainer.*` arguments so the launcher's command line wins
over the config file.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lit_diffusion")


def launcher_settings(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    settings: dict[str, str] = {}
    if env.get("LT_CLI_USED") == "1":  # fabric run (lightning run model)
        for key in ("accelerator", "strategy", "devices", "num_nodes", "precision"):
            value = env.get(f"LT_{key.upper()}")
            if value is not None and value != "None":
                settings[key] = value
    elif "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        settings["devices"] = str(local)
        settings["num_nodes"] = str(max(1, world // local))
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun
        nodes = int(env.get("SLURM_NNODES", "1"))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(int(env["SLURM_NTASKS"]) // nodes)
        settings["devices"] = per_node
        settings["num_nodes"] = str(nodes)
    world = int(settings.get("devices", "1") if settings.get("devices", "1").isdigit() else 1) * int(
        settings.get("num_nodes", "1"))
    if world > 1 and "strategy" not in settings:
        settings["strategy"] = "ddp"
    return settings


def apply_launcher_env(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    settings = launcher_settings(env)
    if not settings:
        return argv
    extra: list[str] = []
    for key, value in settings.items():
        flag = f"--trainer.{key}"
        if flag in argv and argv[argv.index(flag) + 1] != value:
            log.warning(f"{flag} {argv[argv.index(flag) + 1]} on the command line is overridden by the launcher: {value}")
        extra += [flag, value]
    return [*argv, *extra]
