"""What every objective term shares: its config base, its inputs, and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

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
    views of each image from the stream, ``divergence_encoders`` on the model, ``second_view``
    (the second view through the trained image encoder), ``multi_level`` (IMITATE's aggregated
    multi-level image feature) and ``findings`` (the FINDINGS section encoded apart from the
    main text, which is then the IMPRESSION) and ``labels`` (MedFILIP's structured label texts
    of each image, through the text tower). :meth:`side_inputs` adds per-step data that is not a
    model output (computed once per step, outside GradCache's passes), :meth:`zero_shot_prompts`
    the term's own zero-shot template.
    """

    views: int = 1
    divergence_encoders: bool = False
    second_view: bool = False
    multi_level: bool = False
    findings: bool = False
    labels: bool = False

    def __init__(self, config: TermConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def side_inputs(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Extras from the batch for this term, added to ``ObjectiveInputs.extras``."""
        return {}

    def zero_shot_prompts(self, classes: list[str]) -> dict[str, list[str]] | None:
        """Class → prompts, when the term defines how classes are written (None: the default)."""
        return None


_C = TypeVar("_C", bound=type[Objective])
_REGISTRY: dict[str, tuple[type[TermConfig], type[Objective]]] = {}


def register_objective(name: str, config_cls: type[TermConfig]) -> Callable[[_C], _C]:
    def deco(cls: _C) -> _C:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = (config_cls, cls)
        return cls

    return deco


def objective_class(name: str) -> type[Objective]:
    """The term registered as ``name`` (its class attributes say what it needs)."""
    return _REGISTRY[name][1]


def objective_config_types() -> list[type[TermConfig]]:
    return [cfg for cfg, _ in _REGISTRY.values()]


def build_objectives(terms: Sequence[TermConfig]) -> nn.ModuleDict:
    """Instantiate the configured terms, keyed by name (the loss log uses the same keys)."""
    out = nn.ModuleDict()
    for term in terms:
        _, cls = _REGISTRY[term.name]  # type: ignore[attr-defined]
        out[term.name] = cls(term)  # type: ignore[attr-defined]
    return out
