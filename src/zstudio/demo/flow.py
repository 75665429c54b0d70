"""The flow-matching convention that diffusers' Z-Image sampler expects, written down once for training.

Read off `ZImagePipeline.__call__` and `FlowMatchEulerDiscreteScheduler.step`:
- the scheduler's sigma runs from 1 (pure noise) to 0 and a noisy latent is x_σ = (1 − σ)·x₀ + σ·ε;
- the transformer is called with t = (1000 − 1000σ)/1000 = 1 − σ (so t = 1 is the clean end);
- the pipeline negates the transformer's output and the Euler step adds (σ_next − σ)·(−out), which integrates
  dx/dσ = ε − x₀ exactly when out = x₀ − ε.
So the training target for the transformer is x₀ − ε at input time 1 − σ. `tests/test_demo_flow.py` shows that a
perfect denoiser under this convention reconstructs x₀ through the real pipeline's sampling loop.
"""

from __future__ import annotations

import torch


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def model_time(sigma: torch.Tensor) -> torch.Tensor:
    """The `t` the transformer receives for noise level σ."""
    return 1 - sigma


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer must output: x₀ − ε."""
    return x0 - noise
