"""Bidirectional InfoNCE: the loss under every contrastive objective in hilum.

Convention (every implementation here follows it exactly):

* logits ``L = exp(logit_scale) * image_features @ text_features.T`` — features are used as given;
  normalising them is the caller's job.
* targets: ``None`` means the identity (image ``i`` matches text ``i``). Otherwise non-negative-sum
  weights ``W`` — a dense (N, M) tensor, or a ``hilum.kernels.targets.SoftTargets`` that regenerates
  them from per-sample data. Rows are normalised: ``T = W / W.sum(1)`` (a row-stochastic matrix
  is used unchanged).
* image→text: row ``i`` of ``L`` is a distribution over texts with target ``T[i]``.
* text→image: row ``j`` of ``L.T``; its target is column ``j`` of ``T`` divided by that column's
  sum (so identity targets stay the identity).
* the loss is the mean of the two directions, each averaged over its rows:
  ``½ (1/N Σ_i CE(L[i], T[i]) + 1/M Σ_j CE(L[:, j], T[:, j] / Σ_i T[i, j]))``;
  ``directions="image_to_text"`` or ``"text_to_image"`` gives one direction alone (weight 1),
  as MLIP's augmented terms use them.

Gradients flow to both feature tensors and to ``logit_scale``; targets get none. Arithmetic is
float32 or wider whatever the input dtype (bf16 logits at logit scale 100 lose the loss's third
digit).

Implementations (``impl``): ``"triton"`` (fused CUDA kernel, ``hilum.kernels.infonce_triton``),
``"torch"`` (row chunks of at most 1M logits, ``hilum.kernels.infonce_torch``), ``"dense"`` (the direct
formula, O(B²), the float64 test oracle). ``"auto"`` picks Triton for CUDA tensors and the chunked
reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F

from hilum.kernels import infonce_torch
from hilum.kernels.infonce_block import Block, BlockStats, block_loss
from hilum.kernels.targets import DenseTargets, SoftTargets

if TYPE_CHECKING:
    from hilum.kernels.infonce_triton import TileConfig

Impl = Literal["auto", "triton", "torch", "dense"]
Directions = Literal["both", "image_to_text", "text_to_image"]
# (weight of image→text, weight of text→image)
DIRECTION_WEIGHTS: dict[str, tuple[float, float]] = {"both": (0.5, 0.5), "image_to_text": (1.0, 0.0),
                                                     "text_to_image": (0.0, 1.0)}


def direction_weights(directions: str) -> tuple[float, float]:
    try:
        return DIRECTION_WEIGHTS[directions]
    except KeyError:
        raise ValueError(f"directions must be one of {sorted(DIRECTION_WEIGHTS)}, got {directions!r}") from None


def _as_targets(targets: torch.Tensor | SoftTargets | None) -> SoftTargets | None:
    if targets is None or isinstance(targets, SoftTargets):
        return targets
    if isinstance(targets, torch.Tensor):
        return DenseTargets(targets)
    raise TypeError(f"targets must be None, a tensor or hilum.kernels.targets.SoftTargets, got {type(targets).__name__}")


def check_features(image_features: torch.Tensor, text_features: torch.Tensor, targets: SoftTargets | None) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (B, D); got image {tuple(image_features.shape)}, text {tuple(text_features.shape)}"
        )
    n, m = image_features.shape[0], text_features.shape[0]
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image and text features must have the same width; got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if targets is None and n != m:
        raise ValueError(f"identity targets need as many images as texts; got {n} and {m}")
    if targets is not None and (targets.num_rows, targets.num_cols) != (n, m):
        raise ValueError(f"targets must be ({n}, {m}), got ({targets.num_rows}, {targets.num_cols})")


def require_positive(name: str, sums: torch.Tensor) -> None:
    """Refuse target rows/columns whose weights do not sum to a positive number (one host sync)."""
    bad = (sums <= 0) | ~torch.isfinite(sums)
    if bool(bad.any()):
        raise ValueError(f"soft targets: {name} {int(bad.nonzero()[0])} has weights summing to {float(sums[bad][0]):.4g}; they must sum to > 0")


@dataclass(frozen=True)
class Backend:
    """One implementation of the block contract (``hilum.kernels.infonce_block``), options bound."""

    row_sums: Callable[[Block], torch.Tensor]
    forward: Callable[[Block], BlockStats]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def resolve_impl(impl: Impl, features: torch.Tensor) -> str:
    if impl == "auto":
        return "triton" if features.is_cuda and features.dtype != torch.float64 else "torch"
    if impl not in ("triton", "torch", "dense"):
        raise ValueError(f"impl must be auto, triton, torch or dense; got {impl!r}")
    return impl


def make_backend(impl: str, chunk_size: int = infonce_torch.DEFAULT_CHUNK, fp32_precision: str = "tf32x3",
                 tile_config: TileConfig | None = None) -> Backend:
    if impl == "triton":  # imported on first use: importing triton costs a second
        from hilum.kernels import infonce_triton as module

        options: dict = dict(config=tile_config, fp32_precision=fp32_precision)
    else:
        module, options = infonce_torch, dict(chunk=chunk_size)
    return Backend(partial(module.row_sums, **options), partial(module.forward, **options),
                   partial(module.backward, **options))


def solve_block(backend: Backend, block: Block) -> BlockStats:
    """Forward of one block, filling in the target normalisers the backward needs."""
    if block.soft and block.has_col and block.row_norm is None:
        block.row_norm = backend.row_sums(block)
        require_positive("row", block.row_norm)
    stats = backend.forward(block)
    if block.soft:
        if block.row_norm is None:
            require_positive("row", stats.row_ws)
            block.row_norm = stats.row_ws
        if block.has_col:
            require_positive("column", stats.col_w)
            block.col_norm = stats.col_w
    return stats


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, targets, backend, weights):  # type: ignore[override]
        compute = torch.promote_types(image_features.dtype, torch.float32)
        n, m = image_features.shape[0], text_features.shape[0]
        block = Block(image_features.detach(), text_features.detach(), logit_scale.detach().to(compute).exp().reshape(()),
                      0, 0, weights[0] > 0, weights[1] > 0, targets)
        stats = solve_block(backend, block)
        ctx.block, ctx.stats, ctx.backend, ctx.coefs = block, stats, backend, (weights[0] / n, weights[1] / m)
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        return block_loss(block, stats, *ctx.coefs).to(compute)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dx, dy, dscale = ctx.backend.backward(ctx.block, ctx.stats, *ctx.coefs, grad)
        return dx, dy, dscale.reshape(ctx.scale_shape).to(ctx.scale_dtype), None, None, None


def infonce_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | SoftTargets | None = None,
    directions: Directions = "both",
) -> torch.Tensor:
    """The direct formula, materialising the B×B logits. Memory O(B²): the oracle for tests."""
    w_i2t, w_t2i = direction_weights(directions)
    soft = _as_targets(targets)
    check_features(image_features, text_features, soft)
    compute = torch.promote_types(image_features.dtype, torch.float32)
    img, txt = image_features.to(compute), text_features.to(compute)
    logits = logit_scale.to(compute).exp() * img @ txt.T
    if soft is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return w_i2t * F.cross_entropy(logits, labels) + w_t2i * F.cross_entropy(logits.T, labels)
    t = soft.dense(compute).to(logits.device)
    t2i_targets = (t / t.sum(dim=0, keepdim=True)).T
    i2t = -(t * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    t2i = -(t2i_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return w_i2t * i2t + w_t2i * t2i


def infonce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | SoftTargets | None = None,
    *,
    impl: Impl = "auto",
    chunk_size: int = infonce_torch.DEFAULT_CHUNK,
    fp32_precision: str = "tf32x3",
    tile_config: TileConfig | None = None,
    directions: Directions = "both",
) -> torch.Tensor:
    """Bidirectional InfoNCE (see the module docstring for the exact convention).

    ``fp32_precision`` is Triton's ``input_precision`` for float32 features: ``"tf32x3"`` (default,
    float32-grade products from three TF32 passes), ``"tf32"`` (fast, ~1e-3 relative logits, like
    Inf-CL) or ``"ieee"``. ``chunk_size`` bounds the rows the chunked reference holds at once.
    """
    weights = direction_weights(directions)
    soft = _as_targets(targets)
    check_features(image_features, text_features, soft)
    which = resolve_impl(impl, image_features)
    if which == "dense":
        return infonce_loss_reference(image_features, text_features, logit_scale, soft, directions)
    backend = make_backend(which, chunk_size, fp32_precision, tile_config)
    return _InfoNCE.apply(image_features, text_features, logit_scale, soft, backend, weights)
