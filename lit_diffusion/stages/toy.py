"""A 2-D spiral trained in seconds on CPU with the same NoiseSchedule, p_losses and samplers as the image model:
a place to see what the diffusion math does (learned denoising field, DDPM vs DDIM trajectories)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from lit_diffusion.diffusion.samplers import ddim_sample, ddpm_sample
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.models.layers import timestep_embedding

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "data": {"n_points": 4000, "turns": 1.5, "noise": 0.03},
    "schedule": {"num_timesteps": 100, "schedule": "cosine", "zero_terminal_snr": False, "beta_start": None,
                 "beta_end": None, "cosine_s": 0.008},
    "model": {"hidden": 128, "layers": 3, "time_dim": 32},
    "train": {"steps": 3000, "batch_size": 512, "lr": 5e-3, "prediction": "v", "weighting": "plain"},
    "sample": {"n_samples": 1000, "ddim_steps": 20, "ddim_spacing": "trailing", "n_trajectories": 8, "field_t": 30,
               "field_grid": 21},
}


def spiral(n_points: int, turns: float = 1.5, noise: float = 0.03, generator: torch.Generator | None = None) -> Tensor:
    """[n_points, 2] on an Archimedean spiral r ~ theta, normalised to unit std per axis, plus Gaussian jitter."""
    u = torch.rand(n_points, generator=generator, dtype=torch.float64)
    theta = math.pi * (0.5 + 2 * turns * u)
    pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1)
    pts = (pts - pts.mean(0)) / pts.std(0)
    return (pts + noise * torch.randn(n_points, 2, generator=generator, dtype=torch.float64)).float()


class ToyDenoiser(nn.Module):
    """MLP(x_t, sinusoidal t embedding) -> raw prediction [B, 2]."""

    def __init__(self, hidden: int = 128, layers: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        dims = [2 + time_dim] + [hidden] * layers
        blocks = []
        for i, o in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(i, o), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim)], dim=1))


def _merge(defaults: dict, overrides: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {sorted(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: key {key!r} must be a mapping")
            out[key] = _merge(defaults[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


_COUNTS = {"data": ("n_points",), "schedule": ("num_timesteps",), "model": ("hidden", "layers", "time_dim"),
           "train": ("steps", "batch_size"), "sample": ("n_samples", "ddim_steps", "field_grid")}


def _check_counts(cfg: dict, where: str) -> dict:
    """Every count (points, steps, samples, widths) a whole number >= 1: 0 trained nothing and wrote NaN figures."""
    for section, keys in _COUNTS.items():
        for key in keys:
            value = cfg[section][key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {section}.{key} must be a whole number >= 1, got {value!r}")
    return cfg


def load_toy_config(config: dict | str | Path | None) -> dict:
    """Defaults overridden by a dict or a plain YAML file; unknown keys and counts below 1 raise an error naming
    file and key."""
    if config is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    if isinstance(config, dict):
        return _check_counts(_merge(DEFAULT_CONFIG, config, "toy config"), "toy config")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"toy config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a toy config must be a YAML mapping")
    return _check_counts(_merge(DEFAULT_CONFIG, data, str(path)), str(path))


def nearest_distance(samples: Tensor, data: Tensor) -> Tensor:
    """Distance of each sample [N, 2] to its nearest data point [M, 2] -> [N]."""
    return torch.cdist(samples.double(), data.double()).min(dim=1).values


def train_toy(cfg: dict, data: Tensor, schedule: NoiseSchedule, generator: torch.Generator) -> tuple[nn.Module, list]:
    model = ToyDenoiser(**cfg["model"])
    tc = cfg["train"]
    opt = torch.optim.Adam(model.parameters(), lr=tc["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc["steps"], eta_min=tc["lr"] * 0.05)
    losses = []
    for _ in range(tc["steps"]):
        idx = torch.randint(0, len(data), (tc["batch_size"],), generator=generator)
        loss = schedule.p_losses(model, data[idx], prediction=tc["prediction"], weighting=tc["weighting"],
                                 generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def _trajectories(sampler, model, schedule, x_T, prediction, generator, **kw) -> tuple[Tensor, Tensor]:
    path = []
    x = sampler(model, schedule, tuple(x_T.shape), x_T=x_T, prediction=prediction, generator=generator,
                callback=lambda i, t, x_t, pred: path.append(x_t.clone()), **kw)
    path.append(x)
    return x, torch.stack(path, dim=1)  # [N, 2], [N, steps + 1, 2]


def run_toy(config: dict | str | Path | None, out_dir: str | Path) -> dict:
    """Train the spiral model, write `toy.png` (learned field + DDPM vs DDIM trajectories) and `metrics.json` to
    `out_dir`, return the metrics: mean distance to the nearest data point of DDPM / DDIM samples and of the
    prior noise (`prior_mean_dist`, the spread to beat), and the final training loss."""
    cfg = load_toy_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))  # parameter init
    data = spiral(generator=gen, **cfg["data"])
    schedule = NoiseSchedule(**cfg["schedule"])
    model, losses = train_toy(cfg, data, schedule, gen)
    prediction, sc = cfg["train"]["prediction"], cfg["sample"]

    with torch.no_grad():
        x_T = torch.randn(sc["n_samples"], 2, generator=gen)
        ddpm_x, ddpm_path = _trajectories(ddpm_sample, model, schedule, x_T, prediction, gen)
        ddim_x, ddim_path = _trajectories(ddim_sample, model, schedule, x_T, prediction, gen,
                                          steps=sc["ddim_steps"], eta=0.0, spacing=sc["ddim_spacing"])
    metrics = {
        "ddpm_mean_dist": nearest_distance(ddpm_x, data).mean().item(),
        "ddim_mean_dist": nearest_distance(ddim_x, data).mean().item(),
        "prior_mean_dist": nearest_distance(x_T, data).mean().item(),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "train_steps": len(losses),
    }
    metrics["plot"] = str(_plot(out_dir / "toy.png", model, schedule, data, prediction, sc, ddpm_path, ddim_path,
                                metrics))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _plot(path: Path, model, schedule, data, prediction, sc, ddpm_path, ddim_path, metrics) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    lim = 3.0
    for ax in axes:
        ax.scatter(data[:, 0], data[:, 1], s=1, c="0.8", zorder=0)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")

    # learned denoising direction x0_hat(x_t, t) - x_t at one t, on a grid
    n, t_field = sc["field_grid"], min(int(sc["field_t"]), schedule.num_timesteps - 1)
    g = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
    t = torch.full((len(grid),), t_field, dtype=torch.long)
    with torch.no_grad():
        x0 = schedule.to_eps_x0(model(grid, t), grid, t, prediction).x0
    d = x0 - grid
    norm = d.norm(dim=1, keepdim=True)
    # unit arrows coloured by length: the far-field arrows would otherwise hide the structure near the data
    u = d / norm.clamp(min=1e-8) * (2 * lim / n) * 0.8
    axes[0].quiver(grid[:, 0], grid[:, 1], u[:, 0], u[:, 1], norm[:, 0], angles="xy", scale_units="xy", scale=1.0,
                   width=0.004, cmap="viridis")
    axes[0].set_title(f"direction of x0_hat - x_t at t={t_field}/{schedule.num_timesteps}")

    k = sc["n_trajectories"]
    for ax, name, traj, dist in ((axes[1], "DDPM (ancestral)", ddpm_path, metrics["ddpm_mean_dist"]),
                                 (axes[2], f"DDIM eta=0, {sc['ddim_steps']} steps", ddim_path,
                                  metrics["ddim_mean_dist"])):
        final = traj[:, -1]
        ax.scatter(final[:, 0], final[:, 1], s=2, c="tab:blue", alpha=0.5, zorder=1)
        for j in range(min(k, len(traj))):
            ax.plot(traj[j, :, 0], traj[j, :, 1], lw=0.6, c="tab:red", alpha=0.7, zorder=2)
            ax.scatter(traj[j, 0, 0], traj[j, 0, 1], s=12, c="k", zorder=3)
        ax.set_title(f"{name}: mean dist to data {dist:.3f}")
    fig.suptitle(f"spiral toy: prior mean dist {metrics['prior_mean_dist']:.3f}, "
                 f"final loss {metrics['final_loss']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
