"""Semi-supervised GAN (``train.method: sgan``): the classifier is the discriminator.

Salimans et al. (2016), "Improved techniques for training GANs", section 5. The
classifier's K logits l(x) stand for the K real classes and a (K+1)-th class
"generated" whose logit is fixed at 0, so D(x) = P(real | x) = Z / (Z + 1) with
Z = Σ exp(l_k). The classifier is trained on
- labelled images: cross-entropy over the K classes (the supervised loss);
- unlabelled images: −log D(x) = softplus(−log Z), "real, of some class";
- generated images: −log(1 − D(G(z))) = softplus(log Z), "none of the classes".
The generator is trained by feature matching: the mean backbone features of its
images should equal those of the unlabelled batch. What comes out is an ordinary
K-class classifier, so the checkpoint, evaluate, export and serving are unchanged.

The objective plugs into the one training loop (engine/fit.py). A head-only phase
on cached features stays supervised: a generated image has no cached features.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from cellpipe.contract import ModelContract
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.loop import Epoch, Objective, endless, progress
from cellpipe.gan.nets import RESOLUTIONS, Generator
from cellpipe.gan.quality import to_uint8
from cellpipe.params import StageParams

log = logging.getLogger(__name__)


class SganParams(StageParams):
    """The ``train.sgan:`` section."""

    unlabeled_weight: float = Field(1.0, ge=0, description="weight of the real/generated loss")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="steps between validations; null = one pass over unlabeled")
    z_dim: int = Field(100, ge=1)
    channels: int = Field(32, ge=4, description="generator width at full resolution")
    lr_generator: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 42


def discriminator_loss(labeled_logits: torch.Tensor, labels: torch.Tensor,
                       unlabeled_logits: torch.Tensor, generated_logits: torch.Tensor,
                       supervised: nn.Module, unlabeled_weight: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's loss and its unsupervised part (real vs generated, any class)."""
    log_z_unlabeled = torch.logsumexp(unlabeled_logits, dim=1)
    log_z_generated = torch.logsumexp(generated_logits, dim=1)
    unsupervised = (F.softplus(-log_z_unlabeled).mean() + F.softplus(log_z_generated).mean())
    return supervised(labeled_logits, labels) + unlabeled_weight * unsupervised, unsupervised


def feature_matching_loss(real_features: torch.Tensor,
                          generated_features: torch.Tensor) -> torch.Tensor:
    """‖mean f(real) − mean f(G(z))‖², with the real side held fixed."""
    return (real_features.detach().mean(0) - generated_features.mean(0)).pow(2).sum()


class SemiSupervisedGan(Objective):
    """The SGAN objective: an epoch is one pass over the unlabelled images, or
    ``steps_per_epoch`` batches of them (a pretrained backbone on a CPU is slow)."""

    def __init__(self, unlabeled: ImageDataset, contract: ModelContract, params: SganParams,
                 batch_size: int) -> None:
        self.unlabeled, self.contract, self.params = unlabeled, contract, params
        self.batch_size = batch_size
        if len(unlabeled) < batch_size:
            raise ValueError(f"sgan needs at least one batch of unlabeled images "
                             f"({batch_size}), got {len(unlabeled)}")
        resolution = next((r for r in RESOLUTIONS if r >= contract.image_size), RESOLUTIONS[-1])
        with torch.random.fork_rng():  # its initial weights depend on its seed only
            torch.manual_seed(params.seed)
            self.generator = Generator(1, resolution, z_dim=params.z_dim,
                                       channels=params.channels)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=params.lr_generator,
                                          betas=params.betas)
        self.mean = torch.tensor(contract.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(contract.std).view(1, 3, 1, 1)

    def steps_per_epoch(self, model: nn.Module, module: nn.Module, batches: DataLoader) -> int:
        if module is not model:
            return len(batches)  # head on cached features: supervised
        return min(len(self.unlabeled) // self.batch_size,
                   self.params.steps_per_epoch or len(self.unlabeled))

    def train_epoch(self, epoch: Epoch) -> float:
        if epoch.module is not epoch.model:
            return super().train_epoch(epoch)
        device = epoch.device
        self.generator.to(device.torch_device).train()
        self.mean, self.std = self.mean.to(device.torch_device), self.std.to(device.torch_device)
        unlabeled = image_loader(self.unlabeled, self.contract, batch_size=self.batch_size,
                                 shuffle=True, generator=epoch.generator)
        labeled = endless(epoch.batches)
        steps = self.steps_per_epoch(epoch.model, epoch.module, epoch.batches)
        totals = {"loss": 0.0, "unsupervised": 0.0, "feature_matching": 0.0}
        bar = progress(zip(range(steps), unlabeled, strict=False), epoch.desc)
        for _, (unlabeled_images, _labels) in bar:
            images, labels = next(labeled)
            step = self._step(epoch, device.batch(images), labels.to(device.torch_device),
                              device.batch(unlabeled_images))
            for name, value in step.items():
                totals[name] += value
            bar.set_postfix(loss=f"{step['loss']:.3f}", fm=f"{step['feature_matching']:.3f}")
        means = {name: value / max(steps, 1) for name, value in totals.items()}
        log.debug("%s: %s", epoch.desc, means)
        return means["loss"]

    def _step(self, epoch: Epoch, images: torch.Tensor, labels: torch.Tensor,
              unlabeled: torch.Tensor) -> dict[str, float]:
        model, device = epoch.model, epoch.device
        noise = torch.randn(len(unlabeled), self.params.z_dim, device=device.torch_device)
        constant = torch.zeros(len(unlabeled), dtype=torch.long, device=device.torch_device)
        with device.autocast():  # the classifier (= discriminator) step
            generated = self._to_model_input(self.generator(noise, constant))
            unlabeled_features = model.backbone(unlabeled)
            loss, unsupervised = discriminator_loss(
                model(images).float(), labels, model.head(unlabeled_features).float(),
                model(generated.detach()).float(), epoch.loss_fn, self.params.unlabeled_weight)
        epoch.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        epoch.optimizer.step()
        epoch.scheduler.step()
        with device.autocast():  # the generator step, against the updated classifier
            matching = feature_matching_loss(unlabeled_features.float(),
                                             model.backbone(generated).float())
        # Gradients for the generator only: the classifier's own would be thrown away.
        weights = list(self.generator.parameters())
        for weight, grad in zip(weights, torch.autograd.grad(matching, weights), strict=True):
            weight.grad = grad
        self.optimizer.step()
        return {"loss": loss.item(), "unsupervised": unsupervised.item(),
                "feature_matching": matching.item()}

    def _to_model_input(self, generated: torch.Tensor) -> torch.Tensor:
        """Generator output in [-1, 1] → the classifier's normalised input at its size."""
        size = self.contract.image_size
        if generated.shape[-1] != size:
            generated = F.interpolate(generated, size=(size, size), mode="bilinear",
                                      antialias=True, align_corners=False)
        return ((generated + 1) / 2 - self.mean) / self.std

    @torch.no_grad()
    def samples(self, count: int = 64, seed: int = 0) -> np.ndarray:
        """uint8 N×S×S×3 generator samples, for a look at what the classifier rejected."""
        self.generator.eval()
        device = next(self.generator.parameters()).device
        noise = torch.randn(count, self.params.z_dim, generator=torch.Generator().manual_seed(seed))
        images = self.generator(noise.to(device), torch.zeros(count, dtype=torch.long,
                                                              device=device))
        return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
