"""DiffAugment (Zhao et al. 2020): the same differentiable augmentation on real and
generated images before the discriminator sees them, so a small data set does not let
the discriminator memorise it. Built from kornia's differentiable augmentations.
"""

from __future__ import annotations

from typing import Literal

import kornia.augmentation as K
import torch
from torch import nn

Policy = Literal["color", "translation", "cutout"]
DEFAULT_POLICY: tuple[Policy, ...] = ("color", "translation", "cutout")


class DiffAugment(nn.Module):
    """Random colour, translation (1/8 of the side) and cutout (half the side), on [-1, 1]."""

    def __init__(self, policy: tuple[Policy, ...] = DEFAULT_POLICY) -> None:
        super().__init__()
        steps: list[nn.Module] = []
        if "color" in policy:
            steps.append(K.ColorJiggle(brightness=0.25, contrast=0.5, saturation=1.0, p=1.0))
        if "translation" in policy:
            steps.append(K.RandomAffine(degrees=0, translate=(0.125, 0.125), p=1.0))
        if "cutout" in policy:
            steps.append(K.RandomErasing(scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.5, p=1.0))
        self.policy = tuple(policy)
        self.steps = nn.Sequential(*steps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.policy:
            return images
        # kornia's colour operations work on [0, 1].
        return self.steps((images + 1) / 2) * 2 - 1
