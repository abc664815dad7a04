"""Datasets and loaders over uint8 shards; normalisation is the contract's, per batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler
from torchvision.transforms import v2

from cellpipe.contract import ModelContract, to_model_input
from cellpipe.params import StageParams


class TrainAugmentParams(StageParams):
    """Microscopy augmentations; colour jitter stands in for stain variation."""

    flips: bool = True
    rotate90: bool = True
    affine_degrees: float = Field(10.0, ge=0, le=180)
    affine_translate: float = Field(0.05, ge=0, le=0.5)
    affine_scale: float = Field(0.1, ge=0, le=0.5)
    brightness: float = Field(0.15, ge=0, le=1)
    contrast: float = Field(0.15, ge=0, le=1)
    saturation: float = Field(0.1, ge=0, le=1)
    hue: float = Field(0.03, ge=0, le=0.5)


class RandomRot90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees: cells have no canonical orientation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, turns, dims=(-2, -1))


def build_train_augmentation(params: TrainAugmentParams, pad_value: int = 0) -> v2.Compose:
    """uint8 C×H×W → uint8 C×H×W, drawing from torch's global RNG (seeded, resumable)."""
    ops: list[torch.nn.Module] = []
    if params.flips:
        ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if params.rotate90:
        ops.append(RandomRot90())
    if params.affine_degrees or params.affine_translate or params.affine_scale:
        ops.append(v2.RandomAffine(
            degrees=params.affine_degrees,
            translate=(params.affine_translate, params.affine_translate),
            scale=(1 - params.affine_scale, 1 + params.affine_scale),
            fill=pad_value,
        ))
    if params.brightness or params.contrast or params.saturation or params.hue:
        ops.append(v2.ColorJitter(params.brightness, params.contrast, params.saturation,
                                  params.hue))
    return v2.Compose(ops or [v2.Identity()])  # all switched off: Compose refuses []


class ImageDataset(Dataset):
    """uint8 H×W×3 images with integer labels, optionally augmented (still uint8)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 augment: v2.Compose | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.augment = images, np.asarray(labels), augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image = np.array(self.images[index])  # a copy: shards are read-only memmaps
        if self.augment is not None:
            chw = torch.from_numpy(image).permute(2, 0, 1)
            image = self.augment(chw).permute(1, 2, 0).numpy()
        return image, int(self.labels[index])


def collate_images(batch: Sequence[tuple[np.ndarray, int]],
                   contract: ModelContract) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images and normalise them with the contract's one eval transform."""
    images = np.stack([image for image, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return torch.from_numpy(to_model_input(images, contract)), labels


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels[labels >= 0], minlength=num_classes)


@dataclass(frozen=True)
class Shard:
    """This process's share of every pass under DDP: rank ``rank`` of ``world_size``.

    ``seed`` orders the passes; with the epoch number (``set_epoch``) it decides each
    one, so every rank draws the same order and a resumed run replays it.
    """

    rank: int
    world_size: int
    seed: int = 0


class BalancedDistributedSampler(DistributedSampler):
    """This rank's share of a class-balanced draw (the DDP form of the balanced loader).

    Every rank draws the same ``len(labels)`` indices (rounded up to a multiple of the
    world size) with replacement, each class equally likely as WeightedRandomSampler
    draws them, from a generator seeded with ``seed + epoch``; rank r keeps every
    world-size-th index from r. Call ``set_epoch`` before each pass.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, shard: Shard) -> None:
        super().__init__(labels, num_replicas=shard.world_size, rank=shard.rank,
                         shuffle=True, seed=shard.seed)
        counts = class_counts(labels, num_classes).astype(np.float64)
        self.weights = torch.as_tensor(1.0 / np.maximum(counts, 1)[labels])

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True,
                                  generator=generator).tolist()
        return iter(drawn[self.rank:self.total_size:self.num_replicas])


def shard_sampler(dataset: Dataset, labels: np.ndarray, num_classes: int, shard: Shard, *,
                  shuffle: bool, balanced: bool) -> DistributedSampler:
    """The sampler of ``shard``: balanced, shuffled, or in order (validation) and padded."""
    if balanced:
        return BalancedDistributedSampler(labels, num_classes, shard)
    # Without shuffling, rank r reads rows r, r + N, ... and the last pass is padded
    # with the first rows: see cellpipe.engine.distributed.gather_in_order.
    return DistributedSampler(dataset, num_replicas=shard.world_size, rank=shard.rank,
                              shuffle=shuffle, seed=shard.seed, drop_last=False)


def make_loader(dataset: Dataset, labels: np.ndarray, *, batch_size: int, num_classes: int,
                shuffle: bool = False, balanced: bool = False,
                generator: torch.Generator | None = None, collate_fn=None,
                workers: int = 0, shard: Shard | None = None) -> DataLoader:
    """A loader; ``balanced`` draws every class equally often (with replacement).

    With a ``shard`` (DDP) it reads only this rank's share of each pass, through a
    DistributedSampler: call ``set_epoch`` on ``loader.sampler`` before each pass.
    """
    if shard is not None:
        sampler = shard_sampler(dataset, labels, num_classes, shard, shuffle=shuffle,
                                balanced=balanced)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          generator=generator, num_workers=workers, collate_fn=collate_fn)
    sampler = None
    if balanced:
        counts = class_counts(labels, num_classes).astype(np.float64)
        weights = 1.0 / np.maximum(counts, 1)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(labels),
                                        replacement=True, generator=generator)
        shuffle = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                      generator=generator, num_workers=workers, collate_fn=collate_fn)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a sharded (DDP) loader which pass comes next; plain loaders need nothing."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def image_loader(dataset: ImageDataset, contract: ModelContract, *, batch_size: int,
                 **options) -> DataLoader:
    """Normalised float image batches from a uint8 dataset."""
    return make_loader(dataset, dataset.labels, batch_size=batch_size,
                       num_classes=len(contract.class_names),
                       collate_fn=partial(collate_images, contract=contract), **options)


def feature_loader(features: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                   num_classes: int, **options) -> DataLoader:
    """Batches of cached backbone features, for head-only phases."""
    dataset = torch.utils.data.TensorDataset(features, labels)
    return make_loader(dataset, labels.numpy(), batch_size=batch_size, num_classes=num_classes,
                       **options)
