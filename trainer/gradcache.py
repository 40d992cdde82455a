"""GradCache: the contrastive loss over a batch whose activations do not fit in memory at once.

After Gao et al. (2021, luyug/GradCache). Written here rather than taken from GradCache or
sentence-transformers because neither works with a DeepSpeed engine (ZeRO-3 errors, "gradient
computed twice" under ZeRO-2, gradients of all but the last chunk lost) and their functional
APIs drop the CUDA RNG state. One step:

1. encode every chunk of the per-rank batch without a graph, recording the RNG state before
   each chunk (CPU and the chunk's device);
2. compute the objective on the cached features — gathered across ranks inside the loss, as in
   a plain step — and back-propagate it to the cached features and the temperature only;
3. re-encode each chunk with its RNG state restored (same dropout), back-propagate the
   surrogate ``Σ cached_grad · features`` (plus ``grad · logit_scale`` once) through
   ``engine.backward``, and call ``engine.step()``: the engine runs with
   ``gradient_accumulation_steps = number of chunks``, so the optimizer steps once per batch
   and no chunk's gradient is lost or reduced twice at any ZeRO stage: ZeRO-1 reduces the
   chunks' summed gradient once per step; ZeRO-2/3 partition gradients, so DeepSpeed reduces
   each chunk's gradient as it is produced and sums the partitions.

The surrogate's gradient is exactly the gradient of the full-batch loss, and the temperature's
share goes through the same ``engine.backward`` as the encoders', so both get the same scaling
(``scale_wrt_gas=False``: the surrogate already carries the full-batch loss's weights).

Batch norms see every chunk twice; their running statistics keep one update per chunk
(:class:`NormStatistics`), as in gradient accumulation over the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch

from hilum.trainer.distributed import gather_with_grad
from hilum.trainer.objectives import ObjectiveInputs
from hilum.trainer.side_stream import hand_over, run_on
from hilum.trainer.timing import NO_TIMER, PhaseTimer


@dataclass
class RngState:
    """The random state that a chunk's forward consumes: CPU and, on CUDA, the chunk's device."""

    cpu: torch.Tensor
    cuda: tuple[int, torch.Tensor] | None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = (index, torch.cuda.get_rng_state(index))
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


class NormStatistics:
    """The running statistics of a model's batch norms, so that each chunk updates them once.

    Both passes run in training mode (the replay must normalise with the chunk's own statistics,
    as the first pass did), and each would fold the chunk into the running mean and variance:
    twice the updates, so the statistics that evaluation uses would average half as many chunks.
    GradCache implementations leave this as it is; here the first pass's updates are undone
    before the replay, except in layers that only the first pass runs (a part whose graph-less
    output the replay reuses runs once), recognised by their unchanged ``num_batches_tracked``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [m for m in model.modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def snapshot(self) -> list[list[torch.Tensor]]:
        return [[b.detach().clone() for b in self._buffers(m)] for m in self.layers]

    def restore(self, saved: list[list[torch.Tensor]], only_if_unchanged_since: list[list[torch.Tensor]] | None = None) -> None:
        """Put ``saved`` back; with ``only_if_unchanged_since``, only into layers that have not run
        in training mode since that snapshot (same ``num_batches_tracked``). Decided on the device
        (``torch.where``), so no layer waits for the GPU."""
        with torch.no_grad():
            for index, (layer, values) in enumerate(zip(self.layers, saved)):
                buffers = self._buffers(layer)
                if only_if_unchanged_since is None:
                    for buffer, value in zip(buffers, values):
                        buffer.copy_(value)
                    continue
                unchanged = layer.num_batches_tracked == only_if_unchanged_since[index][-1]
                for buffer, value in zip(buffers, values):
                    buffer.copy_(torch.where(unchanged, value, buffer))

    @staticmethod
    def _buffers(layer: torch.nn.Module) -> list[torch.Tensor]:
        return [layer.running_mean, layer.running_var, layer.num_batches_tracked]


def chunk_slices(batch_size: int, chunk_size: int) -> list[slice]:
    """Consecutive chunks of ``chunk_size`` covering the batch; the last may be smaller."""
    return [slice(i, min(i + chunk_size, batch_size)) for i in range(0, batch_size, chunk_size)]


def num_chunks(batch_size: int, chunk_size: int) -> int:
    return -(-batch_size // chunk_size)


class SplitObjective(Protocol):
    """The loss as GradCache computes it: the terms over the whole (cached) batch, and the
    chunk-local terms (per-sample losses, e.g. reconstructions) on each chunk of the replay."""

    cached: tuple[str, ...]  # the model outputs that the whole-batch terms read: what is cached

    def whole_batch(self, inputs: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted sum, each term) of the terms computed on the whole batch."""
        ...

    def chunk_local(self, inputs: ObjectiveInputs, share: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(weighted sum, each term) of the chunk-local terms on one chunk, each scaled by the
        chunk's ``share`` of the batch (None: no such term)."""
        ...


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Images (floating) in the training dtype, token ids and masks as they are.

    Copied as they are and converted on the device: from pinned memory the copy does not block
    the host (a no-op difference for pageable memory, where copies are synchronous anyway)."""
    moved = t.to(device, non_blocking=True)
    return moved.to(dtype) if t.is_floating_point() else moved


class OnDevice(Mapping[str, torch.Tensor]):
    """A host batch whose tensors move to the device when a term reads them (whole-batch terms
    under GradCache read few, if any, of the batch's inputs: the images stay on the host)."""

    def __init__(self, batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.host, self.device, self.dtype, self.moved = batch, device, dtype, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.moved:
            self.moved[key] = to_device(self.host[key], self.device, self.dtype)
        return self.moved[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.host)

    def __len__(self) -> int:
        return len(self.host)


def device_chunks(parts: list[slice], fetch: Callable[[slice], Any], device: torch.device) -> Iterator[Any]:
    """``fetch(part)`` for each part, in order; on CUDA the next part's copy is issued on a side
    stream before the current one is handed out, so chunk ``i + 1`` crosses the bus while chunk
    ``i`` computes (a 256-image bf16 chunk is 77 MB, copied twice per step)."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    upcoming = run_on(side, fetch, parts[0]) if parts else None
    for index in range(len(parts)):
        item, ready = upcoming
        if index + 1 < len(parts):
            upcoming = run_on(side, fetch, parts[index + 1])
        yield hand_over(item, ready, device)


def gradcache_backward(
    engine: Any,
    batch: dict[str, torch.Tensor],
    chunk_size: int,
    objective: SplitObjective,
    device: torch.device,
    replay_rng: bool = True,
    timer: PhaseTimer = NO_TIMER,
    image_dtype: torch.dtype | None = None,
    side: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], ObjectiveInputs]:
    """Both passes and every chunk's backward; the caller makes the final ``engine.step()``.

    ``batch``: the model's per-sample inputs by name (image, tokens, further views, declared
    texts and values), chunked along the first axis. ``objective.cached`` names the outputs to
    cache; every cached output that has a graph in the replay and got a gradient from the loss is
    replayed. Outputs the model marks reusable (no graph: a frozen tower, a no-grad copy of one) are passed
    back to the replay, which then skips computing them. ``side``: per-step objective inputs that
    are no model output (a vocabulary of the global batch), added as they are.
    Returns the weighted total, each term, and the objective's inputs (the cached outputs).
    The batch may stay on the host: each chunk moves to ``device`` (images as ``image_dtype``) when
    it is encoded, so device memory holds one chunk's inputs, never the effective batch's (65536
    images of 224² in bf16 are 20 GB).
    ``replay_rng=False`` exists only to show, in tests, what the replay buys.
    """
    size = next(iter(batch.values())).shape[0]
    slices = chunk_slices(size, chunk_size)
    dtype = image_dtype or (batch["image"].dtype if "image" in batch else torch.float32)

    def chunk(part: slice) -> dict[str, torch.Tensor]:
        return {k: to_device(v[part], device, dtype) for k, v in batch.items()}

    norms = NormStatistics(getattr(engine, "module", engine))
    before_first_pass = norms.snapshot()
    states, cached, reusable = [], [], []
    with torch.no_grad():
        for inputs in device_chunks(slices, chunk, device):
            states.append(RngState.capture(device))
            out = engine(inputs)
            missing = [k for k in objective.cached if k not in out]
            if missing:
                raise ValueError(f"the model produced no {', '.join(missing)}: no configured part declares "
                                 f"{'it' if len(missing) == 1 else 'them'} (it has {', '.join(sorted(out))})")
            cached.append({k: out[k] for k in objective.cached})
            reusable.append(out.reusable)
            logit_scale = out["logit_scale"]
    after_first_pass = RngState.capture(device)
    first_pass_norms = norms.snapshot()
    norms.restore(before_first_pass)  # the replay updates them, once per chunk
    timer.mark("forward")

    # Every cached output becomes a leaf; those the loss back-propagates into are replayed.
    features = {}
    for k in objective.cached:
        whole = torch.cat([c[k] for c in cached])
        features[k] = whole.requires_grad_() if whole.is_floating_point() else whole
    del cached
    logit_scale = logit_scale.detach().float().requires_grad_()
    inputs = ObjectiveInputs({**features, **(side or {})}, logit_scale, gather=gather_with_grad,
                             batch=OnDevice(batch, device, dtype))
    total, terms = objective.whole_batch(inputs)
    # Leaves only: no parameter is reached, so no engine hook fires in this backward.
    total.backward()
    timer.mark("loss")

    local_total, local_terms = torch.zeros((), device=device), {}
    for index, (part, chunk_inputs) in enumerate(zip(slices, device_chunks(slices, chunk, device))):
        if replay_rng:
            states[index].restore()
        out = engine(chunk_inputs, reuse=reusable[index])
        timer.mark("replay")
        pairs = [(out[k], leaf) for k, leaf in features.items()
                 if leaf.grad is not None and out[k].requires_grad]  # a feature no term used has no gradient
        surrogate = sum((fresh.float() * leaf.grad[part].float()).sum() for fresh, leaf in pairs)
        if index == 0 and logit_scale.grad is not None:
            surrogate = surrogate + out["logit_scale"].float() * logit_scale.grad
        local, values = objective.chunk_local(
            ObjectiveInputs({**out, **(side or {})}, out["logit_scale"].float(), batch=chunk_inputs),
            (part.stop - part.start) / size)
        if local is not None:
            surrogate = surrogate + local
            local_total = local_total + local.detach()
            for name, value in values.items():
                local_terms[name] = local_terms.get(name, 0) + value.detach()
        engine.backward(surrogate, scale_wrt_gas=False)
        if index < len(slices) - 1:
            engine.step()  # inside the accumulation window: advances DeepSpeed's micro-step only
        timer.mark("backward")
    after_first_pass.restore()  # the next step's randomness as if each chunk ran once
    norms.restore(first_pass_norms, only_if_unchanged_since=before_first_pass)  # first-pass-only layers
    return (total.detach() + local_total, {k: v.detach() for k, v in terms.items()} | local_terms, inputs)
