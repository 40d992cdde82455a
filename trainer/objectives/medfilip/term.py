"""``medfilip``: MedFILIP's semantic-similarity alignment (Liang et al., §III-B to III-D).

Each image carries c_i structured labels — "{severity} {location} {category}, where {category}
is {explanation}", from the report's fine-grained entities and the knowledge dictionary
(``labels``) — and the text side of the batch is the M = Σ c_i label texts of the global
batch, encoded by the text tower. The label matrix is the semantic similarity matrix (Eq. 4–5):

    s_ij = max over image i's labels l_t of cos(E_sim(l_t), E_sim(l_j))

with E_sim a frozen similarity encoder (bag of words by default, or a local transformers
model). The loss is Eq. 9, MSE + CE between the predicted cosine matrix y = I·Lᵀ and s:

* MSE: (1 / NM) Σ_ij (y_ij − s_ij)², computed without the N×M matrix, from E×E Gram matrices
  and per-vocabulary sums (s depends on j only through label j's vocabulary entry);
* CE: Eq. 9 as printed takes the logarithm of the target s (undefined where s = 0, which the
  clamped cosines give). hilum reads it the usual way: the cross-entropy of the image → label
  softmax of ``logit_scale · y`` against the rows of s normalised to sum to 1, through the fused
  kernel's label-similarity targets (image → label direction only: an image has many labels).

``form: code`` is the authors' public code instead: similarity kept only between labels of the
same category, and MSE + binary cross-entropy (of sigmoid(logit_scale · y) against s) optimised;
its BCE holds the N×M logits, as their code does.

The term computes the loss of the whole global batch on every rank from the gathered features
(the gathers' backward sums the ranks' identical gradients, the engine averages them), so its
compute is not sharded across ranks, unlike ``clip``'s.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from hilum.kernels.infonce import infonce_loss
from hilum.kernels.targets import LabelSimilarityTargets
from hilum.trainer.data.entities import canonical_category, structured_label
from hilum.trainer.data.stream import declared_texts
from hilum.trainer.models.parts import EncodedTexts
from hilum.trainer.objectives.base import DataNeeds, Objective, ObjectiveInputs, TermConfig, register_objective
from hilum.trainer.objectives.medfilip.labels import BagOfWordsEncoder, LabelSpec, LabelTexts, LabelVocabulary, ModelEncoder


class MedfilipConfig(TermConfig):
    name: Literal["medfilip"]
    form: Literal["paper", "code"] = Field(
        "paper", description="paper: Eq. 4-5 over all labels, MSE + CE (Eq. 9); code: within a category, MSE + BCE"
    )
    mse_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0, description="weight of the CE (paper) or BCE (code) part")
    max_labels: int = Field(4, ge=1, le=32, description="labels kept per image (the rest are counted and dropped)")
    uncertain: Literal["keep", "drop"] = Field("keep", description="hedged findings ('possible effusion') as labels or not")
    knowledge: str | None = Field(None, description="category → explanation JSON; None: the chest X-ray dictionary shipped with hilum")
    similarity_model: str | None = Field(None, description="local transformers directory for E_sim; None: bag of words")
    impl: Literal["auto", "triton", "torch"] = Field("auto", description="CE implementation, as for `clip`")


def semantic_mse(image: torch.Tensor, labels: torch.Tensor, label_index: torch.Tensor, column_index: torch.Tensor,
                 similarity: torch.Tensor) -> torch.Tensor:
    """(1 / NM) Σ_ij (image_i · labels_j − s_ij)² with s_ij = max_k similarity[label_index[i, k],
    column_index[j]] clamped at 0, in O((N + M)·E² + N·V·E) without the N×M matrix."""
    x, y = image.float(), labels.float()
    n, m, v = x.shape[0], y.shape[0], similarity.shape[0]
    best = torch.full((n, v), float("-inf"), device=x.device)
    for k in range(label_index.shape[1]):
        rows = similarity[label_index[:, k].clamp_min(0)]
        best = torch.where((label_index[:, k] >= 0)[:, None], torch.maximum(best, rows), best)
    s_image = best.clamp_min(0.0)  # s_ij = s_image[i, column_index[j]]
    per_vocab = torch.zeros(v, y.shape[1], device=y.device).index_add(0, column_index, y)
    counts = torch.bincount(column_index, minlength=v).float()
    yy = ((x.T @ x) * (y.T @ y)).sum()
    ys = (x * (s_image @ per_vocab)).sum()
    ss = (s_image.square() @ counts).sum()
    return (yy - 2 * ys + ss) / (n * m)


@register_objective("medfilip", MedfilipConfig)
class MedfilipObjective(Objective):
    config: MedfilipConfig
    reads = ("image", "labels")

    def __init__(self, config: MedfilipConfig) -> None:
        super().__init__(config)
        self.spec = LabelSpec.load(config.knowledge, config.max_labels, config.uncertain)
        encoder = ModelEncoder(config.similarity_model) if config.similarity_model else BagOfWordsEncoder()
        self.vocabulary = LabelVocabulary(encoder, same_category_only=config.form == "code")

    def data_needs(self) -> DataNeeds:
        return DataNeeds(texts=(LabelTexts(self.spec),))

    def model_parts(self, model_cfg: Any) -> dict[str, Any]:
        return {"label_texts": lambda model: EncodedTexts("label", output="labels")}

    def side_inputs(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The global batch's label vocabulary: this rank's (B, K) indices and the (V, V) table."""
        texts = declared_texts(batch, "label")
        index, similarity = self.vocabulary.prepare(texts, self.config.max_labels, device)
        return {"label_index": index, "label_similarity": similarity}

    def zero_shot_prompts(self, classes: list[str]) -> dict[str, list[str]]:
        """Eq. 10's template(C, Dict(C)): "{category}, where {category} is {explanation}"."""
        return {c: [structured_label({"category": canonical_category(c)}, self.spec.knowledge)] for c in classes}

    def forward(self, inputs: ObjectiveInputs) -> torch.Tensor:
        x = inputs
        image = inputs.gather(x["image"])
        labels = inputs.gather(x["labels"])  # (N, K, E), zeros in empty slots
        index = inputs.gather(x["label_index"])  # (N, K), -1 in empty slots
        filled = index >= 0
        columns, column_index = labels[filled], index[filled]
        similarity = x["label_similarity"]
        mse = semantic_mse(image, columns, index, column_index, similarity)
        if self.config.form == "paper":
            targets = LabelSimilarityTargets(similarity, index, column_index[:, None])
            second = infonce_loss(image, columns, inputs.logit_scale, targets, impl=self.config.impl,
                                  directions="image_to_text")
        else:
            s = LabelSimilarityTargets(similarity, index, column_index[:, None]).weights(
                slice(0, image.shape[0]), slice(0, columns.shape[0]))
            logits = inputs.logit_scale.exp() * image.float() @ columns.float().T
            second = F.binary_cross_entropy_with_logits(logits, s.to(logits.device))
        return self.config.mse_weight * mse + self.config.ce_weight * second
