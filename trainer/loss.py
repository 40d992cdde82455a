"""The run's loss: the configured terms, weighted, as the plain step and GradCache compute it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hilum.trainer.health import poisoned
from hilum.trainer.objectives import ObjectiveInputs, TermConfig


class WeightedLoss:
    """Σ weight · term over the configured terms (in config order; the loss log uses their names).

    GradCache computes it in two parts (``hilum.trainer.gradcache.SplitObjective``): the terms
    over the whole batch on cached outputs, and the chunk-local ones on each replayed chunk, each
    scaled by the chunk's share of the batch — a per-sample mean over the batch is the sum of the
    chunks' means so weighted."""

    def __init__(self, objectives: nn.ModuleDict, terms: Sequence[TermConfig], cached: tuple[str, ...]) -> None:
        self.objectives, self.terms, self.cached = objectives, list(terms), cached
        self.local = [t for t in self.terms if objectives[t.name].chunk_local]
        self.whole = [t for t in self.terms if not objectives[t.name].chunk_local]

    def _weighted(self, inputs: ObjectiveInputs, terms: list[TermConfig],
                  share: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {t.name: self.objectives[t.name](inputs) for t in terms}
        if share != 1.0:
            values = {name: v * share for name, v in values.items()}
        # A non-finite total reaches every gradient as NaN, so the step is dropped (trainer/health.py).
        return poisoned(sum(t.weight * values[t.name] for t in terms)), values

    def __call__(self, inputs: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every term on one batch's outputs: the weighted total and each term."""
        return self._weighted(inputs, self.terms)

    def whole_batch(self, inputs: ObjectiveInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._weighted(inputs, self.whole)

    def chunk_local(self, inputs: ObjectiveInputs, share: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if not self.local:
            return None, {}
        return self._weighted(inputs, self.local, share)
