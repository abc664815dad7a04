"""Write a chosen recipe into params.yaml, changing only its values: comments, order, quoting
and layout stay as the user wrote them (ruamel.yaml's round trip)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from cellpipe.errors import ParamsError
from cellpipe.fsutil import atomic_path

CHOSEN_NOTE = "chosen by cellpipe tune"


@dataclass(frozen=True)
class Change:
    """One params.yaml key whose value changed (``key`` dotted: ``train.augment.hue``)."""

    key: str
    old: Any
    new: Any


def _yaml() -> YAML:
    """A round-trip YAML with params.yaml's layout (2-space maps, ``  - `` lists, ``null``)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar(
            "tag:yaml.org,2002:null", "null"))
    return yaml


def write_params(path: Path, values: dict[str, dict[str, Any]]) -> list[Change]:
    """Set ``values`` (by section, nested like params.yaml) in the file at ``path``; only keys
    whose value differs are written. Returns what changed."""
    yaml = _yaml()
    document = yaml.load(path.read_text())
    changes: list[Change] = []
    for section, section_values in values.items():
        if section not in document:
            raise ParamsError(f"{path} has no '{section}:' section")
        changes += _update(document[section], section_values, section)
    if changes:
        buffer = io.StringIO()
        yaml.dump(document, buffer)
        with atomic_path(path) as tmp:
            tmp.write_text(buffer.getvalue())
    return changes


def _update(mapping: CommentedMap, values: dict[str, Any], prefix: str) -> list[Change]:
    changes = []
    for key, new in values.items():
        old = mapping.get(key)
        if isinstance(new, dict) and isinstance(old, dict):
            changes += _update(old, new, f"{prefix}.{key}")
            continue
        if _plain(old) == new:
            continue
        changes.append(Change(f"{prefix}.{key}", _plain(old), new))
        mapping[key] = _styled(old, new)
    return changes


def _plain(value: Any) -> Any:
    """ruamel's commented containers as plain lists and dicts, for comparing."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _styled(old: Any, new: Any) -> Any:
    """``new`` written as ``old`` was: a list of one-line mappings (train.phases) stays one,
    marked as the search's choice; a whole number where there was an integer stays one."""
    if isinstance(new, list) and new and all(isinstance(item, dict) for item in new):
        items = CommentedSeq()
        for item in new:
            line = CommentedMap(item)
            line.fa.set_flow_style()
            items.append(line)
        items.yaml_add_eol_comment(f"# {CHOSEN_NOTE}", 0)
        return items
    if isinstance(old, int) and isinstance(new, float) and new.is_integer():
        return int(new)
    return new
