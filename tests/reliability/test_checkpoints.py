"""Checkpoints are read with torch's restricted unpickler: a crafted one cannot run code."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch

from cellpipe.engine.checkpoint import (
    UnsafeCheckpoint,
    load_checkpoint,
    load_model,
    load_run_state,
    restore_rng,
    rng_state,
    save_reproducibly,
)

REPO = Path(__file__).resolve().parents[2]


class _RunsCodeOnLoad:
    """What an attacker would put in a checkpoint: unpickling it calls a function."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(_RunsCodeOnLoad.marker),))

    marker = ""


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    _RunsCodeOnLoad.marker = str(marker)
    buffer = io.BytesIO()
    torch.save({"format": 1, "fingerprint": "x", "payload": _RunsCodeOnLoad()}, buffer)
    path = tmp_path / "model.pt"
    path.write_bytes(buffer.getvalue())
    return path, marker


@pytest.mark.parametrize("loader", [load_checkpoint, load_model,
                                    lambda path: load_run_state(path, "x")])
def test_a_checkpoint_carrying_a_pickled_object_is_refused(crafted: tuple[Path, Path],
                                                           loader) -> None:  # noqa: ANN001
    path, marker = crafted
    with pytest.raises(UnsafeCheckpoint, match="refusing to load .*model.pt.*could run code"):
        loader(path)
    assert not marker.exists()


def test_the_run_state_round_trips_through_the_restricted_loader(tmp_path: Path) -> None:
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    state = rng_state(generator)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(),
                torch.rand(1, generator=generator).item())
    save_reproducibly(tmp_path / "state.pt", {"rng": state, "epoch": 2})
    restore_rng(load_checkpoint(tmp_path / "state.pt")["rng"], generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, generator=generator).item()) == expected


def test_no_code_loads_a_checkpoint_with_weights_only_false() -> None:
    offenders = []
    for source in [*REPO.glob("src/**/*.py"), *REPO.glob("flows/*.py"), *REPO.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load":
                keywords = {k.arg: k.value for k in node.keywords}
                value = keywords.get("weights_only")
                if ("weights_only" in keywords and isinstance(value, ast.Constant)
                        and value.value is False):
                    offenders.append(f"{source.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
