"""Augment stage: grow scarce classes with a class-conditional GAN, and measure it.

Trains the GAN (``gan/fit.py``) on the train split of the preprocess shards, keeps
the averaged generator (``models/gan/generator.pt``, identified by its sha256) and
samples synthetic training images into a shards folder that holds a ``train``
split only. Each synthetic row carries its provenance (``synthetic``, the
generator's sha256, the sample seed and index). The stage's metrics are the
sample quality against the val split (FID, KID, precision, recall, density,
coverage). Whether training uses the images is the train stage's data gate.

With ``augment.unlabeled.enabled`` the GAN also learns from the ``unlabeled`` split,
labelled by a linear probe (gan/pool.py); ``pseudo_labels.csv`` lists the images
it took, and the metrics give the probe's val accuracy.

With ``augment.enabled: false`` the stage writes an empty synthetic folder and a
card that says so, so the pipeline's shape does not depend on the switch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cellpipe.data.shards import SplitShard, labeled, open_split, read_meta
from cellpipe.data.synthetic import write_synthetic
from cellpipe.data.transforms import fit_square
from cellpipe.engine.checkpoint import run_fingerprint, save_reproducibly
from cellpipe.engine.loop import Device
from cellpipe.errors import InputError
from cellpipe.fsutil import write_json
from cellpipe.gan.fit import GanData, GanParams, GanResult, fit_gan, generate
from cellpipe.gan.pool import PSEUDO_LABEL_COLUMNS, UnlabeledPoolParams, pseudo_labelled_pool
from cellpipe.gan.quality import FeatureSpace
from cellpipe.params import StageParams
from cellpipe.stages.options import add_device, add_path

log = logging.getLogger(__name__)

GENERATOR_FORMAT = 1


class AugmentStageParams(StageParams):
    """The ``augment:`` section of params.yaml."""

    enabled: bool = False
    classes: list[str] = Field(default_factory=list,
                               description="classes to synthesise; [] = every class")
    count: Literal["balance"] | int = Field(
        "balance", description="images per class, or 'balance': up to the largest class")
    sample_seed: int = 7
    unlabeled: UnlabeledPoolParams = UnlabeledPoolParams()
    gan: GanParams = GanParams()


def synthetic_counts(labels: np.ndarray, class_names: list[str],
                     params: AugmentStageParams) -> dict[int, int]:
    """How many synthetic images each class gets (class index → count)."""
    unknown = sorted(set(params.classes) - set(class_names))
    if unknown:
        raise InputError(f"augment.classes {unknown} are not among the classes {class_names}")
    chosen = params.classes or class_names
    present = np.bincount(labels[labels >= 0], minlength=len(class_names))
    counts = {}
    for name in chosen:
        index = class_names.index(name)
        wanted = int(present.max() - present[index]) if params.count == "balance" else params.count
        if wanted > 0:
            counts[index] = wanted
    return counts


SECTION = "augment"
Params = AugmentStageParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cellpipe augment``'s options, one per parameter of :func:`run`."""
    add_path(parser, "shards", "preprocess shards folder")
    add_path(parser, "out", "folder: synthetic/, samples/, history.csv, metrics.json")
    add_path(parser, "model-dir", "folder for generator.pt and card.json")
    add_device(parser)


@dataclass
class GanRun:
    """What the GAN made: the fitted generator and history, its samples, and its pool."""

    result: GanResult
    images: np.ndarray          # synthetic uint8 N×S×S×3 at the shards' size
    labels: np.ndarray          # their class indices
    pseudo: pd.DataFrame        # unlabeled images the pool took (augment.unlabeled)
    pool_images: int
    pool_metrics: dict


def run(shards: Path, out: Path, model_dir: Path, params: AugmentStageParams, *,
        device: str = "auto") -> dict:
    """The stage as DVC runs it: generator under ``model_dir``, the rest under ``out``."""
    meta = read_meta(shards)
    out.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    train_labels = labeled(open_split(shards, "train")).labels
    counts = synthetic_counts(train_labels, meta["classes"], params) if params.enabled else {}
    if not counts:
        reason = ("augment.enabled is false" if not params.enabled
                  else "the chosen classes need no images (augment.count)")
        return _nothing_to_make(out, model_dir, meta, reason)
    made = augment(shards, counts, out, params, device=device)
    made.pseudo.to_csv(out / "pseudo_labels.csv", index=False)
    generator_path = model_dir / "generator.pt"
    save_reproducibly(generator_path, {
        "format": GENERATOR_FORMAT, "classes": meta["classes"],
        "params": json.loads(params.gan.model_dump_json()),
        "state_dict": {k: v.detach().cpu()
                       for k, v in made.result.generator.state_dict().items()},
    })
    generator_sha = hashlib.sha256(generator_path.read_bytes()).hexdigest()
    write_synthetic(out / "synthetic", meta, made.images, made.labels,
                    provenance={"enabled": True, "generator_sha256": generator_sha,
                                "sample_seed": params.sample_seed,
                                "gan_pseudo_labelled_images": len(made.pseudo)})
    history = pd.DataFrame.from_records(made.result.history).drop(columns="seconds")
    history.to_csv(out / "history.csv", index=False)
    metrics = {"enabled": True, "loss": params.gan.loss, "resolution": params.gan.resolution,
               "epochs": params.gan.epochs, "generator_sha256": generator_sha,
               "synthetic_images": int(len(made.labels)),
               "synthetic_per_class": {meta["classes"][k]: n for k, n in sorted(counts.items())},
               "gan_train_images": made.pool_images, **made.pool_metrics,
               # Wall-clock seconds stay out: a rerun must leave the tracked metrics as they were.
               **{k: v for k, v in made.result.quality.items()
                  if k not in ("d_loss", "g_loss", "gp", "seconds")}}
    write_json(out / "metrics.json", metrics)
    write_json(model_dir / "card.json", {k: metrics[k] for k in
                                         ("enabled", "loss", "resolution", "generator_sha256")})
    log.info("GAN %s at %d px: KID %.4f, FID %.1f; %d synthetic images %s", params.gan.loss,
             params.gan.resolution, metrics.get("kid", float("nan")),
             metrics.get("fid", float("nan")), len(made.labels), metrics["synthetic_per_class"])
    return metrics


def augment(shards: Path, counts: dict[int, int], out: Path, params: AugmentStageParams, *,
            device: str = "auto") -> GanRun:
    """Fit the GAN on the train split (with the pseudo-labelled pool when asked) and sample
    ``counts`` images per class; sample grids and the resumable state go under ``out``."""
    meta = read_meta(shards)
    train, val = (_gan_data(labeled(open_split(shards, split))) for split in ("train", "val"))
    features = FeatureSpace()
    pool, pseudo, pool_metrics = train, pd.DataFrame(columns=PSEUDO_LABEL_COLUMNS), {}
    if params.unlabeled.enabled:
        unlabeled = open_split(shards, "unlabeled", needed_by="augment.unlabeled.enabled")
        pool, pseudo, pool_metrics = pseudo_labelled_pool(
            train, unlabeled.images, val, meta["classes"], params.unlabeled, features)
    # The GAN learns only the classes it is asked for: cheaper, and on CPU that matters.
    if params.classes:
        pool, val = pool.only(list(counts)), val.only(list(counts))
    if len(val.labels) == 0:
        raise InputError("the GAN's sample quality is measured on val, which has no image "
                         f"of the classes to synthesise {params.classes}")
    # What the GAN learns from: a checkpoint made from another pool must not be resumed.
    pool_inputs: list[Path | dict] = [meta, shards / "train" / "rows.parquet"]
    if params.unlabeled.enabled:
        pool_inputs += [params.unlabeled.model_dump(), shards / "unlabeled" / "rows.parquet"]
    fingerprint = run_fingerprint(params.gan, *pool_inputs, code=__name__)
    result = fit_gan(pool, val, len(meta["classes"]), params.gan, Device.pick(device), out=out,
                     checkpoint=out / "checkpoints" / "gan.pt", fingerprint=fingerprint,
                     features=features)
    labels = np.concatenate([np.full(n, k, np.int64) for k, n in sorted(counts.items())])
    samples = generate(result.generator, labels, Device.pick(device), seed=params.sample_seed)
    # Back to the shards' size (the GAN may run at another resolution).
    images = np.stack([fit_square(s, meta["image_size"], resample=meta["resample"])
                       for s in samples])
    return GanRun(result, images, labels, pseudo, int(len(pool.labels)), pool_metrics)


def _gan_data(split: SplitShard) -> GanData:
    return GanData(split.images, split.labels)


def _nothing_to_make(out: Path, model_dir: Path, meta: dict, reason: str) -> dict:
    """Outputs of a run that trains no GAN: every DVC output exists, the synthetic set empty."""
    size = meta["image_size"]
    write_synthetic(out / "synthetic", meta, np.zeros((0, size, size, 3), np.uint8),
                    np.zeros(0, np.int64), provenance={"enabled": False})
    write_json(model_dir / "card.json", {"enabled": False, "reason": reason})
    (model_dir / "generator.pt").unlink(missing_ok=True)  # from an earlier enabled run
    (out / "samples").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    pd.DataFrame(columns=["epoch", "d_loss", "g_loss"]).to_csv(out / "history.csv", index=False)
    pd.DataFrame(columns=PSEUDO_LABEL_COLUMNS).to_csv(out / "pseudo_labels.csv", index=False)
    metrics = {"enabled": False, "synthetic_images": 0}
    write_json(out / "metrics.json", metrics)
    log.info("%s: no GAN trained, no synthetic images", reason)
    return metrics
