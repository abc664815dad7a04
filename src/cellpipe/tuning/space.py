"""The search space: the few recipes a trial can draw, and what each changes in params.yaml.

A recipe is four or five choices, each one a question the data set answers differently:

* **input size**: 64 px, or the data's native size (the median crop side of the
  labelled images, rounded, capped). Upsampling small crops feeds ImageNet blocks the
  scale they were trained at; the native size keeps detail a 64 px resize throws away
  (or, for small crops, avoids inventing pixels).
* **fit to the square** (only for inputs that are not square): pad the whole crop (the
  cell shrinks, the border is filled) or crop its centre (the cell keeps its scale, the
  edges are cut). Which one helps depends on where the cells sit in the crops.
* **model**: the pretrained backbone whole; the same truncated to its first blocks
  (mid-level features separate cells far from ImageNet better: bench/feature_depth.py);
  or the small CNN from scratch (no ImageNet bias at all; strong on tiny crops).
* **training** (pretrained models only): head only on frozen features; head, then the
  last blocks fine-tuned; head, then every block fine-tuned. Fine-tuning phases have
  discriminative rates: the blocks learn 10-30x slower than the head first did, so they
  adapt the pretrained features instead of overwriting them, while the head re-fits fast;
  early stopping counts from the phase's own best, so its first dip does not end it.
* **augmentation strength** (only where training sees images: a head trained on cached
  features never sees an augmented image): params.yaml's, half of it, or twice it.

A trial's choices are its Optuna params; :func:`overrides` turns them into the
params.yaml values, so the best trial's params alone rebuild its recipe.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna

from cellpipe.data.manifest import Manifest
from cellpipe.engine.data import TrainAugmentParams
from cellpipe.nets.registry import build_backbone
from cellpipe.stages.train import TrainParams

# The backbone pretrained offline, for a params.yaml whose own backbone is not pretrained.
DEFAULT_PRETRAINED = ("efficientnet_lite0", "imagenet")
SCRATCH_BACKBONE = "smallcnn"  # the registry's compact CNN (`cellpipe backbones`)

BASE_SIZE = 64
# Larger inputs cost quadratically: on 2 CPU cores one fine-tuning epoch of 8,400 images
# takes ~10 min at 128 px and ~30 min at 224 px, which no search budget of an hour buys.
# The cell sets at hand carry their detail at 128 px (the white-cell row of bench/README.md).
NATIVE_SIZE_CAP = 128
NATIVE_SIZE_STEP = 8  # feature maps halve five times; a multiple of 8 keeps them whole longer
NATIVE_SIZE_FLOOR = 16
# Crops whose median longer side is at least this many times their shorter side make
# padding and centre-cropping differ enough to ask which (white cells: 320x240, 1.33);
# below it the two cut or fill a few pixels and the search does not spend trials on it.
RESIZE_ASPECT = 1.2
RESIZE_MODES = ("pad", "crop")

# Keep ~3/5 of the blocks: on melanoma 5 of Lite0's 9 blocks (and 14 of MobileNetV2's
# 19) gave the best linear probe (bench/feature_depth.py); deeper blocks describe ImageNet.
TRUNCATE_FRACTION = 0.6
# Fine-tune the top third of the kept blocks: the most ImageNet-specific ones, where
# adapting pays most; the lower blocks' edges and colours transfer as they are.
LAST_BLOCKS_FRACTION = 1 / 3

# Learning rates (AdamW, warm-up + cosine per phase). The head's is the one params.yaml
# and the benchmarks use. Fine-tuning phases are discriminative: the head goes on at
# FINETUNE_HEAD_LR (it must re-fit to augmented images seen through moving blocks), the
# blocks 10x (last blocks) and 30x (every block) below the head's first rate, since moving
# more pretrained weights faster wipes out what they know.
HEAD_LR = 3e-3
FINETUNE_HEAD_LR = 1e-3
FINETUNE_LAST_LR = 3e-4
FINETUNE_ALL_LR = 1e-4
SCRATCH_LR = 3e-3  # every weight starts random: the benchmarks' small-CNN rate

# Epochs per phase, in units of ``epochs``: a head on cached features costs almost
# nothing per epoch, so it gets twice as many; from scratch every feature must be learnt.
HEAD_EPOCHS = 2
FINETUNE_EPOCHS = 1
SCRATCH_EPOCHS = 3
# From random weights val climbs slowly and in jumps: the small CNN stops only after a
# third of its epochs without progress (params.yaml's patience of 4 ended melanoma runs
# at 0.62 cross-validated macro-F1; the hand-tuned small CNN used 15 of 60).
SCRATCH_PATIENCE_FRACTION = 1 / 3
# The unit itself follows the train set's size, so that a unit is about the same number of
# images seen (optimiser steps) whatever the set: 160 melanoma images get 15 epochs (3
# steps each), 15,434 malaria images 4 (as the hand-tuned malaria recipe fine-tuned). At
# 45,000 malaria got 3, and its val macro-F1 still rose at the last one (bench/README.md).
IMAGES_PER_UNIT = 60_000
DEFAULT_EPOCHS = 15  # the most: a tiny set's epoch is a few steps
MIN_EPOCHS = 2

MODELS = ("whole", "truncated", "scratch")
TRAININGS = ("head", "finetune_last", "finetune_all")
# Scales of the geometric and colour jitter; flips and 90-degree turns stay as they are
# (cells have no orientation: those are symmetries, not a strength).
AUGMENT_SCALES = {"weaker": 0.5, "base": 1.0, "stronger": 2.0}
_SCALED_AUGMENT = ("affine_degrees", "affine_translate", "affine_scale", "brightness",
                   "contrast", "saturation", "hue")


@dataclass(frozen=True)
class SearchSpace:
    """What the choices mean for one data set and base recipe (stored with the study, so a
    resumed search draws from the same recipes even after params.yaml was rewritten)."""

    sizes: tuple[int, ...]
    backbone: str  # the pretrained backbone
    weights: str
    blocks: int  # how many blocks it has whole
    augment: dict[str, Any]  # params.yaml's train.augment
    epochs: int
    cached_head: bool  # head phases train on cached features (train.cache_frozen_features)
    # How inputs become squares (preprocess.resize): params.yaml's first; both only for
    # inputs far from square (a study stored before this choice existed has the one).
    resizes: tuple[str, ...] = ("pad",)

    @property
    def truncated_blocks(self) -> int:
        return max(1, round(TRUNCATE_FRACTION * self.blocks))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sizes": list(self.sizes), "resizes": list(self.resizes)}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> SearchSpace:
        return cls(**{**stored, "sizes": tuple(stored["sizes"]),
                      "resizes": tuple(stored.get("resizes", ("pad",)))})


def native_size(manifest: Manifest) -> int:
    """The median longer side of the labelled train and val inputs, rounded to a multiple of
    8 and kept within 16..224 px (the test split is not looked at)."""
    rows = _labelled_train_val(manifest)
    side = float(np.median(np.maximum(rows["width"], rows["height"]))) if len(rows) else BASE_SIZE
    rounded = int(round(side / NATIVE_SIZE_STEP)) * NATIVE_SIZE_STEP
    return int(min(max(rounded, NATIVE_SIZE_FLOOR), NATIVE_SIZE_CAP))


def median_aspect(manifest: Manifest) -> float:
    """The median longer-to-shorter side ratio of the labelled train and val inputs (1 when
    there are none; the test split is not looked at)."""
    rows = _labelled_train_val(manifest)
    if not len(rows):
        return 1.0
    longer = np.maximum(rows["width"], rows["height"])
    shorter = np.maximum(np.minimum(rows["width"], rows["height"]), 1)
    return float(np.median(longer / shorter))


def resize_modes(manifest: Manifest, base: str) -> tuple[str, ...]:
    """``base`` alone for square-ish inputs, else both modes with ``base`` first."""
    if median_aspect(manifest) < RESIZE_ASPECT:
        return (base,)
    return (base, *(mode for mode in RESIZE_MODES if mode != base))


def _labelled_train_val(manifest: Manifest):
    rows = manifest.rows
    return rows[rows["split"].isin(["train", "val"]) & rows["label"].notna()]


def epochs_for(train_images: int) -> int:
    """Epochs per unit for a train split of ``train_images``: :data:`IMAGES_PER_UNIT` images
    seen, within :data:`MIN_EPOCHS`..:data:`DEFAULT_EPOCHS`."""
    epochs = round(IMAGES_PER_UNIT / max(train_images, 1))
    return int(min(max(epochs, MIN_EPOCHS), DEFAULT_EPOCHS))


def labelled_train_images(manifest: Manifest) -> int:
    rows = manifest.rows
    return int((rows["split"].eq("train") & rows["label"].notna()).sum())


def build_space(manifest: Manifest, train: TrainParams, epochs: int | None = None,
                resize: str = "pad") -> SearchSpace:
    """The space for this data set, anchored on params.yaml's backbone, augmentation and
    ``resize`` mode; ``epochs`` per unit (default: :func:`epochs_for` the labelled train
    images)."""
    epochs = epochs or epochs_for(labelled_train_images(manifest))
    pretrained = train.weights != "none" and train.backbone != SCRATCH_BACKBONE
    backbone, weights = (train.backbone, train.weights) if pretrained else DEFAULT_PRETRAINED
    blocks = len(build_backbone(backbone, "none").blocks)  # weights do not change the count
    sizes = tuple(sorted({BASE_SIZE, native_size(manifest)}))
    return SearchSpace(sizes, backbone, weights, blocks, train.augment.model_dump(), epochs,
                       train.cache_frozen_features, resize_modes(manifest, resize))


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Draw a recipe's choices; only choices that change the training are asked for."""
    choices: dict[str, Any] = {
        "image_size": trial.suggest_categorical("image_size", list(space.sizes)),
    }
    if len(space.resizes) > 1:
        choices["resize"] = trial.suggest_categorical("resize", list(space.resizes))
    choices["model"] = trial.suggest_categorical("model", list(MODELS))
    if choices["model"] != "scratch":  # a random backbone has no features to freeze
        choices["training"] = trial.suggest_categorical("training", list(TRAININGS))
    if sees_images(choices, space):
        choices["augment"] = trial.suggest_categorical("augment", list(AUGMENT_SCALES))
    return choices


def sees_images(choices: dict[str, Any], space: SearchSpace) -> bool:
    """Whether some phase trains on (augmented) images rather than on cached features."""
    return choices.get("training", "scratch") != "head" or not space.cached_head


def all_recipes(space: SearchSpace) -> list[dict[str, Any]]:
    """Every recipe :func:`suggest` can draw (the space is small enough to count)."""
    resizes = space.resizes if len(space.resizes) > 1 else (None,)
    recipes = []
    for size, resize, model in itertools.product(space.sizes, resizes, MODELS):
        for training in (None,) if model == "scratch" else TRAININGS:
            choices = {"image_size": size, **({"resize": resize} if resize else {}),
                       "model": model, **({"training": training} if training else {})}
            augments = AUGMENT_SCALES if sees_images(choices, space) else (None,)
            recipes += [{**choices, **({"augment": augment} if augment else {})}
                        for augment in augments]
    return recipes


def recipe_name(choices: dict[str, Any]) -> str:
    """A short name for a recipe, also its trial folder: ``64px-whole-finetune_last-base``
    (``128px-crop-whole-...`` where the space asks how to fit the square)."""
    parts = [f"{choices['image_size']}px", *([choices["resize"]] if "resize" in choices else []),
             choices["model"], choices.get("training", "all"), choices.get("augment", "none")]
    return "-".join(str(part) for part in parts)


def overrides(space: SearchSpace, choices: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The params.yaml values of a recipe, by section (what a trial trains with and what
    the chosen one writes back)."""
    model = choices["model"]
    patience = {}
    if model == "scratch":
        backbone, weights, kept_blocks, blocks = SCRATCH_BACKBONE, "none", None, 0
        phases = [{"trainable": "all", "epochs": SCRATCH_EPOCHS * space.epochs,
                   "lr": SCRATCH_LR}]
        patience = {"early_stopping_patience":
                    max(1, round(SCRATCH_PATIENCE_FRACTION * phases[0]["epochs"]))}
    else:
        backbone, weights = space.backbone, space.weights
        kept_blocks = space.truncated_blocks if model == "truncated" else None
        blocks = kept_blocks or space.blocks
        phases = _pretrained_phases(choices["training"], blocks, space.epochs)
    augment = scaled_augment(space.augment, AUGMENT_SCALES[choices.get("augment", "base")])
    fit = {"resize": choices["resize"]} if "resize" in choices else {}
    return {"preprocess": {"image_size": int(choices["image_size"]), **fit},
            "train": {"backbone": backbone, "weights": weights, "backbone_blocks": kept_blocks,
                      "phases": phases, "augment": augment, **patience}}


def _pretrained_phases(training: str, blocks: int, epochs: int) -> list[dict[str, Any]]:
    """Head first (a random head's large gradients would wreck pretrained blocks), then
    the fine-tuning ``training`` asks for."""
    phases: list[dict[str, Any]] = [{"trainable": "head", "epochs": HEAD_EPOCHS * epochs,
                                     "lr": HEAD_LR}]
    if training == "finetune_last":
        last = max(1, round(LAST_BLOCKS_FRACTION * blocks))
        phases.append(_finetune_phase(last, FINETUNE_LAST_LR, epochs))
    elif training == "finetune_all":
        phases.append(_finetune_phase("all", FINETUNE_ALL_LR, epochs))
    return phases


def _finetune_phase(trainable: int | str, blocks_lr: float, epochs: int) -> dict[str, Any]:
    """A fine-tuning phase: the head at FINETUNE_HEAD_LR, the blocks at ``blocks_lr``."""
    return {"trainable": trainable, "epochs": FINETUNE_EPOCHS * epochs, "lr": FINETUNE_HEAD_LR,
            "backbone_lr_scale": round(blocks_lr / FINETUNE_HEAD_LR, 6)}


def scaled_augment(base: dict[str, Any], scale: float) -> dict[str, Any]:
    """``base`` with its affine and colour jitter times ``scale``, within each field's bound."""
    scaled = dict(base)
    for name in _SCALED_AUGMENT:
        bound = next(rule.le for rule in TrainAugmentParams.model_fields[name].metadata
                     if hasattr(rule, "le"))
        scaled[name] = round(min(float(base[name]) * scale, bound), 4)
    return scaled


def apply(section: Any, values: dict[str, Any]) -> Any:
    """A params section (a pydantic model) with ``values`` in place of its own."""
    return type(section).model_validate({**section.model_dump(), **values})
