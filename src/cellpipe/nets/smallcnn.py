"""A compact CNN for training from scratch on small single-cell crops."""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3×3 conv-BN-ReLU layers, then a 2× down-sampling max-pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Four conv stages (32→256 channels) and global average pooling: 256-d features."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        channels = (3, *widths)
        self.stages = nn.ModuleList(_stage(a, b) for a, b in pairwise(channels))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.dim = widths[-1]

    def forward(self, images: Tensor) -> Tensor:
        for stage in self.stages:
            images = stage(images)
        return self.pool(images)
