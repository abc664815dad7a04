"""Compare per-slide counts with reference annotations (Pascal VOC boxes, as BCCD has)."""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from cellpipe.slides.batch import ModelKey

log = logging.getLogger(__name__)


def voc_counts(xml_file: Path) -> dict[str, int]:
    """Objects per class name in one VOC annotation file."""
    counts: dict[str, int] = {}
    for element in ET.parse(xml_file).getroot().iter("object"):
        name = (element.findtext("name") or "").strip()
        counts[name] = counts.get(name, 0) + 1
    return counts


def compare_with_voc(results: Path, annotations: Path, model: ModelKey) -> pd.DataFrame:
    """One row per scored slide (of ``model``) that has an annotation: both counts per class."""
    rows = []
    for summary_file in sorted((results / "slides").glob(f"*-{model.tag}/summary.json")):
        summary = json.loads(summary_file.read_text())
        xml_file = annotations / f"{Path(summary['slide']).stem}.xml"
        if not xml_file.is_file():
            log.warning("%s: no annotation %s", summary["slide"], xml_file)
            continue
        reference = voc_counts(xml_file)
        row: dict[str, object] = {"slide": summary["slide"]}
        for name, count in summary["counts"].items():
            row[f"{name}_found"] = count
            row[f"{name}_annotated"] = reference.get(name, 0)
        rows.append(row)
    return pd.DataFrame(rows)


def count_errors(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per class: mean absolute error, mean signed error, share of slides counted exactly."""
    classes = [c.removesuffix("_found") for c in comparison.columns if c.endswith("_found")]
    rows = []
    for name in classes:
        error = comparison[f"{name}_found"] - comparison[f"{name}_annotated"]
        rows.append({"class": name, "slides": len(error),
                     "annotated_mean": comparison[f"{name}_annotated"].mean(),
                     "mae": error.abs().mean(), "bias": error.mean(),
                     "exact_share": (error == 0).mean()})
    return pd.DataFrame(rows)


def print_comparison(comparison: pd.DataFrame) -> None:
    """The per-class error table on stdout (what `make demo` shows)."""
    if comparison.empty:
        print("no scored slide has an annotation to compare with")
        return
    errors = count_errors(comparison)
    print(f"Counts against the annotations on {len(comparison)} slides:")
    print(errors.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
