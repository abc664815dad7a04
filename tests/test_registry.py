"""Backbones by name: each builds and trains; unknown names and offline weights fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellpipe.errors import CellpipeError
from cellpipe.nets.classifier import Classifier
from cellpipe.nets.registry import WeightsUnavailable, available_backbones, build_backbone


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, "none")
    model = Classifier(backbone, num_classes=3)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.head[1].weight.grad is not None
    assert any(p.grad is not None for p in model.blocks[-1].parameters())
    assert len(backbone.blocks) >= 4


@pytest.mark.parametrize("name", available_backbones())
def test_every_backbone_truncates_to_its_first_blocks(name: str) -> None:
    torch.manual_seed(0)
    whole = build_backbone(name, "none")
    cut = build_backbone(name, "none", blocks=2)
    assert len(cut.blocks) == 2 and cut.dim < whole.dim
    assert cut.features(torch.randn(2, 3, 32, 32)).shape == (2, cut.dim)
    # The kept blocks are the same modules as the first blocks of the whole network.
    assert [type(b) for b in cut.blocks] == [type(b) for b in whole.blocks[:2]]
    model = Classifier(cut, num_classes=3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert any(p.grad is not None for p in model.blocks[0].parameters())


def test_truncation_keeps_the_pretrained_weights_and_checks_the_count() -> None:
    whole = build_backbone("efficientnet_lite0", "imagenet")
    cut = build_backbone("efficientnet_lite0", "imagenet", blocks=5)
    assert cut.pretrained and cut.dim == 80  # the fourth stage's width
    for kept, reference in zip(cut.blocks, whole.blocks, strict=False):
        for a, b in zip(kept.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(CellpipeError, match=r"backbone_blocks: 10 asked, efficientnet_lite0 "
                                            r"has 9 blocks \(use 1..9"):
        build_backbone("efficientnet_lite0", "none", blocks=10)


def test_efficientnet_lite0_loads_imagenet_weights_offline() -> None:
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    assert backbone.pretrained and backbone.mean == (0.5, 0.5, 0.5)
    # The first conv of a trained network is far from its random initialisation scale.
    first = next(backbone.features.parameters())
    assert first.abs().max() > 1.0


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(CellpipeError, match="unknown backbone 'resnet99'; valid: .*vgg16"):
        build_backbone("resnet99")


def test_local_weights_file_round_trip(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "r18.pth")
    backbone = build_backbone("resnet18", str(tmp_path / "r18.pth"))
    assert backbone.pretrained
    assert torch.equal(backbone.blocks[0][0].weight, reference.conv1.weight)
    with pytest.raises(WeightsUnavailable, match="do not fit mobilenet_v2"):
        build_backbone("mobilenet_v2", str(tmp_path / "r18.pth"))
    with pytest.raises(WeightsUnavailable, match="weights file not found"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_imagenet_request_offline_names_the_offline_options(tmp_path: Path) -> None:
    # Offline for real: an empty weights cache and every HTTPS request sent to a closed port.
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"),
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    code = ("from cellpipe.nets.registry import build_backbone\n"
            "try:\n    build_backbone('resnet18', 'imagenet')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "WeightsUnavailable" in done.stdout
    assert "could not be downloaded" in done.stdout
    for option in ("weights: none", "weights: /path/to/file.pth", "efficientnet_lite0"):
        assert option in done.stdout


def test_smallcnn_has_no_imagenet_weights() -> None:
    with pytest.raises(WeightsUnavailable, match="smallcnn has no ImageNet weights"):
        build_backbone("smallcnn", "imagenet")
