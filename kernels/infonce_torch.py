"""The chunked PyTorch backend of ``hilum.kernels.infonce``: exact, bounded memory, any device.

It walks the block in row chunks, so CPU training with large batches never holds the B×B
logits, and it is the oracle the Triton kernel is tested against. Arithmetic is float32, or
float64 when the features are float64.
"""

from __future__ import annotations

import math

import torch

from hilum.kernels.infonce_block import Block, BlockStats

DEFAULT_CHUNK = 1024
# Each temporary holds at most this many logits (4 MiB in float32), whatever the batch: with
# B = 65536 a chunk is 16 rows, so memory stays flat as the batch grows (GradCache relies on it).
MAX_TILE_ELEMENTS = 1 << 20


def _rows_per_chunk(chunk: int, columns: int) -> int:
    return max(1, min(chunk, MAX_TILE_ELEMENTS // max(columns, 1)))


def _compute_dtype(block: Block) -> torch.dtype:
    return torch.promote_types(block.x.dtype, torch.float32)


def _weights(block: Block, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Target weights of block rows [r0, r1) against every block column."""
    rows = slice(block.row_offset + r0, block.row_offset + r1)
    cols = slice(block.col_offset, block.col_offset + block.y.shape[0])
    if block.targets is None:
        gi = torch.arange(rows.start, rows.stop, device=block.x.device)[:, None]
        gj = torch.arange(cols.start, cols.stop, device=block.x.device)[None, :]
        return (gi == gj).to(dtype)
    return block.targets.weights(rows, cols, dtype).to(block.x.device)


def row_sums(block: Block, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    dt = _compute_dtype(block)
    n = block.x.shape[0]
    chunk = _rows_per_chunk(chunk, block.y.shape[0])
    return torch.cat([_weights(block, r0, min(r0 + chunk, n), dt).sum(1) for r0 in range(0, n, chunk)])


def forward(block: Block, chunk: int = DEFAULT_CHUNK) -> BlockStats:
    dt = _compute_dtype(block)
    x, y, s = block.x.to(dt), block.y.to(dt), block.scale.to(dt)
    n, m = x.shape[0], y.shape[0]
    chunk = _rows_per_chunk(chunk, m)
    st = BlockStats()
    if block.has_row:
        st.row_lse, st.row_wl, st.row_ws = (torch.empty(n, dtype=dt, device=x.device) for _ in range(3))
    if block.has_col:
        col_max = torch.full((m,), -math.inf, dtype=dt, device=x.device)
        col_sum, st.col_w, st.col_wl = (torch.zeros(m, dtype=dt, device=x.device) for _ in range(3))
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        logits = s * (x[r0:r1] @ y.T)
        w = _weights(block, r0, r1, dt)
        if block.has_row:
            st.row_lse[r0:r1] = torch.logsumexp(logits, dim=1)
            st.row_wl[r0:r1] = (w * logits).sum(1)
            st.row_ws[r0:r1] = w.sum(1)
        if block.has_col:
            new_max = torch.maximum(col_max, logits.max(0).values)
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(0)
            col_max = new_max
            if block.soft:
                w = w / block.row_norm[r0:r1, None].to(dt)
            st.col_w += w.sum(0)
            st.col_wl += (w * logits).sum(0)
    if block.has_col:
        st.col_lse = col_max + torch.log(col_sum)
    return st


def backward(
    block: Block, stats: BlockStats, row_coef: float, col_coef: float, grad: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``grad · block_loss`` w.r.t. x, y and logit_scale (see ``infonce_block``)."""
    dt = _compute_dtype(block)
    x, y, s = block.x.to(dt), block.y.to(dt), block.scale.to(dt)
    n = x.shape[0]
    chunk = _rows_per_chunk(chunk, y.shape[0])
    dx = torch.empty_like(x)
    dy = torch.zeros_like(y)
    dscale = torch.zeros((), dtype=dt, device=x.device)
    r = block.row_norm.to(dt) if block.soft else None
    c = block.col_norm.to(dt) if block.soft and block.has_col else None
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        logits = s * (x[r0:r1] @ y.T)
        w = _weights(block, r0, r1, dt)
        t = w / r[r0:r1, None] if block.soft else w
        delta = torch.zeros_like(logits)
        if block.has_row:
            delta += row_coef * (torch.exp(logits - stats.row_lse[r0:r1, None].to(dt)) - t)
        if block.has_col:
            tc = t / c[None, :] if block.soft else t
            delta += col_coef * (torch.exp(logits - stats.col_lse[None, :].to(dt)) - tc)
        dx[r0:r1] = s * (delta @ y)
        dy += s * (delta.T @ x[r0:r1])
        dscale += (delta * logits).sum()
    g = grad.to(dt)
    return (g * dx).to(block.x.dtype), (g * dy).to(block.y.dtype), g * dscale
