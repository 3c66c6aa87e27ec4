"""sampling: each sampler's loop against the bare denoiser forwards it performs (target <= 1.05), and batched
classifier-free guidance (one forward of [uncond; cond]) against two forwards of the batch (target <= 1.0)."""

from __future__ import annotations

from lit_diffusion.bench.common import Settings, median, row, timed


class CountedCalls:
    """Wraps a denoiser and counts its calls (each is one U-Net forward)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def sampler_run(name: str, denoiser, schedule, cond, uncond, guidance: float, shape, steps: int | None,
                device) -> int:
    """One sampling loop with batched CFG; -> the number of U-Net forwards it made."""
    import torch

    from lit_diffusion.diffusion import samplers
    from lit_diffusion.diffusion.guidance import cfg_model_fn

    counted = CountedCalls(denoiser)
    generator = torch.Generator(device=device).manual_seed(0)
    kwargs = {} if name == "ddpm" else {"steps": steps}
    samplers.sample(name, cfg_model_fn(counted, cond, uncond, guidance), schedule, shape, generator=generator,
                    device=device, **kwargs)
    return counted.calls


def sampler_timesteps(name: str, schedule, steps: int | None) -> list[int]:
    from lit_diffusion.diffusion.samplers import timestep_spacing

    if name == "ddpm":
        return list(range(schedule.num_timesteps - 1, -1, -1))
    return timestep_spacing(schedule.num_timesteps, steps)


def bare_forwards(denoiser, timesteps: list[int], cond, uncond, shape, device) -> int:
    """The U-Net forwards a guided sampler performs, and nothing else: one [2B] call per timestep."""
    import torch

    # the batch cfg_model_fn builds: [uncond; cond], contexts padded to one length (guidance's own helpers)
    from lit_diffusion.diffusion.guidance import _cat_conds

    both = _cat_conds(uncond, cond)
    x = torch.randn((2 * shape[0], *shape[1:]), device=device)
    calls = 0
    with torch.no_grad():
        for t in timesteps:
            denoiser(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long), both)
            calls += 1
    return calls


def bench_sampling(module, device: str, settings: Settings, guidance: float = 3.0) -> tuple[list[dict], dict]:
    import torch

    from lit_diffusion.diffusion.guidance import cfg_model_fn
    from lit_diffusion.diffusion.schedule import NoiseSchedule

    module = module.to(device).eval()
    module.configure_model()
    b = settings.sample_batch
    cond = module.encode_prompts(["a large red circle above a small blue square"] * b)
    uncond = module.null_cond(b)
    shape = (b, module.latent_channels, module.latent_size, module.latent_size)
    plans = {"ddpm": (NoiseSchedule(num_timesteps=settings.ddpm_timesteps), None),
             "ddim": (module.schedule, settings.ddim_steps), "dpmpp_2m": (module.schedule, settings.dpm_steps)}
    rows, details = [], {}
    for name, (schedule, steps) in plans.items():
        ts = sampler_timesteps(name, schedule, steps)
        times = {"sampler": [], "bare": []}
        calls = {}
        for r in range(settings.sample_repeats):
            for kind in (("sampler", "bare") if r % 2 == 0 else ("bare", "sampler")):
                if kind == "sampler":
                    sec, calls[kind] = timed(lambda: sampler_run(name, module.denoiser, schedule, cond, uncond,
                                                                 guidance, shape, steps, device), device)
                else:
                    sec, calls[kind] = timed(lambda: bare_forwards(module.denoiser, ts, cond, uncond, shape,
                                                                   device), device)
                times[kind].append(sec)
        if calls["sampler"] != calls["bare"]:
            raise RuntimeError(f"{name}: the sampler made {calls['sampler']} U-Net calls, the baseline {calls['bare']}")
        label = f"{name} ({len(ts)} steps)"
        rows.append(row("sampling", label, "s/run", median(times["sampler"]), median(times["bare"]), "<=", 1.05,
                        framework_label="sampler loop with CFG", baseline_label="bare U-Net forwards"))
        details[name] = {"unet_calls": calls["sampler"], "sampler_seconds": times["sampler"],
                         "bare_seconds": times["bare"], "batch": b, "forward_batch": 2 * b}

    # classifier-free guidance: one forward of [uncond; cond] (2B) vs two forwards of B, same combination
    x = torch.randn(shape, device=device)
    t = torch.full((b,), 500, device=device, dtype=torch.long)
    batched = cfg_model_fn(module.denoiser, cond, uncond, guidance)

    def separate():
        out_u = module.denoiser(x, t, uncond)
        out_c = module.denoiser(x, t, cond)
        return out_u + guidance * (out_c - out_u)

    times = {"batched": [], "separate": []}
    with torch.no_grad():
        for r in range(settings.sample_repeats):
            for kind in (("batched", "separate") if r % 2 == 0 else ("separate", "batched")):
                fn = (lambda: batched(x, t)) if kind == "batched" else separate
                sec, _ = timed(lambda: [fn() for _ in range(settings.cfg_calls)], device)
                times[kind].append(sec / settings.cfg_calls)
    rows.append(row("sampling", f"cfg batch {b}", "s/call", median(times["batched"]), median(times["separate"]),
                    "<=", 1.0, framework_label="one forward of 2B", baseline_label="two forwards of B"))
    details["cfg"] = {"batched_seconds": times["batched"], "separate_seconds": times["separate"], "batch": b}
    return rows, details

