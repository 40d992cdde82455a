"""Moving averages between two identically built modules, on whatever each rank holds of them.

``target ← w · source + (1 − w) · target`` after each optimizer step, with ``w`` fixed (EMA
teachers, momentum encoders) or computed per step (MLIP's divergence encoders, Eq. 7: w is the
cosine similarity of the two encoders' features). Written by hand because neither DeepSpeed nor
timm has it for sharded parameters: timm's ModelEmaV3 needs the full parameters, and the usual
ZeRO-3 recipe — ``deepspeed.zero.GatheredParameters`` around the update — all-gathers both
models every step (and, copied without ``modifier_rank`` as in DeepSpeed-Chat, silently
discards the update when the context exits).

Here every rank updates only what it holds, in place:

* ZeRO 0/1/2: parameters are whole on every rank; each rank applies the same update (``w`` is
  the same everywhere), so the copies stay identical without communication.
* ZeRO-3: each parameter's local partition (``param.ds_tensor``). Source and target have the same
  shapes, so their partitions cover the same elements and the update is element-wise. Parameters
  ZeRO-3 keeps gathered between steps ("persistent", below ``stage3_param_persistence_threshold``)
  get the same update on their full copy, which DeepSpeed would otherwise only refresh from the
  partitions at the next step.

No gather, no temporary beyond one parameter, no communication. Arithmetic is float32 or wider
whatever the parameters' dtype; bf16 targets round once per update. Buffers (BatchNorm running
statistics) are the target's own: its forward keeps them, as a separately run encoder's would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class MovingAverageError(ValueError):
    """A configuration under which the in-place update could not be correct."""


def _zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def _gathered(param: nn.Parameter) -> bool:
    """ZeRO-3 parameter whose full value is present (persistent, or inside a forward)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


@dataclass
class _Pair:
    name: str
    source: nn.Parameter
    target: nn.Parameter


def eq7_update(source: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight · source + (1 − weight) · target`` in float32 or wider: MLIP Eq. 7 as written."""
    compute = torch.promote_types(target.dtype, torch.float32)
    return source.to(compute) * weight + target.to(compute) * (1.0 - weight)


class MovingAverage:
    """``target ← w · source + (1 − w) · target`` for every parameter pair of two modules."""

    def __init__(self, source: nn.Module, target: nn.Module, zero_config: dict[str, Any] | None = None) -> None:
        zero_config = zero_config or {}
        offload = (zero_config.get("offload_param") or {}).get("device", "none")
        if str(offload).lower() == "nvme":
            raise MovingAverageError(
                "moving averages need the parameters' partitions in memory; ZeRO-3 parameter offload to NVMe "
                "(zero_optimization.offload_param.device: nvme) swaps them out. Offload to 'cpu' or turn it off."
            )
        src, tgt = dict(source.named_parameters()), dict(target.named_parameters())
        if src.keys() != tgt.keys():
            missing = sorted(src.keys() ^ tgt.keys())[:5]
            raise MovingAverageError(f"source and target differ in parameters, e.g. {missing}")
        self.pairs = [_Pair(name, src[name], tgt[name]) for name in src]
        for pair in self.pairs:
            s_shape = getattr(pair.source, "ds_shape", pair.source.shape)
            t_shape = getattr(pair.target, "ds_shape", pair.target.shape)
            if s_shape != t_shape:
                raise MovingAverageError(f"{pair.name}: source shape {tuple(s_shape)} != target shape {tuple(t_shape)}")
            if _zero3(pair.source) != _zero3(pair.target):
                raise MovingAverageError(f"{pair.name}: only one of source and target is partitioned by ZeRO-3")
            if pair.target.requires_grad:
                raise MovingAverageError(f"{pair.name}: the target must not be trained (requires_grad=False)")

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """Move every target parameter towards its source by ``weight`` (0: keep, 1: copy)."""
        weight = float(weight)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"moving-average weight must lie in [0, 1], got {weight}")
        for pair in self.pairs:
            s, t = pair.source, pair.target
            if _zero3(t):
                t.ds_tensor.copy_(eq7_update(s.ds_tensor, t.ds_tensor, weight))
                if _gathered(t):
                    if not _gathered(s):
                        raise MovingAverageError(f"{pair.name}: target is gathered but its source is not")
                    t.data.copy_(eq7_update(s.data, t.data, weight))
            else:
                t.data.copy_(eq7_update(s.data, t.data, weight))

    # Checkpoints ---------------------------------------------------------------------------------
    # ZeRO-3 checkpoints hold only trainable parameters' partitions, so a frozen target would come
    # back as it was initialised: each rank saves its own partitions of the targets. Under ZeRO
    # 0/1/2 the engine's module state already holds the full targets.

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {p.name: p.target.ds_tensor.detach().clone().cpu() for p in self.pairs if _zero3(p.target)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        partitioned = [p for p in self.pairs if _zero3(p.target)]
        missing = [p.name for p in partitioned if p.name not in state]
        if missing:
            raise KeyError(f"checkpoint lacks moving-average partitions for {missing[:5]}")
        for p in partitioned:
            local = p.target.ds_tensor
            if state[p.name].shape != local.shape:
                raise ValueError(f"{p.name}: saved partition {tuple(state[p.name].shape)} != this rank's {tuple(local.shape)}")
            local.copy_(state[p.name])
        gathered = [p.target for p in partitioned if _gathered(p.target)]
        if gathered:  # their full copies must follow the restored partitions (one all-gather, at resume only)
            gathered[0].all_gather(param_list=gathered)
