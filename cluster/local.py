"""The single-node launcher: one process per worker on this machine, no Ray.

What ``torchrun`` would do, in-process: for debugging, for machines without Ray, and for GPU
boxes where Ray is not installed. Workers get the same environment variables torchrun sets.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.multiprocessing as mp

from hilum.cluster.quick_exit import freeze_at_exit

if TYPE_CHECKING:
    from hilum.launch.config import HilumConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, cfg: "HilumConfig", resume: bool, queue: Any) -> None:
    freeze_at_exit()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    from hilum.trainer.engine import dist_backend, pick_device
    from hilum.trainer.loop import train

    backend = dist_backend(pick_device(cfg.cluster.device, local_rank).type)
    dist.init_process_group(backend, rank=local_rank, world_size=world_size)
    try:
        result = train(cfg, resume)
        if local_rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run_local(cfg: "HilumConfig", resume: bool = False) -> dict[str, Any]:
    n = cfg.cluster.num_workers
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(n, free_port(), cfg, resume, queue), nprocs=n, join=True, start_method="spawn")
    return queue.get() if not queue.empty() else {}
