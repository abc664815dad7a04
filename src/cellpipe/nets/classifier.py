"""The classifier every method trains: a registry backbone plus a linear head."""

from __future__ import annotations

from torch import Tensor, nn

from cellpipe.nets.registry import Backbone


class Classifier(nn.Module):
    """images → backbone features → dropout → linear logits.

    The head is a separate module so that a frozen-backbone phase can train it
    on cached features with the very same training loop.
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone.features
        self.blocks = backbone.blocks
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.dim, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
