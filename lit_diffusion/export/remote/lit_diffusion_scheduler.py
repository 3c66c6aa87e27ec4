"""LitDiffusionFlowHeunScheduler: lit_diffusion's rectified-flow Heun sampler (`diffusion/flow.py` `heun_sample`) as
a diffusers scheduler, remote code in an exported pipeline's scheduler/ folder; needs torch and diffusers only.

Heun's method (Karras et al. 2022, Algorithm 1, deterministic) on dx/dt = v(x, t) from t = 1 (noise) to t = 0 over
the grid t_i = shift(1 - i / n), i = 0..n (SD3 eq. 23: shift(t) = s t / (1 + (s - 1) t)): an Euler step to t_{i+1},
then the trapezoid rule x_{i+1} = x_i + h (v_i + v'_{i+1}) / 2 with the slope there; the last step, to t = 0, stays
Euler. 2 n - 1 network calls, the same arithmetic as lit_diffusion's sampler, in the same order.

Why not diffusers' FlowMatchHeunDiscreteScheduler (0.42): its step is the same method (Euler last step included), but
its `set_timesteps(num_inference_steps)` takes no `sigmas` and no `mu`, and its grid is
shift(linspace(1, shift(1 / num_train_timesteps), n)): its last time before 0 is shift(shift(0.001)), ours
shift(1 / n), so its images differ from lit_diffusion's (0.004-0.1 on a 4-to-13-step toy ODE, 0.17 on a trained
checkpoint's 13-step images in [0, 1]); with our grid forced into it, 5e-7.

Stepping is diffusers' second-order protocol: `timesteps` = [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}] (times the
`num_train_timesteps`, the network's time), one `step` per entry, `order` = 2, `state_in_first_order`. The config
keys are FlowMatchEulerDiscreteScheduler's (num_train_timesteps, shift, use_dynamic_shifting, time_shift_type), so
`FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)` gives lit_diffusion's `euler` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class LitDiffusionFlowHeunSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class LitDiffusionFlowHeunScheduler(SchedulerMixin, ConfigMixin):
    """lit_diffusion's flow `heun` sampler. `sigmas` are flow times t in [0, 1] (t = 1 is noise); the network is
    called with t * num_train_timesteps."""

    _compatibles = []
    order = 2
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        if time_shift_type != "exponential":
            raise ValueError(f"time_shift_type {time_shift_type!r}: only 'exponential' (mu = log(shift)) is "
                             f"lit_diffusion's resolution shift")
        self.num_inference_steps = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._times: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self._step_index = None
        self._index = 0  # the grid interval being integrated
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None) -> None:
        """The grid for `num_inference_steps` (lit_diffusion's: 1 - i / n, i < n), or the unshifted times `sigmas`
        (decreasing, in (0, 1]; 0 is appended); shifted by `shift`, or by exp(`mu`) with use_dynamic_shifting."""
        if sigmas is None:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            t = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float64)[:-1]
        else:
            t = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if num_inference_steps is not None and num_inference_steps != len(t):
                raise ValueError(f"{len(t)} sigmas for {num_inference_steps} steps")
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting: set_timesteps needs mu (log of the resolution's shift)")
            shift = math.exp(mu)
        else:
            shift = float(self.config.shift)
        t = shift * t / (1 + (shift - 1) * t)  # SD3 eq. 23, in float64 as lit_diffusion's sampling_times
        times = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
        self.num_inference_steps = len(t)
        self._times = times.tolist()  # host floats: the step sizes h are formed in float64, as lit_diffusion's
        self.sigmas = times.float().to(device)
        net = t.float() * self.config.num_train_timesteps  # float32 t times the scale, as lit_diffusion's model_time
        self.timesteps = torch.cat([net[:1], net[1:].repeat_interleave(2)]).to(device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One entry of `timesteps`: `model_output` is the (guided) velocity at `sample`. The first call of an
        interval returns its Euler point, at which the next call's velocity is taken; that call returns the Heun
        point. An interval ending at t = 0 is Euler only."""
        if not self._times:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = 0
        t, t_next = self._times[self._index], self._times[self._index + 1]
        h = t_next - t
        if self.state_in_first_order:
            prev = sample + h * model_output
            if t_next == 0:
                self._index += 1
            else:
                self.prev_derivative, self.dt, self.sample = model_output, h, sample
        else:
            prev = self.sample + self.dt * 0.5 * (self.prev_derivative + model_output)
            self.prev_derivative = self.dt = self.sample = None
            self._index += 1
        self._step_index += 1
        return LitDiffusionFlowHeunSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
