"""``divergence``: MLIP's augmented global alignment (Li et al. 2024, Eq. 8, second half).

    L = λ0/2 · mean_i [ L_v2a(v_i, t_aug_i) + L_a2t(v_aug_i, t_i) ]

``L_v2a`` is the image→text direction of InfoNCE between the encoder's images and the divergence
encoder's texts (Eq. 4a with t replaced by t_aug); ``L_a2t`` is the text→image direction between
the divergence encoder's images and the encoder's texts (Eq. 4b with v replaced by v_aug). The
first half of Eq. 8 is the ``clip`` term; λ0 is this term's ``weight``. Both directions use the
global batch (every rank's samples) and the model's one temperature.

What "augmented" means here: v_aug is the image divergence encoder on a second, independently
augmented view of the image (random resized crop and intensity, as the first view; no flip),
t_aug is the text divergence encoder on the same report — MLIP augments text only through the
encoder, not by editing it. Neither carries a gradient; the encoders learn only through v and t.
The divergence encoders are this method's part of the model and follow the encoders by Eq. 7
after every optimizer step (``encoders``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from hilum.kernels.infonce import infonce_loss
from hilum.kernels.infonce_distributed import infonce_loss_distributed
from hilum.trainer.objectives.base import DataNeeds, Objective, ObjectiveInputs, TermConfig, register_objective
from hilum.trainer.objectives.mlip.encoders import DivergenceCopies, DivergenceEncoders

PART = "mlip_divergence"


class DivergenceConfig(TermConfig):
    name: Literal["divergence"]
    gather: bool = Field(True, description="use every rank's samples as negatives")
    impl: Literal["auto", "triton", "torch"] = Field("auto", description="loss implementation, as for `clip`")


@register_objective("divergence", DivergenceConfig)
class DivergenceObjective(Objective):
    config: DivergenceConfig
    reads = ("image", "text", "image_aug", "text_aug")

    def __init__(self, config: DivergenceConfig) -> None:
        super().__init__(config)
        self.encoders: DivergenceEncoders | None = None

    def data_needs(self) -> DataNeeds:
        return DataNeeds(views=2)  # x_rt: a second, independently augmented view of each image

    def model_parts(self, model_cfg: Any) -> dict[str, Any]:
        return {PART: DivergenceCopies}

    def attach(self, model: torch.nn.Module, zero_config: dict[str, Any]) -> None:
        self.encoders = DivergenceEncoders(model, model.parts[PART], zero_config)

    def after_step(self, inputs: ObjectiveInputs) -> dict[str, float]:
        """Eq. 7 for each tower, s from this step's features (collective); logged as s_image, s_text."""
        weights = self.encoders.similarities(inputs["image"], inputs["text"], inputs["image_aug"], inputs["text_aug"])
        self.encoders.update(weights)
        return {f"s_{tower}": s for tower, s in weights.items()}

    def train_state(self) -> dict[str, Any]:
        return self.encoders.state_dict() if self.encoders is not None else {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.encoders.load_state_dict(state)

    def _infonce(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, directions: str) -> torch.Tensor:
        if self.config.gather:
            return infonce_loss_distributed(image, text, scale, grad_reduction="data_parallel", impl=self.config.impl,
                                            directions=directions)
        return infonce_loss(image, text, scale, impl=self.config.impl, directions=directions)

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        image_aug, text_aug = inputs["image_aug"], inputs["text_aug"]
        v2a = self._infonce(inputs["image"], text_aug.detach(), inputs.logit_scale, "image_to_text")
        a2t = self._infonce(image_aug.detach(), inputs["text"], inputs.logit_scale, "text_to_image")
        return 0.5 * (v2a + a2t)
