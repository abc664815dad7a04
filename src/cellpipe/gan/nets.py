"""Class-conditional generator and projection discriminator, for any power-of-two size.

Both networks are built from one block per doubling between 4×4 and the resolution
(32 → 3 blocks, 256 → 6), so every size is the same architecture with more blocks,
not a copy per size. The generator is conditioned through conditional batch norm (a
gain and bias per class); the discriminator through a projection term (Miyato &
Koyama 2018): score = linear(h) + <embed(label), h>. Images are in [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

RESOLUTIONS = (32, 64, 128, 256)
_BASE = 4  # the generator starts from, and the discriminator ends at, 4×4


def _doublings(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"GAN resolution {resolution} is not supported; valid: {RESOLUTIONS}")
    return int(math.log2(resolution // _BASE))


def _widths(resolution: int, channels: int, max_multiplier: int = 8) -> list[int]:
    """Channel width at each size from 4×4 up to ``resolution`` (wide at 4×4, narrow at full)."""
    doublings = _doublings(resolution)
    return [channels * min(max_multiplier, 2 ** (doublings - step))
            for step in range(doublings + 1)]


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose gain and bias are looked up per class."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gain = self.gain(labels)[:, :, None, None]
        bias = self.bias(labels)[:, :, None, None]
        return self.norm(x) * gain + bias


class _UpBlock(nn.Module):
    """CBN → ReLU → 2× nearest upsampling → 3×3 conv, with a 1×1 skip.

    One convolution per doubling (not BigGAN's two) keeps a step affordable on a CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm2d(in_channels, num_classes)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.up(torch.relu(self.norm(x, labels))))
        return h + self.skip(self.up(x))


class Generator(nn.Module):
    """(noise, label) → an RGB image in [-1, 1] of ``resolution``²."""

    def __init__(self, num_classes: int, resolution: int, *, z_dim: int = 128,
                 channels: int = 16) -> None:
        super().__init__()
        widths = _widths(resolution, channels)
        self.num_classes, self.resolution, self.z_dim = num_classes, resolution, z_dim
        self.project = nn.Linear(z_dim, widths[0] * _BASE * _BASE)
        self.blocks = nn.ModuleList(_UpBlock(a, b, num_classes)
                                    for a, b in zip(widths, widths[1:], strict=False))
        self.to_rgb = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(),
                                    nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(len(z), -1, _BASE, _BASE)
        for block in self.blocks:
            h = block(h, labels)
        return self.to_rgb(h)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Images for ``labels`` from fresh noise (drawn from ``generator`` if given)."""
        device = next(self.parameters()).device
        z = torch.randn(len(labels), self.z_dim, generator=generator).to(device)
        return self(z, labels.to(device))


class _DownBlock(nn.Module):
    """LeakyReLU → 3×3 conv → 2× average pooling, with a 1×1 skip."""

    def __init__(self, in_channels: int, out_channels: int, wrap) -> None:
        super().__init__()
        self.conv = wrap(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.skip = wrap(nn.Conv2d(in_channels, out_channels, 1))
        self.act = nn.LeakyReLU(0.2)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.act(x))) + self.skip(self.pool(x))


class Discriminator(nn.Module):
    """(image, label) → a realness score; ``extra_outputs`` adds class logits (for SGAN).

    No batch norm anywhere: the WGAN-GP penalty is per sample, and batch statistics
    would couple the samples of a batch.
    """

    def __init__(self, num_classes: int, resolution: int, *, channels: int = 16,
                 spectral_norm: bool = True, extra_outputs: int = 0) -> None:
        super().__init__()

        def wrap(layer: nn.Module) -> nn.Module:
            return _spectral_norm(layer) if spectral_norm else layer

        widths = list(reversed(_widths(resolution, channels)))  # full size first
        self.from_rgb = wrap(nn.Conv2d(3, widths[0], 3, padding=1))
        self.blocks = nn.Sequential(*(_DownBlock(a, b, wrap)
                                      for a, b in zip(widths, widths[1:], strict=False)))
        self.act = nn.LeakyReLU(0.2)
        self.score = wrap(nn.Linear(widths[-1], 1))
        self.embed = wrap(nn.Embedding(num_classes, widths[-1]))
        self.classes = wrap(nn.Linear(widths[-1], extra_outputs)) if extra_outputs else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Sum-pooled features of the last 4×4 block."""
        return self.act(self.blocks(self.from_rgb(images))).sum(dim=(2, 3))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images)
        projection = (self.embed(labels) * h).sum(dim=1, keepdim=True)
        return (self.score(h) + projection).squeeze(1)

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The extra class outputs (SGAN's K real classes), without the projection."""
        if self.classes is None:
            raise ValueError("this discriminator was built without extra_outputs")
        return self.classes(self.features(images))
