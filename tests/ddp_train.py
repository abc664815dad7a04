"""Test-only launcher: the ``cellpipe train`` command under torchrun, with the checks a test needs.

    torchrun --standalone --nproc_per_node 2 tests/ddp_train.py REPORT.json train --shards ...

Every rank runs the real command (``cellpipe.cli.main``). Around it, here and not in the
library: the weights each fit ends with are hashed on every rank and compared with
``all_gather_object``, and every call that writes an output (stage or loop) is recorded
with the rank that made it. Rank 0 writes both to REPORT.json. The process group is
opened here so that it is still up for the comparison after the command; the stage's own
``distributed.process_group`` nests inside it.

With ``CELLPIPE_TEST_CRASH_AT_EPOCH=k`` every rank raises KeyboardInterrupt when its k-th
training epoch starts (a killed job, for the resume test).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from cellpipe import cli
from cellpipe.engine import distributed
from cellpipe.engine import fit as fit_module
from cellpipe.engine.loop import Objective
from cellpipe.stages import train as train_stage

WRITERS = ((fit_module, "save_run_state"), (train_stage, "save_model"),
           (train_stage, "write_json"), (train_stage, "training_curves"))


def digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a state dict, names included."""
    hasher = hashlib.sha256()
    for name, tensor in state.items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def record_calls(module: ModuleType, name: str, calls: list[str]) -> None:
    """Replace ``module.name`` by a wrapper that appends ``name`` to ``calls``."""
    original: Callable = getattr(module, name)

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(name)
        return original(*args, **kwargs)

    setattr(module, name, recorded)


def compare_fits(weights: list[list[dict[str, str]]]) -> None:
    """Make the stage's fit gather every rank's weight hashes into ``weights``."""
    original = train_stage.fit

    def checked(model: torch.nn.Module, *args: object, **kwargs: object):  # noqa: ANN202
        result = original(model, *args, **kwargs)
        weights.append(distributed.all_gather_object(
            {"best": digest(result.best_state), "last": digest(model.state_dict())}))
        return result

    train_stage.fit = checked


def crash_at_epoch(epoch: int) -> None:
    """Raise KeyboardInterrupt as training epoch ``epoch`` (1-based, over all phases) starts."""
    original = Objective.train_epoch
    started = {"epochs": 0}

    def crashing(self: Objective, work: object) -> float:
        started["epochs"] += 1
        if started["epochs"] == epoch:
            raise KeyboardInterrupt(f"killed in epoch {epoch}")
        return original(self, work)

    Objective.train_epoch = crashing


def main() -> int:
    report, argv = Path(sys.argv[1]), sys.argv[2:]
    writes: list[str] = []
    weights: list[list[dict[str, str]]] = []
    with distributed.process_group(torch.device("cpu")):
        for module, name in WRITERS:
            record_calls(module, name, writes)
        compare_fits(weights)
        if "CELLPIPE_TEST_CRASH_AT_EPOCH" in os.environ:
            crash_at_epoch(int(os.environ["CELLPIPE_TEST_CRASH_AT_EPOCH"]))
        code = cli.main(argv)
        ranks = distributed.all_gather_object({"rank": distributed.rank(), "exit": code,
                                               "writes": writes})
        if distributed.is_main():
            report.write_text(json.dumps({"world_size": distributed.world_size(),
                                          "ranks": ranks, "weights": weights}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
