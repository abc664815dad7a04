"""Adversarial losses: non-saturating BCE (DCGAN) and Wasserstein with gradient penalty.

Each loss turns discriminator scores into the discriminator's and the generator's
loss; WGAN-GP adds :func:`gradient_penalty` on the discriminator side. The loop is
the same for both (``gan/fit.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["bce", "wgan_gp"]


def discriminator_loss(name: LossName, real_scores: torch.Tensor,
                       fake_scores: torch.Tensor) -> torch.Tensor:
    """What the discriminator minimises (without the gradient penalty)."""
    if name == "bce":  # -log σ(real) - log(1 - σ(fake))
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    return fake_scores.mean() - real_scores.mean()


def generator_loss(name: LossName, fake_scores: torch.Tensor) -> torch.Tensor:
    """What the generator minimises: non-saturating -log σ(fake), or -critic(fake)."""
    if name == "bce":
        return F.softplus(-fake_scores).mean()
    return -fake_scores.mean()


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
    """E[(‖∇ critic(x̂)‖₂ − 1)²] at x̂ = mix·real + (1 − mix)·fake (Gulrajani et al. 2017).

    ``mix`` is one number per sample, uniform in [0, 1] unless given.
    """
    if mix is None:
        mix = torch.rand(len(real), device=real.device)
    mix = mix.view(-1, *([1] * (real.dim() - 1)))
    between = (mix * real.detach() + (1 - mix) * fake.detach()).requires_grad_(True)
    scores = critic(between)
    (grads,) = torch.autograd.grad(scores.sum(), between, create_graph=True)
    return ((grads.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
