"""FixMatch (``train.method: fixmatch``): pseudo-labels made online, with consistency.

Sohn et al. (2020), "FixMatch: simplifying semi-supervised learning with consistency
and confidence". Every step sees a labelled batch and ``unlabeled_ratio`` times as many
unlabelled images, each in two views: a weak one (the training augmentation) and a
strong one (RandAugment, then a random erasing). Where the model's prediction on the
weak view reaches ``threshold``, its arg-max is the label the strong view is trained
towards:

    loss = CE(labelled) + unlabeled_weight · mean over unlabelled of
           1[max p(weak) ≥ threshold] · CE(strong, arg max p(weak))

Unlike the offline rounds of ``pseudo_label`` (methods/pseudo.py), the labels follow
the model as it improves, and the strong view keeps it from confirming its own
mistakes cheaply. What comes out is an ordinary classifier: the checkpoint, evaluate,
export and serving are unchanged.

The objective plugs into the one training loop (engine/fit.py). A head-only phase on
cached features stays supervised: a strongly augmented view has no cached features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cellpipe.contract import ModelContract, to_model_input
from cellpipe.engine.data import make_loader
from cellpipe.engine.loop import Epoch, Objective, endless, progress
from cellpipe.params import StageParams

log = logging.getLogger(__name__)


class FixMatchParams(StageParams):
    """The ``train.fixmatch:`` section."""

    threshold: float = Field(0.95, gt=0, le=1,
                             description="confidence on the weak view that makes a label")
    unlabeled_ratio: int = Field(3, ge=1, description="unlabelled images per labelled one")
    unlabeled_weight: float = Field(1.0, ge=0, description="weight of the consistency loss")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="steps between validations; null = one pass over unlabeled")
    strong_ops: int = Field(2, ge=0, description="RandAugment operations per strong view")
    strong_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (of 31)")
    erase_probability: float = Field(0.5, ge=0, le=1,
                                     description="chance of a random erasing (cutout)")
    distribution_alignment: bool = Field(
        False, description="scale weak-view probabilities by the class balance the loop "
                           "trains towards over their running mean (ReMixMatch)")
    alignment_momentum: float = Field(0.99, ge=0, lt=1,
                                      description="per step, of that running mean")


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                     threshold: float, alignment: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled loss, averaged over all unlabelled images (unconfident ones count
    0), and each image's label: the weak view's class, or -1 below ``threshold``.

    ``alignment`` (per class) rescales the weak-view probabilities before they are
    judged, renormalised: distribution alignment.
    """
    probabilities = torch.softmax(weak_logits.detach(), dim=1)
    if alignment is not None:
        probabilities = probabilities * alignment
        probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)
    confidence, pseudo_labels = probabilities.max(dim=1)
    mask = confidence >= threshold
    per_image = F.cross_entropy(strong_logits, pseudo_labels, reduction="none")
    return (per_image * mask).mean(), torch.where(mask, pseudo_labels, -1)


def build_strong_augment(weak: v2.Compose, params: FixMatchParams,
                         pad_value: int = 0) -> v2.Compose:
    """The weak augmentation, then RandAugment and a random erasing (uint8 C×H×W)."""
    return v2.Compose([
        weak,
        v2.RandAugment(num_ops=params.strong_ops, magnitude=params.strong_magnitude,
                       fill=pad_value),
        v2.RandomErasing(p=params.erase_probability, scale=(0.02, 0.25), value=pad_value),
    ])


class TwoViews(Dataset):
    """Each unlabelled image as a (weak, strong) pair of uint8 H×W×3 views."""

    def __init__(self, images: np.ndarray, weak: v2.Compose, strong: v2.Compose) -> None:
        self.images, self.weak, self.strong = images, weak, strong

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chw = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        return (self.weak(chw).permute(1, 2, 0).numpy(),
                self.strong(chw).permute(1, 2, 0).numpy())


def collate_views(batch: Sequence[tuple[np.ndarray, np.ndarray]], contract: ModelContract
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of a batch, normalised with the contract's one eval transform."""
    weak = np.stack([pair[0] for pair in batch])
    strong = np.stack([pair[1] for pair in batch])
    return (torch.from_numpy(to_model_input(weak, contract)),
            torch.from_numpy(to_model_input(strong, contract)))


class FixMatch(Objective):
    """The FixMatch objective: an epoch is one pass over the unlabelled images, or
    ``steps_per_epoch`` batches of them (a pretrained backbone on a CPU is slow)."""

    def __init__(self, unlabeled: TwoViews, contract: ModelContract, params: FixMatchParams,
                 batch_size: int, label_smoothing: float = 0.0) -> None:
        self.unlabeled, self.contract, self.params = unlabeled, contract, params
        self.unlabeled_batch = batch_size * params.unlabeled_ratio
        if len(unlabeled) < self.unlabeled_batch:
            raise ValueError(f"fixmatch needs at least one batch of unlabeled images "
                             f"({self.unlabeled_batch}), got {len(unlabeled)}")
        # Label smoothing ε trains the true class towards 1 − ε(K − 1)/K, not 1: a
        # threshold at or above that is seldom reached and the unlabelled images go unused.
        classes = len(contract.class_names)
        # Distribution alignment's target: the class-balanced batches (or loss weights)
        # of the loop make every class equally likely to the model.
        self.running_mean = torch.full((classes,), 1 / classes)
        ceiling = 1 - label_smoothing * (classes - 1) / classes
        if params.threshold >= ceiling:
            log.warning("fixmatch threshold %.3f is at or above %.3f, the confidence label "
                        "smoothing %.2f trains towards: few unlabelled images will get a "
                        "label (lower the threshold or set label_smoothing: 0)",
                        params.threshold, ceiling, label_smoothing)

    def steps_per_epoch(self, model: nn.Module, module: nn.Module, batches: DataLoader) -> int:
        if module is not model:
            return len(batches)  # head on cached features: supervised
        passes = len(self.unlabeled) // self.unlabeled_batch
        return min(passes, self.params.steps_per_epoch or passes)

    def train_epoch(self, epoch: Epoch) -> float:
        if epoch.module is not epoch.model:
            return super().train_epoch(epoch)
        device = epoch.device
        unlabeled = make_loader(self.unlabeled, np.zeros(len(self.unlabeled), np.int64),
                                batch_size=self.unlabeled_batch,
                                num_classes=len(self.contract.class_names), shuffle=True,
                                generator=epoch.generator,
                                collate_fn=partial(collate_views, contract=self.contract))
        labeled = endless(epoch.batches)
        steps = self.steps_per_epoch(epoch.model, epoch.module, epoch.batches)
        classes = len(self.contract.class_names)
        totals, per_class, seen = {"loss": 0.0, "consistency": 0.0}, np.zeros(classes), 0
        bar = progress(zip(range(steps), unlabeled, strict=False), epoch.desc)
        for _, (weak, strong) in bar:
            images, labels = next(labeled)
            step, pseudo_labels = self._step(
                epoch, device.batch(images), labels.to(device.torch_device),
                device.batch(weak), device.batch(strong))
            for name, value in step.items():
                totals[name] += value
            counts = pseudo_labels[pseudo_labels >= 0].bincount(minlength=classes)
            per_class += counts.cpu().numpy()
            seen += len(pseudo_labels)
            bar.set_postfix(loss=f"{step['loss']:.3f}",
                            labelled=f"{counts.sum().item() / len(pseudo_labels):.2f}")
        self._report(epoch.desc, per_class, seen, totals["consistency"] / max(steps, 1))
        return totals["loss"] / max(steps, 1)

    def _alignment(self, weak_logits: torch.Tensor) -> torch.Tensor | None:
        """Uniform over the running mean of the weak-view predictions (updated here), so
        a class the model over-predicts on unlabelled images is labelled less readily."""
        if not self.params.distribution_alignment:
            return None
        batch_mean = torch.softmax(weak_logits.detach(), dim=1).mean(dim=0).cpu()
        momentum = self.params.alignment_momentum
        self.running_mean = momentum * self.running_mean + (1 - momentum) * batch_mean
        uniform = torch.full_like(self.running_mean, 1 / len(self.running_mean))
        return (uniform / self.running_mean.clamp_min(1e-6)).to(weak_logits.device)

    def state_dict(self) -> dict:
        return {"running_mean": self.running_mean.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.running_mean = state["running_mean"].clone()

    def _report(self, desc: str, per_class: np.ndarray, seen: int, consistency: float) -> None:
        """Log how many unlabelled views got a label, and of which class: a drift of the
        labels towards one class shows here first."""
        log.info("%s: %.0f%% of unlabelled views above the %.2f threshold (per class %s), "
                 "consistency loss %.4f", desc, 100 * per_class.sum() / max(seen, 1),
                 self.params.threshold,
                 dict(zip(self.contract.class_names, per_class.astype(int).tolist(),
                          strict=True)), consistency)

    def _step(self, epoch: Epoch, images: torch.Tensor, labels: torch.Tensor,
              weak: torch.Tensor, strong: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        # One forward pass over all three, as in the paper: batch-norm statistics (of a
        # model trained from scratch) then see labelled and unlabelled images together.
        with epoch.device.autocast():
            logits = epoch.model(torch.cat([images, weak, strong])).float()
        labeled_logits, weak_logits, strong_logits = logits.split(
            [len(images), len(weak), len(strong)])
        consistency, pseudo_labels = consistency_loss(weak_logits, strong_logits,
                                                      self.params.threshold,
                                                      self._alignment(weak_logits))
        loss = epoch.loss_fn(labeled_logits, labels) + self.params.unlabeled_weight * consistency
        epoch.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        epoch.optimizer.step()
        epoch.scheduler.step()
        return {"loss": loss.item(), "consistency": consistency.item()}, pseudo_labels
