"""PyTorch's own distributed engine, as facemt uses it: process groups started
by ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``),
gloo on CPU, NCCL on GPUs. A plain single process never touches
``torch.distributed``: every helper here is a no-op when there is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from facemt.errors import FacemtError

@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current process group, or a single process when none is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return World()
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str = "auto") -> World:
    """Join the process group described by the launcher's environment
    (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``).
    NCCL when this process trains on CUDA, gloo otherwise. Does nothing for a
    single process.

    Raises:
        FacemtError: the environment is incomplete or the group cannot form.
    """
    if not launched():
        return World()
    if world().distributed:
        return world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise FacemtError(f"WORLD_SIZE is set but {', '.join(missing)} not: start several processes with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    except (RuntimeError, ValueError) as exc:
        raise FacemtError(f"cannot join the process group ({exc})") from None
    return world()


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if world().distributed:
        torch.distributed.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over all processes (``values`` itself when alone)."""
    if not world().distributed:
        return values
    out = values.detach().clone()
    torch.distributed.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any of them (a stop request)."""
    if not world().distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics)."""
    if world().distributed:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, 0)


def barrier() -> None:
    if world().distributed:
        torch.distributed.barrier()
