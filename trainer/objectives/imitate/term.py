"""``imitate``: IMITATE's hierarchical alignment (Liu et al., §III-C to III-E).

Each image is seen in two augmented views; the image tower gives a high-level feature z_v,h (its
pooled output) and a multi-level feature z_v,m (its stages aggregated by self-attention,
``hierarchy``, this method's part of the model) for each view; the text tower — frozen by default in IMITATE —
encodes the IMPRESSION (z_t,I, the run's main text) and the FINDINGS (z_t,F) separately. The loss
is the paper's six clinical-informed contrastive terms (§III-E):

    CICL(z_v,h¹, z_I) + CICL(z_v,m¹, z_F) + CICL(z_v,h², z_I) + CICL(z_v,m², z_F)
      + CICL(z_v,h¹, z_v,h²) + CICL(z_v,m¹, z_v,m²)

each the fused InfoNCE kernel with IMITATE's smoothed report-correlation targets (Eq. 3–4,
``kernels.ReportCorrelationTargets``) over the global batch: no B×B tensor at any size.

Choices where the paper is open:

* Which embedding defines R. Eq. 3 says z_t is "z_t,F or z_t,I"; with ``correlation: section``
  (default) the terms aligned with the IMPRESSION (and the high-level V-V term) take R from the
  impression's embeddings, those aligned with the FINDINGS (and the multi-level V-V term) from
  the findings'; ``report`` takes one R for all six from both sections' embeddings concatenated.
  The embeddings are the text tower's pooled outputs, without gradient (the authors' code: the
  frozen encoder's [CLS]).
* Targets and directions as in ``cicl`` (``form: paper`` or the authors' ``code``): the kernel
  normalises the weights per row (and per column for the other direction) and averages both
  directions. Each term is a mean over the
  batch, where the paper writes a sum: a constant factor, folded into the learning rate.
* The projections into the shared space are linear, like the other terms' (the paper's are
  non-linear); z_v,m has its own, the V-V terms compare features in the shared space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from hilum.trainer.data.stream import report_text
from hilum.trainer.models.parts import EncodedTexts
from hilum.trainer.objectives.base import DataNeeds, Objective, ObjectiveInputs, register_objective
from hilum.trainer.objectives.imitate.cicl import CorrelationTargetsConfig
from hilum.trainer.objectives.imitate.hierarchy import MultiLevelConfig, MultiLevelImage


class ImitateConfig(CorrelationTargetsConfig):
    name: Literal["imitate"]
    correlation: Literal["section", "report"] = Field(
        "section", description="R per section (impression terms / findings terms), or one R from both sections"
    )
    multi_level: MultiLevelConfig = Field(default_factory=MultiLevelConfig, description="the aggregation block P(·)")

    def check(self, config: Any) -> None:
        if config.data.text != "impression":
            raise ValueError(f"objective 'imitate' aligns images with the IMPRESSION and the FINDINGS separately: set "
                             f"data.text to 'impression' (it is {config.data.text!r}); the findings are read as well")


@dataclass(frozen=True)
class FindingsText:
    """The FINDINGS section as a second text; a report without one lends its IMPRESSION (counted
    as ``findings_from_impression``: a report with neither is skipped as ``empty_report``)."""

    name: str = "findings"
    per_sample: int = 1

    def read(self, meta: dict[str, Any], text: str) -> tuple[str, dict[str, int]]:
        findings = report_text(meta, "findings")
        return findings or report_text(meta, "impression") or text, {"findings_from_impression": int(not findings)}


@register_objective("imitate", ImitateConfig)
class ImitateObjective(Objective):
    config: ImitateConfig
    reads = ("image", "text", "text_pooled", "image_multi", "image_2", "image_multi_2", "findings", "findings_pooled")

    def data_needs(self) -> DataNeeds:
        return DataNeeds(views=2, texts=(FindingsText(),))

    def model_parts(self, model_cfg: Any) -> dict[str, Any]:
        multi_level = self.config.multi_level
        return {"imitate_multi_level": lambda model: MultiLevelImage(model, multi_level),
                "findings": lambda model: EncodedTexts("findings")}

    def terms(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        """The six terms by name (VL/VV branch, h/m level, view)."""
        x = inputs
        c = self.config
        e_imp, e_find = x["text_pooled"].detach(), x["findings_pooled"].detach()
        if c.correlation == "section":
            r_imp, r_find = c.targets(e_imp), c.targets(e_find)
        else:
            r_imp = r_find = c.targets(torch.cat([e_imp, e_find], dim=1))
        s = inputs.logit_scale
        h1, h2, m1, m2 = x["image"], x["image_2"], x["image_multi"], x["image_multi_2"]
        z_i, z_f = x["text"], x["findings"]
        return {
            "vl_h1": c.loss(h1, z_i, s, r_imp),
            "vl_m1": c.loss(m1, z_f, s, r_find),
            "vl_h2": c.loss(h2, z_i, s, r_imp),
            "vl_m2": c.loss(m2, z_f, s, r_find),
            "vv_h": c.loss(h1, h2, s, r_imp),
            "vv_m": c.loss(m1, m2, s, r_find),
        }

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return sum(self.terms(inputs).values())
