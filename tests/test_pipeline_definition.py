"""dvc.yaml and params.yaml stay in step with the code they describe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellpipe.codefiles import imported_code
from cellpipe.params import StageParams, flat_keys, load_section
from cellpipe.stages.augment import AugmentStageParams
from cellpipe.stages.evaluate import EvaluateParams
from cellpipe.stages.export import ExportParams
from cellpipe.stages.ingest import IngestParams
from cellpipe.stages.preprocess import PreprocessParams
from cellpipe.stages.publish import PublishParams
from cellpipe.stages.train import TrainParams
from conftest import REPO

STAGES: dict[str, tuple[str, type[StageParams]]] = {
    "ingest": ("cellpipe.stages.ingest", IngestParams),
    "preprocess": ("cellpipe.stages.preprocess", PreprocessParams),
    "augment": ("cellpipe.stages.augment", AugmentStageParams),
    "train": ("cellpipe.stages.train", TrainParams),
    "evaluate": ("cellpipe.stages.evaluate", EvaluateParams),
    "export": ("cellpipe.stages.export", ExportParams),
    "publish": ("cellpipe.stages.publish", PublishParams),
}
# Code that a stage copies into the Triton repository instead of importing it.
COPIED_CODE = "src/cellpipe/serving/triton_python/"
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _leaves(section: dict, prefix: str) -> set[str]:
    keys = set()
    for name, value in section.items():
        if isinstance(value, dict):
            keys |= _leaves(value, f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_exactly_the_params_a_stage_reads(stage: str) -> None:
    _, model = STAGES[stage]
    assert set(PIPELINE[stage]["params"]) == flat_keys(model, stage)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_yaml_spells_out_every_key_and_validates(stage: str) -> None:
    _, model = STAGES[stage]
    assert _leaves(PARAMS[stage], stage) == flat_keys(model, stage)
    load_section(model, stage, REPO / "params.yaml")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_a_dvc_dependency(stage: str) -> None:
    # The same list the stage's run fingerprint hashes (engine/checkpoint.py).
    module, _ = STAGES[stage]
    code = {path.relative_to(REPO).as_posix() for path in imported_code(module)}
    deps = set(PIPELINE[stage]["deps"])
    assert code - deps == set(), f"stage '{stage}' imports code that dvc.yaml does not list"
    listed_code = {d for d in deps if d.startswith("src/") and not d.startswith(COPIED_CODE)}
    assert listed_code - code == set(), f"stage '{stage}' lists code it does not import"
    assert all((REPO / d).exists() for d in listed_code)


def test_imported_code_covers_what_python_loads_and_imports_inside_functions() -> None:
    # What a fresh interpreter loads misses imports inside functions: `cellpipe score`
    # imports the slide batch only when the command runs.
    listing = subprocess.run(
        [sys.executable, "-c",
         "import json, sys, cellpipe.commands.score; print(json.dumps([m.__file__ for n, m in "
         "sys.modules.items() if n.startswith('cellpipe') and getattr(m, '__file__', None)]))"],
        capture_output=True, text=True, check=True,
    )
    loaded = {Path(f).resolve() for f in json.loads(listing.stdout)}
    found = set(imported_code("cellpipe.commands.score"))
    assert {f for f in loaded if f.name != "__init__.py"} < found
    batch = REPO / "src/cellpipe/slides/batch.py"
    assert batch in found and batch not in loaded
    assert REPO / "src/cellpipe/codefiles.py" in set(imported_code("cellpipe.stages.train"))


# Keys whose params.yaml value describes the demo's data set rather than a default: the
# code's default works on any data set (ingest.classes: [] infers the class names).
DATA_SET_CHOICES = {"ingest.classes"}


def _flat(values: dict, prefix: str) -> dict:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}.{name}")
        else:
            flat[f"{prefix}.{name}"] = value
    return flat


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_yaml_holds_the_code_defaults(stage: str) -> None:
    """One source of defaults: what the code falls back to when params.yaml leaves a key
    out is what params.yaml says. Required keys (no default) are taken from params.yaml."""
    _, model = STAGES[stage]
    required = {name: PARAMS[stage][name] for name, field in model.model_fields.items()
                if field.is_required()}
    defaults = _flat(model.model_validate(required).model_dump(mode="json"), stage)
    written = _flat(model.model_validate(PARAMS[stage]).model_dump(mode="json"), stage)
    differences = {key: {"code": defaults[key], "params.yaml": written[key]}
                   for key in defaults if defaults[key] != written[key]
                   and key not in DATA_SET_CHOICES}
    assert differences == {}
