"""The diffusion process: noise schedule, training loss and a fast seeded sampler.

The schedules and the sampler's update rule come from ``diffusers`` (DDPM forward process with
``num_train_timesteps`` steps, by default 1,000 with the cosine schedule; DDIM sampling in ~20 steps,
Song et al. 2021); this module only holds the conditioning and the masking that super-resolution needs.
The network predicts ``prediction_type`` (``epsilon``, ``sample`` = the clean map, or ``v_prediction``).
Maps handled here are in the *normalised residual* space of :mod:`voxelome.models.diffusion.normalise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxelome.errors import VoxelomeError, check_choice

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


@dataclass(frozen=True)
class GaussianDiffusion:
    """A DDPM forward process with a DDIM sampler.

    Parameters
    ----------
    num_train_timesteps : int
        Diffusion steps of the forward process (training).
    beta_schedule : str
        ``squaredcos_cap_v2`` (cosine), ``linear`` or ``scaled_linear``.
    prediction_type : str
        What the network predicts: ``epsilon``, ``sample`` or ``v_prediction``.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"

    def __post_init__(self):
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("beta_schedule", self.beta_schedule, SCHEDULES)
        if self.num_train_timesteps < 2:
            raise VoxelomeError(f"num_train_timesteps={self.num_train_timesteps} must be ≥ 2; e.g. 1000.")

    #: Bound on the clean-map estimate inside a sampling step (the maps are normalised residuals, in units of
    #: a gene's training spread): keeps the first steps of an ε- or v-model from exploding where ᾱ_t ≈ 0.
    clip_range: float = 8.0

    def _kwargs(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                    prediction_type=self.prediction_type)

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self._kwargs(), clip_sample=False)

    def sample_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        if not 1 <= int(steps) <= self.num_train_timesteps:
            raise VoxelomeError(f"steps={steps} must lie in [1, {self.num_train_timesteps}]; e.g. 20.")
        sched = DDIMScheduler(**self._kwargs(), set_alpha_to_one=True, timestep_spacing="trailing",
                              clip_sample=True, clip_sample_range=self.clip_range)
        sched.set_timesteps(int(steps))
        return sched

    def loss(self, model, x0: torch.Tensor, mask: torch.Tensor, conditions: dict, generator: torch.Generator,
             scheduler=None) -> torch.Tensor:
        """Masked MSE of the network's prediction at a random step.

        Parameters
        ----------
        model : SuperResDenoiser
        x0 : tensor, shape (B, G, H, W)
            Clean (normalised residual) maps.
        mask : tensor, shape (B, 1, H, W)
            1 where the target is measured; only those pixels count.
        conditions : dict
            ``low_up``, ``low_mask``, ``image`` for the network.
        generator : torch.Generator
            Source of the step and noise draws (seeded → reproducible).
        """
        sched = scheduler or self.train_scheduler()
        b = x0.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = sched.add_noise(x0, noise, t)
        x_self = None
        if getattr(model, "self_condition", False):
            # half of the items see the network's own estimate from a first, gradient-free pass
            use = (torch.rand(b, generator=generator, device=x0.device) < 0.5).to(x0.dtype)[:, None, None, None]
            with torch.no_grad():
                first = self.clean_estimate(sched, model(x_t, t, **conditions), x_t, t)
            x_self = first * use
        out = model(x_t, t, **conditions, x_self=x_self)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "sample":
            target = x0
        else:
            target = sched.get_velocity(x0, noise, t)
        err = (out - target) ** 2 * mask
        return err.sum() / (mask.sum() * x0.shape[1]).clamp_min(1.0)

    def clean_estimate(self, sched, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean map implied by the network's output at step ``t`` (clipped like the sampler)."""
        if self.prediction_type == "sample":
            x0 = out
        else:
            abar = sched.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)[:, None, None, None]
            if self.prediction_type == "epsilon":
                x0 = (x_t - (1 - abar).sqrt() * out) / abar.sqrt().clamp_min(1e-4)
            else:
                x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * out
        return x0.clamp(-self.clip_range, self.clip_range)

    @torch.no_grad()
    def sample(self, model, shape: tuple[int, int, int, int], conditions: dict, *, steps: int = 20,
               generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
        """Draw ``shape[0]`` samples ``(S, G, H, W)`` by DDIM in ``steps`` steps.

        The condition features are computed once and reused at every step. With a seeded ``generator`` the
        samples are reproducible bit for bit on the same device.
        """
        sched = self.sample_scheduler(steps)
        device = conditions["low_up"].device
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        cond = model.condition(conditions["low_up"], conditions["low_mask"], conditions.get("image"))
        x_self = None
        for t in sched.timesteps:
            tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            out = model(x, tt, conditions["low_up"], conditions["low_mask"], conditions.get("image"), cond=cond,
                        x_self=x_self)
            step = sched.step(out, t, x, eta=eta, generator=generator)
            x = step.prev_sample
            if getattr(model, "self_condition", False):
                x_self = step.pred_original_sample
        return x
