"""GAN: the gradient penalty by hand, every resolution, conditioning, resume, quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellpipe.engine.loop import Device
from cellpipe.gan import fit as gan_fit
from cellpipe.gan.diffaugment import DiffAugment
from cellpipe.gan.fit import GanData, GanParams, fit_gan, generate
from cellpipe.gan.losses import discriminator_loss, generator_loss, gradient_penalty
from cellpipe.gan.nets import RESOLUTIONS, Discriminator, Generator
from cellpipe.gan.quality import FeatureSpace, sample_quality

RED, BLUE = (200, 40, 40), (40, 40, 200)
CPU = Device.pick("cpu")


def _two_colours(count: int, seed: int, size: int = 32) -> GanData:
    """Class 0 is noisy red, class 1 noisy blue."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = np.where(labels[:, None, None, None] == 0, np.array(RED), np.array(BLUE))
    images = np.broadcast_to(images, (count, size, size, 3))
    noisy = images + rng.integers(-20, 21, (count, size, size, 3))
    return GanData(np.clip(noisy, 0, 255).astype(np.uint8), labels)


def _small_params(**overrides) -> GanParams:
    settings = {"resolution": 32, "channels": 8, "z_dim": 16, "batch_size": 32, "epochs": 3,
                "lr_generator": 1e-3, "lr_discriminator": 1e-3, "sample_every": 100,
                "evaluate_every": 100}
    return GanParams.model_validate({**settings, **overrides})


@pytest.fixture(scope="module")
def features() -> FeatureSpace:
    return FeatureSpace(size=64)


def test_gradient_penalty_of_a_linear_critic_is_hand_computed() -> None:
    # critic(x) = <w, x> has gradient w everywhere: the penalty is (‖w‖ - 1)² = (3 - 1)².
    weights = torch.zeros(3, 4, 4)
    weights[0, 0, 0], weights[1, 2, 3] = 2.0, -torch.sqrt(torch.tensor(5.0))
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    penalty = gradient_penalty(lambda x: (x * weights).flatten(1).sum(1), real, fake)
    assert penalty.item() == pytest.approx(4.0, rel=1e-6)


def test_gradient_penalty_of_a_quadratic_critic_is_hand_computed() -> None:
    # critic(x) = ½‖x‖² has gradient x̂ itself, at x̂ = mix·real + (1 - mix)·fake.
    real = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    fake = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    mix = torch.tensor([0.5, 0.25])
    # x̂ = (1.5, 2) with norm 2.5, and (1.5, 1) with norm √3.25.
    expected = ((2.5 - 1) ** 2 + (np.sqrt(3.25) - 1) ** 2) / 2
    penalty = gradient_penalty(lambda x: 0.5 * (x ** 2).sum(1), real, fake, mix)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)


def test_losses_reward_the_right_side() -> None:
    high, low = torch.full((4,), 5.0), torch.full((4,), -5.0)
    for name in ("bce", "wgan_gp"):
        assert discriminator_loss(name, high, low) < discriminator_loss(name, low, high)
        assert generator_loss(name, high) < generator_loss(name, low)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_every_resolution_builds_and_yields_its_shape(resolution: int) -> None:
    generator = Generator(3, resolution, z_dim=16, channels=4)
    discriminator = Discriminator(3, resolution, channels=4, extra_outputs=3)
    labels = torch.tensor([0, 2])
    images = generator.sample(labels)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert discriminator(images, labels).shape == (2,)
    assert discriminator.class_logits(images).shape == (2, 3)
    # One block per doubling from 4×4: a bigger image is the same network, deeper.
    assert len(generator.blocks) == len(discriminator.blocks) == int(np.log2(resolution / 4))


def test_unknown_resolution_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        GanParams(resolution=48)
    with pytest.raises(ValueError, match="valid"):
        Generator(2, 48)


def test_diffaugment_is_differentiable_and_off_when_empty() -> None:
    images = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    augmented = DiffAugment()(images)
    assert augmented.shape == images.shape and not torch.equal(augmented, images)
    augmented.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(DiffAugment(())(images), images)


@pytest.mark.parametrize("loss", ["bce", "wgan_gp"])
def test_conditional_samples_come_out_with_the_labels_asked_for(
        tmp_path: Path, loss: str, features: FeatureSpace) -> None:
    params = _small_params(loss=loss, epochs=8, sample_every=8)
    result = fit_gan(_two_colours(256, 0), _two_colours(32, 1), 2, params, CPU, out=tmp_path,
                     checkpoint=tmp_path / "state.pt", fingerprint="f", features=features)
    asked = np.array([0] * 16 + [1] * 16)
    samples = generate(result.generator, asked, CPU, seed=0).astype(float)
    red, blue = samples[:16].mean((0, 1, 2)), samples[16:].mean((0, 1, 2))
    assert red[0] > red[2] + 60, f"label 0 should be red, got mean RGB {red}"
    assert blue[2] > blue[0] + 60, f"label 1 should be blue, got mean RGB {blue}"
    assert (tmp_path / "samples" / "epoch_0008.png").stat().st_size > 0
    assert {"fid", "kid", "precision", "recall"} <= set(result.quality)


def test_the_sample_grid_has_a_row_per_learned_class_only(tmp_path: Path,
                                                         features: FeatureSpace) -> None:
    """A GAN asked for class 1 of 3 draws one row, not rows of classes it never saw."""
    only_blue = _two_colours(64, 0)
    blue = only_blue.labels == 1
    train = GanData(only_blue.images[blue], only_blue.labels[blue])
    params = _small_params(epochs=1, sample_every=1, evaluate_every=1)
    fit_gan(train, train, 3, params, CPU, out=tmp_path, checkpoint=tmp_path / "state.pt",
            fingerprint="f", features=features)
    grid = np.asarray(Image.open(tmp_path / "samples" / "epoch_0001.png"))
    side = params.resolution + 2  # make_grid pads 2 pixels around each image
    assert grid.shape[:2] == (side + 2, 8 * side + 2)


def test_a_killed_gan_run_resumes_to_the_same_weights(tmp_path: Path, features: FeatureSpace,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = _two_colours(96, 0), _two_colours(16, 1)
    params = _small_params(loss="wgan_gp", epochs=3)

    def run(folder: Path) -> gan_fit.GanResult:
        return fit_gan(train, val, 2, params, CPU, out=folder, checkpoint=folder / "state.pt",
                       fingerprint="same run", features=features)

    uninterrupted = run(tmp_path / "a")
    real_epoch = gan_fit._train_epoch

    def dies_in_epoch_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt("killed")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(gan_fit, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(gan_fit, "_train_epoch", real_epoch)
    resumed = run(tmp_path / "b")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for name, value in uninterrupted.generator.state_dict().items():
        assert torch.equal(value, resumed.generator.state_dict()[name]), name


def test_quality_separates_same_from_different_images(features: FeatureSpace) -> None:
    real = torch.from_numpy(_two_colours(40, 0).images).permute(0, 3, 1, 2)
    same = torch.from_numpy(_two_colours(40, 2).images).permute(0, 3, 1, 2)
    gray = torch.full_like(real, 128)
    close, far = sample_quality(real, same, features), sample_quality(real, gray, features)
    assert close["fid"] < far["fid"] and close["kid"] < far["kid"]
    assert close["recall"] > 0.5 and far["recall"] < 0.1
