"""``clip``: symmetric InfoNCE between images and their reports (CLIP, Radford et al. 2021)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from hilum.kernels.infonce import infonce_loss
from hilum.kernels.infonce_distributed import infonce_loss_distributed
from hilum.trainer.objectives.base import Objective, ObjectiveInputs, TermConfig, register_objective


class ClipConfig(TermConfig):
    name: Literal["clip"]
    gather: bool = Field(True, description="use every rank's samples as negatives")
    impl: Literal["auto", "triton", "torch"] = Field(
        "auto", description="loss implementation: fused Triton kernel on CUDA, chunked PyTorch elsewhere"
    )


@register_objective("clip", ClipConfig)
class ClipObjective(Objective):
    """The loss over the global batch, each rank computing its own rows and columns of it.

    Gradients come back scaled for the engine's average over ranks (``data_parallel``), so the
    update is the gradient of the global-batch loss.
    """

    config: ClipConfig

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        img, txt = inputs["image"], inputs["text"]
        if self.config.gather:
            return infonce_loss_distributed(img, txt, inputs.logit_scale, grad_reduction="data_parallel",
                                            impl=self.config.impl)
        return infonce_loss(img, txt, inputs.logit_scale, impl=self.config.impl)

    def chance_loss(self, batch_per_rank: int, world_size: int) -> float | None:
        """ln N for N candidates per row (each direction of the symmetric mean alike)."""
        return math.log(batch_per_rank * (world_size if self.config.gather else 1))
