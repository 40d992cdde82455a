"""One worker's training loop. It needs an initialised process group (or none for one process),
not Ray: Ray Train, the local launcher and torchrun all end up calling :func:`train`."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator

import numpy as np
import torch

from hilum.monitoring.console import configure_console
from hilum.monitoring.flops import peak_tflops, training_flops_per_sample
from hilum.monitoring.metrics import find_stragglers
from hilum.trainer import checkpoint
from hilum.trainer.checkpoint import TrainState
from hilum.trainer.data.device_decode import DeviceDecoder
from hilum.trainer.data.prefetch import Batch, Prefetcher
from hilum.trainer.data.shards import load_manifest
from hilum.trainer.data.storage import redact_url
from hilum.trainer.data.stream import (
    Preprocess,
    ShardStream,
    StreamPosition,
    StreamSpec,
    batches_per_epoch,
    make_loader,
    resume_position,
    short_batches_warning,
)
from hilum.trainer.data.text import Tokenize, worker_tokenizer_threads
from hilum.trainer.distributed import WorkerInfo, all_gather_floats, gather_with_grad, worker_info
from hilum.trainer.engine import build_engine, deepspeed_config, pick_device, pick_dtype
from hilum.trainer.evaluate import evaluate
from hilum.trainer.gradcache import gradcache_backward, num_chunks, to_device
from hilum.trainer.health import (
    DrilledLoss,
    HealthEvent,
    HealthMonitor,
    LossDrill,
    Observation,
    StepGuard,
    TrainingDiverged,
    UpdateRatio,
    embedding_variance,
    grad_norms_by_module,
    mean_over_ranks,
    nonfinite_state,
)
from hilum.trainer.loss import WeightedLoss
from hilum.trainer.models.dual_encoder import build_model
from hilum.trainer.objectives import ObjectiveInputs, build_objectives, method_needs
from hilum.trainer.timing import NO_TIMER, PhaseTimer

if TYPE_CHECKING:
    from hilum.launch.config import HilumConfig

log = logging.getLogger("hilum")

# Called on every rank after each checkpoint with the latest logged metrics (Ray Train's report,
# for one). Not at every log step: Ray Train holds one unconsumed report per worker and collects
# them every 2 s, so a report per short step stalled it (2 s a step with log_every 1).
Reporter = Callable[[dict[str, Any]], None]


def setup_logging(info: WorkerInfo) -> None:
    configure_console(f"%(asctime)s [rank {info.rank}] %(levelname)s %(name)s: %(message)s", show_info=info.is_main)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (an error, not a silent fallback, where torch has none).

    The rest of what makes a resumed run repeat an uninterrupted one is always on: seeds, the
    data stream as a function of (seed, epoch, position), RNG states in every checkpoint, and
    collectives whose reduction order depends only on the world size (gloo's ring on CPU).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@dataclass
class Worker:
    """What the loop holds for one rank; built once by :func:`build_worker`."""

    cfg: "HilumConfig"
    info: WorkerInfo
    device: torch.device
    dtype: torch.dtype
    engine: Any
    objectives: torch.nn.ModuleDict  # the configured terms by name
    loss: WeightedLoss | DrilledLoss
    tokenize: Tokenize
    train_preprocess: Preprocess
    eval_preprocess: Preprocess
    metrics: Any  # monitoring.WorkerMetrics or None
    decoder: DeviceDecoder | None = None  # finishes batches whose JPEGs decode on the device
    store: checkpoint.CheckpointStore | None = None  # where this run's checkpoints live
    guard: StepGuard | None = None  # takes or skips each optimizer step
    health: HealthMonitor | None = None  # spikes and collapses
    chance: dict[str, float] = field(default_factory=dict)  # the terms' values at chance
    rollbacks: int = 0

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def build_worker(cfg: "HilumConfig") -> Worker:
    info = worker_info()
    setup_logging(info)
    # One intra-op thread pool per CPU granted: OpenMP threads spinning on cores another worker
    # holds made small matmuls 5x slower on a 2-core machine.
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    if cfg.run.deterministic:
        use_deterministic_algorithms()
    else:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    device = pick_device(cfg.cluster.device, info.local_rank)
    dtype = pick_dtype(cfg.train.precision, device)
    tokenize = Tokenize(cfg.model.text.tokenizer, cfg.data.context_length,
                        worker_tokenizer_threads(cfg.data.tokenizer_threads, cfg.cluster.cpus_per_worker, cfg.data.num_workers))
    objectives = build_objectives(cfg.objectives).to(device)
    needs = method_needs(objectives, cfg.model)
    # The parts the terms declare are built before the engine, so ZeRO partitions them too.
    model = build_model(cfg.model, cfg.data.in_chans, len(tokenize.tokenizer), parts=needs.parts)
    engine = build_engine(model, cfg, info.world_size, device, dtype)
    zero_config = deepspeed_config(cfg, info.world_size, dtype)["zero_optimization"]
    for objective in objectives.values():
        objective.attach(engine.module, zero_config)
    seed_everything(cfg.run.seed + 1000 * info.rank)  # per-rank randomness from here on
    d, a = cfg.data, cfg.data.augment
    on_device = d.decodes_on_device(device.type)
    if on_device and device.type != "cuda":
        raise RuntimeError(f"data.decode is 'gpu' but this worker's device is {device}")
    train_pre = Preprocess(d.image_size, d.in_chans, d.text, True, a.crop_scale_min, a.brightness, a.contrast,
                           defer_jpeg=on_device, views=needs.data.views, texts=needs.data.texts, values=needs.data.values)
    eval_pre = Preprocess(d.image_size, d.in_chans, d.text, False)
    # Under GradCache the decoded batch waits on the host: the device gets one chunk at a time.
    decoder = None
    if on_device:
        decoder = DeviceDecoder(train_pre.augment_spec, d.in_chans, device, dtype, to_host=cfg.gradcache.enabled)
    metrics = None
    if cfg.monitoring.enabled:
        from hilum.monitoring.metrics import WorkerMetrics

        metrics = WorkerMetrics(cfg.run.name, info.rank, info.node)
        url = metrics.serve(cfg.monitoring.metrics_host, cfg.monitoring.metrics_port, info.local_rank)
        metrics.write_target(cfg.run_dir / "metrics_targets")  # this run's ranks: `hilum status`
        # Every run under output_dir in one folder: Prometheus's file_sd globs only the last path element.
        metrics.write_target(Path(cfg.run.output_dir) / "metrics_targets", f"{cfg.run.name}-rank{info.rank}.json")
        log.info("metrics at %s", url)
    loss: WeightedLoss | DrilledLoss = WeightedLoss(objectives, cfg.objectives, needs.cached)
    if (drill := LossDrill.from_env()) is not None:  # a test-only fault point (trainer/health.py)
        loss = DrilledLoss(loss, drill, info.rank)
    chance = {name: level for name, o in objectives.items()
              if (level := o.chance_loss(cfg.data.batch_size, info.world_size)) is not None}
    return Worker(cfg, info, device, dtype, engine, objectives, loss, tokenize, train_pre, eval_pre, metrics, decoder,
                  store=checkpoint.store_for(cfg), guard=StepGuard(cfg.train.max_bad_steps, loss_scaled=dtype == torch.float16),
                  health=HealthMonitor(cfg.train.health), chance=chance)


def prepare_batch(w: Worker, batch: Batch) -> Batch:
    """What the training process does to a loader batch before its step: decode its JPEGs on the
    device, and, for a plain step on a GPU, copy its tensors there (GradCache keeps the batch on
    the host and moves one chunk at a time). Runs ahead of the step in the prefetch thread."""
    if w.decoder is not None:
        batch = w.decoder(batch)
    if w.device.type == "cuda" and not w.cfg.gradcache.enabled:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                batch[key] = to_device(value, w.device, w.dtype)
    return batch


def training_batches(w: Worker, stream: ShardStream) -> Prefetcher | Generator[Batch, None, None]:
    """The loader's batches, prepared (:func:`prepare_batch`) ``data.prefetch`` batches ahead;
    ``close()`` it before dropping it."""
    loader = iter(make_loader(stream, pin_memory=w.device.type == "cuda" and w.decoder is None))
    if w.cfg.data.prefetch == 0:
        return (prepare_batch(w, batch) for batch in loader)
    return Prefetcher(loader, partial(prepare_batch, w), w.device, w.cfg.data.prefetch)


StepResult = tuple[torch.Tensor, dict[str, torch.Tensor], ObjectiveInputs]


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch: its tensors, each per-sample (image, views, tokens, the
    terms' declared texts and values); the rest (texts, metadata, counters) is for the host."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def side_inputs(w: Worker, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-step data the terms read besides the model's outputs."""
    side: dict[str, torch.Tensor] = {}
    for objective in w.objectives.values():
        side.update(objective.side_inputs(batch, w.device))
    return side


def plain_backward(w: Worker, inputs: dict[str, torch.Tensor], timer: PhaseTimer = NO_TIMER,
                   side: dict[str, torch.Tensor] | None = None) -> StepResult:
    """One forward over the whole per-rank batch and its backward; the caller steps."""
    out = w.engine(inputs)
    timer.mark("forward")
    # Features stay in the model dtype (bf16 on GPUs): the loss kernels accumulate in float32.
    objective_inputs = ObjectiveInputs({**out, **(side or {})}, out["logit_scale"].float(), gather=gather_with_grad,
                                       batch=inputs)
    total, terms = w.loss(objective_inputs)
    timer.mark("loss")
    w.engine.backward(total)
    timer.mark("backward")
    return total.detach(), {k: v.detach() for k, v in terms.items()}, objective_inputs


def step_backward(w: Worker, batch: dict[str, Any], timer: PhaseTimer = NO_TIMER) -> StepResult:
    """Every backward of one training step, plain or gradient-cached; the optimizer step is left.
    Returns the weighted total, each term, and the objective's inputs (named outputs, temperature)."""
    inputs, side = model_inputs(batch), side_inputs(w, batch)
    if w.cfg.gradcache.enabled:  # moves one chunk at a time to the device
        return gradcache_backward(w.engine, inputs, w.cfg.gradcache.chunk_size, w.loss, w.device, timer=timer,
                                  image_dtype=w.dtype, side=side)
    return plain_backward(w, {k: to_device(v, w.device, w.dtype) for k, v in inputs.items()}, timer, side)


@dataclass
class StepReport:
    values: dict[str, float]  # each term, the loss, the temperature, what the after-step updates report
    # the global gradient norm, skipped (0/1), the embeddings' variance; at detailed steps each
    # module's gradient norm and the update/weight ratio
    health: dict[str, float]
    applied: bool


def train_step(w: Worker, batch: dict[str, Any], timer: PhaseTimer = NO_TIMER, step: int = 0,
               detail: bool = False) -> StepReport:
    """Forward, weighted objective terms, backward, optimizer step (skipped on every rank when the
    loss or gradients are not finite: trainer/health.py), the terms' after-step updates (a
    method's moving averages, left alone on a skipped step). ``step``: the step this is (1-based);
    ``detail``: also measure each module's gradient norm and the update/weight ratio (collectives,
    for log steps). Raises TrainingDiverged after ``train.max_bad_steps`` skips in a row."""
    if isinstance(w.loss, DrilledLoss):
        w.loss.step = step
    total, terms, inputs = step_backward(w, batch, timer)
    values = {name: float(v) for name, v in terms.items()}
    values["loss"] = float(total)
    values["logit_scale"] = float(inputs.logit_scale.detach().exp())
    health: dict[str, float] = {}
    if detail:
        health.update({f"grad_norm/{k}": v for k, v in grad_norms_by_module(w.engine).items()})
        ratio = UpdateRatio(w.engine, w.device)
    outcome = w.guard.step(w.engine)
    timer.mark("optimizer")
    health["grad_norm"], health["skipped"] = outcome.grad_norm, float(not outcome.applied)
    if detail and outcome.applied:
        health["update_ratio"] = ratio.after()
    for name in ("image", "text"):
        if name in inputs:
            health[f"embedding_variance/{name}"] = embedding_variance(inputs[name])
    skipped = w.guard.count(step, outcome, values, w.device)
    if skipped:
        record_event(w, HealthEvent("nonfinite", step, skipped))
    if outcome.applied:
        reported: dict[str, float] = {}
        for objective in w.objectives.values():
            reported.update(objective.after_step(inputs))
        if reported:
            values.update(reported)
            timer.mark("after_step")
    return StepReport(values, health, outcome.applied)


def record_event(w: Worker, event: HealthEvent) -> None:
    """A health finding: a warning, a metric, and (rank 0) a line in RUN_DIR/health_events.jsonl."""
    if w.metrics:
        w.metrics.observe_event(event.kind)
    if w.info.is_main:
        log.warning("%s", event.message)
        append_line(w.run_dir / "health_events.jsonl",
                    {"kind": event.kind, "step": event.step, "time": time.time(), "message": event.message, **event.data})


def run_eval(w: Worker, step: int) -> dict[str, Any] | None:
    cfg = w.cfg
    if not cfg.data.eval_manifest:
        return None
    prompts = cfg.eval.zero_shot.prompts
    if prompts is None:
        from hilum.trainer.data.phantom import ZERO_SHOT_PROMPTS

        prompts = ZERO_SHOT_PROMPTS
        for objective in w.objectives.values():  # a term with its own template
            prompts = objective.zero_shot_prompts(list(prompts)) or prompts
    t0 = time.perf_counter()
    result = evaluate(
        w.engine.module,
        load_manifest(cfg.data.eval_manifest, cfg.data.storage_options),
        w.eval_preprocess,
        w.tokenize,
        prompts,
        cfg.eval.batch_size,
        w.device,
        w.dtype,
        cfg.eval.max_samples,
        cfg.data.storage_options,
        cfg.data.read_ahead_bytes,
    )
    result["step"] = step
    if w.info.is_main:
        zs, rt = result["zero_shot"], result["retrieval"]
        log.info(
            "eval step %d | zero-shot acc %.3f (balanced %.3f, chance %.3f, n=%d) | i2t R@1 %.3f R@5 %.3f | t2i R@1 %.3f R@5 %.3f | %.1fs",
            step, zs.get("accuracy", float("nan")), zs.get("balanced_accuracy", float("nan")), zs.get("chance", float("nan")),
            zs.get("samples", 0), rt["image_to_text_R@1"], rt["image_to_text_R@5"], rt["text_to_image_R@1"],
            rt["text_to_image_R@5"], time.perf_counter() - t0,
        )
        (w.run_dir / f"eval_step_{step:08d}.json").write_text(json.dumps(result, indent=1))
    return result


def save_checkpoint(w: Worker, state: TrainState) -> None:
    """Save (collective), unless a weight or optimizer moment is not finite: then the run stops
    and the previous checkpoints stay as they are."""
    t0 = time.perf_counter()
    if bad := nonfinite_state(w.engine, w.device):
        raise TrainingDiverged(f"step {state.step}: non-finite values in the weights or the optimizer state "
                               f"({'; '.join(bad)}), so no checkpoint was written")
    kept = {name: s for name, o in w.objectives.items() if (s := o.train_state())}
    if kept:
        state.extra["objectives"] = kept
    url = checkpoint.save(
        w.engine, w.store, state, w.info.rank, w.info.world_size, w.cfg.fingerprint(), w.cfg.train.keep_checkpoints,
        healthy=w.health.healthy if w.health else True,
    )
    seconds = time.perf_counter() - t0
    if w.metrics:
        w.metrics.checkpoint_seconds.labels(**w.metrics.labels).set(seconds)
        w.metrics.checkpoint_bytes.labels(**w.metrics.labels).set(w.store.size(w.store.find(state.step)))
    log.info("checkpoint %s saved in %.1fs", redact_url(url), seconds)


def resume_state(w: Worker, ckpt: checkpoint.CheckpointInfo) -> TrainState:
    """Load ``ckpt`` into the worker (collective) and return where training continues."""
    state = checkpoint.load(w.engine, w.store, ckpt, w.info.rank, w.info.world_size)
    for name, kept in state.extra.get("objectives", {}).items():
        if name in w.objectives:
            w.objectives[name].load_train_state(kept)
    log.info("resumed from %s: continuing at step %d (epoch %d, batch %d)",
             redact_url(ckpt.url), state.step + 1, state.position.epoch, state.position.batch)
    return state


def last_healthy_checkpoint(w: Worker) -> str:
    found = [c for c in w.store.list_complete() if c.healthy]
    return f"the last healthy checkpoint is {redact_url(found[-1].url)}" if found else "no healthy checkpoint exists"


def observe_health(w: Worker, step: int, report: StepReport) -> tuple[dict[str, float], list[HealthEvent]]:
    """The step's rank means (loss, terms, embedding variance: one small all-reduce) and what the
    health monitor finds in them; every rank gets the same findings."""
    names = ["loss", *(t.name for t in w.cfg.objectives)]
    variance = sorted(k for k in report.health if k.startswith("embedding_variance/"))
    means = dict(zip(names + variance, mean_over_ranks([report.values[k] for k in names] +
                                                       [report.health[k] for k in variance], w.device)))
    observation = Observation(step, means["loss"], report.values["logit_scale"], {k: means[k] for k in names[1:]},
                              w.chance, {k.split("/", 1)[1]: means[k] for k in variance},
                              past_warmup=step > w.cfg.optim.warmup_steps)
    events = w.health.observe(observation)
    for event in events:
        record_event(w, event)
    return means, events


def roll_back(w: Worker, state: TrainState, spike: HealthEvent) -> bool:
    """Reload the newest healthy checkpoint from before ``spike`` began (collective) and go on
    with the data after the spike: the batches between that checkpoint and now are skipped, the
    stream position saying exactly which. Later checkpoints (written as the spike built up) are
    removed, so a restart cannot pick them. False when there is nothing to roll back to."""
    onset = int(spike.data["onset"])
    found = [c for c in w.store.list_complete() if c.healthy and c.step < onset]
    # Rank 0's choice for every rank, as at resume.
    target = int(all_gather_floats(found[-1].step if found else -1, w.device)[0])
    at = state.step
    if target < 0:
        record_event(w, HealthEvent("rollback", at, f"no rollback: no healthy checkpoint from before step {onset}",
                                    {"to_step": None}))
        return False
    w.rollbacks += 1
    if w.rollbacks > w.cfg.train.max_rollbacks:
        raise TrainingDiverged(f"loss spikes came back after {w.cfg.train.max_rollbacks} rollbacks (train.max_rollbacks); "
                               f"the last at step {at}")
    position = state.position
    restored = resume_state(w, w.store.find(target))
    if w.info.is_main:
        for later in w.store.list_complete():
            if later.step > target:
                w.store.remove(later.tag)
    state.step, state.extra, state.position = restored.step, restored.extra, position
    w.health.spikes.reset()
    record_event(w, HealthEvent("rollback", at, f"rolled back from step {at} to the checkpoint of step {target}; the "
                                f"batches trained since (steps {target + 1}-{at}) are not trained on again",
                                {"from_step": at, "to_step": target, "onset": onset, "epoch": position.epoch,
                                 "batch": position.batch}))
    return True


class Progress:
    """Throughput over the steps since the last log line, the console line, metrics.jsonl, metrics."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.last: dict[str, Any] = {}
        self.epoch_skipped: Counter[str] = Counter()
        self.epoch_filled: Counter[str] = Counter()  # samples used with a stand-in (a missing section)
        self.flops_per_sample, self.peak_tflops = 0.0, None
        if w.metrics:
            self.flops_per_sample = count_flops_per_sample(w)
            self.peak_tflops = w.cfg.monitoring.peak_tflops or device_peak_tflops(w.device, w.dtype)
            w.metrics.flops_per_sample.labels(**w.metrics.labels).set(self.flops_per_sample)
            chunks = num_chunks(w.cfg.data.batch_size, w.cfg.gradcache.chunk_size) if w.cfg.gradcache.enabled else 0
            w.metrics.gradcache_chunks.labels(**w.metrics.labels).set(chunks)
        self.restart_window()

    def epoch_done(self, epoch: int, finished: bool = True) -> None:
        """Print what this rank skipped in ``epoch`` (every rank: each reads its own slots)."""
        what = "finished" if finished else "so far"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.epoch_skipped.items())) or "none"
        total = sum(self.epoch_skipped.values())
        (log.warning if total else log.debug)("rank %d, epoch %d (%s): %d samples skipped: %s",
                                             self.w.info.rank, epoch, what, total, reasons)
        for reason, n in sorted(self.epoch_filled.items()):
            if n:
                log.info("rank %d, epoch %d (%s): %d samples kept with %s", self.w.info.rank, epoch, what, n,
                         reason.replace("_", " "))
        self.epoch_skipped.clear()
        self.epoch_filled.clear()

    def restart_window(self) -> None:
        self.window_start, self.window_samples, self.window_steps = time.perf_counter(), 0, 0
        self.window_step_seconds = self.window_data_seconds = 0.0
        self.window_phases: Counter[str] = Counter()  # seconds per phase, when monitoring.phase_timing

    def check_stragglers(self) -> None:
        """Compare every rank's mean step time over the window with the median rank (collective)."""
        w = self.w
        mine = self.window_step_seconds / max(1, self.window_steps)
        times = all_gather_floats(mine, w.device)
        factor = w.cfg.monitoring.straggler_factor
        median, slow = find_stragglers(times, factor)
        if w.metrics:
            w.metrics.observe_straggler(mine / median if median > 0 else 1.0, w.info.rank in slow)
        if slow and w.info.is_main:
            log.warning("straggler%s: %s (median step %.3fs, factor %.1f)", "s" if len(slow) > 1 else "",
                        ", ".join(f"rank {r} {times[r]:.3f}s" for r in slow), median, factor)

    def step_done(self, state: TrainState, batch: dict[str, Any], report: StepReport, means: dict[str, float],
                  data_seconds: float, step_seconds: float, phases: dict[str, float] | None = None) -> None:
        """``means``: the step's rank means (loss, terms), the same on every rank."""
        w, cfg = self.w, self.w.cfg
        values, health = report.values, report.health
        samples = len(batch["text"])
        self.window_samples += samples
        self.window_steps += 1
        self.window_step_seconds += step_seconds
        self.window_data_seconds += data_seconds
        self.window_phases.update(phases or {})
        self.epoch_skipped.update(batch["_skipped"])
        self.epoch_filled.update(batch.get("_filled", {}))
        losses = {k: values[k] for k in ["loss", *(t.name for t in cfg.objectives)]}
        reported = {k: v for k, v in values.items() if k not in losses and k != "logit_scale"}  # after-step values
        if w.metrics:
            w.metrics.observe_step(state.step, samples, step_seconds, data_seconds, losses, values["logit_scale"],
                                   batch["_skipped"], reported, phases=phases, tokens=int(batch["attention_mask"].sum()),
                                   flops_per_sample=self.flops_per_sample, peak_tflops=self.peak_tflops,
                                   memory=device_memory(w.device))
            w.metrics.observe_health({"global" if k == "grad_norm" else k.split("/", 1)[1]: v for k, v in health.items()
                                      if k.startswith("grad_norm")}, not report.applied, w.guard.skipped_fraction,
                                     health.get("update_ratio"),
                                     {k.split("/", 1)[1]: v for k, v in health.items() if k.startswith("embedding_variance/")})
        if state.step % cfg.train.log_every and state.step != cfg.train.max_steps:
            return
        self.check_stragglers()
        if w.metrics and cfg.monitoring.pushgateway:
            w.metrics.push(cfg.monitoring.pushgateway)
        elapsed = time.perf_counter() - self.window_start
        rate = self.window_samples / elapsed * w.info.world_size if elapsed > 0 else 0.0
        loss = means["loss"]
        # The share of step time this rank spent waiting for data (and decoding it) over the window:
        # the figure that says whether the loader keeps up, steadier than the last step's wait.
        data_share = self.window_data_seconds / self.window_step_seconds if self.window_step_seconds > 0 else 0.0
        self.last = {"step": state.step, "time": time.time(), "epoch": state.position.epoch, "loss": loss, "samples_per_second": rate,
                     "samples_per_step": self.window_samples / max(1, self.window_steps), "data_wait_fraction": data_share, "lr": w.engine.get_lr()[0],
                     **{k: v for k, v in values.items() if k != "loss"}, **health,
                     "skipped_fraction": w.guard.skipped_fraction}
        if self.window_phases:  # mean seconds per step of each phase over the window
            self.last["phase_seconds"] = {k: v / self.window_steps for k, v in self.window_phases.items()}
        if w.info.is_main:
            terms = " ".join(f"{t.name} {values[t.name]:.4f}" for t in cfg.objectives)
            if reported:
                terms += " | " + " ".join(f"{k} {v:.3f}" for k, v in reported.items())
            log.info("step %d/%d | loss %.4f | %s | %.0f samples/s | step %.3fs (data %.3fs, %.1f%% of the window) | "
                     "lr %.2e | scale %.1f | grad norm %.3g%s", state.step, cfg.train.max_steps, loss, terms, rate,
                     step_seconds, data_seconds, 100 * data_share, self.last["lr"], values["logit_scale"],
                     health["grad_norm"], f" | {w.guard.skipped} steps skipped" if w.guard.skipped else "")
            with open(w.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(self.last) + "\n")
        self.restart_window()


def count_flops_per_sample(w: Worker) -> float:
    """Training FLOPs per sample of this worker's model (a CPU copy without weights, counted once)."""
    cfg = w.cfg
    model_cfg = cfg.model.model_copy(update={"image": cfg.model.image.model_copy(update={"weights": None})})
    model = build_model(model_cfg, cfg.data.in_chans, len(w.tokenize.tokenizer))
    counts = training_flops_per_sample(
        model, cfg.data.image_size, cfg.data.in_chans, cfg.data.context_length, frozen_text=cfg.model.text.freeze,
        parts=list(w.engine.module.parts.values()), gradcache=cfg.gradcache.enabled,
        global_batch=cfg.data.batch_size * w.info.world_size,
    )
    return float(counts["total"])


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), dtype)


def device_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
                "peak": torch.cuda.max_memory_allocated(device)}
    with open("/proc/self/statm") as f:
        return {"rss": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}


def advance(position: StreamPosition, batch: dict[str, Any], workers: int) -> StreamPosition:
    """The stream position after consuming ``batch``."""
    if batch["_epoch"] != position.epoch:
        position = StreamPosition(epoch=batch["_epoch"])
    offsets = list(position.worker_offsets) + [0] * (workers - len(position.worker_offsets))
    offsets[batch["_worker"]] = batch["_offset"]
    return StreamPosition(position.epoch, position.batch + 1, offsets)


def append_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def record_start(w: Worker, step: int) -> None:
    """One line per start of this rank in RUN_DIR/workers/rankN.jsonl: process, host, Ray node, the
    step it continues after. Restarts after failures show up here (and `hilum status` reads it)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    append_line(w.run_dir / "workers" / f"rank{w.info.rank}.jsonl",
                {"pid": os.getpid(), "host": os.uname().nodename, "ray_node": node, "time": time.time(), "from_step": step})


def run_steps(w: Worker, state: TrainState, batches: Iterator[Batch], progress: Progress, workers: int,
              report: Reporter | None) -> None:
    """Training steps from ``state`` until ``train.max_steps``, with the checkpoints and evaluations
    they fall on; ``state`` advances in place (step, stream position). A run that diverges is recorded
    with the checkpoint to restart from, and raised."""
    try:
        _run_steps(w, state, batches, progress, workers, report)
    except TrainingDiverged as err:
        message = f"{err}; {last_healthy_checkpoint(w)}"
        record_event(w, HealthEvent("diverged", state.step + 1, message))
        raise TrainingDiverged(message) from None


def _run_steps(w: Worker, state: TrainState, batches: Iterator[Batch], progress: Progress, workers: int,
               report: Reporter | None) -> None:
    cfg = w.cfg
    while state.step < cfg.train.max_steps:
        timer = PhaseTimer(w.device, enabled=w.metrics is not None and cfg.monitoring.phase_timing)
        t_data = time.perf_counter()
        batch = next(batches)  # the data wait: nothing, when the prefetch keeps ahead of the steps
        if batch["_epoch"] != state.position.epoch:
            progress.epoch_done(state.position.epoch)
        timer.mark("data")
        t_step = time.perf_counter()
        step = state.step + 1
        logs = step % cfg.train.log_every == 0 or step == cfg.train.max_steps
        stepped = train_step(w, batch, timer, step, detail=logs and cfg.monitoring.module_grad_norms)
        state.step = step
        if cfg.train.sample_log:
            append_line(w.run_dir / "samples" / f"rank{w.info.rank}.jsonl",
                        {"step": state.step, "epoch": batch["_epoch"], "keys": [m["__key__"] for m in batch["meta"]]})
        state.position = advance(state.position, batch, workers)
        means, events = observe_health(w, step, stepped)
        progress.step_done(state, batch, stepped, means, data_seconds=t_step - t_data,
                           step_seconds=time.perf_counter() - t_data, phases=timer.phases)
        spike = next((e for e in events if e.kind == "spike"), None)
        if spike and cfg.train.rollback and roll_back(w, state, spike):
            progress.restart_window()
            continue

        every = cfg.train.checkpoint_every
        if (every and state.step % every == 0) or state.step == cfg.train.max_steps:
            save_checkpoint(w, state)
            if report and progress.last:
                report(progress.last)
            progress.restart_window()  # checkpoint time is not training throughput
        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < cfg.train.max_steps:
            run_eval(w, state.step)
            progress.restart_window()


def train(cfg: "HilumConfig", resume: bool = False, report: Reporter | None = None) -> dict[str, Any]:
    """Train on this rank until ``train.max_steps``; returns the final metrics (eval included).

    With ``resume``, training continues from the latest complete checkpoint in the run's store,
    looked up here rather than by the launcher: after a failure Ray Train restarts this function
    with its original arguments, and the latest checkpoint is then a newer one.
    """
    w = build_worker(cfg)
    state = TrainState()
    if resume:
        latest = w.store.latest_complete()
        # Rank 0's choice for every rank: a listing that raced a marker being written elsewhere
        # must not leave ranks loading different checkpoints.
        step = int(all_gather_floats(latest.step if latest else -1, w.device)[0])
        if step >= 0:
            state = resume_state(w, w.store.find(step))
    record_start(w, state.step)

    manifest = load_manifest(cfg.data.train_manifest, cfg.data.storage_options)
    spec = StreamSpec(cfg.data.batch_size, w.info.world_size, cfg.data.num_workers, cfg.run.seed, True, cfg.data.shuffle_buffer)
    state.position = resume_position(state.position, spec)
    steps_per_epoch = batches_per_epoch(manifest, spec)
    if w.info.is_main and (short := short_batches_warning(manifest, spec)):
        log.warning(short)
    log.info("training %s: %d workers, ZeRO stage %d, %s/%s, %d samples, %d steps per epoch, %d steps",
             cfg.run.name, w.info.world_size, cfg.train.zero_stage, w.device.type, str(w.dtype).split(".")[-1],
             manifest.num_samples, steps_per_epoch, cfg.train.max_steps)
    if cfg.gradcache.enabled:
        log.info("GradCache: contrastive batch %d (%d per rank), encoded %d at a time",
                 cfg.data.batch_size * w.info.world_size, cfg.data.batch_size, cfg.gradcache.chunk_size)

    progress = Progress(w)
    stream = ShardStream(manifest, spec, w.train_preprocess, w.tokenize, w.info.rank, state.position,
                         storage_options=cfg.data.storage_options, epochs=None,
                         read_ahead_bytes=cfg.data.read_ahead_bytes)
    batches = training_batches(w, stream)
    try:
        run_steps(w, state, batches, progress, spec.workers, report)
    finally:
        batches.close()  # the prefetch thread first: it may be inside the loader's __next__
        del batches  # stops the loader processes
    progress.epoch_done(state.position.epoch, finished=False)

    result = {"train": progress.last}
    if cfg.eval.at_end:
        ev = run_eval(w, state.step)
        if ev is not None:
            result["eval"] = ev
            if w.info.is_main:
                (w.run_dir / "eval.json").write_text(json.dumps(ev, indent=1))
    if w.metrics:
        w.metrics.write_snapshot(w.run_dir / "metrics")
        w.metrics.discard_target(Path(cfg.run.output_dir) / "metrics_targets" / f"{cfg.run.name}-rank{w.info.rank}.json")
        if cfg.monitoring.pushgateway:
            w.metrics.push(cfg.monitoring.pushgateway)
        w.metrics.close()
    return result
