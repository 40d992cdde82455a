"""The contract between the dual encoder and the modules that methods add to it.

A method's modules (decoders, aggregation blocks, no-grad copies of the towers, ...) are *parts*: registered
on the :class:`~hilum.trainer.models.dual_encoder.DualEncoder` before the engine is built, so ZeRO
partitions them like any other parameter, and run inside its forward, so ZeRO-3 gathers their
parameters as it gathers the towers'. A part states what it needs from the main pass of each
tower (a :class:`TowerRequest`), reads the batch's inputs and those passes from a
:class:`ForwardContext`, and returns named outputs. The model knows parts only through this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from hilum.trainer.models.towers import TowerRequest


class ModelOutput(dict):
    """What one forward produced: named tensors (``image``, ``text``, ``logit_scale``, and every
    part's outputs). ``reusable`` holds results computed without a graph (a frozen tower's output,
    a no-grad copy's features) that a replay of the same inputs may pass back as ``reuse`` instead
    of computing them again: GradCache's second pass does. A dict, so DeepSpeed's ZeRO-3 output
    hooks reach every tensor in it."""

    reusable: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reusable = {}


@dataclass
class ForwardContext:
    """One forward's inputs and main tower passes, as parts see them.

    ``inputs``: the batch's per-sample tensors by name (``image``, ``input_ids``,
    ``attention_mask``, ``image_aug`` with the further views, and every text or value that a term
    declared); ``image`` / ``text``: the main passes' outputs (``pooled`` and whatever the parts
    requested), None when the batch has no images or no texts (unpaired streams)."""

    model: Any  # the DualEncoder
    inputs: Mapping[str, torch.Tensor]
    reuse: Mapping[str, Any]
    output: ModelOutput
    image: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    _seen: set[str] = field(default_factory=set)

    def reusable(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what the first pass over these inputs kept under ``key``. Only for
        results without a graph: a replay must not skip what its backward needs."""
        if key in self._seen:
            raise ValueError(f"two parts keep a reusable result under {key!r}")
        self._seen.add(key)
        value = self.reuse[key] if key in self.reuse else compute()
        self.output.reusable[key] = value
        return value

    def text_pooled(self, key: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output for further texts (a second section, label texts); from
        a frozen tower it carries no graph, so a replay reuses it (kept under ``key``)."""
        if self.model.freeze_text:
            return self.reusable(key, lambda: self.model.text_features(input_ids, attention_mask))
        return self.model.text_features(input_ids, attention_mask)


class ModelPart(nn.Module):
    """A module a method adds to the model. Subclasses set the requests and implement ``forward``."""

    image_request: TowerRequest = TowerRequest()
    text_request: TowerRequest = TowerRequest()

    def forward(self, ctx: ForwardContext) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_flops(self, image_forward: int, text_forward: int) -> int:
        """Training FLOPs per sample this part adds beyond the towers' own (for MFU): a no-grad
        copy of both towers, for one, adds one forward of each. Default: none counted."""
        return 0


class EncodedTexts(ModelPart):
    """Further texts of each sample through the text tower and its projection: a report's second
    section (``(B, T)`` tokens), or up to K texts per sample (``(B, K, T)`` with a ``(B, K)``
    ``<name>_valid`` mask: only the filled slots run, empty ones give zero vectors).

    Outputs ``<output>`` (unit-norm features) and ``<output>_pooled`` (the tower's pooled output,
    (B, D); single texts only). Inputs: ``<name>_input_ids``, ``<name>_attention_mask``, as the
    stream writes a declared text."""

    def __init__(self, name: str, output: str | None = None) -> None:
        super().__init__()
        self.name, self.output = name, output or name

    def forward(self, ctx: ForwardContext) -> dict[str, torch.Tensor]:
        ids, mask = ctx.inputs[f"{self.name}_input_ids"], ctx.inputs[f"{self.name}_attention_mask"]
        model = ctx.model
        if ids.dim() == 2:
            pooled = ctx.text_pooled(f"{self.name}_pooled", ids, mask)
            return {self.output: model.project_text(pooled), f"{self.output}_pooled": pooled}
        b, k, t = ids.shape
        flat = ctx.inputs[f"{self.name}_valid"].reshape(-1).bool()
        out = model.text_proj.weight.new_zeros(b * k, model.text_proj.out_features)
        if flat.any():
            pooled = model.text_features(ids.reshape(-1, t)[flat], mask.reshape(-1, t)[flat])
            out = out.index_put((flat.nonzero().squeeze(1),), model.project_text(pooled).to(out.dtype))
        return {self.output: out.reshape(b, k, -1)}
