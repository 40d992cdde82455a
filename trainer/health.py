"""Training health: a non-finite step is skipped on every rank, spikes and collapses are caught.

How a bad step is skipped. DeepSpeed's ZeRO optimizers (stages 1-3) already compute the global
gradient norm inside ``engine.step()``, with one all-reduce, and when it is not finite they drop
the step: the weights, the optimizer state and the learning-rate schedule stay as they were, the
gradients are cleared, and ``engine.was_step_applied()`` says so on every rank alike. hilum
leans on that rather than on a second all-reduce of its own, and adds what it lacks:

- a non-finite *loss* on any rank is turned into non-finite gradients (:func:`poisoned`: the
  total times 1, or times NaN), so the loss check and DeepSpeed's gradient check agree on every
  rank without a collective (the gradient reduction carries one rank's NaN to all);
- ZeRO stage 0, where DeepSpeed hands the step to the torch optimizer unchecked: the gradients are
  all-reduced and whole on every rank before the step, so each rank finds the same norm locally
  and drops the step by handing the optimizer no gradient (:class:`StepGuard`);
- the count: ``train.max_bad_steps`` consecutive skips stop the run with
  :class:`TrainingDiverged` (exit code :data:`DIVERGED_EXIT_CODE`).

Spikes and collapses (:class:`HealthMonitor`) are judged from values every rank holds alike (the
rank-mean loss, the temperature), so every rank reaches the same verdict at the same step and a
rollback needs no extra agreement.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger("hilum")

DIVERGED_EXIT_CODE = 3  # `hilum train`/`resume` exit with it when a run stops as diverged


class TrainingDiverged(RuntimeError):
    """The run stopped because its weights or its loss can no longer be trusted."""


def diverged_message(err: BaseException) -> str | None:
    """The :class:`TrainingDiverged` message inside a launcher's error, if that is what stopped a
    worker. Launchers hand a worker's exception back as text (torch.multiprocessing's
    ProcessRaisedException, Ray Train's TrainingFailedError hold the worker's traceback), so it is
    looked for there, as well as in the chain of causes."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, TrainingDiverged):
            return str(seen)
        marker = f"{TrainingDiverged.__name__}: "
        text = str(seen)
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
        seen = seen.__cause__ or seen.__context__
    return None


def poisoned(total: torch.Tensor) -> torch.Tensor:
    """``total`` for the backward: unchanged (times exactly 1) when finite, else times NaN, so that
    every gradient it reaches is NaN and the optimizer's own overflow check drops the step.

    Without it a loss that is NaN only at its last operation (a term added as a NaN constant, a
    zero-weighted NaN term) back-propagates finite gradients, and the step would be applied.
    No host synchronisation: the factor is computed on the device.
    """
    if not isinstance(total, torch.Tensor):  # an empty sum of terms
        return total
    one = torch.ones((), dtype=total.dtype, device=total.device)
    return total * torch.where(torch.isfinite(total.detach()), one, torch.full_like(one, float("nan")))


def nonfinite(values: dict[str, float]) -> list[str]:
    return [name for name, v in values.items() if not math.isfinite(v)]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---------------------------------------------------------------------------------------------
# The step guard


@dataclass
class StepOutcome:
    applied: bool
    grad_norm: float  # global, before clipping; inf or nan on a skipped step
    reason: str = ""  # why it was skipped ("" when applied)


def _stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


def _checks_overflow(engine: Any) -> bool:
    """Whether the engine's optimizer drops non-finite steps itself (DeepSpeed's ZeRO, fp16 and
    bf16 wrappers carry an ``overflow`` flag; a plain torch optimizer at stage 0 does not)."""
    return hasattr(engine.optimizer, "overflow")


class StepGuard:
    """Takes the optimizer step, or skips it, the same way on every rank; counts the skips."""

    def __init__(self, max_bad_steps: int, loss_scaled: bool = False) -> None:
        self.max_bad_steps = max_bad_steps
        self.loss_scaled = loss_scaled  # fp16: DeepSpeed skips loss-scale overflows as routine
        self.consecutive = 0
        self.skipped = 0
        self.steps = 0
        self.first_bad_step: int | None = None

    def step(self, engine: Any) -> StepOutcome:
        """``engine.step()`` at the accumulation boundary, unless the gradients are not finite."""
        if _checks_overflow(engine):
            engine.step()
            norm = engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            applied = bool(engine.was_step_applied())
            return StepOutcome(applied, norm, "" if applied else "non-finite gradients")
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if math.isfinite(norm):
            engine.step()
            return StepOutcome(True, norm)
        # Stage 0: engine.step() still runs, so that DeepSpeed's step and micro-step counters (its
        # accumulation boundary under GradCache) move on as for any step, but with the optimizer's
        # own step shadowed for this one call and the gradients zeroed (DeepSpeed clips them
        # first). The schedule is put back, as ZeRO's overflow path leaves it.
        for p in params:
            p.grad.zero_()
        schedule = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        rates = [group["lr"] for group in engine.optimizer.param_groups]
        engine.optimizer.step = lambda *args, **kwargs: None
        try:
            engine.step()
        finally:
            del engine.optimizer.step
        if schedule is not None:
            engine.lr_scheduler.load_state_dict(schedule)
        for group, lr in zip(engine.optimizer.param_groups, rates):
            group["lr"] = lr
        return StepOutcome(False, norm, "non-finite gradients")

    def count(self, step: int, outcome: StepOutcome, values: dict[str, float], device: torch.device) -> str | None:
        """Record the outcome of ``step`` (collective on a skipped step: every rank skips alike).
        Returns the log line of a skip, or None. Raises :class:`TrainingDiverged` after
        ``max_bad_steps`` consecutive bad steps."""
        self.steps += 1
        if outcome.applied:
            self.consecutive, self.first_bad_step = 0, None
            return None
        self.skipped += 1
        where = nonfinite_by_rank(values, device)
        if self.loss_scaled and not where:
            return None  # fp16's dynamic loss scale at work: DeepSpeed lowered the scale
        self.consecutive += 1
        self.first_bad_step = self.first_bad_step or step
        terms = "; ".join(f"rank {r}: {', '.join(names)}" for r, names in sorted(where.items())) or "none"
        line = (f"step {step} skipped: {outcome.reason} (norm {outcome.grad_norm}); non-finite terms: {terms}; "
                f"{self.consecutive} consecutive (train.max_bad_steps {self.max_bad_steps})")
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(f"training diverged: {self.consecutive} consecutive steps with non-finite loss or "
                                   f"gradients (steps {self.first_bad_step}-{step}); the last: {line}")
        return line

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0


def nonfinite_by_rank(values: dict[str, float], device: torch.device) -> dict[int, list[str]]:
    """Which of ``values`` are non-finite on which rank (collective: one number per rank, a bit
    per value, gathered only on skipped steps)."""
    names = sorted(values)
    mine = sum(1 << i for i, name in enumerate(names) if not math.isfinite(values[name]))
    if _world() == 1:
        masks = [mine]
    else:
        t = torch.tensor([mine], dtype=torch.int64, device=device)
        out = [torch.zeros_like(t) for _ in range(_world())]
        dist.all_gather(out, t)
        masks = [int(x.item()) for x in out]
    return {r: [n for i, n in enumerate(names) if m >> i & 1] for r, m in enumerate(masks) if m}


# ---------------------------------------------------------------------------------------------
# What the optimizer holds: finite or not, and how far a step moved it


def master_weights(engine: Any) -> list[torch.Tensor]:
    """The tensors the optimizer updates: fp32 partitions under ZeRO (disjoint across ranks),
    the module's parameters at stage 0 (whole on every rank)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [p for group in inner.param_groups for p in group["params"] if p.numel()]


def _sum_over_ranks(values: list[float], partitioned: bool, device: torch.device) -> list[float]:
    if not partitioned or _world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _optimizer_state(engine: Any) -> Iterator[tuple[str, torch.Tensor | None]]:
    """This rank's share of the weights and optimizer moments, padding excluded, each named."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = {k for state in inner.state.values() for k, v in state.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1}
    if _stage(engine) == 3:
        # ZeRO-3's flat partitions end in padding that is never written (torch.empty): read each
        # parameter's own fragment through DeepSpeed's accessors instead.
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        rank = dist.get_rank() if _world() > 1 else 0

        def own(fragment: torch.Tensor | None, total: int) -> torch.Tensor | None:
            # each rank holds an equal share; the last share's tail is padding (all of it, on the
            # ranks past a small parameter's end)
            if fragment is None:
                return None
            share = fragment.numel()
            return fragment.flatten()[:max(0, min(share, total - rank * share))]

        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                yield name, own(safe_get_local_fp32_param(p), p.ds_numel)
                for key in sorted(moments):
                    yield f"{name} ({key})", own(safe_get_local_optimizer_state(p, key), p.ds_numel)
        return
    for name, p in engine.module.named_parameters():
        yield name, p.data
    for i, p in enumerate(master_weights(engine)):
        yield f"the optimizer's weights #{i}", p
        for key in sorted(moments):
            yield f"the optimizer's {key} #{i}", inner.state.get(p, {}).get(key)


def nonfinite_state(engine: Any, device: torch.device) -> list[str]:
    """What holds a non-finite value among the weights and optimizer moments, on each rank
    ("rank R: NAME"); empty when everything is finite (collective)."""
    mine = next((name for name, t in _optimizer_state(engine)
                 if t is not None and t.numel() and not bool(torch.isfinite(t).all())), None)
    found = [mine] if _world() == 1 else _gather_objects(mine)
    return [f"rank {r}: {name}" for r, name in enumerate(found) if name is not None]


def _gather_objects(value: Any) -> list[Any]:
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, value)
    return out


class UpdateRatio:
    """‖Δw‖ / ‖w‖ of one optimizer step over the master weights (a copy of them is held from
    :meth:`before` to :meth:`after`: only on the steps that log it)."""

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.partitioned = _stage(engine) > 0
        self.saved = [p.detach().clone() for p in master_weights(engine)]

    def after(self) -> float:
        new = master_weights(self.engine)
        moved = sum(float((n.detach().float() - s.float()).pow(2).sum()) for n, s in zip(new, self.saved))
        size = sum(float(n.detach().float().pow(2).sum()) for n in new)
        moved, size = _sum_over_ranks([moved, size], self.partitioned, self.device)
        self.saved = []
        return math.sqrt(moved / size) if size > 0 else 0.0


def grad_norms_by_module(engine: Any) -> dict[str, float]:
    """The gradient norm of each top-level part of the model (towers, projections, a method's parts),
    from the full gradients (DeepSpeed's ``safe_get_full_grad``: a collective per parameter under
    ZeRO, so this runs only on the steps that log it). Call between the backward and the step."""
    from deepspeed.utils import safe_get_full_grad

    sums: dict[str, float] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "parts" else parts[0]
        grad = safe_get_full_grad(p)
        if grad is not None:
            sums[key] = sums.get(key, 0.0) + float(grad.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sums.items()}


def embedding_variance(features: torch.Tensor) -> float:
    """Total variance of a batch of unit-norm embeddings across the batch: about 1 − ‖mean‖² when
    they spread, 0 when every sample maps to the same point (a collapsed tower)."""
    f = features.detach().float()
    return float(f.var(0, unbiased=False).sum()) if f.shape[0] > 1 else float("nan")


# ---------------------------------------------------------------------------------------------
# Spikes and collapses


@dataclass
class HealthEvent:
    kind: str  # nonfinite, spike, collapse, rollback
    step: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)


class SpikeDetector:
    """A loss spike: the loss above the running median of the last ``window`` healthy steps by
    ``deviations`` robust deviations (1.4826 × the median absolute deviation) for ``steps``
    consecutive steps. Values inside a spike do not enter the window, so a lasting one stays flagged."""

    def __init__(self, deviations: float, steps: int, window: int) -> None:
        self.deviations, self.steps = deviations, steps
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = max(8, window // 4)
        self.streak = 0
        self.onset: int | None = None

    def threshold(self) -> float | None:
        if len(self.history) < self.min_history:
            return None
        median = statistics.median(self.history)
        spread = 1.4826 * statistics.median(abs(x - median) for x in self.history)
        # A flat history (a loss that has converged) still allows for rounding-size wiggles.
        return median + self.deviations * max(spread, 1e-3 * abs(median), 1e-8)

    def observe(self, step: int, loss: float) -> HealthEvent | None:
        if not math.isfinite(loss):
            return None  # the step guard's business
        limit = self.threshold()
        if limit is None or loss <= limit:
            self.streak, self.onset = 0, None
            self.history.append(loss)
            return None
        self.streak += 1
        self.onset = self.onset or step
        if self.streak != self.steps:
            return None
        median = statistics.median(self.history)
        return HealthEvent("spike", step, f"loss spike: {loss:.4f} at step {step}, over {limit:.4f} (running median "
                                          f"{median:.4f}) for {self.steps} steps since step {self.onset}",
                           {"loss": loss, "threshold": limit, "median": median, "onset": self.onset})

    def reset(self) -> None:
        self.streak, self.onset = 0, None

    @property
    def in_spike(self) -> bool:
        return self.streak > 0


class Persistent:
    """A condition that must hold for ``steps`` consecutive steps before it is reported, once,
    and is reported again only after it has cleared."""

    def __init__(self, steps: int) -> None:
        self.steps, self.count, self.reported = steps, 0, False

    def update(self, holds: bool) -> bool:
        self.count = self.count + 1 if holds else 0
        if not holds:
            self.reported = False
        if self.count >= self.steps and not self.reported:
            self.reported = True
            return True
        return False


@dataclass
class Observation:
    """One step as the health monitor sees it; every field is the same on every rank."""

    step: int
    loss: float  # the rank-mean total loss
    logit_scale: float  # exp(logit_scale)
    terms: dict[str, float]  # rank-mean term values
    chance: dict[str, float]  # the chance level of the terms that have one
    embedding_variance: dict[str, float]  # rank-mean, by output name
    past_warmup: bool


class HealthMonitor:
    """Spike and collapse detection over the observations of a run (``train.health``)."""

    def __init__(self, cfg: Any) -> None:  # cfg: hilum.launch.config.HealthSection
        self.cfg = cfg
        self.spikes = SpikeDetector(cfg.spike_deviations, cfg.spike_steps, cfg.spike_window)
        n = cfg.collapse_steps
        self.scale_floor, self.at_chance, self.flat = Persistent(n), Persistent(n), Persistent(n)
        self.collapsed = False

    def observe(self, o: Observation) -> list[HealthEvent]:
        if not self.cfg.enabled:
            return []
        events = []
        spike = self.spikes.observe(o.step, o.loss)
        if spike:
            events.append(spike)
        n = self.cfg.collapse_steps
        if self.scale_floor.update(o.logit_scale <= self.cfg.min_logit_scale):
            events.append(HealthEvent("collapse", o.step, f"collapse: the logit scale has been at or below "
                                      f"{self.cfg.min_logit_scale} for {n} steps ({o.logit_scale:.4f} at step {o.step}): "
                                      "the logits no longer separate pairs", {"cause": "logit_scale", "value": o.logit_scale}))
        chance = [f"{name} {o.terms[name]:.4f} (chance {level:.4f})" for name, level in o.chance.items()
                  if name in o.terms and abs(o.terms[name] - level) <= self.cfg.chance_tolerance * level]
        if self.at_chance.update(o.past_warmup and bool(chance)):
            events.append(HealthEvent("collapse", o.step, f"collapse: loss at chance for {n} steps after warm-up: "
                                      f"{'; '.join(chance)} at step {o.step}", {"cause": "chance", "terms": chance}))
        flat = {k: v for k, v in o.embedding_variance.items() if v < self.cfg.min_embedding_variance}
        if self.flat.update(o.past_warmup and bool(flat)):  # randomly initialised towers start near it
            listed = ", ".join(f"{k} {v:.2e}" for k, v in flat.items())
            events.append(HealthEvent("collapse", o.step, f"collapse: embedding variance near zero for {n} steps "
                                      f"({listed} at step {o.step}; threshold {self.cfg.min_embedding_variance})",
                                      {"cause": "embedding_variance", **flat}))
        self.collapsed = any(p.count >= n for p in (self.scale_floor, self.at_chance, self.flat))
        return events

    @property
    def healthy(self) -> bool:
        """Whether a checkpoint written now may be rolled back to: no spike under way, no collapse."""
        return not self.spikes.in_spike and not self.collapsed


# ---------------------------------------------------------------------------------------------
# Test-only fault point: a loss made non-finite, or a spike, at chosen steps on one rank


DRILL_ENV = "HILUM_LOSS_DRILL"


@dataclass(frozen=True)
class LossDrill:
    """``HILUM_LOSS_DRILL=KIND:FIRST-LAST:RANK[,…]`` (``KIND`` nan or spike; ``FIRST-LAST`` steps,
    1-based, inclusive, or one step): the loss of those steps on ``RANK`` is multiplied by NaN, or
    by 20. How the tests make a step go bad, and how an operator can rehearse one (like
    ``HILUM_FAULT_DRILL``, which kills a worker)."""

    entries: tuple[tuple[str, int, int, int], ...]  # (kind, first, last, rank)

    @classmethod
    def from_env(cls) -> "LossDrill | None":
        spec = os.environ.get(DRILL_ENV)
        if not spec:
            return None
        entries = []
        for part in spec.split(","):
            try:
                kind, steps, rank = part.split(":")
                first, _, last = steps.partition("-")
                entries.append((kind, int(first), int(last or first), int(rank)))
            except ValueError:
                raise ValueError(f"{DRILL_ENV}: {part!r} is not KIND:FIRST-LAST:RANK") from None
            if kind not in ("nan", "spike"):
                raise ValueError(f"{DRILL_ENV}: kind must be nan or spike, not {kind!r}")
        return cls(tuple(entries))

    def factor(self, step: int, rank: int) -> float | None:
        for kind, first, last, at in self.entries:
            if rank == at and first <= step <= last:
                return float("nan") if kind == "nan" else 20.0
        return None


class DrilledLoss:
    """The run's loss with :class:`LossDrill` applied at its steps (``step`` set by the loop), once
    per step number: a step trained again after a rollback sees other data, and is left alone."""

    def __init__(self, loss: Any, drill: LossDrill, rank: int) -> None:
        self.inner, self.drill, self.rank, self.step = loss, drill, rank, 0
        self.fired: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _apply(self, result: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        factor = self.drill.factor(self.step, self.rank)
        if factor is None or self.step in self.fired:
            return result
        self.fired.add(self.step)
        total, terms = result
        return poisoned(total * factor), {k: v * factor for k, v in terms.items()}

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._apply(self.inner(inputs))

    def whole_batch(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._apply(self.inner.whole_batch(inputs))


def mean_over_ranks(values: Iterable[float], device: torch.device) -> list[float]:
    """Rank means of a few numbers in one all-reduce (NaN stays NaN)."""
    values = [float(v) for v in values]
    if _world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / _world()).tolist()


Callback = Callable[[HealthEvent], None]
