"""InfoNCE over the global batch of a data-parallel group, with sharded work.

Each rank holds ``b`` images and their ``b`` texts; the global batch is their concatenation in
rank order. Instead of every rank computing the whole (W·b)² problem, rank ``r`` computes two
stripes of it with the same block backends as the single-process loss:

* its images against every text — the image→text rows it owns;
* every image against its texts — the text→image columns it owns.

The stripes' losses sum over ranks to the global loss. Their gradients reach every global
feature, so the backward sums them over ranks and hands each rank its own rows
(reduce-scatter; on gloo, which has none, an all-reduce and a slice). Soft targets are built
from every rank's per-sample data (``SoftTargets.gather``); the column direction needs every
row's normaliser, which the image→text stripe produces and one all-gather shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from hilum.kernels import infonce_torch
from hilum.kernels.infonce import (
    Directions,
    Impl,
    _as_targets,
    check_features,
    direction_weights,
    make_backend,
    resolve_impl,
    solve_block,
)
from hilum.kernels.infonce_block import Block, block_loss
from hilum.kernels.targets import DenseTargets, SoftTargets

if TYPE_CHECKING:
    from hilum.kernels.infonce_triton import TileConfig

GradReduction = Literal["exact", "data_parallel"]


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _sum_to_owner(full: torch.Tensor, rank: int, rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``full`` over ranks and return this rank's ``rows``-row slice."""
    if dist.get_backend(group) == "nccl":
        out = torch.empty((rows, *full.shape[1:]), dtype=full.dtype, device=full.device)
        dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
        return out
    dist.all_reduce(full, group=group)  # gloo has no reduce-scatter
    return full[rank * rows : (rank + 1) * rows]


_VERIFIED_SIZES: set[tuple[int, int, int]] = set()


def _check_equal_sizes(b: int, m: int, device: torch.device, group: dist.ProcessGroup | None) -> None:
    """Collectives need the same rows on every rank; a mismatch would hang NCCL, so refuse it.

    Checked once per (group, size): the check costs a collective and a host sync, and a training
    loop repeats the same size every step.
    """
    key = (id(group), b, m)
    if key in _VERIFIED_SIZES:
        return
    sizes = _all_gather(torch.tensor([[b, m]], device=device), group)
    if not bool((sizes == b).all()):
        raise ValueError(f"every rank must pass the same number of images and texts; got {sizes.tolist()}")
    _VERIFIED_SIZES.add(key)


class _DistributedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, logit_scale, targets, backend, group, grad_reduction, weights):  # type: ignore[override]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b = x.shape[0]
        _check_equal_sizes(b, y.shape[0], x.device, group)
        compute = torch.promote_types(x.dtype, torch.float32)
        scale = logit_scale.detach().to(compute).exp().reshape(())
        xg, yg = _all_gather(x.detach(), group), _all_gather(y.detach(), group)
        n = world * b
        check_features(xg, yg, targets)
        rows = Block(x.detach(), yg, scale, rank * b, 0, True, False, targets)
        cols = Block(xg, y.detach(), scale, 0, rank * b, False, True, targets)
        # A direction with weight 0 skips its stripe; soft column targets still need every row's normaliser.
        row_stats = solve_block(backend, rows) if weights[0] else None  # soft: fills rows.row_norm
        if weights[1]:
            if targets is not None:
                local_norm = rows.row_norm if rows.row_norm is not None else backend.row_sums(rows)
                cols.row_norm = _all_gather(local_norm, group)
            col_stats = solve_block(backend, cols)
        else:
            col_stats = None
        coefs = (weights[0] / n, weights[1] / n)
        partial = torch.zeros((), dtype=torch.float64, device=x.device)
        if row_stats is not None:
            partial = partial + block_loss(rows, row_stats, coefs[0], 0.0)
        if col_stats is not None:
            partial = partial + block_loss(cols, col_stats, 0.0, coefs[1])
        total = partial.clone()
        dist.all_reduce(total, group=group)
        ctx.saved = (rows, row_stats, cols, col_stats, coefs, backend, group, grad_reduction, world, rank, b)
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        return total.to(compute)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        rows, row_stats, cols, col_stats, coefs, backend, group, grad_reduction, world, rank, b = ctx.saved
        own = slice(rank * b, (rank + 1) * b)
        x_all = y_all = None  # gradients for every rank's rows, in the backend's dtype
        dscale = torch.zeros(1, dtype=torch.float64, device=rows.x.device)
        if row_stats is not None:  # this rank's images against every text
            dx_own, y_all, ds = backend.backward(rows, row_stats, coefs[0], 0.0, grad)
            x_all = dx_own.new_zeros((world * b, dx_own.shape[1]))
            x_all[own] += dx_own
            dscale += ds.reshape(1).to(torch.float64)
        if col_stats is not None:  # every image against this rank's texts
            dx_cols, dy_own, ds = backend.backward(cols, col_stats, 0.0, coefs[1], grad)
            x_all = dx_cols if x_all is None else x_all + dx_cols
            if y_all is None:
                y_all = dy_own.new_zeros((world * b, dy_own.shape[1]))
            y_all[own] += dy_own
            dscale += ds.reshape(1).to(torch.float64)
        dx = _sum_to_owner(x_all, rank, b, group)
        dy = _sum_to_owner(y_all, rank, b, group)
        if grad_reduction == "exact":
            dist.all_reduce(dscale, group=group)
        else:
            # The engine will average over ranks: scale so the average is the global gradient.
            dx, dy, dscale = dx * world, dy * world, dscale * world
        return dx, dy, dscale.reshape(ctx.scale_shape).to(ctx.scale_dtype), None, None, None, None, None


def infonce_loss_distributed(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | SoftTargets | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    grad_reduction: GradReduction = "exact",
    impl: Impl = "auto",
    chunk_size: int = infonce_torch.DEFAULT_CHUNK,
    fp32_precision: str = "tf32x3",
    tile_config: TileConfig | None = None,
    directions: Directions = "both",
) -> torch.Tensor:
    """``infonce_loss`` over the concatenation of every rank's samples (same value on every rank).

    ``targets`` holds this rank's per-sample target data (a ``SoftTargets`` built from the local
    samples, gathered here), or a dense tensor over the whole global batch.

    ``grad_reduction="exact"``: each rank's feature gradients are its rows of the global-batch
    gradient and ``logit_scale`` gets the global gradient — what a single process would compute.
    ``"data_parallel"``: the same multiplied by the world size, so that a data-parallel engine
    that averages parameter gradients over ranks (DDP, DeepSpeed) applies the global-batch
    gradient; use this inside training.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        from hilum.kernels.infonce import infonce_loss

        return infonce_loss(image_features, text_features, logit_scale, targets, impl=impl, chunk_size=chunk_size,
                            fp32_precision=fp32_precision, tile_config=tile_config, directions=directions)
    weights = direction_weights(directions)
    if grad_reduction not in ("exact", "data_parallel"):
        raise ValueError(f"grad_reduction must be 'exact' or 'data_parallel', got {grad_reduction!r}")
    soft = _as_targets(targets)
    if soft is not None and not isinstance(soft, DenseTargets):
        soft = soft.gather(group)
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"each rank needs (b, D) image and text features of one shape; got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    which = resolve_impl(impl, image_features)
    if which == "dense":
        which = "torch"  # the stripes are the oracle's job too: the chunked path is exact
    backend = make_backend(which, chunk_size, fp32_precision, tile_config)
    return _DistributedInfoNCE.apply(image_features, text_features, logit_scale, soft, backend, group, grad_reduction,
                                     weights)


__all__ = ["infonce_loss_distributed"]
