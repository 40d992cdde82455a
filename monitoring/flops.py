"""FLOPs per training sample and model FLOPs utilisation (MFU).

How hilum counts (documented because every trainer counts differently):

* A tower's forward FLOPs per sample come from PyTorch's own counter
  (``torch.utils.flop_counter.FlopCounterMode``) on one sample at the configured input size,
  through a CPU copy of the model built once at start (the text tower cannot run on the ``meta``
  device: transformers reads mask values). It counts matrix products and convolutions as
  2·m·n·k (one multiply, one add) and attention through SDPA; element-wise work (norms,
  activations, softmax) is not counted, as in PaLM's and torchtitan's MFU.
* Training FLOPs per sample = 3 × forward (the backward costs two forwards) for each trained
  tower, 1 × forward for a frozen tower, plus one more forward of each trained tower under
  GradCache (its first, graph-less pass), plus what each part of the model (a method's modules)
  says it adds (``ModelPart.extra_flops``: a no-grad copy of both towers adds one forward of each).
  The contrastive loss (O(B²·D) per step) is added per sample as 6·B_global·D for the logits and
  their gradient.
* MFU = achieved FLOP/s ÷ the device's dense peak for the training dtype (table below, or
  ``monitoring.peak_tflops``). Activation recomputation, if any, does not count as useful work.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

# Dense (not sparse) peak TFLOP/s by device-name fragment and dtype, from the vendors' data sheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},  # fp32 via TF32 tensor cores
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
}


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The table's peak for a device name (first matching fragment), or None when unknown."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name and key in peaks:
            return peaks[key]
    return None


def forward_flops(fn: Callable[..., Any], *inputs: torch.Tensor) -> int:
    """FLOPs of ``fn(*inputs)`` as PyTorch's counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*inputs)
    return int(counter.get_total_flops())


def training_flops_per_sample(
    model: Any,
    image_size: int,
    in_chans: int,
    context_length: int,
    *,
    frozen_text: bool = False,
    parts: Sequence[Any] = (),
    gradcache: bool = False,
    global_batch: int = 1,
) -> dict[str, int]:
    """Per-sample FLOPs of one training step for a CPU :class:`~hilum.trainer.models.dual_encoder.DualEncoder`
    (see the module docstring for what is counted); ``parts``: the trained model's parts."""
    image = torch.zeros(1, in_chans, image_size, image_size)
    ids = torch.ones(1, context_length, dtype=torch.long)
    mask = torch.ones(1, context_length, dtype=torch.long)
    image_fwd = forward_flops(model.encode_image, image)
    text_fwd = forward_flops(lambda i, m: model.text_proj(model.text_tower(i, m)), ids, mask)
    replay = 1 if gradcache else 0
    counts = {
        "image": (3 + replay) * image_fwd,
        "text": (1 if frozen_text else 3 + replay) * text_fwd,
        "parts": sum(part.extra_flops(image_fwd, text_fwd) for part in parts),
        "loss": 6 * global_batch * int(model.image_proj.out_features),
    }
    counts["total"] = sum(counts.values())
    return counts


def mfu(samples_per_second: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over ``peak`` TFLOP/s (None when the peak is unknown)."""
    if not peak:
        return None
    return samples_per_second * flops_per_sample / (peak * 1e12)
