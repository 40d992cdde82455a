"""The CLIP-style dual encoder: towers, linear projections into a shared space, a learnable temperature."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.towers import TextTower, build_image_tower


class Embeddings(NamedTuple):
    image: torch.Tensor  # (B, E), unit norm
    text: torch.Tensor  # (B, E), unit norm
    logit_scale: torch.Tensor  # scalar: log inverse temperature, clamped


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
        if freeze_text:
            self.text_tower.requires_grad_(False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(image)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.freeze_text:
            # A frozen tower needs no graph: its forward costs inference memory only.
            with torch.no_grad():
                self.text_tower.eval()
                pooled = self.text_tower(input_ids, attention_mask)
        else:
            pooled = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embeddings:
        # Clamping in the forward (rather than in place after the step, as open_clip does) keeps
        # the parameter untouched, which matters when ZeRO-3 owns its storage.
        scale = self.logit_scale.clamp(max=self.max_log_scale)[0]
        return Embeddings(self.encode_image(image), self.encode_text(input_ids, attention_mask), scale)


def build_model(model_cfg, in_chans: int, vocab_size: int) -> DualEncoder:  # noqa: ANN001 - ModelSection
    """Build the dual encoder from the ``model`` config section."""
    image = build_image_tower(model_cfg.image.model, in_chans, model_cfg.image.kwargs, model_cfg.image.weights)
    text = TextTower(model_cfg.text.pretrained, model_cfg.text.config, vocab_size, model_cfg.text.pooling)
    return DualEncoder(
        image,
        text,
        model_cfg.embed_dim,
        init_temperature=model_cfg.init_temperature,
        max_logit_scale=model_cfg.max_logit_scale,
        freeze_text=model_cfg.text.freeze,
    )
