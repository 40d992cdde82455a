"""What every objective term shares: its config base, its inputs, and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class TermConfig(BaseModel):
    """Fields every term has. Subclasses add ``name: Literal["..."]`` and their own knobs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    weight: float = Field(1.0, ge=0.0)


@dataclass
class ObjectiveInputs:
    """What the model produced for one batch on this rank.

    Features are L2-normalised and local to this rank; terms that want negatives from every rank
    gather them with ``gather`` (identity on a single process), which keeps gradients flowing
    back to the local rows.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor  # log of the inverse temperature, already clamped
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """A term of the loss. Subclasses compute an unweighted scalar from ObjectiveInputs.

    Class attributes say what a term needs from the rest of the worker: ``views`` augmented
    views of each image from the stream, ``divergence_encoders`` on the model.
    """

    views: int = 1
    divergence_encoders: bool = False

    def __init__(self, config: TermConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


_C = TypeVar("_C", bound=type[Objective])
_REGISTRY: dict[str, tuple[type[TermConfig], type[Objective]]] = {}


def register_objective(name: str, config_cls: type[TermConfig]) -> Callable[[_C], _C]:
    def deco(cls: _C) -> _C:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = (config_cls, cls)
        return cls

    return deco


def objective_config_types() -> list[type[TermConfig]]:
    return [cfg for cfg, _ in _REGISTRY.values()]


def build_objectives(terms: Sequence[TermConfig]) -> nn.ModuleDict:
    """Instantiate the configured terms, keyed by name (the loss log uses the same keys)."""
    out = nn.ModuleDict()
    for term in terms:
        _, cls = _REGISTRY[term.name]  # type: ignore[attr-defined]
        out[term.name] = cls(term)  # type: ignore[attr-defined]
    return out
