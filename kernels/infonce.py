"""Bidirectional InfoNCE: the loss under every contrastive objective in hilum.

Convention (shared with the fused kernel that replaces the reference on CUDA):

* logits ``L = exp(logit_scale) * image_features @ text_features.T`` — features are used as given;
  normalising them is the caller's job.
* image→text: row ``i`` of ``L`` is a distribution over texts; its target is row ``i`` of ``targets``
  (row-stochastic), or the one-hot ``e_i`` when ``targets is None``.
* text→image: row ``j`` of ``L.T``; its target is column ``j`` of ``targets`` divided by that
  column's sum (so a row-stochastic matrix yields column-normalised targets for this direction).
* the loss is the mean of the two directions, each averaged over its B rows.

Gradients flow to both feature tensors and to ``logit_scale``. Arithmetic is float32 or wider
whatever the input dtype (bf16 logits at logit scale 100 lose the loss's third digit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor | None) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (B, D); got image {tuple(image_features.shape)}, text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must have the same shape; got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    b = image_features.shape[0]
    if targets is not None and targets.shape != (b, b):
        raise ValueError(f"targets must be ({b}, {b}), got {tuple(targets.shape)}")


def infonce_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The direct formula, materialising the B×B logits. Memory O(B²): for tests and small batches."""
    _check(image_features, text_features, targets)
    compute = torch.promote_types(image_features.dtype, torch.float32)
    img, txt = image_features.to(compute), text_features.to(compute)
    logits = logit_scale.to(compute).exp() * img @ txt.T
    if targets is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    t = targets.to(compute)
    t2i_targets = (t / t.sum(dim=0, keepdim=True)).T
    i2t = -(t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(t2i_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


def infonce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional InfoNCE (see the module docstring for the exact convention).

    Dispatches to the fastest implementation available for the inputs; today that is the
    PyTorch reference on every device.
    """
    return infonce_loss_reference(image_features, text_features, logit_scale, targets)
