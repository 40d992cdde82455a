"""A method that hilum does not ship, built only on the documented interface (a test fixture).

``toy_words`` predicts how many words each report's IMPRESSION has from the image's per-patch
features. It brings everything a method can bring:

* a value it declares from the data: the word count, read from each sample's json;
* a module of its own on the model: a small head over the image tower's patch tokens (a
  ``tokens`` request of the tower), whose parameters ZeRO partitions like the towers';
* a per-sample loss that GradCache computes chunk by chunk in its replay (``local: true``), or on
  the cached batch (``local: false``), where the head's output is then cached and replayed.

A config uses it with ``plugins: [toy_method]`` (this folder on PYTHONPATH) and an objective
``{name: toy_words}``. tests/test_methods.py trains it through ``hilum train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from hilum.trainer.models.parts import ForwardContext, ModelPart
from hilum.trainer.models.towers import TowerRequest
from hilum.trainer.objectives import DataNeeds, Objective, ObjectiveInputs, TermConfig, register_objective


class ToyWordsConfig(TermConfig):
    name: Literal["toy_words"]
    local: bool = Field(True, description="computed per GradCache chunk (true) or on the cached batch (false)")
    hidden: int = Field(16, ge=1)


@dataclass(frozen=True)
class ImpressionWords:
    """The number of words of a sample's IMPRESSION (a declared per-sample value)."""

    name: str = "toy_words"

    def read(self, meta: dict[str, Any], text: str) -> float:
        return float(len(str(meta.get("impression") or "").split()))


class WordCountHead(ModelPart):
    """Mean of the image tower's patch tokens → a small MLP → one number per image."""

    image_request = TowerRequest(tokens=True)

    def __init__(self, model: nn.Module, hidden: int) -> None:
        super().__init__()
        width = model.image_tower.num_features
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, ctx: ForwardContext) -> dict[str, torch.Tensor]:
        return {"toy_words_pred": self.mlp(ctx.image["tokens"].mean(1)).squeeze(-1)}


@register_objective("toy_words", ToyWordsConfig)
class ToyWordsObjective(Objective):
    config: ToyWordsConfig
    reads = ("toy_words_pred",)

    def __init__(self, config: ToyWordsConfig) -> None:
        super().__init__(config)
        self.chunk_local = config.local

    def data_needs(self) -> DataNeeds:
        return DataNeeds(values=(ImpressionWords(),))

    def model_parts(self, model_cfg: Any) -> dict[str, Any]:
        hidden = self.config.hidden
        return {"toy_words_head": lambda model: WordCountHead(model, hidden)}

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        target = torch.log1p(inputs.batch["toy_words"].float())  # the declared value, for the same rows
        return (inputs["toy_words_pred"].float() - target).square().mean()
