"""IMITATE's hierarchical feature aggregation (Liu et al., §III-C): multi-level visual features
from the image tower's stages, aggregated by self-attention into one multi-level feature z_v,m.

Each level's feature map is average-pooled to ``grid × grid`` and flattened, so a level of c
channels becomes a sequence of c tokens of dimension grid² (the paper's "(256, c)", c being the
number of tokens). Intermediate channel dropping keeps a random subset of each level's channel
tokens in training — the paper drops 85 % of the shallowest level's and 90 % of the others',
which cuts the attention's O(N²) cost; at evaluation every channel is kept. The kept tokens get
their channel's positional embedding, a [CLS] token is prepended, and a pre-norm transformer
encoder aggregates them; the [CLS] output is z_v,m (projected into the shared space by the
block's own projection, :class:`MultiLevelImage`).

Levels come from timm's ``forward_intermediates`` (the tower's ``levels`` request), which every timm CNN and ViT offers, so the
same block serves both kinds of tower: for ResNets the four stages (the paper's 256/512/1024/2048
channels for ResNet-50), for ViTs ``levels`` blocks spread evenly over the depth (the last one
included), their patch-token grids taken as feature maps. A ViT's levels all have embed_dim
channels; the block treats them alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hilum.trainer.models.parts import ForwardContext, ModelPart
from hilum.trainer.models.towers import TowerRequest


class MultiLevelConfig(BaseModel):
    """The aggregation block's shape (the ``multi_level`` field of the ``imitate`` term)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)
    levels: int = Field(4, ge=1, description="stages of a CNN tower (the last ones), or blocks spread over a ViT")
    grid: int = Field(16, ge=1, le=64, description="each level is average-pooled to grid x grid; a channel is a token of grid² values")
    dim: int = Field(256, ge=8, description="width of the aggregating self-attention")
    heads: int = Field(8, ge=1)
    depth: int = Field(1, ge=1, le=12, description="self-attention layers")
    drop_shallowest: float = Field(0.85, ge=0.0, lt=1.0, description="share of the shallowest level's channels dropped in training")
    drop_others: float = Field(0.9, ge=0.0, lt=1.0, description="share of every other level's channels dropped in training")

    @model_validator(mode="after")
    def _heads_divide(self) -> "MultiLevelConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


def level_indices(tower: nn.Module, levels: int) -> list[int]:
    """Which of the tower's ``feature_info`` entries feed the aggregation: the last ``levels``
    stages of a CNN, or ``levels`` blocks evenly spread over a ViT's depth (last included)."""
    n = len(tower.feature_info)
    if levels > n:
        raise ValueError(f"imitate: multi_level.levels: {levels} levels asked, the tower has {n}")
    if getattr(tower, "patch_embed", None) is not None:  # a ViT: every block is a candidate level
        return sorted({n - 1 - round(k * n / levels) for k in range(levels)})
    return list(range(n - levels, n))


class HierarchicalAggregator(nn.Module):
    def __init__(self, tower: nn.Module, levels: int, grid: int, dim: int, heads: int, depth: int,
                 drop_shallowest: float, drop_others: float) -> None:
        super().__init__()
        self.indices = level_indices(tower, levels)
        channels = [int(tower.feature_info[i]["num_chs"]) for i in self.indices]
        self.grid, self.channels = grid, channels
        self.drop = [drop_shallowest] + [drop_others] * (len(channels) - 1)
        self.embed = nn.Linear(grid * grid, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, sum(channels), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim

    def kept_channels(self, level: int, device: torch.device) -> torch.Tensor:
        """Indices of the channel tokens of ``level`` kept in this forward (all at evaluation).
        Drawn from the global RNG, so GradCache's replayed forward keeps the same ones."""
        c = self.channels[level]
        if not self.training or self.drop[level] <= 0:
            return torch.arange(c, device=device)
        keep = max(1, round(c * (1.0 - self.drop[level])))
        return torch.randperm(c, device=device)[:keep].sort().values

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if [m.shape[1] for m in maps] != self.channels:
            raise ValueError(f"expected levels of {self.channels} channels, got {[m.shape[1] for m in maps]}")
        tokens, offset = [], 0
        for level, m in enumerate(maps):
            keep = self.kept_channels(level, m.device)
            pooled = F.adaptive_avg_pool2d(m.index_select(1, keep), self.grid).flatten(2)  # (B, kept, grid²)
            tokens.append(self.embed(pooled) + self.pos[:, offset + keep])
            offset += m.shape[1]
        x = torch.cat([self.cls.expand(maps[0].shape[0], -1, -1).to(tokens[0].dtype), *tokens], dim=1)
        return self.norm(self.encoder(x)[:, 0])


class MultiLevelImage(ModelPart):
    """IMITATE's part of the model: the aggregation block P(·) and its projection, giving z_v,m of
    the main view (``image_multi``) from the main pass's levels and, when the batch has a second
    view (``image_aug``), z_v,h and z_v,m of that view (``image_2``, ``image_multi_2``)."""

    def __init__(self, model: nn.Module, cfg: MultiLevelConfig) -> None:
        super().__init__()
        self.hierarchy = HierarchicalAggregator(model.image_tower, cfg.levels, cfg.grid, cfg.dim, cfg.heads, cfg.depth,
                                                cfg.drop_shallowest, cfg.drop_others)
        self.multi_proj = nn.Linear(self.hierarchy.num_features, model.image_proj.out_features, bias=False)
        self.image_request = TowerRequest(levels=tuple(self.hierarchy.indices))

    def multi_level(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.multi_proj(self.hierarchy(levels)), dim=-1)

    def forward(self, ctx: ForwardContext) -> dict[str, torch.Tensor]:
        out = {"image_multi": self.multi_level(ctx.image["levels"])}
        if "image_aug" in ctx.inputs:
            second = ctx.model.image_pass(ctx.inputs["image_aug"][:, 0], self.image_request)
            out["image_2"] = ctx.model.project_image(second["pooled"])
            out["image_multi_2"] = self.multi_level(second["levels"])
        return out
