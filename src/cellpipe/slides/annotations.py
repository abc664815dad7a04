"""A slide's objects as GeoJSON that QuPath imports: one detection per cell or tile.

QuPath reads a FeatureCollection whose features carry ``objectType``, a
``classification`` (name and RGB colour) and ``measurements`` (name → number), with
coordinates in the full-resolution (level-0) pixels of the image: File → Import objects,
or drop the file onto the open image. Each object's box becomes a closed rectangle; the
colours are the overlays' (:func:`cellpipe.slides.scoring.class_colours`), so a class
looks the same in QuPath as in the overlay picture.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cellpipe.fsutil import atomic_path
from cellpipe.slides.scoring import class_colours

GEOJSON_FILE = "objects.geojson"
# Columns that become QuPath measurements besides each class's probability.
_MEASURED = ("confidence",)


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[list[float]]]:
    """A box as a GeoJSON Polygon's coordinates: one closed ring, corners clockwise on
    screen (y grows downwards in image pixels)."""
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def objects_feature_collection(objects: pd.DataFrame,
                               class_names: Iterable[str]) -> dict[str, Any]:
    """One GeoJSON Feature per row of a slide's ``objects`` table (see score_slide).

    ``class_names`` are the model's classes in order, which fixes each class's colour and
    which ``p_<class>`` columns become measurements. ``page`` and ``object_id`` stay as
    properties, so a feature can be traced back to its row.
    """
    names = tuple(class_names)
    colours = class_colours(names)
    measured = [*_MEASURED, *(f"p_{name}" for name in names)]
    columns = ["object_id", "page", "x0", "y0", "x1", "y1", "class", *measured]
    features = []
    for row in objects[columns].itertuples(index=False, name=None):
        object_id, page, x0, y0, x1, y1, name, *values = row
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": box_polygon(int(x0), int(y0), int(x1), int(y1))},
            "properties": {
                "objectType": "detection",
                "classification": {"name": str(name), "color": list(colours[name])},
                "measurements": {key: float(value)
                                 for key, value in zip(measured, values, strict=True)},
                "object_id": int(object_id),
                "page": int(page),
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_objects_geojson(path: Path, objects: pd.DataFrame, class_names: Iterable[str]) -> None:
    """Write :func:`objects_feature_collection` to ``path``, atomically and compactly
    (a tiled whole-slide image may have 10^5 features)."""
    collection = objects_feature_collection(objects, class_names)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")) + "\n")
