"""Context parallelism: one render over the GPUs of a ``torchrun`` launch, each expert's token sequence split
over them (diffusers' ``_cp_plan``). Every rank runs the same pipeline calls; rank 0 alone picks keyframes
(and shares them) and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from .options import RenderError

__all__ = ["ProcessGroup", "check_parallel", "enable_context_parallel"]


def check_parallel(options) -> None:
    """``--parallel`` needs a torchrun launch of 2+ processes, CUDA, no offload, and a token grid that splits
    evenly (checked when the size is known)."""
    import torch

    if options.parallel == "none":
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise RenderError(f"--parallel {options.parallel}: run under torchrun with 2 or more processes, e.g. "
                          "`torchrun --nproc-per-node 2 infer_story.py ...`")
    if not torch.cuda.is_available():
        raise RenderError(f"--parallel {options.parallel}: context parallelism needs CUDA GPUs")
    if options.offload != "none":
        raise RenderError(f"--parallel {options.parallel} keeps each expert on every GPU; use --offload none")
    if options.height is not None and ((options.height // 16) * (options.width // 16)) % world:
        raise RenderError(f"--parallel {options.parallel}: the {options.height // 16}x{options.width // 16} tokens "
                          f"of a latent frame must split evenly over {world} GPUs")


def enable_context_parallel(pipe, parallel: str = "ulysses", world_size: Optional[int] = None,
                            attention_backend: Optional[str] = None, mesh: Any = None):
    """Split each expert's token sequence over the GPUs of the process group (diffusers' ``_cp_plan``).

    Call after ``torch.distributed`` is initialised and the pipeline is on its GPU; every rank then runs the same
    pipeline call. StoryMemPipeline installed its memory rope as ``transformer.rope`` when it was built, so the
    plan's "rope" entry splits the memory rope's output along the sequence exactly like the stock one's.
    Ulysses works with diffusers' default SDPA backend; ring attention needs a backend that returns the
    log-sum-exp, so it defaults to ``_native_cudnn``. ``mesh``: the device mesh of a group of the processes
    (a batch's story group, with "ring" and "ulysses" dimensions); default: one over all of them.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from ..rope import install_memory_rope

    if parallel not in ("ulysses", "ring"):
        raise ValueError(f"parallel must be 'ulysses' or 'ring', got {parallel!r}")
    world_size = world_size or dist.get_world_size()
    backend = attention_backend or ("_native_cudnn" if parallel == "ring" else None)
    for model in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if model is None:
            continue
        install_memory_rope(model)  # idempotent; before the plan hooks the module named "rope"
        if backend:
            model.set_attention_backend(backend)
        if parallel == "ulysses":
            config = ContextParallelConfig(ulysses_degree=world_size, mesh=mesh)
        else:
            config = ContextParallelConfig(ring_degree=world_size, mesh=mesh)
        model.enable_parallelism(config=config)
    return pipe


@dataclass
class ProcessGroup:
    """This process's place in the render: rank 0 of 1 without ``--parallel``.

    A batch renders each story with a group of the processes (``handle``: their torch.distributed group,
    ``leader``: the global rank of the group's rank 0, ``mesh``: their device mesh); ``rank`` and
    ``world_size`` are then within the group. Default: all processes."""

    rank: int = 0
    world_size: int = 1
    device: Optional[str] = None  # the rank's GPU (None: the options' device)
    owned: bool = False  # this render started the process group, so it ends it
    handle: Any = None
    leader: int = 0
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, parallel: str) -> "ProcessGroup":
        """Join (or start) torchrun's NCCL process group on the GPU of ``LOCAL_RANK``; a single process for
        ``parallel == "none"``."""
        if parallel == "none":
            return cls()
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        owned = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
            owned = True
        group = cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=f"cuda:{local_rank}",
                    owned=owned)
        # Every rank has read (and validated) the folder in prepare(); only now may rank 0 write to it.
        group.barrier()
        return group

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.handle)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=self.leader, group=self.handle)
        return box[0]

    def close(self) -> None:
        """Wait for every rank; end the process group if this render started it."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.handle)
            if self.owned:
                dist.destroy_process_group()
