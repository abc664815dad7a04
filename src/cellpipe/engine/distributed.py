"""The process group of a ``torchrun`` job, for the one training loop (engine/fit.py).

Under ``torchrun`` every process trains the same model on its shard of each epoch
(DistributedDataParallel averages the gradients), and rank 0 alone writes. Outside
``torchrun`` the helpers the loop calls are no-ops that answer for a single process,
so the loop calls them unconditionally and stays one loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 for a single process).

    Without an initialised group it is 0 whatever ``RANK`` says: a process that did
    not join its job trains alone, and must then write and log as one.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def local_rank() -> int:
    """This process's rank on its own host: the GPU it uses (0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """Whether this process writes checkpoints, metrics and INFO logs (rank 0)."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> None:
    """Join the job ``torchrun`` started (env ``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE`` ...).

    On CUDA the process first takes GPU ``LOCAL_RANK`` as its current device, so the
    plain ``cuda`` device the rest of the code uses is this process's own GPU.
    Ranks other than 0 log at WARNING: N copies of every INFO line say nothing more.
    """
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend_for(device))
    if not is_main():
        # Both the root logger and the package's: `cellpipe` CLI's basicConfig resets the
        # root level when it runs after this, the package logger keeps its own.
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("cellpipe").setLevel(logging.WARNING)
    log.info("distributed: rank %d of %d (backend %s, device %s)", rank(), world_size(),
             backend_for(device), device)


def cleanup() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Within the block, be one rank of the ``torchrun`` job, if this process is one.

    A no-op for a single process, and when a caller already initialised the group
    (that caller then also destroys it): so it nests, and a launcher may hold the
    group open around a stage that opens it too.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    init(device)
    try:
        yield
    finally:
        cleanup()


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` on every rank (picklable objects, tensors included)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` for one process)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_in_order(rows: np.ndarray, total: int) -> np.ndarray:
    """The whole of a pass sharded in order (validation), the same on every rank.

    ``rows`` are this rank's results of a DistributedSampler pass without shuffling:
    rank r held dataset rows r, r + N, r + 2N, ..., the last ones padded with the
    first rows. Returns the ``total`` rows in dataset order.
    """
    if not is_distributed():
        return rows
    parts = all_gather_object(rows)
    return np.stack(parts, axis=1).reshape(-1, *rows.shape[1:])[:total]


def mean(value: float) -> float:
    """The mean of ``value`` over ranks, the same bits on every rank (``value`` alone)."""
    if not is_distributed():
        return value
    values = all_gather_object(value)
    # Summed in rank order on every rank, so every rank gets exactly the same float.
    return sum(values) / len(values)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over ranks), or as is.

    Wrap after choosing what trains: DDP only synchronises the parameters that
    require gradients when it is built. Buffers are synchronised when it is built,
    not on each forward: each rank's BatchNorm statistics follow its own shard, and
    :func:`average_batchnorm_stats` reconciles them once per epoch.
    """
    if not is_distributed():
        return module
    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what to save, validate and load weights into)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def average_batchnorm_stats(module: nn.Module) -> None:
    """Average the running statistics of BatchNorm layers in training mode over ranks.

    Each rank's statistics follow its own shard of the epoch; their mean estimates
    the whole epoch's and leaves every rank with the same weights to validate and
    save. Layers in eval mode (frozen, pretrained) are left alone: they are equal on
    every rank already, and an average of N equal floats need not equal them.
    """
    if not is_distributed():
        return
    for layer in unwrap(module).modules():
        if (isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
                and layer.track_running_stats and layer.running_mean is not None):
            for stats in (layer.running_mean, layer.running_var):
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
                stats.div_(world_size())
