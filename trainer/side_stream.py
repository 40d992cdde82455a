"""Work issued on a side CUDA stream and handed to the stream that consumes it.

Two places prepare device tensors ahead of the compute that uses them: the prefetch thread
(GPU decode, batch copies; ``hilum.trainer.data.prefetch``) and GradCache's chunk copies
(``hilum.trainer.gradcache.device_chunks``). Both need the same hand-over: the consumer's stream waits
for an event rather than the host synchronising, and each tensor is marked as used by the
consumer's stream, because the caching allocator otherwise frees a side-stream allocation as soon
as the side stream is done with it. On CPU every function here is a plain call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


def tensors_in(item: Any) -> list[torch.Tensor]:
    """The tensors in ``item``, through nested lists, tuples and dicts."""
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (list, tuple)):
        return [t for x in item for t in tensors_in(x)]
    if isinstance(item, dict):
        return [t for x in item.values() for t in tensors_in(x)]
    return []


def run_on(stream: torch.cuda.Stream | None, fn: Callable[..., Any], *args: Any) -> tuple[Any, torch.cuda.Event | None]:
    """``fn(*args)`` with its kernels issued on ``stream``, and an event that marks their end
    (``stream`` None: a plain call, no event)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        item = fn(*args)
        ready = None
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(stream)
    return item, ready


def hand_over(item: Any, ready: torch.cuda.Event | None, device: torch.device) -> Any:
    """``item`` made safe to use on ``device``'s current stream: that stream waits for ``ready``
    (no host synchronisation), and the allocator keeps each CUDA tensor until it is done."""
    if ready is None:
        return item
    stream = torch.cuda.current_stream(device)
    stream.wait_event(ready)
    for t in tensors_in(item):
        if t.is_cuda:
            t.record_stream(stream)
    return item
