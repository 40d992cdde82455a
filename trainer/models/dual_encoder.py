"""The CLIP-style dual encoder: towers, linear projections into a shared space, a learnable
temperature, and the parts that the configured methods add (``hilum.trainer.models.parts``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hilum.trainer.models.parts import ForwardContext, ModelOutput, ModelPart
from hilum.trainer.models.towers import TextTower, TowerRequest, build_image_tower, image_tower_outputs

PartFactory = Callable[["DualEncoder"], ModelPart]


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
        # The methods' modules, by the key their factory was declared under; registered last, so
        # a model without parts has the parameters (and their order) it had before parts existed.
        self.parts = nn.ModuleDict()
        # What the parts need from the main image and text passes, merged (kept with the parts).
        self.image_request, self.text_request = TowerRequest(), TowerRequest()

    def add_parts(self, factories: Mapping[str, PartFactory]) -> None:
        """Build and register the declared parts, in order, each key once (two terms of one method
        may declare the same part). Before the engine is built, so ZeRO partitions them too."""
        for key, factory in factories.items():
            if key not in self.parts:
                part = self.parts[key] = factory(self)
                self.image_request = self.image_request.merge(part.image_request)
                self.text_request = self.text_request.merge(part.text_request)

    def layout(self, image: torch.Tensor | None) -> torch.Tensor | None:
        """Images in channels-last (NHWC) memory on CUDA when configured: cuDNN's native layout for
        bf16/fp16 convolutions, which otherwise transposes every activation of a CNN tower."""
        if image is not None and self.channels_last and image.is_cuda and image.dim() == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_tower(image))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output (before the projection)."""
        return self.text_pass(input_ids, attention_mask)["pooled"]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project_text(self.text_features(input_ids, attention_mask))

    def image_pass(self, image: torch.Tensor, request: TowerRequest = TowerRequest()) -> dict[str, Any]:
        """One pass of the image tower: ``pooled`` and what ``request`` asks for (towers.py)."""
        return image_tower_outputs(self.image_tower, self.layout(image), request)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled), dim=-1)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  request: TowerRequest = TowerRequest()) -> dict[str, Any]:
        """One pass of the text tower: ``pooled`` and what ``request`` asks for. A frozen tower
        runs without a graph (inference memory only) and in evaluation mode."""
        def run() -> dict[str, Any]:
            if request == TowerRequest():
                return {"pooled": self.text_tower(input_ids, attention_mask)}
            return self.text_tower.outputs(input_ids, attention_mask, request)

        if self.freeze_text:
            with torch.no_grad():
                self.text_tower.eval()
                return run()
        return run()

    def forward(self, inputs: Mapping[str, torch.Tensor], reuse: Mapping[str, Any] | None = None,
                with_parts: bool = True) -> ModelOutput:
        """The named outputs for a batch of per-sample ``inputs`` (see ``ForwardContext``).

        Always ``logit_scale``; with texts (``input_ids``, ``attention_mask``) ``text`` (unit norm)
        and ``text_pooled`` (the tower's output, before the projection); with images (``image``)
        ``image`` and ``image_pooled``; then every part's outputs, in the order the parts were
        added. ``reuse``: the ``reusable`` of an earlier forward over the same inputs (GradCache's
        replay), whose graph-less results are taken instead of computed again. ``with_parts=False``:
        the towers' features only, as evaluation and export use them (through the forward, so that
        ZeRO-3 gathers the parameters as in training)."""
        # Clamping in the forward (rather than in place after the step, as open_clip does) keeps
        # the parameter untouched, which matters when ZeRO-3 owns its storage.
        out = ModelOutput(logit_scale=self.logit_scale.clamp(max=self.max_log_scale)[0])
        ctx = ForwardContext(self, inputs, reuse or {}, out)
        image_request, text_request = (self.image_request, self.text_request) if with_parts else (TowerRequest(), TowerRequest())
        if "input_ids" in inputs:
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            if self.freeze_text and text_request == TowerRequest():
                # A frozen tower's output has no graph: GradCache's replay takes the first pass's.
                ctx.text = {"pooled": ctx.reusable("text_pooled", lambda: self.text_features(ids, mask))}
            else:
                ctx.text = self.text_pass(ids, mask, text_request)
            out["text"] = self.project_text(ctx.text["pooled"])
            out["text_pooled"] = ctx.text["pooled"]
        if "image" in inputs:
            ctx.image = self.image_pass(inputs["image"], image_request)
            out["image"] = self.project_image(ctx.image["pooled"])
            out["image_pooled"] = ctx.image["pooled"]
        for key, part in (self.parts.items() if with_parts else ()):
            produced = part(ctx)
            clash = sorted(set(produced) & set(out))
            if clash:
                raise ValueError(f"model part {key!r} returns {clash}, which another part or the model already produced")
            out.update(produced)
        return out


def build_model(model_cfg, in_chans: int, vocab_size: int, parts: Mapping[str, PartFactory] | None = None,  # noqa: ANN001
                text_config: dict | None = None, text_pooler: bool = False) -> DualEncoder:
    """Build the dual encoder from the ``model`` config section, with the ``parts`` the
    objectives declare (``hilum.trainer.objectives.model_parts``). ``text_config`` (a full
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
    model.add_parts(parts or {})
    return model
