"""The interface between a method and the core: a term's config, its inputs, what it declares, and
the registry.

A method (CLIP, IMITATE, MLIP, MedFILIP, ...) is a package (or, when a loss is all it has, a
module) under ``hilum.trainer.objectives``. Its terms subclass :class:`Objective` and declare what
they need; the core — loop, GradCache, engine, stream, dual encoder — reads the declarations and
never names a method:

* ``reads``: the named model outputs the term reads (GradCache caches exactly these);
* :meth:`Objective.data_needs`: image views, further texts, per-sample values, streams (``DataNeeds``);
* :meth:`Objective.model_parts`: the modules it adds to the model (``hilum.trainer.models.parts``);
* ``chunk_local``: a per-sample term, computed on each GradCache chunk in the replay pass instead
  of on cached features;
* hooks: :meth:`side_inputs` (per-step data that is no model output), :meth:`attach` (after the
  engine is built), :meth:`after_step` (after the optimizer step), :meth:`train_state` (saved in
  checkpoints), :meth:`zero_shot_prompts`.

Importing a term's module registers it (:func:`register_objective`); the config schema accepts
every registered name, so a new term, even one outside hilum (``plugins:`` in the config), needs
no edit in the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from hilum.trainer.models.dual_encoder import PartFactory

# The streams a term may train on. Only "paired" (image with its report) exists; image-only and
# text-only streams (MMCLIP's unpaired data) arrive with their own batches, whose inputs lack the
# other modality — the model skips a tower whose inputs a batch does not have.
STREAMS = ("paired", "image_only", "text_only")


class TermConfig(BaseModel):
    """Fields every term has. Subclasses add ``name: Literal["..."]`` and their own knobs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    weight: float = Field(1.0, ge=0.0)

    def check(self, config: Any) -> None:
        """Refuse a run configuration this term cannot train with (``config``: the whole
        ``HilumConfig``), raising ValueError that names the fields. Called at launch."""


class SampleText(Protocol):
    """A further text per sample that a term declares: the stream reads it from the sample's
    json, tokenizes it and batches it as ``<name>_input_ids`` / ``<name>_attention_mask``
    ((B, T), or (B, K, T) with a (B, K) ``<name>_valid`` mask when ``per_sample`` is K > 1).

    Implementations are module-level (picklable: loader workers are spawned)."""

    name: str
    per_sample: int  # 1: one text; K > 1: up to K texts, padded with empty slots

    def read(self, meta: dict[str, Any], text: str) -> tuple[str | list[str], dict[str, int]]:
        """The text (or up to K texts) of a sample from its json ``meta`` and its main ``text``,
        and counts to report (stand-ins, cuts: summed per epoch). Raises
        ``hilum.trainer.data.stream.SampleError`` to skip the sample (counted by reason)."""
        ...


class SampleValue(Protocol):
    """A number per sample from its json, batched as a float tensor ``<name>`` of shape (B,)."""

    name: str

    def read(self, meta: dict[str, Any], text: str) -> float: ...


@dataclass(frozen=True)
class DataNeeds:
    """What a term needs from the stream beyond one view of each image and its main text."""

    views: int = 1  # image views per sample; the further ones arrive as ``image_aug`` (B, views-1, C, H, W)
    texts: tuple[SampleText, ...] = ()
    values: tuple[SampleValue, ...] = ()
    streams: tuple[str, ...] = ("paired",)

    def merge(self, other: "DataNeeds") -> "DataNeeds":
        """Both terms' needs; one name must mean one thing."""
        texts, values = {t.name: t for t in self.texts}, {v.name: v for v in self.values}
        for kind, mine, theirs in (("text", texts, other.texts), ("value", values, other.values)):
            for item in theirs:
                if item.name in mine and mine[item.name] != item:
                    raise ValueError(f"two terms declare the sample {kind} {item.name!r} differently: "
                                     f"{mine[item.name]!r} and {item!r}")
                mine[item.name] = item
        streams = tuple(dict.fromkeys(self.streams + other.streams))
        return DataNeeds(max(self.views, other.views), tuple(texts.values()), tuple(values.values()), streams)


@dataclass
class ObjectiveInputs:
    """What the model produced for one batch on this rank, by name, and the per-step side inputs.

    Features are L2-normalised and local to this rank; terms that want negatives from every rank
    gather them with ``gather`` (identity on a single process), which keeps gradients flowing
    back to the local rows. ``features`` holds the model's named outputs (``image``, ``text``,
    ``text_pooled``, the parts' outputs) and the terms' side inputs; ``batch`` the model's
    per-sample inputs for the same rows (pixels, tokens, declared texts and values: a
    reconstruction's targets), on the device when read.
    """

    features: Mapping[str, torch.Tensor]
    logit_scale: torch.Tensor  # log of the inverse temperature, already clamped
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    batch: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.features[name]
        except KeyError:
            raise KeyError(f"no model output or side input named {name!r} (have: {', '.join(sorted(self.features))}); "
                           "a term reads only what it or another configured term declares") from None

    def __contains__(self, name: str) -> bool:
        return name in self.features


class Objective(nn.Module):
    """A term of the loss: an unweighted scalar from :class:`ObjectiveInputs`, and its declarations."""

    reads: tuple[str, ...] = ("image", "text")
    chunk_local: bool = False  # a class attribute, or set per instance from the config

    def __init__(self, config: TermConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def data_needs(self) -> DataNeeds:
        return DataNeeds()

    def model_parts(self, model_cfg: Any) -> dict[str, "PartFactory"]:
        """Key → factory of each module this term adds to the model (built once per key, in the
        order of the configured terms; ``model_cfg`` is the ``model`` config section)."""
        return {}

    def side_inputs(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-step data from the batch that is no model output (computed once per step, outside
        GradCache's passes), added to the inputs' features."""
        return {}

    def attach(self, model: nn.Module, zero_config: dict[str, Any]) -> None:
        """Called once the engine is built, with its module (parameters partitioned by ZeRO)."""

    def after_step(self, inputs: ObjectiveInputs) -> dict[str, float]:
        """Called on every rank after each optimizer step, with the step's inputs (collectives
        allowed). Returns values to log with the step (``metrics.jsonl``, the console, Prometheus)."""
        return {}

    def train_state(self) -> dict[str, Any]:
        """State besides the model's parameters that a checkpoint keeps (tensors, numbers)."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        pass

    def zero_shot_prompts(self, classes: list[str]) -> dict[str, list[str]] | None:
        """Class → prompts, when the term defines how classes are written (None: the default)."""
        return None

    def chance_loss(self, batch_per_rank: int, world_size: int) -> float | None:
        """The term's value when the model has learned nothing (uniform logits), if it has one:
        a loss that sits there after warm-up is a collapse (``hilum.trainer.health``)."""
        return None


_C = TypeVar("_C", bound=type[Objective])
_REGISTRY: dict[str, tuple[type[TermConfig], type[Objective]]] = {}


def register_objective(name: str, config_cls: type[TermConfig]) -> Callable[[_C], _C]:
    def deco(cls: _C) -> _C:
        if name in _REGISTRY and _REGISTRY[name][1].__qualname__ != cls.__qualname__:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = (config_cls, cls)
        return cls

    return deco


def objective_class(name: str) -> type[Objective]:
    return _REGISTRY[name][1]


def objective_config_types() -> list[type[TermConfig]]:
    """The config class of every registered term (the config schema's union, at validation time)."""
    return [cfg for cfg, _ in _REGISTRY.values()]


def build_objectives(terms: Sequence[TermConfig]) -> nn.ModuleDict:
    """Instantiate the configured terms, keyed by name (the loss log uses the same keys)."""
    out = nn.ModuleDict()
    for term in terms:
        _, cls = _REGISTRY[term.name]  # type: ignore[attr-defined]
        out[term.name] = cls(term)  # type: ignore[attr-defined]
    return out


@dataclass
class MethodNeeds:
    """The configured terms' declarations, merged: what the worker builds and the stream delivers."""

    data: DataNeeds = field(default_factory=DataNeeds)
    parts: dict[str, "PartFactory"] = field(default_factory=dict)
    cached: tuple[str, ...] = ()  # outputs that terms computed on the whole batch read (GradCache caches them)


def method_needs(objectives: Mapping[str, Objective], model_cfg: Any) -> MethodNeeds:
    needs = MethodNeeds()
    cached: dict[str, None] = {}
    for term in objectives.values():
        needs.data = needs.data.merge(term.data_needs())
        for key, factory in term.model_parts(model_cfg).items():
            needs.parts.setdefault(key, factory)
        if not term.chunk_local:
            cached.update(dict.fromkeys(term.reads))
    unknown = [s for s in needs.data.streams if s not in STREAMS]
    if unknown:
        raise ValueError(f"unknown stream {unknown[0]!r}; streams are {', '.join(STREAMS)}")
    if needs.data.streams != ("paired",):
        raise ValueError(f"a term asks for the {', '.join(s for s in needs.data.streams if s != 'paired')} stream, "
                         "which this version does not mix in yet: only paired image-report samples are streamed")
    needs.cached = tuple(cached)
    return needs
