"""One torchrun setup for training and batch captioning.

``torchrun --nproc_per_node N`` starts N copies of a command with ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` set. :class:`Distributed` reads them, joins the process group (only when
``WORLD_SIZE`` > 1, and only if nobody has yet), picks each rank's device and offers the few
collectives the commands use. Without torchrun it is a world of one and every call is a no-op.

>>> with Distributed() as ddp:              # training: nccl on GPUs, else gloo
...     device = ddp.device(args.device)    # "cuda" -> cuda:LOCAL_RANK under torchrun
...     if ddp.is_main: ...
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Distributed:
    """This process's rank in a torchrun job, and its process group while it lasts.

    ``backend``: ``nccl`` when CUDA is available, else ``gloo`` (default); pass ``gloo`` when
    the collectives carry CPU tensors or Python objects only. ``timeout``: how long a rank waits
    at a collective (torch's default when None; batch captioning waits for the slowest rank).
    """

    def __init__(self, backend: str | None = None, timeout: timedelta | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False  # this object started the group, so close() ends it
        if self.world > 1 and not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
            self.owned = True

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that reads inputs, writes shared files and reports."""
        return self.rank == 0

    def device(self, requested: str | None = None) -> torch.device:
        """This rank's device: ``requested``, else CUDA if available, else CPU; a bare ``cuda`` under
        torchrun is ``cuda:LOCAL_RANK`` (made the current CUDA device), so each rank has its own GPU."""
        name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
        if name == "cuda" and self.world > 1:
            name = f"cuda:{self.local_rank}"
        device = torch.device(name)
        if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
            torch.cuda.set_device(device)
        return device

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum of integer counts over the ranks; also a barrier."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.long)  # (n,) on the CPU: needs a gloo group
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this object started it."""
        if self.owned:
            dist.destroy_process_group()
            self.owned = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
