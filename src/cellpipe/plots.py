"""PNG figures for people: training curves, confusion matrix, reliability, mistakes.

DVC's HTML plots load their JavaScript from a CDN, so every figure a user should
look at is also rendered here as a PNG that opens offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on batch machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from cellpipe.fsutil import atomic_path  # noqa: E402


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def training_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and validation scores per epoch, with phase boundaries marked."""
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(history["epoch"], history["train_loss"], label="train loss")
    loss_axis.plot(history["epoch"], history["val_loss"], label="val loss")
    score_axis.plot(history["epoch"], history["val_macro_f1"], label="val macro-F1")
    score_axis.plot(history["epoch"], history["val_accuracy"], label="val accuracy")
    starts = history.loc[history["phase"].diff().fillna(1) != 0, "epoch"]
    for axis in (loss_axis, score_axis):
        for start in starts.iloc[1:]:
            axis.axvline(start - 0.5, color="gray", linestyle=":", linewidth=1)
        axis.set_xlabel("epoch")
        axis.legend()
        axis.grid(alpha=0.3)
    loss_axis.set_title("loss")
    score_axis.set_title("validation (dotted lines: phase changes)")
    _save(figure, path)


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Counts, with each row's share as colour (rows = true class)."""
    size = max(4.5, 0.9 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(
        ax=axis, cmap="Blues", colorbar=False, values_format="d")
    axis.set_title("confusion matrix (test)")
    _save(figure, path)


def reliability_diagram(bins: pd.DataFrame, ece_before: float, ece_after: float,
                        path: Path) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    for column, label in (("raw", f"raw (ECE {ece_before:.3f})"),
                          ("scaled", f"temperature-scaled (ECE {ece_after:.3f})")):
        part = bins[bins[f"{column}_count"] > 0]
        axis.plot(part[f"{column}_confidence"], part[f"{column}_accuracy"], marker="o",
                  label=label)
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left")
    axis.set_title("reliability (test)")
    _save(figure, path)


def image_gallery(images: np.ndarray, titles: Sequence[str], path: Path,
                    columns: int = 8, *,
                    title: str = "most confident mistakes (true → predicted, confidence)"
                    ) -> None:
    """A grid of images (uint8 N×H×W×3) with a title each (the mistakes gallery by default)."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles, strict=False):  # grid ≥ images
        axis.imshow(image)
        axis.set_title(title, fontsize=7)
    if len(images) == 0:
        axes.flat[0].text(0, 0.5, "no mistakes", fontsize=12)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)
