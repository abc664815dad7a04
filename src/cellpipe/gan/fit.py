"""The one GAN training loop: any loss, any resolution, resumable after a kill.

Per step: ``critic_steps`` discriminator updates (DiffAugment on real and generated
images alike; WGAN-GP adds the gradient penalty), then one generator update, then
the exponential moving average of the generator. Every epoch the whole state
(both networks, the average, both optimisers, RNGs, history) is checkpointed; a
killed run resumes at the next epoch and ends exactly as an uninterrupted one.
Every ``sample_every`` epochs a grid from fixed noise (one row per class) is drawn
with the averaged generator, and every ``evaluate_every`` epochs its samples are
scored against the validation images (FID, KID, precision, recall…).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import make_grid, save_image

from cellpipe.engine.checkpoint import load_run_state, restore_rng, rng_state, save_run_state
from cellpipe.engine.fit import seed_everything
from cellpipe.engine.loop import Device, progress
from cellpipe.fsutil import atomic_path
from cellpipe.gan.diffaugment import DEFAULT_POLICY, DiffAugment, Policy
from cellpipe.gan.losses import LossName, discriminator_loss, generator_loss, gradient_penalty
from cellpipe.gan.nets import RESOLUTIONS, Discriminator, Generator
from cellpipe.gan.quality import FeatureSpace, sample_quality, to_uint8
from cellpipe.params import StageParams

log = logging.getLogger(__name__)


class GanParams(StageParams):
    """The ``augment.gan:`` section: architecture, loss and schedule of the GAN."""

    loss: LossName = "wgan_gp"
    resolution: int = Field(64, description=f"one of {RESOLUTIONS}")
    z_dim: int = Field(128, ge=1)
    channels: int = Field(16, ge=4, description="width at full resolution, ×2 per halving")
    spectral_norm: bool = True
    diffaugment: tuple[Policy, ...] = DEFAULT_POLICY
    ema_decay: float = Field(0.999, ge=0, lt=1)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=2)
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.9)
    critic_steps: int = Field(1, ge=1, description="discriminator updates per generator update")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient penalty weight")
    sample_every: int = Field(10, ge=1, description="epochs between sample grids")
    evaluate_every: int = Field(10, ge=1, description="epochs between FID/KID evaluations")
    seed: int = 42

    @field_validator("resolution")
    @classmethod
    def _known_resolution(cls, value: int) -> int:
        if value not in RESOLUTIONS:
            raise ValueError(f"resolution {value} is not supported; valid: {list(RESOLUTIONS)}")
        return value


@dataclass
class GanData:
    """Images as uint8 N×H×W×3 (any size: resized to the GAN's) and their labels."""

    images: np.ndarray
    labels: np.ndarray

    def only(self, classes: list[int]) -> GanData:
        """The images of these classes."""
        keep = np.isin(self.labels, classes)
        return GanData(self.images[keep], self.labels[keep])


@dataclass
class GanResult:
    generator: Generator  # the moving average, in eval mode
    history: list[dict] = field(default_factory=list)

    @property
    def quality(self) -> dict:
        """The last evaluation's metrics (empty if none ran)."""
        scored = [r for r in self.history if "kid" in r]
        return {k: v for k, v in scored[-1].items() if k not in ("epoch",)} if scored else {}


def build_networks(num_classes: int, params: GanParams) -> tuple[Generator, Discriminator]:
    generator = Generator(num_classes, params.resolution, z_dim=params.z_dim,
                          channels=params.channels)
    discriminator = Discriminator(num_classes, params.resolution, channels=params.channels,
                                  spectral_norm=params.spectral_norm)
    return generator, discriminator


def to_gan_tensor(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×R×R in [-1, 1]."""
    # A copy: shards are read-only memory maps, which torch warns about.
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp(-1, 1)


def fit_gan(train: GanData, val: GanData, num_classes: int, params: GanParams, device: Device,
            *, out: Path, checkpoint: Path, fingerprint: str,
            features: FeatureSpace | None = None) -> GanResult:
    """Train a class-conditional GAN on ``train``; grids and state go under ``out``."""
    batch_generator = seed_everything(params.seed)
    generator, discriminator = build_networks(num_classes, params)
    generator, discriminator = device.prepare(generator), device.prepare(discriminator)
    average = AveragedModel(generator, avg_fn=_ema_with_warmup(params.ema_decay),
                            use_buffers=True)
    optimizers = {
        "generator": torch.optim.Adam(generator.parameters(), lr=params.lr_generator,
                                      betas=params.betas),
        "discriminator": torch.optim.Adam(discriminator.parameters(),
                                          lr=params.lr_discriminator, betas=params.betas),
    }
    augment = DiffAugment(params.diffaugment)
    real = to_gan_tensor(train.images, params.resolution)
    labels = torch.from_numpy(train.labels.astype(np.int64))
    state = load_run_state(checkpoint, fingerprint)
    if state is None:
        state = {"epoch": 0, "history": []}
    else:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        average.load_state_dict(state["average"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state[f"optimizer_{name}"])
        restore_rng(state["rng"], batch_generator)
        log.info("GAN: resuming after epoch %d (of a killed or earlier run)", state["epoch"])
    # Rows only for the classes the GAN learns (augment.classes may pick a few).
    grid_noise = _grid_noise(np.unique(train.labels).tolist(), params)
    while state["epoch"] < params.epochs:
        epoch = state["epoch"] + 1
        started = time.perf_counter()
        losses = _train_epoch(generator, discriminator, average, optimizers, augment, real,
                              labels, params, device, batch_generator, epoch)
        record = {"epoch": epoch, **losses}
        if epoch % params.evaluate_every == 0 or epoch == params.epochs:
            record.update(evaluate_generator(average.module, val, params, device,
                                             features or FeatureSpace()))
        if epoch % params.sample_every == 0 or epoch == params.epochs:
            draw_grid(average.module, grid_noise, out / "samples" / f"epoch_{epoch:04d}.png",
                      device)
        record["seconds"] = time.perf_counter() - started
        state["history"].append(record)
        state.update(epoch=epoch, generator=generator.state_dict(),
                     discriminator=discriminator.state_dict(), average=average.state_dict(),
                     rng=rng_state(batch_generator),
                     **{f"optimizer_{k}": o.state_dict() for k, o in optimizers.items()})
        save_run_state(checkpoint, state, fingerprint)
        log.info("GAN epoch %d/%d: %s (%.1f s)", epoch, params.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                           if k not in ("epoch", "seconds")), record["seconds"])
    final = average.module.eval()
    return GanResult(final, state["history"])


def _train_epoch(generator: Generator, discriminator: Discriminator, average: AveragedModel,
                 optimizers: dict[str, torch.optim.Optimizer], augment: DiffAugment,
                 real: torch.Tensor, labels: torch.Tensor, params: GanParams, device: Device,
                 batch_generator: torch.Generator, epoch: int) -> dict[str, float]:
    generator.train()
    discriminator.train()
    order = torch.randperm(len(real), generator=batch_generator)
    batch_size = min(params.batch_size, len(real))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    totals = {"d_loss": 0.0, "g_loss": 0.0, "gp": 0.0}
    bar = progress(batches, f"GAN epoch {epoch}/{params.epochs}")
    for rows in bar:
        images, classes = device.batch(real[rows]), device.batch(labels[rows])
        for _ in range(params.critic_steps):
            with torch.no_grad():
                fake = generator.sample(classes)
            real_aug, fake_aug = augment(images), augment(fake)
            d_loss = discriminator_loss(params.loss, discriminator(real_aug, classes),
                                        discriminator(fake_aug, classes))
            penalty = torch.zeros((), device=images.device)
            if params.loss == "wgan_gp" and params.gp_weight > 0:
                penalty = gradient_penalty(partial(discriminator, labels=classes),
                                           real_aug, fake_aug)
            optimizers["discriminator"].zero_grad(set_to_none=True)
            (d_loss + params.gp_weight * penalty).backward()
            optimizers["discriminator"].step()
        g_loss = generator_loss(params.loss, discriminator(augment(generator.sample(classes)),
                                                           classes))
        optimizers["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        optimizers["generator"].step()
        average.update_parameters(generator)
        step = {"d_loss": d_loss.item(), "g_loss": g_loss.item(), "gp": penalty.item()}
        for name, value in step.items():
            totals[name] += value
        bar.set_postfix(d=f"{step['d_loss']:.3f}", g=f"{step['g_loss']:.3f}")
    steps = max(1, len(batches))
    losses = {k: v / steps for k, v in totals.items()}
    if params.loss != "wgan_gp":
        losses.pop("gp")
    return losses


def _ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over n updates.

    A constant 0.999 would keep the average near the random initial weights for the
    first thousand steps, which is all a small data set gets in a short run.
    """

    def update(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor
               ) -> torch.Tensor:
        n = float(updates)
        rate = min(decay, (1 + n) / (10 + n))
        return averaged * rate + current * (1 - rate)

    return update


@torch.no_grad()
def generate(generator: Generator, labels: np.ndarray, device: Device, *, seed: int,
             batch_size: int = 256) -> np.ndarray:
    """uint8 N×R×R×3 images for ``labels``, reproducible from ``seed``."""
    generator.eval()
    noise = torch.Generator().manual_seed(seed)
    out = []
    classes = torch.from_numpy(labels.astype(np.int64))
    for start in range(0, len(classes), batch_size):
        images = generator.sample(device.batch(classes[start:start + batch_size]), noise)
        out.append(to_uint8(images).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, generator.resolution,
                                                     generator.resolution, 3), np.uint8)


def evaluate_generator(generator: Generator, val: GanData, params: GanParams, device: Device,
                       features: FeatureSpace) -> dict[str, float]:
    """Sample quality against the validation images, with their class mix."""
    fake = generate(generator, val.labels, device, seed=params.seed + 1)
    real = to_uint8(to_gan_tensor(val.images, params.resolution))
    return sample_quality(real, torch.from_numpy(fake).permute(0, 3, 1, 2), features)


def _grid_noise(classes: list[int], params: GanParams, per_class: int = 8
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed noise and labels for the sample grids: one row of ``per_class`` per class."""
    noise = torch.Generator().manual_seed(params.seed + 2)
    z = torch.randn(per_class, params.z_dim, generator=noise).repeat(len(classes), 1)
    return z, torch.tensor(classes).repeat_interleave(per_class)


@torch.no_grad()
def draw_grid(generator: Generator, grid: tuple[torch.Tensor, torch.Tensor], path: Path,
              device: Device) -> None:
    """A PNG grid of samples from fixed noise, one row per class."""
    z, labels = grid
    generator.eval()
    images = generator(device.batch(z), device.batch(labels)).cpu()
    per_row = int((labels == labels[0]).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_image(make_grid((images + 1) / 2, nrow=per_row, padding=2), tmp, format="png")
