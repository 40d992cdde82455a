"""Checkpoints: DeepSpeed's own shards plus hilum's per-rank state, committed with a marker.

A run's checkpoints live under one directory URL (``run.checkpoint_dir``, by default
``RUN_DIR/checkpoints``): a local path, or object storage such as ``s3://bucket/prefix``. Each is
``step_00000050/``: DeepSpeed's model and optimizer shards, ``hilum_rank00000.pt`` … (step,
stream position, RNG states), and ``COMPLETE`` written by rank 0 after a barrier that every rank
reaches only once its files are stored. A checkpoint without ``COMPLETE`` is invisible to resume,
so a crash mid-save leaves the previous one the latest.

DeepSpeed writes and reads local files only. For object storage each rank saves into its own
local staging directory, so it knows exactly which files are its own, and uploads them; to load,
one rank per node downloads the checkpoint into a node-local cache. Ray Train's checkpoint
upload does the same for Ray runs only; this one also serves the single-node launcher and
``hilum checkpoints``/``export``, which read the store without Ray.

Everything is loaded with ``torch.load(weights_only=True)``: DeepSpeed's own loader unpickles
arbitrary objects, so its checkpoint engine is replaced by one that allows only the handful of
DeepSpeed types its files hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hilum.trainer.data.storage import PERMANENT, redact_url, url_to_fs, with_retry
from hilum.trainer.data.stream import StreamPosition

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class TrainState:
    """What a rank must get back to continue exactly where it was."""

    step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    # Per-rank state of worker parts the engine does not checkpoint (tensors, dicts, numbers only:
    # it loads with weights_only=True), e.g. a method's moving-average copies' ZeRO-3 partitions.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    url: str  # the checkpoint's directory: a local path or a URL
    step: int
    world_size: int
    saved_at: float
    healthy: bool = True  # written while no loss spike or collapse was under way (hilum.trainer.health)

    @property
    def tag(self) -> str:
        return tag_for(self.step)


class CheckpointStore:
    """The directory (local or object storage, through fsspec) that holds a run's checkpoints."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = url_to_fs(self.url, self.storage_options)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __repr__(self) -> str:
        return f"CheckpointStore({redact_url(self.url)})"

    def path_of(self, tag: str) -> str:
        return f"{self.root}/{tag}"

    def url_of(self, tag: str) -> str:
        return f"{self.url}/{tag}"

    def list_complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (a fresh listing: object-store listings are cached)."""
        self.fs.invalidate_cache()
        try:
            markers = self.fs.glob(f"{self.root}/step_*/{COMPLETE}")
        except FileNotFoundError:
            return []
        out = []
        for marker in markers:
            tag = marker.rstrip("/").split("/")[-2]
            m = _TAG.match(tag)
            if not m:
                continue
            try:
                meta = json.loads(self.fs.cat_file(marker))
            except (ValueError, *PERMANENT):
                continue
            out.append(CheckpointInfo(self.url_of(tag), int(m.group(1)), int(meta.get("world_size", 0)),
                                      float(meta.get("saved_at", 0)), bool(meta.get("healthy", True))))
        return sorted(out, key=lambda c: c.step)

    def latest_complete(self) -> CheckpointInfo | None:
        found = self.list_complete()
        return found[-1] if found else None

    def find(self, step: int | None = None) -> CheckpointInfo:
        """The complete checkpoint of ``step`` (the latest one when None); FileNotFoundError if none."""
        found = [c for c in self.list_complete() if step is None or c.step == step]
        if not found:
            at = f" at step {step}" if step is not None else ""
            raise FileNotFoundError(f"no complete checkpoint{at} in {redact_url(self.url)}")
        return found[-1]

    def size(self, ckpt: CheckpointInfo) -> int:
        return int(self.fs.du(self.path_of(ckpt.tag), total=True))

    def remove(self, tag: str) -> None:
        path = self.path_of(tag)
        if self.fs.exists(path):
            with_retry(lambda: self.fs.rm(path, recursive=True), f"removing {redact_url(self.url_of(tag))}")

    def upload(self, local_dir: Path, tag: str) -> None:
        """Put every file under ``local_dir`` into the checkpoint ``tag`` (each retried on its own)."""
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            remote = f"{self.path_of(tag)}/{f.relative_to(local_dir).as_posix()}"
            self._parent_dirs(remote)
            with_retry(lambda f=f, remote=remote: self.fs.put_file(str(f), remote),
                       f"uploading {f.name} to {redact_url(self.url_of(tag))}")

    def download(self, tag: str, local_dir: Path) -> None:
        """Copy the checkpoint ``tag`` into ``local_dir`` (through a temporary name: a crash leaves no half copy)."""
        partial = local_dir.with_name(local_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        src = self.path_of(tag)
        for remote in self.fs.find(src):
            dest = partial / remote[len(src) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with_retry(lambda remote=remote, dest=dest: self.fs.get_file(remote, str(dest)),
                       f"downloading {redact_url(self.url)}/{remote[len(self.root) + 1:]}")
        shutil.rmtree(local_dir, ignore_errors=True)
        os.replace(partial, local_dir)

    def _parent_dirs(self, path: str) -> None:
        if self.is_local:  # object stores have no directories to create
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def write_marker(self, tag: str, marker: dict[str, Any]) -> None:
        path = f"{self.path_of(tag)}/{COMPLETE}"
        self._parent_dirs(path)
        with_retry(lambda: self.fs.pipe_file(path, json.dumps(marker).encode()), f"writing {COMPLETE} of {tag}")


def store_for(cfg: Any) -> CheckpointStore:
    """The checkpoint store of a run config (``hilum.launch.config.HilumConfig``)."""
    return CheckpointStore(cfg.checkpoint_url, cfg.run.storage_options)


def store_of_run(run_dir: Path) -> CheckpointStore:
    """The checkpoint store of the run in ``run_dir`` (its saved config names it)."""
    from hilum.launch.config import load_run_config

    return store_for(load_run_config(run_dir))


def list_complete(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of the run in ``run_dir``, oldest first."""
    return store_of_run(run_dir).list_complete()


def latest_complete(run_dir: Path) -> CheckpointInfo | None:
    return store_of_run(run_dir).latest_complete()


# ---------------------------------------------------------------------------------------------
# RNG state as plain tensors and lists, so it loads under weights_only=True.


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"hilum_rank{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _local_scratch(kind: str, store: CheckpointStore) -> Path:
    """Node-local scratch (``$TMPDIR``) for staging and cached checkpoints of ``store``; the host
    name keeps nodes that share a temporary directory apart."""
    key = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"hilum-{kind}" / socket.gethostname() / key


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def retired(found: list[CheckpointInfo], keep: int) -> list[CheckpointInfo]:
    """What retention removes from ``found`` (oldest first): all but the newest ``keep``, and never
    the newest healthy one, the checkpoint a rollback or a restart after a divergence needs."""
    healthy = [c for c in found if c.healthy]
    spare = {healthy[-1].step} if healthy else set()
    return [c for c in found[:-keep] if c.step not in spare]


def save(engine: Any, store: CheckpointStore, state: TrainState, rank: int, world_size: int, fingerprint: str,
         keep: int, healthy: bool = True) -> str:
    """Save on every rank (collective). Returns the checkpoint's URL. ``healthy``: whether a
    rollback may return to it (the marker records it; retention keeps the newest such)."""
    tag = tag_for(state.step)
    if rank == 0:
        store.remove(tag)  # an incomplete leftover from a crash at this very step
    _barrier()
    if store.is_local:
        local_root = Path(store.root)
    else:  # each rank's own staging directory: what it holds after the save is what it must upload
        local_root = _local_scratch("staging", store) / f"rank{rank:05d}"
        shutil.rmtree(local_root, ignore_errors=True)
    engine.save_checkpoint(str(local_root), tag=tag, client_state={"hilum_step": state.step}, save_latest=False)
    payload = {"step": state.step, "position": state.position.to_dict(), "rng": capture_rng(), "world_size": world_size,
               "extra": state.extra}
    rank_file = _rank_file(local_root / tag, rank)
    tmp = rank_file.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, rank_file)
    if not store.is_local:
        store.upload(local_root / tag, tag)
        shutil.rmtree(local_root, ignore_errors=True)
    fault_drill("checkpoint_save", state.step, rank)
    _barrier()  # every rank's files are stored
    if rank == 0:
        store.write_marker(tag, {"step": state.step, "world_size": world_size, "saved_at": time.time(),
                                 "config_fingerprint": fingerprint, "healthy": healthy})
        for old in retired(store.list_complete(), keep):
            store.remove(old.tag)
    _barrier()
    return store.url_of(tag)


def local_copy(store: CheckpointStore, ckpt: CheckpointInfo) -> Path:
    """A local directory holding ``ckpt`` for DeepSpeed to read (collective when the store is remote:
    the first rank of each node downloads, the others wait). A cached copy is reused only while its
    marker matches the store's."""
    if store.is_local:
        return Path(store.path_of(ckpt.tag))
    cached = _local_scratch("checkpoints", store) / ckpt.tag
    if _local_rank() == 0:
        marker = store.fs.cat_file(f"{store.path_of(ckpt.tag)}/{COMPLETE}")
        if not ((cached / COMPLETE).is_file() and (cached / COMPLETE).read_bytes() == marker):
            store.download(ckpt.tag, cached)
        for other in cached.parent.iterdir():  # one cached checkpoint per store and node is enough
            if other != cached:
                shutil.rmtree(other, ignore_errors=True)
    _barrier()
    return cached


def load(engine: Any, store: CheckpointStore, ckpt: CheckpointInfo, rank: int, world_size: int) -> TrainState:
    """Restore engine, optimizer, schedule, RNG and stream position from a complete checkpoint."""
    if ckpt.world_size != world_size:
        raise ValueError(
            f"{redact_url(ckpt.url)} was written by {ckpt.world_size} workers; this run has {world_size}. "
            "Resume with cluster.num_workers matching the checkpoint."
        )
    local = local_copy(store, ckpt)
    use_weights_only_loading(engine)
    load_path, _ = engine.load_checkpoint(str(local.parent), tag=local.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {redact_url(ckpt.url)}")
    payload = torch.load(_rank_file(local, rank), map_location="cpu", weights_only=True)
    restore_rng(payload["rng"])
    return TrainState(step=int(payload["step"]), position=StreamPosition.from_dict(payload["position"]),
                      extra=payload.get("extra", {}))


def fault_drill(point: str, step: int, rank: int) -> None:
    """Failure drills: ``HILUM_FAULT_DRILL=POINT:STEP:RANK:ONCE_FILE`` kills this process at ``POINT``
    of ``STEP`` on ``RANK``, once (the first time, creating ONCE_FILE). How the failure tests crash a
    worker in the middle of a checkpoint save, and how an operator can rehearse one on a cluster."""
    spec = os.environ.get("HILUM_FAULT_DRILL")
    if not spec:
        return
    want_point, want_step, want_rank, once = spec.split(":", 3)
    if (want_point, int(want_step), int(want_rank)) != (point, step, rank):
        return
    try:
        fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(137)  # as SIGKILL would: no cleanup, no barrier


def use_weights_only_loading(engine: Any) -> None:
    """Make DeepSpeed read its files with ``weights_only=True``.

    DeepSpeed's TorchCheckpointEngine unpickles with ``weights_only=False``, which runs any code a
    tampered checkpoint carries. Its files hold tensors, containers and a few DeepSpeed enums and
    config objects; those are allowed by name, nothing else.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):  # noqa: ANN001, ANN201 - DeepSpeed's signature
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, TorchCheckpointEngine) and not isinstance(current, WeightsOnlyCheckpointEngine):
        replacement = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
        replacement.__dict__.update(current.__dict__)
        engine.checkpoint_engine = replacement


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed: list[Any] = [ZeroStageEnum]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler

        allowed.append(LossScaler)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:
        pass
    return allowed
