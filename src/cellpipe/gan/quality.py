"""How good generated images are: FID, KID, precision/recall, in an offline feature space.

Inception weights need a download, so nothing here uses them. Features are the pooled
ImageNet EfficientNet-Lite0 features (its weights ship as a package), which makes the
numbers comparable between runs of cellpipe, not with published Inception FIDs.
FID and KID come from torchmetrics, precision/recall/density/coverage (Naeem et al.
2020, k-NN manifolds) from prdc.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from prdc import compute_prdc
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from cellpipe.nets.registry import build_backbone


class FeatureSpace(nn.Module):
    """uint8 N×3×H×W images → pooled EfficientNet-Lite0 features (resized to ``size``)."""

    def __init__(self, size: int = 128) -> None:
        super().__init__()
        backbone = build_backbone("efficientnet_lite0", "imagenet")
        self.net = backbone.features.eval().requires_grad_(False)
        self.num_features = backbone.dim
        self.size = size
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.net((x - self.mean) / self.std).flatten(1)

    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] → uint8 in [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_quality(real: torch.Tensor, fake: torch.Tensor, features: FeatureSpace, *,
                   nearest_k: int = 5, kid_subsets: int = 50) -> dict[str, float]:
    """FID, KID (mean ± std over subsets), precision, recall, density, coverage.

    ``real`` and ``fake`` are uint8 N×3×H×W. With few real images (a validation split of
    a scarce class) KID is the number to trust: FID is biased upwards for small N.
    """
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    # Subsets of half the smaller set: with all of it every subset would be the same.
    subset = min(1000, max(2, min(len(real), len(fake)) // 2))
    with warnings.catch_warnings():  # "KID keeps all features": a few thousand at most here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subset_size=subset,
                                      subsets=kid_subsets, normalize=False)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    k = max(1, min(nearest_k, len(real) - 1, len(fake) - 1))
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        manifold = compute_prdc(real_features=features.embed(real).numpy(),
                                fake_features=features.embed(fake).numpy(), nearest_k=k)
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            **{name: float(np.asarray(value)) for name, value in manifold.items()}}
