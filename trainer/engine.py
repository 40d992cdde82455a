"""The DeepSpeed engine: ZeRO stage, optimizer, schedule and precision from the hilum config."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hilum.monitoring.console import printed_to_log
from hilum.trainer.gradcache import num_chunks

log = logging.getLogger("hilum")

if TYPE_CHECKING:  # the schema belongs to launch/, which trainer/ never imports at run time
    from hilum.launch.config import HilumConfig


def device_type(requested: str) -> str:
    """``cluster.device`` resolved on this machine: "cuda" or "cpu" (auto takes CUDA when visible)."""
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(requested: str, local_rank: int) -> torch.device:
    if device_type(requested) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device is 'cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def dist_backend(device_type: str) -> str:
    """The collective backend for a device type: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def prepare_deepspeed_env(device_type: str) -> None:
    """Must run before deepspeed is imported: it picks its accelerator at import time."""
    if device_type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    _prefer_interpreters_ninja()


def _prefer_interpreters_ninja() -> None:
    """Put the ``ninja`` installed beside this interpreter first on PATH, when there is one.

    DeepSpeed JIT-builds its ops (on CPU: the shared-memory communication op) through
    torch.utils.cpp_extension, which runs whichever ``ninja`` PATH finds first. pip installs one
    next to the interpreter (a DeepSpeed dependency), but a virtual environment that is not
    activated finds the system's instead. Two ninja versions keep their build logs in different
    formats, so each rebuilds what the other built: 30 s on two cores at every start that
    follows a start by the other (a Ray job's workers run with the environment's bin first, a
    plain `.venv/bin/hilum train` does not).
    """
    bin_dir = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (bin_dir / "ninja").is_file() and path.split(os.pathsep)[0] != str(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}" if path else str(bin_dir)


def deepspeed_config(cfg: "HilumConfig", world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    o, t = cfg.optim, cfg.train
    # GradCache makes one backward per chunk: the engine accumulates them and steps once a batch.
    micro, accumulate = cfg.data.batch_size, 1
    if cfg.gradcache.enabled:
        micro = cfg.gradcache.chunk_size
        accumulate = num_chunks(cfg.data.batch_size, micro)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": micro * accumulate * world_size,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused Adam would JIT-build a C++/CUDA op; torch's is as fast here.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": min(o.warmup_steps, max(t.max_steps - 1, 0)),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.01,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if accumulate > 1 and dtype != torch.float32 and t.zero_stage >= 1:
        # GradCache sums one backward per chunk. DeepSpeed accumulates in the training dtype unless
        # told otherwise, and 256 bf16 additions drop the low bits of every chunk's share; fp32
        # accumulation costs 4 bytes per (partitioned) parameter. At ZeRO-1 DeepSpeed does this
        # through its BF16_Optimizer (tested in tests/test_gradcache.py).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


# ZeRO-3 on gloo (CPU) keeps no parameter gathered between steps. DeepSpeed re-gathers its
# "persistent" parameters (below 100k elements: on the tiny CPU models, all of them) after every
# optimizer step and checkpoint with one asynchronous all-gather per parameter, then waits on the
# last handle only: NCCL runs them in order on one stream, but gloo runs them on two threads, so
# an earlier parameter can still be arriving when the next forward reads it (measured: 1 of
# 20 000 parameters gathered that way held uninitialised memory). Without persistent parameters
# every gather goes through the forward's fetch, which waits on each handle (and the tiny model
# runs no slower: 150-170 samples/s on 2 CPU ranks, against 130-150 with persistent parameters).
GLOO_ZERO3 = {"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0}

# DeepSpeed's default for its ZeRO gradient and all-gather buckets, in elements.
DEEPSPEED_BUCKET = 500_000_000


def bucket_sizes(model: nn.Module) -> dict[str, int]:
    """ZeRO buckets no larger than the model's trainable parameters.

    DeepSpeed allocates its gradient buckets (two under ``overlap_comm``) at every backward, 5e8
    elements each by default: 1 GB apiece in bf16 on a GPU. A bucket that holds every trainable
    parameter never fills before the backward ends, so capping it there moves no reduction; it only
    frees that memory. On CPU in deterministic mode, where torch fills every new tensor, the full-size
    buckets cost 1.2 s of a tiny model's 1.3 s step.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unit = 1024  # DeepSpeed wants a multiple of its communication alignment (2 to 8 elements)
    size = min(DEEPSPEED_BUCKET, max(unit, -(-trainable // unit) * unit))
    return {"reduce_bucket_size": size, "allgather_bucket_size": size}


# Elements per alignment unit: 16 bytes in bf16/fp16 (32 in fp32), what cuBLAS's fast kernels need.
ALIGN_ELEMENTS = 8


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: gains, biases and the temperature keep their scale (as open_clip does).

    Within each, parameters whose size is a whole number of 16-byte units come first, in a group
    of their own: DeepSpeed's ZeRO-1/2 optimizers flatten each group into one buffer with the
    parameters as views packed back to back, so one odd-sized parameter (the 1-element
    temperature) moved every later one off 16-byte alignment. cuBLAS then runs a linear layer
    whose bias is misaligned with a fallback kernel: BERT-base's 768→3072 layer over 65 536
    tokens took 3.4 ms instead of 0.45 ms on an H200, 37 % of the whole plain step's GPU time.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((p.ndim >= 2, p.numel() % ALIGN_ELEMENTS == 0), []).append(p)
    order = [(True, True), (True, False), (False, True), (False, False)]
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0} for key in order if key in groups]


def build_engine(model: nn.Module, cfg: "HilumConfig", world_size: int, device: torch.device, dtype: torch.dtype):  # noqa: ANN201
    prepare_deepspeed_env(device.type)
    import deepspeed

    backend = dist_backend(device.type)
    with printed_to_log(log):
        deepspeed.init_distributed(dist_backend=backend)
    config = deepspeed_config(cfg, world_size, dtype)
    config["zero_optimization"].update(bucket_sizes(model))
    if backend == "gloo" and cfg.train.zero_stage == 3:
        config["zero_optimization"].update(GLOO_ZERO3)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=config,
    )
    match_norm_buffers(engine.module, dtype)
    chunks = num_chunks(cfg.data.batch_size, cfg.gradcache.chunk_size)
    if cfg.gradcache.enabled and dtype != torch.float32 and cfg.train.zero_stage == 0:
        log.warning("GradCache at ZeRO stage 0 sums its %d chunk gradients in %s (DeepSpeed has no fp32 accumulation "
                    "without ZeRO): set train.zero_stage to 1 or more for fp32 accumulation",
                    chunks, str(dtype).split(".")[-1])
    if cfg.gradcache.enabled and cfg.train.zero_stage == 2 and world_size > 1 and chunks > 1:
        log.warning("GradCache at ZeRO stage 2 reduces the gradients of each of its %d chunks across ranks; ZeRO-1 "
                    "reduces once per step (README, Scaling): consider train.zero_stage: 1", chunks)
    return engine


def match_norm_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """Batch-norm running statistics in the training dtype.

    DeepSpeed (0.19 on) casts parameters to bf16/fp16 but leaves buffers in fp32, and
    ``batch_norm`` refuses a bf16 weight next to fp32 running statistics: every BatchNorm tower
    (ResNet-50) would fail at its first step. Older DeepSpeed cast the whole module, buffers
    included; this restores that for the norm layers only, leaving other buffers (position ids,
    rotary frequencies) as they are.
    """
    if dtype == torch.float32:
        return
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._NormBase):
            target = layer.weight.dtype if layer.weight is not None else dtype
            for name in ("running_mean", "running_var"):
                buf = getattr(layer, name)
                if buf is not None and buf.is_floating_point() and buf.dtype != target:
                    setattr(layer, name, buf.to(target))
