"""The two towers: images through timm, reports through transformers, both from local files only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
