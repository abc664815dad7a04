"""Read one section of params.yaml into a validated, immutable model.

Each stage owns one section and reads nothing else, so dvc.yaml can list exactly
the keys a stage depends on. Unknown keys are errors: a typo in params.yaml must
not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cellpipe.errors import ParamsError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class StageParams(BaseModel):
    """Base for every params section: strict keys, frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=StageParams)


def load_section(model: type[P], section: str, path: Path = DEFAULT_PARAMS_FILE) -> P:
    """Load ``section`` of the YAML file at ``path`` as ``model``; raise ParamsError if invalid."""
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    document = yaml.safe_load(path.read_text()) or {}
    if section not in document:
        raise ParamsError(f"{path} has no '{section}:' section (found: {sorted(document)})")
    try:
        return model.model_validate(document[section] or {})
    except ValidationError as error:
        raise ParamsError(f"invalid '{section}' params in {path}:\n{error}") from error


def flat_keys(model: type[StageParams], prefix: str) -> set[str]:
    """Dotted names of every leaf field of ``model``, as dvc.yaml's ``params:`` lists them."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, StageParams):
            keys |= flat_keys(annotation, f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys
