"""The training loop's building blocks, shared by every backbone and method.

``module`` is whatever is being trained: the whole classifier on images, or only
its head on cached features. The same functions serve both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cellpipe.engine import distributed


@dataclass(frozen=True)
class Device:
    """Where to run, and the CUDA-only speed-ups (bf16 autocast, channels_last)."""

    torch_device: torch.device

    @classmethod
    def pick(cls, requested: str = "auto") -> Device:
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(torch.device(requested))

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def batch(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.torch_device, non_blocking=True)
        if self.is_cuda and tensor.ndim == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.torch_device)
        if self.is_cuda:
            module = module.to(memory_format=torch.channels_last)
        return module


def progress(batches: Iterable, desc: str) -> tqdm:
    """A per-batch progress bar, shown only when stderr is a terminal (and on rank 0)."""
    # Under torchrun every rank shares the terminal: N bars would overwrite each other.
    disable = None if distributed.is_main() else True
    return tqdm(batches, desc=desc, unit="batch", leave=False, disable=disable,
                dynamic_ncols=True)


@dataclass
class Epoch:
    """What one training epoch works with: the whole classifier, the module being
    trained (the classifier, or only its head on cached features), the labelled
    batches, the optimiser and scheduler of this phase, the loss, and the generator
    that orders the data (checkpointed, so a resumed epoch replays exactly)."""

    model: nn.Module
    module: nn.Module
    batches: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    device: Device
    generator: torch.Generator
    desc: str


class Objective:
    """What an epoch optimises. The loop around it (phases, validation, early stopping,
    checkpoints, resume) is the same for every method; a method changes only this.

    The base class is plain supervised training on the labelled batches.
    """

    def steps_per_epoch(self, model: nn.Module, module: nn.Module, batches: DataLoader) -> int:
        """Optimiser steps in one epoch (the scheduler's horizon is built from it)."""
        return len(batches)

    def train_epoch(self, epoch: Epoch) -> float:
        """Train one epoch; return its mean loss."""
        return train_one_epoch(epoch.module, epoch.batches, epoch.optimizer, epoch.scheduler,
                               epoch.loss_fn, epoch.device, desc=epoch.desc)

    def supports_distributed(self) -> bool:
        """Whether this objective trains correctly under DDP (``torchrun``).

        Plain supervised training does: each rank's batches come from the loop's
        sharded loader and DDP averages the gradients of ``module``. A subclass that
        trains networks of its own or draws its own (unsharded) batches must shard
        them and keep its networks equal on every rank first; it says so by
        overriding this.
        """
        return type(self) is Objective

    def state_dict(self) -> dict:
        """Whatever the objective itself trains (checkpointed with the model)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (resume after a kill)."""


def endless(loader: DataLoader) -> Iterator:
    """Pass after pass over ``loader`` (each pass reshuffled, unlike itertools.cycle)."""
    while True:
        yield from loader


def train_one_epoch(module: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module,
                    device: Device, *, desc: str = "train") -> float:
    """One pass over ``loader``; the scheduler steps per batch. Returns the mean loss."""
    total, seen = 0.0, 0
    bar = progress(loader, desc)
    for inputs, labels in bar:
        inputs, labels = device.batch(inputs), labels.to(device.torch_device)
        with device.autocast():
            loss = loss_fn(module(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        seen += len(labels)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1)


@torch.no_grad()
def predict(module: nn.Module, loader: DataLoader, device: Device, *,
            desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and labels for every batch of ``loader``, in order."""
    module.eval()
    logits, labels = [], []
    for inputs, batch_labels in progress(loader, desc):
        with device.autocast():
            logits.append(module(device.batch(inputs)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: Device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every image, computed once for a frozen-backbone phase."""
    backbone.eval()
    features, labels = [], []
    for inputs, batch_labels in progress(loader, "features"):
        with device.autocast():
            features.append(backbone(device.batch(inputs)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to zero, stepped once per batch."""
    warmup_steps = min(max(warmup_steps, 0), max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0,
                                               total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine],
                                                 milestones=[warmup_steps])
