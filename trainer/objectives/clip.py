"""``clip``: symmetric InfoNCE between images and their reports (CLIP, Radford et al. 2021)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kernels import infonce_loss
from trainer.objectives.base import Objective, ObjectiveInputs, TermConfig, register_objective


class ClipConfig(TermConfig):
    name: Literal["clip"]
    gather: bool = Field(True, description="use every rank's samples as negatives")


@register_objective("clip", ClipConfig)
class ClipObjective(Objective):
    """Every rank computes the loss over the gathered global batch.

    The gather's backward returns each rank's share of the gradient, and the engine averages
    gradients over ranks, so the update is the gradient of the global-batch loss.
    """

    config: ClipConfig

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        img, txt = inputs.image_features, inputs.text_features
        if self.config.gather:
            img, txt = inputs.gather(img), inputs.gather(txt)
        return infonce_loss(img, txt, inputs.logit_scale)
