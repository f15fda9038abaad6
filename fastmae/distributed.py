"""The device and the processes of a run: ``--device``, torchrun's process group, and the few
collectives the training engine needs (all of them no-ops for one process)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place among the processes torchrun started (one alone by default)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(name: str | None) -> torch.device:
    """``--device``: cpu or cuda[:N]; None means cuda when available, else cpu."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available (use --device cpu)")
    return dev


def init_distributed(device_type: str, init_method: str = "env://") -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); one process alone
    when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    info = Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method=init_method,
                                world_size=world, rank=info.rank)
    return info


def resolve_device(name: str | None, dist_info: Dist) -> torch.device:
    """The device of this process (under torchrun on CUDA: the GPU of its local rank)."""
    dev = parse_device(name)
    if dev.type == "cuda" and dist_info.enabled:
        dev = torch.device("cuda", dist_info.local_rank)
    return dev


def all_reduce_mean(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """The mean of ``x`` over the processes (``x`` itself for one process)."""
    if dist_info.enabled:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= dist_info.world_size
    return x


def all_reduce_sum(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """The sum of ``x`` over the processes (``x`` itself for one process)."""
    if dist_info.enabled:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_from_main(obj, dist_info: Dist):
    """Rank 0's ``obj`` on every process (a picklable value)."""
    if dist_info.enabled:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def barrier(dist_info: Dist) -> None:
    """Wait for every process."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
