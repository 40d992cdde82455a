"""The two towers: images through timm, reports through transformers, both from local files only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TowerRequest:
    """What one pass through a tower returns besides its pooled feature (``"pooled"``).

    * ``levels``: image towers only, the feature maps of these ``feature_info`` indices
      (``"levels"``, a list), from timm's ``forward_intermediates`` — stages of a CNN, blocks of a ViT.
    * ``tokens``: the last layer's per-token (text) or per-patch (image) features (``"tokens"``,
      (B, N, D); a CNN's last feature map flattened to its H·W positions).
    * ``attention``: the last block's attention maps (``"attention"``, (B, heads, N, N)); text towers
      switch to transformers' eager attention for it, image towers need timm attention blocks (ViTs).

    Parts of the model ask for these; the model merges every part's request into one pass.
    """

    levels: tuple[int, ...] = ()
    tokens: bool = False
    attention: bool = False

    def merge(self, other: "TowerRequest") -> "TowerRequest":
        return TowerRequest(tuple(sorted(set(self.levels) | set(other.levels))), self.tokens or other.tokens,
                            self.attention or other.attention)


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens from a ViT's token sequence or a CNN's (B, C, H, W) map."""
    return features if features.dim() == 3 else features.flatten(2).transpose(1, 2)


class LastBlockAttention:
    """The softmaxed attention of a timm ViT's last block, captured during one forward.

    timm's attention blocks return no weights; with the fused (SDPA) path switched off for the
    pass, the block computes them explicitly and hands them to its ``attn_drop``, whose input this
    hook records — timm's own arithmetic, nothing recomputed here."""

    def __init__(self, tower: nn.Module) -> None:
        blocks = getattr(tower, "blocks", None)
        attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
        if attn is None or not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
            raise ValueError(f"attention maps need a tower with timm attention blocks (a ViT); "
                             f"{type(tower).__name__} has none")
        self.attn, self.maps = attn, None

    def __enter__(self) -> "LastBlockAttention":
        self.fused, self.attn.fused_attn = self.attn.fused_attn, False
        self.handle = self.attn.attn_drop.register_forward_pre_hook(self._record)
        return self

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.maps = args[0]

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        self.attn.fused_attn = self.fused


def image_tower_outputs(tower: nn.Module, image: torch.Tensor, request: TowerRequest = TowerRequest()) -> dict[str, Any]:
    """One pass of a timm tower: ``pooled`` (what ``tower(image)`` returns with ``num_classes=0``)
    and what ``request`` asks for. With nothing asked it *is* ``tower(image)``."""
    if request.attention:
        with LastBlockAttention(tower) as attention:
            out = image_tower_outputs(tower, image, TowerRequest(request.levels, request.tokens))
        out["attention"] = attention.maps
        return out
    if request.levels:
        final, maps = tower.forward_intermediates(image, indices=list(request.levels))
        out = {"pooled": tower.forward_head(final, pre_logits=True), "levels": maps}
    elif request.tokens:
        final = tower.forward_features(image)
        out = {"pooled": tower.forward_head(final, pre_logits=True)}
    else:
        return {"pooled": tower(image)}
    if request.tokens:
        out["tokens"] = _tokens(final)
    return out


def load_state_file(path: str) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build_image_tower(name: str, in_chans: int, kwargs: dict[str, Any], weights: str | None = None) -> nn.Module:
    """A timm backbone returning pooled features (``num_classes=0``); ``.num_features`` is their width."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as err:  # timm's message for unknown names
        raise ValueError(f"model.image.model: {err}") from None
    except TypeError as err:
        raise ValueError(f"model.image.kwargs: {name} does not accept them: {err}") from None
    if weights:
        state = {k: v for k, v in load_state_file(weights).items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"model.image.weights: {weights} does not fit {name}: "
                f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
    return model


class TextTower(nn.Module):
    """A transformers encoder pooled to one vector per report ([CLS] or attention-masked mean)."""

    def __init__(self, pretrained: str | None, config: dict[str, Any], vocab_size: int, pooling: str) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, BertConfig

        if pretrained:
            if not Path(pretrained).is_dir():
                raise FileNotFoundError(f"model.text.pretrained: {pretrained} is not a local directory")
            self.encoder = AutoModel.from_pretrained(pretrained, local_files_only=True)
        else:
            try:
                bert = BertConfig(vocab_size=vocab_size, **config)
            except TypeError as err:
                raise ValueError(f"model.text.config: {err}") from None
            self.encoder = AutoModel.from_config(bert, add_pooling_layer=False)
        if self.encoder.config.vocab_size < vocab_size:
            raise ValueError(
                f"model.text: the tokenizer has {vocab_size} tokens but the encoder only {self.encoder.config.vocab_size}"
            )
        self.pooling = pooling
        self.num_features = int(self.encoder.config.hidden_size)

    @property
    def has_pooler(self) -> bool:
        return getattr(self.encoder, "pooler", None) is not None

    @classmethod
    def from_config(cls, config: dict[str, Any], pooling: str, with_pooler: bool) -> "TextTower":
        """The architecture a saved transformers config describes, randomly initialised (an
        exported model's weights are loaded next; no pretrained directory is needed)."""
        from transformers import AutoConfig, AutoModel

        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        config = dict(config)
        arch = AutoConfig.for_model(config.pop("model_type"), **config)
        try:
            tower.encoder = AutoModel.from_config(arch, add_pooling_layer=with_pooler)
        except TypeError:  # an architecture without a pooler option
            tower.encoder = AutoModel.from_config(arch)
        tower.pooling = pooling
        tower.num_features = int(tower.encoder.config.hidden_size)
        return tower

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                request: TowerRequest = TowerRequest()) -> dict[str, torch.Tensor]:
        """``pooled`` (what :meth:`forward` returns) and what ``request`` asks for: ``tokens``, the
        last hidden states; ``attention``, the last layer's attention maps (transformers returns
        them from its eager attention only, so the tower switches to it the first time they are
        asked for: SDPA gives none)."""
        if request.levels:
            raise ValueError("feature levels are an image-tower request; a text tower has tokens and attention")
        if request.attention and getattr(self.encoder.config, "_attn_implementation", "eager") != "eager":
            self.encoder.set_attn_implementation("eager")
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_attentions=request.attention)
        hidden = out.last_hidden_state
        result = {"pooled": self.pool(hidden, attention_mask)}
        if request.tokens:
            result["tokens"] = hidden
        if request.attention:
            result["attention"] = out.attentions[-1]
        return result
