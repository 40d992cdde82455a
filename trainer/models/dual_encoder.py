"""The CLIP-style dual encoder: towers, linear projections into a shared space, a learnable temperature."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hilum.trainer.models.hierarchy import HierarchicalAggregator, tower_levels
from hilum.trainer.models.towers import TextTower, build_image_tower


class Embeddings(NamedTuple):
    image: torch.Tensor  # (B, E), unit norm
    text: torch.Tensor  # (B, E), unit norm
    logit_scale: torch.Tensor  # scalar: log inverse temperature, clamped
    text_pooled: torch.Tensor | None = None  # frozen text tower's output, reusable (GradCache)
    image_aug: torch.Tensor | None = None  # divergence image encoder on the augmented view (no grad)
    text_aug: torch.Tensor | None = None  # divergence text encoder on the same report (no grad)
    report_embedding: torch.Tensor | None = None  # the text tower's pooled output, detached (IMITATE's R)
    # Further unit-norm features that carry a graph, by name (IMITATE: image_multi = z_v,m of the
    # first view; image_2 / image_multi_2 = z_v,h / z_v,m of the second view; findings = z_t,F).
    features: dict[str, torch.Tensor] | None = None
    findings_pooled: torch.Tensor | None = None  # frozen text tower's findings output, reusable (GradCache)
    findings_embedding: torch.Tensor | None = None  # the findings' pooled output, detached (R of the F terms)


class DualEncoder(nn.Module):
    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: TextTower,
        embed_dim: int,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        freeze_text: bool = False,
    ) -> None:
        super().__init__()
        self.image_tower, self.text_tower = image_tower, text_tower
        self.image_proj = nn.Linear(image_tower.num_features, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_tower.num_features, embed_dim, bias=False)
        # Shape (1,), not a 0-dim scalar: DeepSpeed's parameter broadcast views every parameter as
        # bytes, which a 0-dim tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.freeze_text = freeze_text
        self.channels_last = False  # build_model sets it from the config
        if freeze_text:
            self.text_tower.requires_grad_(False)

    # MLIP's divergence encoders ------------------------------------------------------------------

    @property
    def has_divergence(self) -> bool:
        return hasattr(self, "divergence_image")

    def add_divergence_encoders(self) -> None:
        """Copies of each tower with its projection, trained by no optimizer: a moving average of
        the encoders (``hilum.trainer.divergence``). Added before the engine is built, so ZeRO-3
        partitions them like any other parameter."""
        self.divergence_image = nn.ModuleDict({"tower": copy.deepcopy(self.image_tower), "proj": copy.deepcopy(self.image_proj)})
        self.divergence_text = nn.ModuleDict({"tower": copy.deepcopy(self.text_tower), "proj": copy.deepcopy(self.text_proj)})
        self.divergence_image.requires_grad_(False)
        self.divergence_text.requires_grad_(False)

    def divergence_pairs(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """(encoder, divergence encoder) per tower, with matching parameter names."""
        return {
            "image": (nn.ModuleDict({"tower": self.image_tower, "proj": self.image_proj}), self.divergence_image),
            "text": (nn.ModuleDict({"tower": self.text_tower, "proj": self.text_proj}), self.divergence_text),
        }

    @torch.no_grad()
    def encode_divergence(
        self, image_aug: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLIP Eq. 6: v_aug = o_v(x_rt) on the randomly transformed view, t_aug = o_t(y) on the report."""
        image = self.divergence_image["proj"](self.divergence_image["tower"](image_aug))
        text = self.divergence_text["proj"](self.divergence_text["tower"](input_ids, attention_mask))
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    # IMITATE's multi-level visual feature ------------------------------------------------------------

    @property
    def has_hierarchy(self) -> bool:
        return hasattr(self, "hierarchy")

    def add_hierarchy(self, cfg) -> None:  # noqa: ANN001 - hilum.launch.config.MultiLevelSection
        """The aggregation block P(·) over the image tower's levels and its projection (z_v,m)."""
        self.hierarchy = HierarchicalAggregator(self.image_tower, cfg.levels, cfg.grid, cfg.dim, cfg.heads, cfg.depth,
                                                cfg.drop_shallowest, cfg.drop_others)
        self.multi_proj = nn.Linear(self.hierarchy.num_features, self.image_proj.out_features, bias=False)

    def encode_image_levels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_v,h, z_v,m) from one pass of the image tower."""
        pooled, maps = tower_levels(self.image_tower, image, self.hierarchy.indices)
        high = F.normalize(self.image_proj(pooled), dim=-1)
        return high, F.normalize(self.multi_proj(self.hierarchy(maps)), dim=-1)

    # ----------------------------------------------------------------------------------------------

    def layout(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """Images in channels-last (NHWC) memory on CUDA when configured: cuDNN's native layout for
        bf16/fp16 convolutions, which otherwise transposes every activation of a CNN tower."""
        if image is not None and self.channels_last and image.is_cuda and image.dim() == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(image)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output (before the projection)."""
        if self.freeze_text:
            # A frozen tower needs no graph: its forward costs inference memory only.
            with torch.no_grad():
                self.text_tower.eval()
                return self.text_tower(input_ids, attention_mask)
        return self.text_tower(input_ids, attention_mask)

    def encode_labels(self, ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, K, E) unit features of the filled label slots, zeros in the empty ones (only the
        filled slots run through the tower)."""
        b, k, t = ids.shape
        flat = valid.reshape(-1).bool()
        out = self.text_proj.weight.new_zeros(b * k, self.text_proj.out_features)
        if flat.any():
            pooled = self.text_features(ids.reshape(-1, t)[flat], mask.reshape(-1, t)[flat])
            out = out.index_put((flat.nonzero().squeeze(1),), F.normalize(self.text_proj(pooled), dim=-1).to(out.dtype))
        return out.reshape(b, k, -1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)), dim=-1)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_pooled: torch.Tensor | None = None,
        image_aug: torch.Tensor | None = None,
        image_view2: torch.Tensor | None = None,
        findings_ids: torch.Tensor | None = None,
        findings_mask: torch.Tensor | None = None,
        findings_pooled: torch.Tensor | None = None,
        label_ids: torch.Tensor | None = None,
        label_mask: torch.Tensor | None = None,
        label_valid: torch.Tensor | None = None,
    ) -> Embeddings:
        """``text_pooled``: a frozen text tower's output from an earlier pass over the same batch,
        so GradCache's second pass skips that tower (``findings_pooled`` likewise). ``image_aug``:
        the augmented view for the divergence encoders (when the model has them), which run last
        and without a graph. ``image_view2``: a second view through the trained image encoder;
        ``findings_ids``/``findings_mask``: the FINDINGS section, through the text tower (IMITATE).
        ``label_ids``/``label_mask`` (B, K, T) with ``label_valid`` (B, K): each image's structured
        label texts (MedFILIP), through the text tower; empty slots give zero vectors."""
        image, image_aug, image_view2 = (self.layout(x) for x in (image, image_aug, image_view2))
        # Clamping in the forward (rather than in place after the step, as open_clip does) keeps
        # the parameter untouched, which matters when ZeRO-3 owns its storage.
        scale = self.logit_scale.clamp(max=self.max_log_scale)[0]
        if text_pooled is None:
            text_pooled = self.text_features(input_ids, attention_mask)
        text = F.normalize(self.text_proj(text_pooled), dim=-1)
        features: dict[str, torch.Tensor] = {}
        if self.has_hierarchy:
            image, features["image_multi"] = self.encode_image_levels(image)
            if image_view2 is not None:
                features["image_2"], features["image_multi_2"] = self.encode_image_levels(image_view2)
        else:
            image = self.encode_image(image)
            if image_view2 is not None:
                features["image_2"] = self.encode_image(image_view2)
        if findings_pooled is None and findings_ids is not None:
            findings_pooled = self.text_features(findings_ids, findings_mask)
        if findings_pooled is not None:
            features["findings"] = F.normalize(self.text_proj(findings_pooled), dim=-1)
        if label_ids is not None:
            features["labels"] = self.encode_labels(label_ids, label_mask, label_valid)
        image_div = text_div = None
        if image_aug is not None:
            if not self.has_divergence:
                raise ValueError("image_aug given but the model has no divergence encoders")
            image_div, text_div = self.encode_divergence(image_aug, input_ids, attention_mask)
        return Embeddings(image, text, scale, text_pooled if self.freeze_text else None, image_div, text_div,
                          text_pooled.detach(), features,
                          findings_pooled if self.freeze_text else None,
                          findings_pooled.detach() if findings_pooled is not None else None)


def build_model(model_cfg, in_chans: int, vocab_size: int, divergence: bool = False,  # noqa: ANN001 - ModelSection
                multi_level: bool = False, text_config: dict | None = None, text_pooler: bool = False) -> DualEncoder:
    """Build the dual encoder from the ``model`` config section, with the parts the objectives
    need (MLIP's divergence encoders, IMITATE's multi-level block). ``text_config`` (a full
    transformers config) builds an exported model's architecture without any weight file: the
    caller loads the whole state dict next."""
    if text_config is not None:
        image = build_image_tower(model_cfg.image.model, in_chans, model_cfg.image.kwargs)
        text = TextTower.from_config(text_config, model_cfg.text.pooling, text_pooler)
    else:
        image = build_image_tower(model_cfg.image.model, in_chans, model_cfg.image.kwargs, model_cfg.image.weights)
        text = TextTower(model_cfg.text.pretrained, model_cfg.text.config, vocab_size, model_cfg.text.pooling)
    model = DualEncoder(
        image,
        text,
        model_cfg.embed_dim,
        init_temperature=model_cfg.init_temperature,
        max_logit_scale=model_cfg.max_logit_scale,
        freeze_text=model_cfg.text.freeze,
    )
    model.channels_last = model_cfg.image.channels_last
    if divergence:
        model.add_divergence_encoders()
    if multi_level:
        model.add_hierarchy(model_cfg.image.multi_level)
    return model
