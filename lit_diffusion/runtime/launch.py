"""Make the Trainer follow the launcher: `fabric run`, plain `torchrun`, or SLURM `srun`.

`fabric run --accelerator cpu --devices 1 --num-nodes 2 ...` starts our script through torchrun and sets
`LT_ACCELERATOR`, `LT_DEVICES`, `LT_NUM_NODES`, `LT_STRATEGY` and `LT_PRECISION`. Lightning's Trainer finds the
process group from torchrun's (or SLURM's) variables by itself, but it still needs devices and nodes that
match, or it refuses to start; we append them as `--trainer.*` arguments so the launcher's command line wins
over the config file. A launcher's `ddp` becomes `DDPStrategy` by class path, so the init arguments a config gives
it (`timeout`, `find_unused_parameters`) survive, where the bare string "ddp" would replace them.

Every process of one job must also agree on the run directory before any process group exists:
`shared_run_name` has global rank zero choose the default name and hands it to the others (see there).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta

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


# the Trainer's DDP, by class path: a configured DDPStrategy keeps its init_args (timeout, find_unused_parameters)
DDP_STRATEGY = json.dumps({"class_path": "lightning.pytorch.strategies.DDPStrategy"})


def apply_launcher_env(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    settings = launcher_settings(env)
    if not settings:
        return argv
    if settings.get("strategy") == "ddp":
        settings["strategy"] = DDP_STRATEGY
    extra: list[str] = []
    for key, value in settings.items():
        flag = f"--trainer.{key}"
        if flag in argv and argv[argv.index(flag) + 1] != value:
            log.warning(f"{flag} {argv[argv.index(flag) + 1]} on the command line is overridden by the launcher: {value}")
        extra += [flag, value]
    return [*argv, *extra]


RUN_NAME_ENV = "LIT_DIFFUSION_RUN_NAME"


def shared_run_name(stem: str, env: dict[str, str] | None = None, timeout_s: float = 300.0) -> str:
    """The default run name (`STEM-YYYYmmdd-HHMMSS`) that every process of a job agrees on.

    Processes that torchrun (or `fabric run`) starts parse the config each on its own, possibly on other machines
    and in other seconds, so a timestamp alone would give each rank its own run directory. In order:
    - `LIT_DIFFUSION_RUN_NAME` when set (Lightning's own launcher starts ranks 1.. after rank 0 set it; pipeline);
    - torchrun / `fabric run`: rank 0 publishes its name in the launcher's TCP store (the one torchrun shares with
      its workers, at MASTER_ADDR:MASTER_PORT), the other ranks wait for it there;
    - SLURM `srun` (no store before the process group exists): a name from the job and step id, the same in every
      task: `STEM-slurmJOB-STEP`;
    - otherwise this process's own timestamp, with a warning when other processes may exist (pass `--run.name`).
    The result is also put into `LIT_DIFFUSION_RUN_NAME` for processes started from this one.
    """
    own_env = env is None
    env = os.environ if env is None else env
    name = env.get(RUN_NAME_ENV)
    if not name:
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("MASTER_PORT"):
            name = _exchange_through_agent_store(name, env, timeout_s)
        elif int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID") and "SLURM_PROCID" in env:
            name = f"{stem}-slurm{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
        elif world > 1 or int(env.get("NODE_RANK", "0") or 0) > 0:
            log.warning(f"no launcher to agree on a run name with (WORLD_SIZE={world}, NODE_RANK="
                        f"{env.get('NODE_RANK')}): pass the same --run.name to every process, or this one "
                        f"writes to its own run directory {name}")
    if own_env:
        os.environ[RUN_NAME_ENV] = name
    return name


def _exchange_through_agent_store(name: str, env, timeout_s: float) -> str:
    import torch.distributed as dist

    store = dist.TCPStore(env.get("MASTER_ADDR", "127.0.0.1"), int(env["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    # a restarted worker group (torchrun --max-restarts) agrees afresh
    key = f"lit_diffusion/run_name/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if int(env.get("RANK", "0")) == 0:
        store.set(key, name)
        return name
    return store.get(key).decode()
