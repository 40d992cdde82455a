"""Process-group facts a worker needs, whoever started it (Ray Train, the local launcher, torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    world_size: int
    local_rank: int
    node: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_info() -> WorkerInfo:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return WorkerInfo(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        node=os.environ.get("HILUM_NODE", os.uname().nodename),
    )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows.

    Written by hand because torch.distributed.nn's all_gather needs reduce-scatter or all-to-all
    in its backward, which gloo (our CPU backend) does not provide for every dtype; one
    all-reduce followed by a slice works on every backend.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank (rank order); identity on a single process.

    Every rank must pass the same number of rows (the stream guarantees equal batches).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def all_gather_floats(value: float, device: torch.device) -> list[float]:
    """One number from every rank, in rank order (a single-process run gets its own)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(value)]
    mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [float(t.item()) for t in out]
