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
from typing import Any, Callable, Iterator

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
    before the replay, except in layers that only the first pass runs (MLIP's divergence encoders
    run without a gradient, once), recognised by their unchanged ``num_batches_tracked``.
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


Objective = Callable[[ObjectiveInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def objective_extras(out: Any) -> dict[str, torch.Tensor]:
    """What the objectives read from a forward besides the main features (``Embeddings``):
    report embeddings, divergence encoders' features, further graph-carrying features."""
    extras = {"report_embedding": out.report_embedding}
    if out.image_aug is not None:
        extras.update(image_aug=out.image_aug, text_aug=out.text_aug)
    if out.findings_embedding is not None:
        extras["findings_embedding"] = out.findings_embedding
    extras.update(out.features or {})
    return extras


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Images (floating) in the training dtype, token ids and masks as they are.

    Copied as they are and converted on the device: from pinned memory the copy does not block
    the host (a no-op difference for pageable memory, where copies are synchronous anyway)."""
    moved = t.to(device, non_blocking=True)
    return moved.to(dtype) if t.is_floating_point() else moved


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
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    chunk_size: int,
    objective: Objective,
    device: torch.device,
    replay_rng: bool = True,
    image_aug: torch.Tensor | None = None,
    timer: PhaseTimer = NO_TIMER,
    image_dtype: torch.dtype | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    side: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], ObjectiveInputs]:
    """Both passes and every chunk's backward; the caller makes the final ``engine.step()``.

    ``objective`` maps the cached features to (weighted total, per-term values). Returns those
    and the objective's inputs (cached features, logit scale, divergence encoders' features when
    ``image_aug`` is given: they run in the first pass only, having no gradient to replay).
    ``extra``: further per-sample model inputs by keyword (a second view, the findings' tokens),
    chunked like the batch; every further feature the model returns is cached and replayed
    like the main two. ``side``: per-step objective inputs that are no model output (MedFILIP's
    label vocabulary), added to the extras as they are.
    The batch may stay on the host: each chunk moves to ``device`` (images as ``image_dtype``) when
    it is encoded, so device memory holds one chunk's inputs, never the effective batch's (65536
    images of 224² in bf16 are 20 GB).
    ``replay_rng=False`` exists only to show, in tests, what the replay buys.
    """
    image, input_ids, attention_mask = batch
    slices = chunk_slices(image.shape[0], chunk_size)
    dtype = image_dtype or image.dtype
    extra = extra or {}

    def move(t: torch.Tensor) -> torch.Tensor:
        return to_device(t, device, dtype)

    def chunk(part: slice) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        return [move(t[part]) for t in (image, input_ids, attention_mask)], {k: move(v[part]) for k, v in extra.items()}

    def first_chunk(part: slice) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
        return (*chunk(part), move(image_aug[part]) if image_aug is not None else None)

    norms = NormStatistics(getattr(engine, "module", engine))
    before_first_pass = norms.snapshot()
    states, cached = [], []
    with torch.no_grad():
        for args, kwargs, aug in device_chunks(slices, first_chunk, device):
            states.append(RngState.capture(device))
            cached.append(engine(*args, image_aug=aug, **kwargs))
    after_first_pass = RngState.capture(device)
    first_pass_norms = norms.snapshot()
    norms.restore(before_first_pass)  # the replay updates them, once per chunk
    timer.mark("forward")

    image_features = torch.cat([c.image for c in cached]).detach().requires_grad_()
    text_features = torch.cat([c.text for c in cached]).detach().requires_grad_()
    logit_scale = cached[0].logit_scale.detach().float().requires_grad_()
    per_chunk = [objective_extras(c) for c in cached]
    graph_keys = list(cached[0].features or {})  # features whose gradient the second pass replays
    extras = {k: torch.cat([e[k] for e in per_chunk]) for k in per_chunk[0]}
    for k in graph_keys:
        extras[k] = extras[k].detach().requires_grad_()
    extras.update(side or {})
    inputs = ObjectiveInputs(image_features, text_features, logit_scale, gather=gather_with_grad, extras=extras)
    total, terms = objective(inputs)
    # Leaves only: no parameter is reached, so no engine hook fires in this backward.
    total.backward()
    timer.mark("loss")

    for index, (part, (args, kwargs)) in enumerate(zip(slices, device_chunks(slices, chunk, device))):
        if replay_rng:
            states[index].restore()
        out = engine(*args, text_pooled=cached[index].text_pooled, findings_pooled=cached[index].findings_pooled, **kwargs)
        timer.mark("replay")
        pairs = [(out.image, image_features), (out.text, text_features), *((out.features[k], extras[k]) for k in graph_keys)]
        # A feature that no term used has no gradient (MedFILIP never reads the report's).
        surrogate = sum((fresh.float() * leaf.grad[part].float()).sum() for fresh, leaf in pairs if leaf.grad is not None)
        if index == 0 and logit_scale.grad is not None:
            surrogate = surrogate + out.logit_scale.float() * logit_scale.grad
        engine.backward(surrogate, scale_wrt_gas=False)
        if index < len(slices) - 1:
            engine.step()  # inside the accumulation window: advances DeepSpeed's micro-step only
        timer.mark("backward")
    after_first_pass.restore()  # the next step's randomness as if each chunk ran once
    norms.restore(first_pass_norms, only_if_unchanged_since=before_first_pass)  # first-pass-only layers
    return total.detach(), {k: v.detach() for k, v in terms.items()}, inputs
