"""The CLIP-style dual encoder: towers, linear projections into a shared space, a learnable temperature."""

from __future__ import annotations

import copy
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
    text_pooled: torch.Tensor | None = None  # frozen text tower's output, reusable (GradCache)
    image_aug: torch.Tensor | None = None  # divergence image encoder on the augmented view (no grad)
    text_aug: torch.Tensor | None = None  # divergence text encoder on the same report (no grad)
    report_embedding: torch.Tensor | None = None  # the text tower's pooled output, detached (IMITATE's R)


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

    # MLIP's divergence encoders ------------------------------------------------------------------

    @property
    def has_divergence(self) -> bool:
        return hasattr(self, "divergence_image")

    def add_divergence_encoders(self) -> None:
        """Copies of each tower with its projection, trained by no optimizer: a moving average of
        the encoders (``trainer.divergence``). Added before the engine is built, so ZeRO-3
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

    # ----------------------------------------------------------------------------------------------

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

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)), dim=-1)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_pooled: torch.Tensor | None = None,
        image_aug: torch.Tensor | None = None,
    ) -> Embeddings:
        """``text_pooled``: a frozen text tower's output from an earlier pass over the same batch,
        so GradCache's second pass skips that tower. ``image_aug``: the augmented view for the
        divergence encoders (when the model has them), which run last and without a graph."""
        # Clamping in the forward (rather than in place after the step, as open_clip does) keeps
        # the parameter untouched, which matters when ZeRO-3 owns its storage.
        scale = self.logit_scale.clamp(max=self.max_log_scale)[0]
        if text_pooled is None:
            text_pooled = self.text_features(input_ids, attention_mask)
        text = F.normalize(self.text_proj(text_pooled), dim=-1)
        image = self.encode_image(image)
        image_div = text_div = None
        if image_aug is not None:
            if not self.has_divergence:
                raise ValueError("image_aug given but the model has no divergence encoders")
            image_div, text_div = self.encode_divergence(image_aug, input_ids, attention_mask)
        return Embeddings(image, text, scale, text_pooled if self.freeze_text else None, image_div, text_div,
                          text_pooled.detach())


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
