"""Deterministic inversion: the starting noise x_T from which a deterministic sampler returns a given clean x0.

DALL-E 2 (Ramesh et al. 2022, sec. 3.1 and 3.3) inverts an image with DDIM so that decoding the inverted latent
again reproduces the image, and then decodes it with another CLIP embedding: the layout is kept, the content moves.

Each sampler step is a map x_i -> x_{i+1} that depends on the network's output at (x_i, t_i):
    DDIM, eta = 0 (Song et al. 2021, eq. 12): x_{i+1} = sqrt(abar_{i+1}) x0_hat(x_i) + sqrt(1 - abar_{i+1}) eps_hat(x_i)
    Euler on the velocity (euler_sample):     x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)
Running a step backwards means solving it for x_i. Both are linear in x_i once the network output is fixed:
    DDIM:  x_i = sqrt(abar_i) (x_{i+1} - sqrt(1 - abar_{i+1}) eps_hat) / sqrt(abar_{i+1}) + sqrt(1 - abar_i) eps_hat
    Euler: x_i = x_{i+1} - (t_{i+1} - t_i) v(x_i, t_i)
but the output is the network's at the unknown x_i. Plain DDIM inversion evaluates it at the point it has, x_{i+1},
with the timestep of the step (t_i), so the only error per step is the network's change between two neighbouring
points of the trajectory: it shrinks with the step size, and the round trip sampler(invert(x0)) -> x0 converges as
the steps grow. `refine` > 0 solves each step's implicit equation better by fixed-point iteration (Pan et al. 2023,
"Effective Real Image Editing with Accelerated Iterative Diffusion Inversion"): evaluate the network at the current
estimate of x_i and solve again; each iteration costs one more network call per step.

Both walk exactly the grid their sampler walks (`samplers.timestep_spacing` / `FlowSchedule.sampling_times`), in
reverse, so ddim_sample(x_T=ddim_invert(...)) and euler_sample(x_T=flow_invert(...)) with the same steps and model
return x0 up to that error. A zero-terminal-SNR schedule (abar = 0 at the first visited step) has no invertible last
step: x_T there is the predicted noise alone, and the round trip is only as good as that prediction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_diffusion.diffusion.flow import FlowSchedule, VelocityFn
from lit_diffusion.diffusion.samplers import ModelFn, timestep_spacing
from lit_diffusion.diffusion.schedule import ModelPrediction, NoiseSchedule


def _check_refine(refine: int) -> None:
    if refine < 0:
        raise ValueError(f"refine must be >= 0 fixed-point iterations, got {refine}")


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    steps: int,
    prediction: str = "eps",
    *,
    spacing: str = "trailing",
    refine: int = 0,
) -> Tensor:
    """x_T [x0's shape] such that `ddim_sample(model_fn, schedule, x0.shape, steps=steps, eta=0, spacing=spacing,
    prediction=prediction, x_T=x_T)` returns about x0. `model_fn(x_t, t)` as the samplers take it (t: long [B])."""
    _check_refine(refine)
    ts = timestep_spacing(schedule.num_timesteps, steps, spacing)  # decreasing, as ddim_sample visits them
    abar_all = schedule.alphas_cumprod_f64
    # the sampler's step i goes from ts[i] (abar[i]) to the level after it (abar_next[i]); 1 after the last step
    abar = abar_all[ts].tolist()
    abar_next = abar_all[ts[1:]].tolist() + [1.0]
    x = x0.float()
    t_dev = torch.tensor(ts, device=x.device)
    for i in reversed(range(len(ts))):
        t = t_dev[i].expand(x.shape[0])
        a, a_next = abar[i], abar_next[i]
        # the clean part of x_{i+1} once eps is known: x0' = (x_{i+1} - sqrt(1 - abar_next) eps) / sqrt(abar_next)
        guess = x
        for _ in range(refine + 1):
            out = model_fn(guess, t)
            pred = out if isinstance(out, ModelPrediction) else schedule.to_eps_x0(out, guess, t, prediction)
            eps = pred.eps.float()
            clean = (x - (1 - a_next) ** 0.5 * eps) / a_next**0.5
            guess = a**0.5 * clean + (1 - a) ** 0.5 * eps
        x = guess
    return x


@torch.no_grad()
def flow_invert(
    model_fn: VelocityFn,
    schedule: FlowSchedule,
    x0: Tensor,
    steps: int,
    *,
    refine: int = 0,
) -> Tensor:
    """x_T [x0's shape] such that `euler_sample(model_fn, schedule, x0.shape, steps=steps, x_T=x_T)` returns about
    x0: Euler from t = 0 to t = 1 over `schedule.sampling_times(steps)` reversed, the velocity of each step taken at
    that step's sampling time. `model_fn(x_t, t * time_scale) -> velocity`, as the flow samplers call it."""
    _check_refine(refine)
    ts = schedule.sampling_times(steps).tolist()  # decreasing from 1 to 0, as euler_sample walks it
    x = x0.float()
    t_dtype = torch.promote_types(x.dtype, torch.float32)
    for i in reversed(range(steps)):
        t_net = schedule.model_time(torch.full((x.shape[0],), ts[i], device=x.device, dtype=t_dtype))
        h = ts[i + 1] - ts[i]  # negative: the sampler moves towards t = 0
        guess = x
        for _ in range(refine + 1):
            guess = x - h * model_fn(guess, t_net).float()
        x = guess
    return x
