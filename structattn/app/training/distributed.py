"""Device and data-parallel set-up for the trainer, and the few collectives it uses.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (gloo on CPU, NCCL on
CUDA; an already initialised group is used as it is and left open), the model is wrapped in
``DistributedDataParallel`` and rank ``r`` takes batch ``r`` of every group of ``world_size``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Distributed", "resolve_device"]


def resolve_device(device: str | torch.device, local_rank: int | None) -> torch.device:
    """``device`` as a ``torch.device``; under torchrun, CUDA means ``cuda:$LOCAL_RANK``."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
        if local_rank is not None:
            resolved = torch.device("cuda", local_rank)
        elif resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(resolved)
    elif resolved.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return resolved


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) data-parallel run.

    Attributes:
        device: the device this process trains on.
        world_size: number of processes.
        rank: this process's rank (0 writes checkpoints and logs).
        owns_group: whether :meth:`setup` created the process group (and :meth:`close`
            destroys it).
    """

    device: torch.device
    world_size: int = 1
    rank: int = 0
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str | torch.device) -> Distributed:
        """Resolve ``device`` and join the process group torchrun describes, if any."""
        already = dist.is_available() and dist.is_initialized()
        distributed = already or int(os.environ.get("WORLD_SIZE", "1")) > 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else None
        resolved = resolve_device(device, local_rank)
        owns = False
        if distributed and not already:
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
            owns = True
        if not distributed:
            return cls(resolved)
        return cls(resolved, dist.get_world_size(), dist.get_rank(), owns)

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def wrap(self, module: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """``module`` in DistributedDataParallel when there are several processes."""
        if self.world_size == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def shard(self, batches: Iterable[Any], skip_groups: int) -> Iterator[Any]:
        """This rank's batch of every complete group of ``world_size``, from a group on."""
        world, rank = self.world_size, self.rank
        if isinstance(batches, Sequence):
            for group in range(skip_groups, len(batches) // world):
                yield batches[group * world + rank]
            return
        iterator = itertools.islice(iter(batches), skip_groups * world, None)
        while True:
            group = list(itertools.islice(iterator, world))
            if len(group) < world:
                return
            yield group[rank]

    def group_count(self, batches: Iterable[Any]) -> int | None:
        """Steps in an epoch of ``batches``, when it has a length."""
        try:
            return len(batches) // self.world_size  # type: ignore[arg-type]
        except TypeError:
            return None

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes."""
        if self.world_size == 1:
            return value
        total = value.clone()
        dist.all_reduce(total)
        return total / self.world_size

    def barrier(self) -> None:
        """Wait for every process (a no-op alone)."""
        if self.world_size > 1:
            dist.barrier()
