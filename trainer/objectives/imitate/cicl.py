"""``cicl``: IMITATE's clinical-informed contrastive loss (Liu et al., §III-D, Eq. 3–5).

Soft targets instead of the identity: the targets of image i are the smoothed correlations
between report i and every report of the global batch,

    R_ij = Pearson correlation of the report embeddings e_i, e_j                   (Eq. 3)
    W_ij = 1 if i = j, else 1 − exp(−λ R_ij)                                      (Eq. 4)

and the loss is the contrastive cross-entropy against them (Eq. 5), computed by the fused
InfoNCE kernel from the O(B) embeddings — no B×B tensor at any batch size.

Choices where the paper is open (configurable where it matters):

* Which embedding defines R (``embedding``): ``report`` (default) is the text tower's pooled
  output (the model's ``text_pooled``) — the frozen tower's, when ``model.text.freeze`` as in IMITATE (the authors' code uses
  the frozen encoder's [CLS] output); ``text_features`` is the projected, normalised text feature.
  Either way it carries no gradient.
* How W becomes targets: the kernel's convention — image→text rows normalised to sum to 1,
  text→image columns normalised again — and the two directions averaged, as CLIP's loss does.
* Negative correlations stay negative (the paper keeps them: "does not convert negative values
  to positive ones"); a row of weights summing to ≤ 0 is refused with an error naming it. The
  authors' code instead clamps R at 0, zeroes the diagonal and adds the prior, scaled by the
  temperature, to the one-hot target: ``form: code`` (scale ``prior_scale``). Their code computes
  R over each GPU's batch, where hilum uses the global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hilum.kernels.infonce import infonce_loss
from hilum.kernels.infonce_distributed import infonce_loss_distributed
from hilum.kernels.targets import ReportCorrelationTargets
from hilum.trainer.objectives.base import Objective, ObjectiveInputs, TermConfig, register_objective


class CorrelationTargetsConfig(TermConfig):
    """What the clinical-informed terms (``cicl``, ``imitate``) share: how R becomes targets."""

    lam: float = Field(0.2, gt=0.0, description="λ of the smoothing kernel, Eq. 4 (form: paper)")
    form: Literal["paper", "code"] = Field(
        "paper", description="paper: W = 1 − exp(−λR) (Eq. 4); code: the authors' code, W = prior_scale · max(R, 0)"
    )
    prior_scale: float = Field(0.07, gt=0.0, description="scale of the prior in the code form (the code: the temperature)")
    gather: bool = Field(True, description="use every rank's samples (and reports) as the batch")
    impl: Literal["auto", "triton", "torch"] = Field("auto", description="loss implementation, as for `clip`")

    def targets(self, embedding: torch.Tensor) -> ReportCorrelationTargets:
        lam = self.lam if self.form == "paper" else self.prior_scale
        return ReportCorrelationTargets(embedding.detach(), lam=lam, form=self.form)

    def loss(self, a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor, targets: ReportCorrelationTargets) -> torch.Tensor:
        """The contrastive cross-entropy of ``a`` against ``b`` with these soft targets (Eq. 5)."""
        if self.gather:
            return infonce_loss_distributed(a, b, log_scale, targets, grad_reduction="data_parallel", impl=self.impl)
        return infonce_loss(a, b, log_scale, targets, impl=self.impl)


class CiclConfig(CorrelationTargetsConfig):
    name: Literal["cicl"]
    embedding: Literal["report", "text_features"] = Field(
        "report", description="the report embedding that defines R: the text tower's pooled output, or the projected feature"
    )


@register_objective("cicl", CiclConfig)
class CiclObjective(Objective):
    config: CiclConfig

    def __init__(self, config: CiclConfig) -> None:
        super().__init__(config)
        self.reads = ("image", "text", "text_pooled") if config.embedding == "report" else ("image", "text")

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        embedding = inputs["text_pooled" if self.config.embedding == "report" else "text"]
        c = self.config
        return c.loss(inputs["image"], inputs["text"], inputs.logit_scale, c.targets(embedding))
