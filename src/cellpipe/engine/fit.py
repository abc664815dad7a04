"""Fit a classifier through a schedule of phases, resumable after a kill.

A phase trains the head only, the last N backbone blocks plus the head, or
everything, for some epochs at its own learning rate (AdamW, warm-up + cosine).
While the backbone is frozen its features are computed once and the head trains
on them, which is what makes transfer learning affordable on a CPU. Each epoch
is validated (macro-F1), the best weights are kept, a phase stops early after
``patience`` epochs without improvement, and the whole state (weights, optimiser,
scheduler, RNGs, history) is checkpointed atomically so a killed run resumes
at the next epoch and ends exactly as an uninterrupted one.

Under ``torchrun`` the same loop runs on every rank (see engine/distributed.py):
the module that trains is wrapped in DistributedDataParallel, each rank reads its
shard of every epoch, validation is sharded and gathered so that every rank sees
the same scores and stops at the same epoch, and rank 0 alone writes the run state.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader

from cellpipe.contract import ModelContract
from cellpipe.engine import distributed
from cellpipe.engine.checkpoint import load_run_state, restore_rng, rng_state, save_run_state
from cellpipe.engine.data import (
    ImageDataset,
    Shard,
    TrainAugmentParams,
    build_train_augmentation,
    class_counts,
    feature_loader,
    image_loader,
    set_epoch,
)
from cellpipe.engine.loop import (
    Device,
    Epoch,
    Objective,
    extract_features,
    predict,
    warmup_cosine,
)
from cellpipe.errors import CellpipeError
from cellpipe.nets.classifier import Classifier
from cellpipe.params import StageParams

log = logging.getLogger(__name__)


class PhaseParams(StageParams):
    """One phase: what trains (head | all | N = last N blocks + head), how long, how fast."""

    trainable: Literal["head", "all"] | int = "head"
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    # Discriminative learning rates: the backbone's trainable blocks learn at lr x this, the
    # head at lr. Below 1 a fine-tuning phase re-fits the head quickly (it now sees augmented
    # images through the blocks, not the cached clean features it was fitted on) while the
    # pretrained blocks move slowly enough to keep what they know.
    backbone_lr_scale: float = Field(1.0, gt=0, le=1)


class FitParams(StageParams):
    """Everything the loop needs besides the data and the model."""

    phases: list[PhaseParams] = Field(min_length=1)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    balance: Literal["sampler", "loss", "none"] = "sampler"
    early_stopping_patience: int = Field(4, ge=1)
    cache_frozen_features: bool = True
    freeze_pretrained_bn: bool = True
    seed: int = 42
    augment: TrainAugmentParams = TrainAugmentParams()


@dataclass
class FitResult:
    best_score: float
    best_state: dict
    history: list[dict] = field(default_factory=list)
    # The best epoch's val predictions (argmax), aligned with the val labels, so a caller
    # can compare two fits image by image (the data gate's paired bootstrap).
    best_val_predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class RunState:
    """Where a fit stands after an epoch: enough to continue it, after a kill, exactly as
    an uninterrupted run would.

    On disk it is a plain dict (:meth:`to_checkpoint`, :meth:`from_checkpoint`), the
    format checkpoints have always had: they load with ``weights_only=True``, which
    refuses instances of Python classes such as this one.
    """

    phase: int  # index of the phase in progress; len(phases) once all are done
    epoch: int  # epochs done in that phase
    best_score: float  # best val macro-F1 so far (-1 before the first epoch)
    stale: int  # epochs since phase_best last rose (early stopping)
    history: list[dict]  # one record per epoch, over all phases
    best_state: dict  # the model's state dict at best_score
    best_val_predictions: np.ndarray  # val arg-max predictions at best_score
    # Saved after every epoch; None only before the first one.
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | list[dict] | None = None  # see _rng_state: a list under DDP, one per rank
    objective: dict | None = None  # the objective's own state (e.g. SGAN's generator)
    # Best val macro-F1 of the phase in progress: early stopping counts the epochs since it
    # rose, so a fine-tuning phase that dips below the head's best at its start (new
    # optimiser, augmented images) runs on while it recovers. Checkpoints of older runs lack
    # it; -1 then means "no epoch of this phase yet".
    phase_best: float = -1.0

    @classmethod
    def fresh(cls, model: nn.Module) -> RunState:
        """The state before the first epoch: nothing trained, ``model``'s weights best."""
        return cls(phase=0, epoch=0, best_score=-1.0, stale=0, history=[],
                   best_state=copy.deepcopy(model.state_dict()),
                   best_val_predictions=np.zeros(0, np.int64))

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        """The state saved by :meth:`to_checkpoint` (keys it does not know, such as the
        fingerprint, are left out; a key that older checkpoints lack stays None)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def to_checkpoint(self) -> dict:
        """Plain data and tensors to save: one key per field, in field order; fields
        still None (before the first epoch) are left out."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that orders the data."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(model: Classifier, pretrained: bool, train: ImageDataset, val: ImageDataset,
        contract: ModelContract, params: FitParams, device: Device, *,
        checkpoint: Path, fingerprint: str, tag: str = "",
        objective: Objective | None = None) -> FitResult:
    """Train ``model`` in place through ``params.phases``; resume from ``checkpoint``.

    ``objective`` is what each epoch optimises (supervised cross-entropy unless given,
    e.g. the semi-supervised GAN's); everything else is this one loop. Under
    ``torchrun`` (an initialised process group) every rank calls it alike, and
    ``params.batch_size`` is the batch of all ranks together.
    """
    objective = objective or Objective()
    if len(val) == 0:
        raise CellpipeError("training needs a non-empty 'val' split for early stopping")
    generator = seed_everything(params.seed)
    shard = None
    if distributed.is_distributed():
        shard = _shard(objective, params, tag)
        # Each rank draws its own augmentations and dropout masks: one stream on every
        # rank would transform the i-th image of each rank's batch alike. The loader
        # generator seeded above stays the same on every rank.
        seed_everything(params.seed + shard.rank)
        # Another number of processes shards and batches the data otherwise: its saved
        # state cannot continue this run.
        fingerprint = f"{fingerprint}:world{shard.world_size}"
    model = device.prepare(model)
    # Rank 0 reads the run state and every rank continues from it: the same weights,
    # optimiser and history everywhere, even where other hosts cannot see rank 0's disk.
    saved = distributed.broadcast_object(
        load_run_state(checkpoint, fingerprint) if distributed.is_main() else None)
    resuming = saved is not None
    if saved is not None:
        state = RunState.from_checkpoint(saved)
        model.load_state_dict(state.model)
        objective.load_state_dict(state.objective or {})
        log.info("%sresuming after phase %d epoch %d (of a killed or earlier run)",
                 tag, state.phase + 1, state.epoch)
    else:
        state = RunState.fresh(model)
    num_classes = len(contract.class_names)
    loss_fn = _loss(train.labels, num_classes, params).to(device.torch_device)
    for index in range(state.phase, len(params.phases)):
        phase = params.phases[index]
        # RNG states are restored where they were saved, so that building the loaders
        # (which draws seeds) replays exactly as in an uninterrupted run.
        if resuming and state.epoch == 0:
            _restore_rng(state.rng, generator)
            resuming = False
        _set_trainable(model, phase)
        cached = phase.trainable == "head" and params.cache_frozen_features
        module, train_batches, val_batches = _phase_data(model, cached, train, val, contract,
                                                         params, device, generator, shard)
        optimizer = torch.optim.AdamW(_param_groups(model, module, phase), lr=phase.lr,
                                      weight_decay=params.weight_decay)
        total_steps = phase.epochs * objective.steps_per_epoch(model, module, train_batches)
        warmup_steps = round(params.warmup_fraction * total_steps)
        scheduler = warmup_cosine(optimizer, total_steps, warmup_steps)
        if resuming:  # inside this phase
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            _restore_rng(state.rng, generator)
            resuming = False
        # Wrapped only now: DDP synchronises the parameters that require gradients when
        # it is built, and _set_trainable has just chosen them for this phase.
        trained = distributed.wrap(module, device.torch_device)
        while state.epoch < phase.epochs and state.stale < params.early_stopping_patience:
            started = time.perf_counter()
            _train_mode(model, module, phase, pretrained and params.freeze_pretrained_bn)
            desc = f"{tag}phase {index + 1}/{len(params.phases)} epoch {state.epoch + 1}"
            set_epoch(train_batches, len(state.history))
            train_loss = objective.train_epoch(Epoch(model, trained, train_batches, optimizer,
                                                     scheduler, loss_fn, device, generator,
                                                     desc))
            train_loss = distributed.mean(train_loss)  # every rank records the same history
            logits, labels = _validate(trained, val_batches, len(val), device)
            record = _epoch_record(state, index, phase, train_loss, logits, labels,
                                   optimizer, time.perf_counter() - started, cached)
            state.history.append(record)
            _keep_if_best(state, model, record["val_macro_f1"], logits.argmax(1))
            state.epoch += 1
            state.model, state.optimizer = model.state_dict(), optimizer.state_dict()
            state.scheduler, state.rng = scheduler.state_dict(), _rng_state(generator)
            state.objective = objective.state_dict()
            _save(checkpoint, state, fingerprint)
            # Logged after saving: an epoch in the log is an epoch a rerun will not repeat.
            log.info("%s: loss %.4f, val macro-F1 %.4f, val accuracy %.4f (%.1f s)", desc,
                     train_loss, record["val_macro_f1"], record["val_accuracy"],
                     record["seconds"])
        del trained  # its gradient hooks must not outlive the phase they were built for
        # The next phase starts from the best weights so far, not the last ones.
        model.load_state_dict(state.best_state)
        state.phase, state.epoch, state.stale, state.phase_best = index + 1, 0, 0, -1.0
        state.model, state.rng = model.state_dict(), _rng_state(generator)
        _save(checkpoint, state, fingerprint)
    return FitResult(state.best_score, state.best_state, state.history,
                     state.best_val_predictions)


# --- ranks (torchrun) ----------------------------------------------------------------------


def _shard(objective: Objective, params: FitParams, tag: str) -> Shard:
    """This rank's share of the data; refuses what would not train alike on every rank."""
    ranks = distributed.world_size()
    if not objective.supports_distributed():
        raise CellpipeError(f"{type(objective).__name__} does not train under torchrun yet: "
                            "run this method as a single process")
    if params.batch_size % ranks:
        raise CellpipeError(f"train.batch_size {params.batch_size} is the batch of all "
                            f"{ranks} processes together: make it a multiple of {ranks}")
    log.info("%sdistributed: %d processes, %d images each per step (batch %d)", tag, ranks,
             params.batch_size // ranks, params.batch_size)
    return Shard(distributed.rank(), ranks, params.seed)


def _rng_state(generator: torch.Generator) -> dict | list[dict]:
    """The random states to checkpoint: this process's, or under DDP every rank's in
    rank order (each rank draws its own augmentations; a resumed rank takes its own)."""
    if distributed.is_distributed():
        return distributed.all_gather_object(rng_state(generator))
    return rng_state(generator)


def _restore_rng(saved: dict | list[dict], generator: torch.Generator) -> None:
    """Put back what :func:`_rng_state` saved (this rank's entry under DDP)."""
    restore_rng(saved[distributed.rank()] if isinstance(saved, list) else saved, generator)


def _save(checkpoint: Path, state: RunState, fingerprint: str) -> None:
    """Rank 0 writes the run state; the other ranks wait until it is on disk."""
    if distributed.is_main():
        save_run_state(checkpoint, state.to_checkpoint(), fingerprint)
    distributed.barrier()


def _validate(trained: nn.Module, batches: DataLoader, total: int, device: Device
              ) -> tuple[np.ndarray, np.ndarray]:
    """Val logits and labels in dataset order; under DDP each rank predicts its shard and
    all ranks gather the whole, so every rank scores alike and stops at the same epoch."""
    # BatchNorm statistics first: each rank's followed its own shard of the epoch.
    distributed.average_batchnorm_stats(trained)
    logits, labels = predict(distributed.unwrap(trained), batches, device, desc="validate")
    return (distributed.gather_in_order(logits, total),
            distributed.gather_in_order(labels, total))


# --- phases --------------------------------------------------------------------------------


def _set_trainable(model: Classifier, phase: PhaseParams) -> None:
    for parameter in model.parameters():
        parameter.requires_grad = phase.trainable == "all"
    for parameter in model.head.parameters():
        parameter.requires_grad = True
    if isinstance(phase.trainable, int):
        if not 0 < phase.trainable <= len(model.blocks):
            raise CellpipeError(f"trainable: {phase.trainable} blocks asked, the backbone has "
                                f"{len(model.blocks)} (use 1..{len(model.blocks)}, head or all)")
        for block in model.blocks[-phase.trainable:]:
            for parameter in block.parameters():
                parameter.requires_grad = True


def _param_groups(model: Classifier, module: nn.Module, phase: PhaseParams) -> list[dict]:
    """The trainable parameters of ``module``: the head's at the phase's rate, the
    backbone's in a group of their own at ``lr x backbone_lr_scale`` (one group at 1)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if phase.backbone_lr_scale == 1.0:
        return [{"params": trainable}]
    head = {id(p) for p in model.head.parameters()}
    groups = [{"params": [p for p in trainable if id(p) in head]},
              {"params": [p for p in trainable if id(p) not in head],
               "lr": phase.lr * phase.backbone_lr_scale}]
    return [group for group in groups if group["params"]]


def _train_mode(model: Classifier, module: nn.Module, phase: PhaseParams,
                freeze_bn: bool) -> None:
    """Train mode where weights train; frozen parts (and pretrained BN) stay in eval mode."""
    module.train()
    if module is not model:
        return  # head on cached features: nothing else runs
    if phase.trainable == "head":
        model.backbone.eval()
        return
    for layer in model.backbone.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in layer.parameters())
            # Small microscopy batches give noisy statistics: keep pretrained ones.
            if frozen or freeze_bn:
                layer.eval()


def _phase_data(model: Classifier, cached: bool, train: ImageDataset, val: ImageDataset,
                contract: ModelContract, params: FitParams, device: Device,
                generator: torch.Generator, shard: Shard | None = None):
    """The module to train and its train/val loaders: images, or cached features.

    With a ``shard`` (DDP) both loaders read this rank's share, and a training batch
    is this rank's part of ``params.batch_size``. Frozen features are still computed
    for every image on every rank: one forward pass, and no gathering to get wrong.
    """
    balanced = params.balance == "sampler"
    num_classes = len(contract.class_names)
    batch_size = params.batch_size // (shard.world_size if shard else 1)
    plain_train = ImageDataset(train.images, train.labels)
    if cached:
        train_features = extract_features(model.backbone, image_loader(
            plain_train, contract, batch_size=params.batch_size), device)
        val_features = extract_features(model.backbone, image_loader(
            val, contract, batch_size=params.batch_size), device)
        return (model.head,
                feature_loader(*train_features, batch_size=batch_size, shuffle=True,
                               balanced=balanced, num_classes=num_classes, generator=generator,
                               shard=shard),
                feature_loader(*val_features, batch_size=params.batch_size,
                               num_classes=num_classes, shard=shard))
    augmented = ImageDataset(train.images, train.labels,
                             build_train_augmentation(params.augment, contract.pad_value))
    return (model,
            image_loader(augmented, contract, batch_size=batch_size, shuffle=True,
                         balanced=balanced, generator=generator, shard=shard),
            image_loader(val, contract, batch_size=params.batch_size, shard=shard))


def _loss(labels: np.ndarray, num_classes: int, params: FitParams) -> nn.Module:
    weight = None
    if params.balance == "loss":
        counts = class_counts(labels, num_classes).astype(np.float32)
        weight = torch.as_tensor(counts.sum() / (num_classes * np.maximum(counts, 1)))
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing)


def _epoch_record(state: RunState, index: int, phase: PhaseParams, train_loss: float,
                  logits: np.ndarray, labels: np.ndarray, optimizer: torch.optim.Optimizer,
                  seconds: float, cached: bool) -> dict:
    predictions = logits.argmax(1)
    val_loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    return {
        "epoch": len(state.history) + 1,
        "phase": index + 1,
        "trainable": str(phase.trainable),
        "cached_features": cached,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": round(train_loss, 6),
        "val_loss": round(val_loss.item(), 6),
        "val_accuracy": round(float((predictions == labels).mean()), 6),
        # Over the classes val holds, as every macro average (engine/metrics.py): a class
        # that val lacks has no F1 to learn from, only the 0 of a wrong prediction.
        "val_macro_f1": round(float(f1_score(labels, predictions, labels=np.unique(labels),
                                             average="macro", zero_division=0)), 6),
        "seconds": round(seconds, 3),
    }


def _keep_if_best(state: RunState, model: nn.Module, score: float,
                  predictions: np.ndarray) -> None:
    """Keep the weights and val predictions of a new best score; count a stale epoch unless
    the phase's own best rose."""
    if score > state.best_score:
        state.best_score = score
        state.best_state = copy.deepcopy(model.state_dict())
        state.best_val_predictions = predictions
    if score > state.phase_best:
        state.phase_best, state.stale = score, 0
    else:
        state.stale += 1
