"""Checkpoints: DeepSpeed's own shards plus hilum's per-rank state, committed with a marker.

Layout under ``RUN_DIR/checkpoints/step_00000050/``: DeepSpeed's model and optimizer shards,
``hilum_rank00000.pt`` … (step, stream position, RNG states), and ``COMPLETE`` written by rank 0
after a barrier that every rank reaches only once its files are on disk. A checkpoint without
``COMPLETE`` is invisible to resume, so a crash mid-save leaves the previous one the latest.

Everything is loaded with ``torch.load(weights_only=True)``: DeepSpeed's own loader unpickles
arbitrary objects, so its checkpoint engine is replaced by one that allows only the handful of
DeepSpeed types its files hold.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.data.stream import StreamPosition

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class TrainState:
    """What a rank must get back to continue exactly where it was."""

    step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    # Per-rank state of worker parts the engine does not checkpoint (tensors, dicts, numbers only:
    # it loads with weights_only=True), e.g. the divergence encoders' ZeRO-3 partitions.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    world_size: int
    saved_at: float


def list_complete(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = _TAG.match(d.name)
        marker = d / COMPLETE
        if not (m and marker.is_file()):
            continue
        try:
            meta = json.loads(marker.read_text())
        except ValueError:
            continue
        out.append(CheckpointInfo(d, int(m.group(1)), int(meta.get("world_size", 0)), float(meta.get("saved_at", 0))))
    return sorted(out, key=lambda c: c.step)


def latest_complete(run_dir: Path) -> CheckpointInfo | None:
    found = list_complete(run_dir)
    return found[-1] if found else None


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


def save(engine: Any, run_dir: Path, state: TrainState, rank: int, world_size: int, fingerprint: str, keep: int) -> Path:
    """Save on every rank (collective). Returns the checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for(state.step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete leftover from a crash at this very step
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"hilum_step": state.step}, save_latest=False)
    payload = {"step": state.step, "position": state.position.to_dict(), "rng": capture_rng(), "world_size": world_size,
               "extra": state.extra}
    tmp = _rank_file(path, rank).with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, _rank_file(path, rank))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        marker = {"step": state.step, "world_size": world_size, "saved_at": time.time(), "config_fingerprint": fingerprint}
        tmp_marker = path / (COMPLETE + ".tmp")
        tmp_marker.write_text(json.dumps(marker))
        os.replace(tmp_marker, path / COMPLETE)
        for old in list_complete(run_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    _barrier()
    return path


def load(engine: Any, ckpt: Path, rank: int, world_size: int) -> TrainState:
    """Restore engine, optimizer, schedule, RNG and stream position from a complete checkpoint."""
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    meta = json.loads((ckpt / COMPLETE).read_text())
    if int(meta["world_size"]) != world_size:
        raise ValueError(
            f"{ckpt} was written by {meta['world_size']} workers; this run has {world_size}. "
            "Resume with cluster.num_workers matching the checkpoint."
        )
    use_weights_only_loading(engine)
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")
    payload = torch.load(_rank_file(ckpt, rank), map_location="cpu", weights_only=True)
    restore_rng(payload["rng"])
    return TrainState(step=int(payload["step"]), position=StreamPosition.from_dict(payload["position"]),
                      extra=payload.get("extra", {}))


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
