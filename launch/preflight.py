"""Checks that run in the launching process, before any worker starts.

A cluster job that dies after scheduling, image pulls and a DeepSpeed build because a path was
mistyped wastes the most expensive minutes of a run; every check here is cheap and local.
The model is built on the ``meta`` device, so even a large configuration costs no memory.
"""

from __future__ import annotations

import os

import torch

from hilum.launch.config import ConfigError, HilumConfig
from hilum.trainer.data.shards import load_manifest
from hilum.trainer.data.storage import resolve_env_refs
from hilum.trainer.data.stream import StreamSpec, slot_size


def preflight(cfg: HilumConfig) -> None:
    """Raise ConfigError naming the field of the first problem found."""
    problems = []
    manifests = {}
    try:
        resolve_env_refs(cfg.data.storage_options, "data.storage_options")
    except ValueError as err:
        raise ConfigError(f"refusing to start:\n  {err}") from None
    for field in ("train_manifest", "eval_manifest"):
        url = getattr(cfg.data, field)
        if url is None or (field == "eval_manifest" and not (cfg.eval.at_end or cfg.eval.every_steps)):
            continue
        try:
            manifests[field] = load_manifest(url, cfg.data.storage_options)
        except (OSError, ValueError) as err:
            problems.append(f"data.{field}: {err}")
    if "train_manifest" in manifests:
        spec = StreamSpec(cfg.data.batch_size, cfg.cluster.num_workers, cfg.data.num_workers)
        try:
            slot_size(manifests["train_manifest"], spec)
        except ValueError as err:
            problems.append(f"data.train_manifest: {err}")
    if cfg.model.text.pretrained and not os.path.isdir(cfg.model.text.pretrained):
        problems.append(f"model.text.pretrained: {cfg.model.text.pretrained} is not a local directory")
    if cfg.model.image.weights and not os.path.isfile(cfg.model.image.weights):
        problems.append(f"model.image.weights: {cfg.model.image.weights} is not a file")
    if cfg.cluster.device == "cuda" and cfg.cluster.launcher == "local" and not torch.cuda.is_available():
        problems.append("cluster.device: 'cuda' requested but no CUDA device is visible here")
    problems += _check_host_memory(cfg)
    if problems:
        raise ConfigError("refusing to start:\n  " + "\n  ".join(problems))
    try:
        from hilum.trainer.data.text import load_tokenizer

        vocab = len(load_tokenizer(cfg.model.text.tokenizer))
    except (OSError, ValueError) as err:
        raise ConfigError(f"refusing to start:\n  model.text.tokenizer: {err}") from None
    _check_model(cfg, vocab)


def host_bytes_per_rank(cfg: HilumConfig) -> int:
    """A lower bound on the host memory that one rank's image batches hold (one view, no text).

    CPU decode: float32 batches, ``2 × data.num_workers`` in the loader (its prefetch factor)
    plus ``data.prefetch`` + 1 in the training process. GPU decode: only GradCache keeps the
    decoded batch on the host (bf16: 2 bytes a value), ``data.prefetch`` + 1 of them.
    """
    from hilum.trainer.engine import device_type

    d = cfg.data
    values = d.batch_size * d.in_chans * d.image_size**2
    if d.decodes_on_device(device_type(cfg.cluster.device)):
        return values * 2 * (d.prefetch + 1) if cfg.gradcache.enabled else 0
    return values * 4 * (2 * d.num_workers + d.prefetch + 1)


def _check_host_memory(cfg: HilumConfig) -> list[str]:
    """Refuse what cannot fit in this machine's memory when every rank runs on it (local launcher,
    embedded Ray): the kernel would kill the run minutes later, after the DeepSpeed build.
    GradCache's per-rank batches of tens of thousands reach it first (65 536 grey 224² images:
    13 GB a batch as float32)."""
    from hilum.cluster.ray_runner import ray_address

    if cfg.cluster.launcher == "ray" and ray_address(cfg):
        return []
    need = host_bytes_per_rank(cfg) * cfg.cluster.num_workers
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need <= memory:
        return []
    return [f"data.batch_size: {cfg.cluster.num_workers} ranks × {cfg.data.batch_size} images of "
            f"{cfg.data.in_chans}×{cfg.data.image_size}² hold at least {need / 2**30:.1f} GiB of host memory in "
            f"batches on their way (data.num_workers {cfg.data.num_workers}, data.prefetch {cfg.data.prefetch}, "
            f"data.decode {cfg.data.decode}); this machine has {memory / 2**30:.1f} GiB. Fewer loader workers, GPU decode "
            "or a smaller per-rank batch (more ranks) bring it down"]


def _check_model(cfg: HilumConfig, vocab: int) -> None:
    """Build the model on the meta device and push a fake image batch through the image side.

    The text tower is built but not run: transformers inspects attention-mask values, which meta
    tensors do not have; its output width is fixed by construction anyway.
    """
    from hilum.trainer.models.dual_encoder import build_model

    d = cfg.data
    # Files were checked above; loading real weights is the workers' job.
    cfg_model = cfg.model.model_copy(update={"image": cfg.model.image.model_copy(update={"weights": None})})
    try:
        with torch.device("meta"):
            model = build_model(cfg_model, d.in_chans, vocab)
            out = model.encode_image(torch.zeros(2, d.in_chans, d.image_size, d.image_size))
    except (ValueError, TypeError, RuntimeError, AssertionError, OSError) as err:
        raise ConfigError(f"refusing to start:\n  model: cannot build or run the configured model: {err}") from None
    if tuple(out.shape) != (2, cfg.model.embed_dim):
        raise ConfigError(f"refusing to start:\n  model: image embeddings have shape {tuple(out.shape)}, expected (2, {cfg.model.embed_dim})")
