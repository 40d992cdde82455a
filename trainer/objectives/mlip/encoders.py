"""MLIP's divergence encoders (Li et al. 2024, §3.2, Eq. 6-7): after each optimizer step,
θ_o ← s · θ_f + (1 − s) · θ_o per tower, with s the cosine similarity between the encoder's
feature and its divergence encoder's feature.

The paper writes s_v = cosine(v_i, v_aug_i) per sample, but an update of shared parameters takes
one number per step: hilum uses the mean over the *global* batch (each rank's mean, all-reduced:
the only communication the update needs), clamped to [0, 1] so that a negative cosine early in
training cannot extrapolate the parameters. v is the encoder's feature of the clean view, v_aug
the divergence encoder's feature of the randomly transformed view (x_rt), t and t_aug the two
text encoders' features of the same report. The update itself is
:class:`hilum.trainer.moving_average.MovingAverage`: in place, on each rank's own ZeRO partition.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hilum.trainer.models.parts import ForwardContext, ModelPart
from hilum.trainer.moving_average import MovingAverage


class DivergenceCopies(ModelPart):
    """MLIP's part of the model: a copy of each tower with its projection, trained by no optimizer
    (:class:`DivergenceEncoders` moves them). Registered before the engine is built, so ZeRO-3
    partitions them like any other parameter. Outputs ``image_aug`` = o_v(x_rt), the image copy on
    the second view, and ``text_aug`` = o_t(y), the text copy on the report (Eq. 6) — without a
    graph, so GradCache's replay reuses the first pass's instead of running the copies again."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.image = nn.ModuleDict({"tower": copy.deepcopy(model.image_tower), "proj": copy.deepcopy(model.image_proj)})
        self.text = nn.ModuleDict({"tower": copy.deepcopy(model.text_tower), "proj": copy.deepcopy(model.text_proj)})
        self.requires_grad_(False)

    def pairs(self, model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
        """(encoder, divergence encoder) per tower, with matching parameter names."""
        return {
            "image": (nn.ModuleDict({"tower": model.image_tower, "proj": model.image_proj}), self.image),
            "text": (nn.ModuleDict({"tower": model.text_tower, "proj": model.text_proj}), self.text),
        }

    @torch.no_grad()
    def encode(self, image_aug: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image["proj"](self.image["tower"](image_aug))
        text = self.text["proj"](self.text["tower"](input_ids, attention_mask))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def forward(self, ctx: ForwardContext) -> dict[str, torch.Tensor]:
        x = ctx.inputs
        image_aug, text_aug = ctx.reusable("divergence", lambda: self.encode(ctx.model.layout(x["image_aug"][:, 0]),
                                                                            x["input_ids"], x["attention_mask"]))
        return {"image_aug": image_aug, "text_aug": text_aug}

    def extra_flops(self, image_forward: int, text_forward: int) -> int:
        return image_forward + text_forward  # one forward of each copy, no backward


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch of the row-wise cosine similarity (every rank gets the same value)."""
    cos = torch.nn.functional.cosine_similarity(a.detach().float(), b.detach().float(), dim=-1)
    stats = torch.stack([cos.sum(), torch.tensor(float(cos.numel()), device=cos.device)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).float()


class DivergenceEncoders:
    """The image and text moving averages of a model's divergence copies."""

    def __init__(self, model: Any, copies: DivergenceCopies, zero_config: dict[str, Any] | None = None) -> None:
        self.averages = {tower: MovingAverage(source, target, zero_config)
                         for tower, (source, target) in copies.pairs(model).items()}
        self.last: dict[str, float] = {}

    def similarities(self, image: torch.Tensor, text: torch.Tensor, image_aug: torch.Tensor,
                     text_aug: torch.Tensor) -> dict[str, float]:
        """s per tower for this step (collective: every rank must call it)."""
        both = torch.stack([mean_cosine(image, image_aug), mean_cosine(text, text_aug)])
        s_image, s_text = both.clamp(0.0, 1.0).tolist()
        return {"image": s_image, "text": s_text}

    def update(self, weights: dict[str, float]) -> None:
        """Eq. 7 for each tower; call after the optimizer step."""
        for tower, weight in weights.items():
            self.averages[tower].update(weight)
        self.last = dict(weights)

    def state_dict(self) -> dict[str, Any]:
        return {tower: avg.state_dict() for tower, avg in self.averages.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for tower, avg in self.averages.items():
            avg.load_state_dict(state.get(tower, {}))
