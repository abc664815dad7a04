"""Benchmark: at which depth do pretrained features separate melanoma from nevus best?

For every block count N of a backbone (``train.backbone_blocks: N``, the registry's
``truncate``), a linear probe (scikit-learn logistic regression, balanced class weights,
standardised features) is scored by 5-fold cross-validation, three times over, on the
200 labelled melanoma images at 64 px, the train stage's input. The depth with the best
cross-validated accuracy is the one to train with; the 600 test images are scored too,
for the record, but choose nothing.

    python bench/feature_depth.py [--folds 5] [--repeats 3]

Writes bench/results/feature_depth.md and feature_depth.png. MobileNetV2 runs only when
../shared/weights holds its converted ImageNet weights.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import train_real
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from cellpipe.data.shards import labeled, open_split, read_meta
from cellpipe.engine.data import ImageDataset, image_loader
from cellpipe.engine.loop import Device, extract_features
from cellpipe.nets.registry import build_backbone
from cellpipe.stages.train import TrainParams, make_contract

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger("bench")
MOBILENET_WEIGHTS = train_real.DATASETS.parent / "weights" / "mobilenet_v2_imagenet_from_tflite.pth"


@dataclass(frozen=True)
class Candidate:
    """A backbone to probe, with the train params that load its weights."""

    label: str
    train: dict


def candidates() -> list[Candidate]:
    found = [Candidate("EfficientNet-Lite0", {"backbone": "efficientnet_lite0",
                                              "weights": "imagenet"})]
    if MOBILENET_WEIGHTS.is_file():
        # Converted from TensorFlow: inputs in [-1, 1] (see ../shared/README.md).
        found.append(Candidate("MobileNetV2", {"backbone": "mobilenet_v2",
                                               "weights": str(MOBILENET_WEIGHTS),
                                               "mean": [0.5] * 3, "std": [0.5] * 3}))
    return found


def probe() -> Pipeline:
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))


def _features(params: TrainParams, shards: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    backbone = build_backbone(params.backbone, params.weights, params.backbone_blocks)
    contract = make_contract(read_meta(shards), backbone, params)
    part = labeled(open_split(shards, split))
    loader = image_loader(ImageDataset(part.images, part.labels), contract, batch_size=128)
    features, labels = extract_features(backbone.features.eval(), loader, Device.pick("cpu"))
    return features.numpy(), labels.numpy()


def depth_table(candidate: Candidate, shards: Path, folds: int, repeats: int) -> list[dict]:
    """One row per block count: cross-validated and test accuracy of the linear probe."""
    total = len(build_backbone(candidate.train["backbone"], "none").blocks)
    rows = []
    for blocks in range(1, total + 1):
        params = TrainParams.model_validate({**candidate.train, "backbone_blocks": blocks,
                                             "phases": [{"epochs": 1, "lr": 0.1}]})
        split_features = {s: _features(params, shards, s) for s in ("train", "val", "test")}
        labelled = [np.concatenate(parts) for parts in
                    zip(split_features["train"], split_features["val"], strict=True)]
        scores = cross_val_score(probe(), *labelled, cv=RepeatedStratifiedKFold(
            n_splits=folds, n_repeats=repeats, random_state=0))
        fitted = probe().fit(*labelled)
        test_features, test_labels = split_features["test"]
        rows.append({"backbone": candidate.label, "blocks kept": blocks,
                     "of": total, "feature width": labelled[0].shape[1],
                     "cv accuracy": scores.mean(), "cv std": scores.std(),
                     "test accuracy": (fitted.predict(test_features) == test_labels).mean()})
        log.info("%s, %d of %d blocks: cv %.3f, test %.3f", candidate.label, blocks, total,
                 scores.mean(), rows[-1]["test accuracy"])
    return rows


def plot(table: pd.DataFrame, path: Path) -> None:
    """One panel per backbone: probe accuracy against the number of blocks kept."""
    groups = list(table.groupby("backbone", sort=False))
    figure, panels = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), sharey=True,
                                  squeeze=False)
    for axes, (label, rows) in zip(panels[0], groups, strict=True):
        axes.plot(rows["blocks kept"], rows["cv accuracy"], "o-",
                  label="5-fold CV on the 200 labelled (chooses)")
        axes.plot(rows["blocks kept"], rows["test accuracy"], "x--", alpha=0.7,
                  label="600 test images (reported only)")
        axes.set(title=label, xlabel="backbone blocks kept (train.backbone_blocks)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    panels[0][0].set_ylabel("linear probe accuracy")
    panels[0][0].legend(fontsize=8)
    figure.suptitle("melanoma vs nevus at 64 px: pretrained features by depth")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train_real.RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cellpipe-depth-") as scratch:
        _, shards = train_real._prepare(train_real.melanoma([]), Path(scratch))
        table = pd.DataFrame([row for candidate in candidates()
                              for row in depth_table(candidate, shards, args.folds,
                                                     args.repeats)])
    best = table.loc[table.groupby("backbone", sort=False)["cv accuracy"].idxmax()]
    plot(table, train_real.RESULTS / "feature_depth.png")
    formatted = table.assign(**{column: table[column].map(lambda v: f"{v:.3f}")
                                for column in ("cv accuracy", "cv std", "test accuracy")})
    markdown = formatted.to_markdown(index=False, disable_numparse=True)
    chosen = "\n".join(f"- {row.backbone}: {row['blocks kept']} of {row.of} blocks "
                       f"(cv {row['cv accuracy']:.3f})" for _, row in best.iterrows())
    (train_real.RESULTS / "feature_depth.md").write_text(
        f"{markdown}\n\nBest cross-validated depth:\n{chosen}\n")
    print(markdown, "\n\nBest cross-validated depth:\n" + chosen, flush=True)


if __name__ == "__main__":
    main()
