"""The processes of a batch render: who this process is in a ``torchrun`` / ``accelerate launch`` launch (one
machine or several), which GPU it uses, and - with ``--parallel`` - the group of processes it renders each
story with (context parallelism inside a group, data parallelism between groups).

Without a launcher (``WORLD_SIZE`` unset or 1) the batch is one process and nothing here talks to anything.
Under a launcher the processes join torch.distributed: for the launch's key-value store (a story is claimed
there once per launch, so two processes never take the same story even where file locks do not reach across
machines) and for one agreement at the end (every process waits for the others, so all of them exit with the
same code and the launcher stops none of them early).
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

from .options import RenderError
from .parallel import ProcessGroup

__all__ = ["BatchWorld", "launch_sizes", "process_record"]

# Processes that finished their stories wait at the end for the slowest; a story can take hours.
_WAIT = timedelta(days=7)
_CLAIM_PREFIX = "storymem-batch/claim/"


def launch_sizes() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) as the launcher set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local_rank, local_world


def process_record(rank: int, device: str) -> dict:
    """What this process ran on, as the batch record lists it."""
    import torch

    record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "device": device,
              "platform": platform.platform(terse=True), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        record.update(device_name=torch.cuda.get_device_name(index), device_count=torch.cuda.device_count(),
                      cuda=torch.version.cuda)
    else:
        record.update(device_name=platform.processor() or platform.machine(), device_count=1)
    return record


@dataclass
class BatchWorld:
    """This process's place in the batch launch.

    ``group``: with ``--parallel``, the :class:`ProcessGroup` of the ``cp_degree`` processes that render a story
    together (its rank 0, the *leader*, claims the stories and writes the files); None without.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    parallel: str = "none"
    cp_degree: int = 1
    group: Optional[ProcessGroup] = None
    distributed: bool = False  # this batch started torch.distributed (and ends it)
    control: Any = None  # the gloo group of the end-of-batch agreement
    records: list[dict] = field(default_factory=list)

    @property
    def is_leader(self) -> bool:
        """Claims stories and writes their files: every process without groups, a group's rank 0 with them."""
        return self.group is None or self.group.is_main

    @property
    def groups(self) -> int:
        return self.world_size // self.cp_degree

    @property
    def group_index(self) -> int:
        return self.rank // self.cp_degree

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, device: str, parallel: str = "none", cp_degree: Optional[int] = None) -> "BatchWorld":
        """Join the launch (``device``: the options' resolved device; a bare "cuda" becomes this process's GPU,
        ``cuda:LOCAL_RANK``). Checks the group size before anything starts."""
        import torch

        rank, world, local_rank, local_world = launch_sizes()
        degree = check_cp_degree(parallel, cp_degree, world, local_world)
        if device == "cuda" and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self = cls(rank=rank, world_size=world, local_rank=local_rank, device=device, parallel=parallel,
                   cp_degree=degree)
        if world > 1:
            self._join(parallel)
        return self

    def _join(self, parallel: str) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            if parallel == "none" or not self.device.startswith("cuda"):
                dist.init_process_group(backend="gloo", timeout=_WAIT)
            else:
                import torch

                dist.init_process_group(backend="nccl", device_id=torch.device(self.device))
            self.distributed = True
        # The end-of-batch wait goes over gloo (no GPU memory, a long timeout, whatever the render backend).
        self.control = None if parallel == "none" else dist.new_group(backend="gloo", timeout=_WAIT)
        if parallel != "none":
            self.group = self._story_group(parallel)

    def _story_group(self, parallel: str) -> ProcessGroup:
        """Consecutive ranks in groups of ``cp_degree`` (under torchrun: GPUs of one machine), as a device mesh
        whose "ring"/"ulysses" dimension is the group, the layout diffusers' context parallelism reads."""
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        degree = self.cp_degree
        shape = (self.groups, degree, 1) if parallel == "ring" else (self.groups, 1, degree)
        mesh = init_device_mesh(torch.device(self.device).type, shape, mesh_dim_names=("story", "ring", "ulysses"))
        handle = mesh.get_group(parallel)
        return ProcessGroup(rank=dist.get_rank(handle), world_size=degree, device=self.device, handle=handle,
                            leader=dist.get_global_rank(handle, 0), mesh=mesh)

    # ------------------------------------------------------------------ claims and agreement
    def claim_in_launch(self, name: str) -> bool:
        """True for the first process of this launch to ask for story ``name`` (the launch's store counts the
        askers); always True for a single process."""
        if self.world_size == 1:
            return True
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        return int(store.add(_CLAIM_PREFIX + name, 1)) == 1

    def share_in_group(self, value: Any) -> Any:
        """The group leader's ``value`` on every process of its group (the value itself without groups)."""
        return value if self.group is None else self.group.share(value)

    def all_in_group(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process of the group."""
        if self.group is None or self.group.world_size == 1:
            return ok
        import torch.distributed as dist

        flags: list = [None] * self.group.world_size
        dist.all_gather_object(flags, bool(ok), group=self.group.handle)
        return all(flags)

    def gather_records(self) -> list[dict]:
        """Every process's :func:`process_record`, gathered after all processes finished their stories (the
        wait at the end of the batch)."""
        mine = process_record(self.rank, self.device)
        if self.world_size == 1:
            return [mine]
        import torch.distributed as dist

        records: list = [None] * self.world_size
        dist.all_gather_object(records, mine, group=self.control)
        return records

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (the exit code, so all of them end alike)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.distributed = False


def check_cp_degree(parallel: str, cp_degree: Optional[int], world: int, local_world: int) -> int:
    """The size of the groups that split a shot: 1 without ``--parallel``; else ``--cp-degree`` (default: the
    processes of one machine), which must divide the launch and be at least 2."""
    if parallel == "none":
        if cp_degree not in (None, 1):
            raise RenderError(f"--cp-degree {cp_degree}: groups split shots with context parallelism; add "
                              "--parallel ulysses or --parallel ring")
        return 1
    import torch

    degree = cp_degree or local_world
    if world < 2 or degree < 2:
        raise RenderError(f"--parallel {parallel}: run under torchrun with 2 or more processes per group, e.g. "
                          "`torchrun --nproc-per-node 8 -m storymem render --story stories/ --parallel ulysses "
                          "--cp-degree 2`")
    if world % degree:
        raise RenderError(f"--cp-degree {degree}: the launch's {world} processes do not split into groups of "
                          f"{degree}")
    if not torch.cuda.is_available():
        raise RenderError(f"--parallel {parallel}: context parallelism needs CUDA GPUs")
    return degree
