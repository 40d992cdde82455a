"""The unit of work both InfoNCE backends implement: one rectangular block of the global logits.

A single process computes one block covering the whole batch, both directions at once. Under
data parallelism a rank computes two stripes — its images against every text (image→text rows)
and every image against its texts (text→image columns) — so the same backend code serves both.

For a block with rows ``x`` (global indices ``row_offset + i``) and columns ``y``, logits
``L = s · x yᵀ`` and unnormalised target weights ``W`` (identity for hard targets):

forward (``BlockStats``)
    rows: ``lse_r[i] = logsumexp_j L[i, j]``, ``wl_r[i] = Σ_j W L``, ``ws_r[i] = Σ_j W``
    cols: ``lse_c[j] = logsumexp_i L[i, j]``, ``w_c[j] = Σ_i W / r_i``,
    ``wl_c[j] = Σ_i (W / r_i) L`` — column statistics need the row normalisers ``r`` first.

backward, for ``loss = row_coef Σ_i (lse_r − wl_r / r) + col_coef Σ_j (lse_c − wl_c / c)``
    ``Δ = row_coef (softmax_row(L) − W/r) + col_coef (softmax_col(L) − W/(r c))``,
    ``dx = s Δ y``, ``dy = s Δᵀ x``, ``d logit_scale = Σ Δ ∘ L = s Σ_i x_i · (Δ y)_i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hilum.kernels.targets import SoftTargets


@dataclass(eq=False)
class Block:
    x: torch.Tensor  # (n, D)
    y: torch.Tensor  # (m, D)
    scale: torch.Tensor  # 0-dim, exp(logit_scale), float32 or wider, no grad
    row_offset: int
    col_offset: int
    has_row: bool
    has_col: bool
    targets: SoftTargets | None  # over the global batch; None = identity
    row_norm: torch.Tensor | None = None  # (n,) Σ_j W over every column, soft targets only
    col_norm: torch.Tensor | None = None  # (m,) Σ_i W/r over every row, backward only

    @property
    def soft(self) -> bool:
        return self.targets is not None


@dataclass(eq=False)
class BlockStats:
    row_lse: torch.Tensor | None = None
    row_wl: torch.Tensor | None = None
    row_ws: torch.Tensor | None = None
    col_lse: torch.Tensor | None = None
    col_w: torch.Tensor | None = None
    col_wl: torch.Tensor | None = None


def block_loss(block: Block, stats: BlockStats, row_coef: float, col_coef: float) -> torch.Tensor:
    """The block's share of the loss, from its statistics (float32 or wider)."""
    total = torch.zeros((), dtype=torch.float64, device=block.x.device)
    if block.has_row:
        r = stats.row_ws if block.soft else 1.0
        total = total + row_coef * (stats.row_lse.double() - stats.row_wl.double() / r).sum()
    if block.has_col:
        c = stats.col_w if block.soft else 1.0
        total = total + col_coef * (stats.col_lse.double() - stats.col_wl.double() / c).sum()
    return total
