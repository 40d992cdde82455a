"""Export a run's checkpoint as one consolidated fp32 model, and load it back for downstream use.

``hilum export RUN_DIR --out DIR`` writes:

* ``model.safetensors``: every parameter and buffer of the dual encoder in fp32, gathered from
  the ranks' DeepSpeed shards by DeepSpeed's own ``zero_to_fp32`` (ZeRO 1–3: the fp32 master
  weights; ZeRO 0: the saved module, upcast);
* ``config.yaml``: the run's resolved config; ``text_config.json``: the text tower's
  transformers config (so loading needs no pretrained directory); ``tokenizer/``: a copy of the
  tokenizer; ``export.json``: step, source checkpoint, config fingerprint, parameter count.

:func:`from_pretrained` rebuilds the model from those files alone and loads the weights
strictly (every key, nothing else) from safetensors: no pickle is involved.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from hilum.launch.config import HilumConfig, dump_config, load_config, load_run_config
from hilum.trainer.checkpoint import CheckpointInfo, _deepspeed_safe_globals, local_copy, store_for
from hilum.trainer.data.storage import redact_url

_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """``torch.load`` with ``weights_only=True`` (DeepSpeed's types allowed by name) while DeepSpeed's
    ``zero_to_fp32`` runs: it calls ``torch.load(weights_only=False)`` itself, which would run any
    code a tampered checkpoint carries, and offers no hook to change that."""
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return original(*args, **kwargs)

    with _LOAD_LOCK:
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = original


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a complete hilum checkpoint directory."""
    zero_files = list(ckpt.glob("*_optim_states.pt"))
    with weights_only_loads():
        if zero_files:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:  # ZeRO 0: the module is saved whole
            state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _model_parts(cfg: HilumConfig) -> dict[str, Any]:
    """The parts the run's terms added to the model (their parameters are in the checkpoint)."""
    from hilum.trainer.objectives import build_objectives, method_needs

    return method_needs(build_objectives(cfg.objectives), cfg.model).parts


def export(run_dir: Path, out: Path, step: int | None = None) -> CheckpointInfo:
    """Write the consolidated model of ``run_dir``'s latest complete checkpoint (or ``step``'s)."""
    from safetensors.torch import save_file

    from hilum.trainer.data.text import load_tokenizer
    from hilum.trainer.models.dual_encoder import build_model

    cfg = load_run_config(run_dir)
    store = store_for(cfg)
    ckpt = store.find(step)
    state = consolidated_state_dict(local_copy(store, ckpt))
    tokenizer = load_tokenizer(cfg.model.text.tokenizer)
    # The architecture as trained (pretrained tower included), to record its config and check the keys.
    model = build_model(cfg.model, cfg.data.in_chans, len(tokenizer), parts=_model_parts(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{redact_url(ckpt.url)} does not fit the run's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    dump_config(cfg, out / "config.yaml")
    (out / "text_config.json").write_text(model.text_tower.encoder.config.to_json_string())
    tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {"step": ckpt.step, "checkpoint": redact_url(ckpt.url), "fingerprint": cfg.fingerprint(),
            "parameters": sum(v.numel() for v in state.values()), "text_pooler": model.text_tower.has_pooler}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return ckpt


@dataclass
class PretrainedDualEncoder:
    """An exported model, ready for downstream use: unit-norm embeddings of images and texts."""

    model: Any  # hilum.trainer.models.dual_encoder.DualEncoder, in eval mode
    tokenize: Any  # hilum.trainer.data.text.Tokenize
    config: HilumConfig

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [0, 1], as the training stream delivers them → (B, E)."""
        device = next(self.model.parameters()).device
        return self.model.encode_image(images.to(device))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenize(texts)
        return self.model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    def similarity(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.encode_images(images), dim=-1) @ F.normalize(self.encode_texts(texts), dim=-1).T


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> PretrainedDualEncoder:
    """Load what :func:`export` wrote; needs nothing else (no run directory, no pretrained tower)."""
    from safetensors.torch import load_file

    from hilum.trainer.data.text import Tokenize
    from hilum.trainer.models.dual_encoder import build_model

    path = Path(path)
    for name in ("model.safetensors", "config.yaml", "text_config.json", "tokenizer", "export.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a hilum export: {name} is missing")
    cfg = load_config(path / "config.yaml")
    meta = json.loads((path / "export.json").read_text())
    tokenize = Tokenize(str(path / "tokenizer"), cfg.data.context_length)
    model = build_model(cfg.model, cfg.data.in_chans, len(tokenize.tokenizer), parts=_model_parts(cfg),
                        text_config=json.loads((path / "text_config.json").read_text()), text_pooler=meta["text_pooler"])
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return PretrainedDualEncoder(model.to(device).eval(), tokenize, cfg)
