"""Triton backend of ``hilum.kernels.infonce``: fused, tiled, never materialising the B×B logits.

Written by hand because no library offers it: open_clip materialises the logits, Inf-CL tiles
them but computes one direction per call, fp32 only and hard labels only. Here

* the forward makes one pass over the tiles and produces the row log-sum-exps (image→text)
  and, through per-program column partials merged afterwards, the column log-sum-exps
  (text→image) — each program owns one row of the partial buffers, so no atomics;
* the backward recomputes the tiles twice: once row-parallel for ``dx`` (and the temperature's
  gradient), once column-parallel for ``dy``; every output element is written by one program,
  so results are deterministic;
* target weights are regenerated inside each tile from per-sample data (``hilum.kernels.targets``);
* inputs may be bf16/fp16/fp32, accumulation is fp32, exponentials use a running max in
  base 2, and any B and D work (edges are masked).

The block statistics and gradients follow ``hilum.kernels.infonce_block``, the same contract as the
chunked PyTorch backend that tests this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hilum.kernels.infonce_block import Block, BlockStats
from hilum.kernels.targets import HARD

LN2 = 0.6931471805599453
# Kernels work in base 2 (exp2/log2 are the hardware's): logits are scaled by log2(e) on the way in
# and log-sum-exps by ln(2) on the way out.
LOG2E_C: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2_C: tl.constexpr = tl.constexpr(LN2)


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of the kernels. Defaults: the fastest of the configurations
    benchmarks/infonce_kernels.py compared on an H200 at B=65536, D=512, bf16
    (benchmarks/RESULTS.md)."""

    fwd_bm: int = 128
    fwd_bn: int = 64
    fwd_bk: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    bwd_bm: int = 64
    bwd_bn: int = 64
    bwd_bk: int = 64
    bwd_bd: int = 256  # gradient columns one program accumulates (capped at next_pow2(D)); the
    # logits are recomputed once per D/bwd_bd slice, but a 64×512 fp32 accumulator spills
    bwd_warps: int = 4
    bwd_stages: int = 3
    bwd_dot16: bool = True  # 16-bit inputs: gradient products in fp16 (see ``backward``)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETED: tl.constexpr = tl.constexpr(_INTERPRETED)
# Small tiles keep the CPU interpreter fast enough for tests.
_INTERPRETER_CONFIG = TileConfig(32, 32, 32, 4, 1, 32, 32, 32, 64, 4, 1, True)


def default_config(dtype: torch.dtype, fp32_precision: str = "tf32x3") -> TileConfig:
    """Tiles measured on an H200 (benchmarks/RESULTS.md). Float32 operands take twice the shared
    memory per stage, and tf32x3 keeps three operand splits in flight, so they get smaller tiles
    (the larger ones do not fit the 227 KiB of shared memory)."""
    if _INTERPRETED:
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 and fp32_precision == "tf32x3":
        return TileConfig(fwd_bk=32, fwd_warps=8, fwd_stages=2, bwd_bk=32, bwd_bd=128, bwd_warps=8, bwd_stages=1)
    if dtype == torch.float32:
        return TileConfig(fwd_bn=128, fwd_warps=8, fwd_stages=2, bwd_bd=512, bwd_warps=8, bwd_stages=1)
    return TileConfig()


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b. Triton's CPU interpreter multiplies bf16 wrongly, so it gets float32 operands
    (holding the same bf16-rounded values)."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tile_dot(a_ptr, b_ptr, offs_a, offs_b, ma, mb, K, sa, sb, BA: tl.constexpr, BB: tl.constexpr,
              BK: tl.constexpr, PREC: tl.constexpr):
    """a[offs_a] @ b[offs_b]ᵀ over K in BK chunks, fp32 accumulation; masked rows read as 0."""
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + offs_a[:, None].to(tl.int64) * sa + offs_k[None, :],
                    mask=ma[:, None] & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_b[None, :].to(tl.int64) * sb + offs_k[:, None],
                    mask=mb[None, :] & (offs_k[:, None] < K), other=0.0)
        acc = _mma(a, b, acc, PREC)
    return acc


@triton.jit
def _target_weights(gi, gj, mi, mj, T0, T1, T2, st0, lam, n_vocab, K, L,
                    TMODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Unnormalised target weights W[gi, gj] for one tile (global indices), 0 outside the masks.

    TMODE 0: identity. 1: dense matrix T0 (row stride st0). 2: IMITATE correlation from unit
    centred embeddings T0 (B, K=E): 1 − exp(−lam · u_i·u_j), 1 on the diagonal. 3: MedFILIP label
    similarity: max over label pairs of the (V, V) table T0, labels T1 (N, K) and T2 (M, L).
    4: IMITATE's code form of mode 2: lam · max(u_i·u_j, 0), 1 on the diagonal.
    """
    valid = mi[:, None] & mj[None, :]
    if TMODE == 0:
        w = (gi[:, None] == gj[None, :]).to(tl.float32)
    elif TMODE == 1:
        w = tl.load(T0 + gi[:, None].to(tl.int64) * st0 + gj[None, :], mask=valid, other=0.0)
    elif TMODE == 2 or TMODE == 4:
        r = _tile_dot(T0, T0, gi, gj, mi, mj, K, st0, st0, BM, BN, BK, PREC)
        if TMODE == 2:
            w = 1.0 - tl.exp(-lam * r)
        else:
            w = lam * tl.maximum(r, 0.0)
        w = tl.where(gi[:, None] == gj[None, :], 1.0, w)
    else:
        w = tl.full((BM, BN), float("-inf"), tl.float32)
        for k in range(K):
            a = tl.load(T1 + gi * K + k, mask=mi, other=-1)
            for l in range(L):
                b = tl.load(T2 + gj * L + l, mask=mj, other=-1)
                ok = (a[:, None] >= 0) & (b[None, :] >= 0)
                v = tl.load(T0 + tl.maximum(a, 0)[:, None] * n_vocab + tl.maximum(b, 0)[None, :], mask=ok,
                            other=float("-inf"))
                w = tl.maximum(w, v)
        w = tl.maximum(w, 0.0)
    return tl.where(valid, w, 0.0)


@triton.jit
def _fwd_kernel(X, Y, SCALE, n, m, D, sx, sy, ro, co,
                T0, T1, T2, st0, lam, n_vocab, K, L, RN,
                ROW_LSE, ROW_WL, ROW_WS, CP_MAX, CP_SUM, CP_W, CP_WL,
                HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, TMODE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    g = tl.program_id(0)
    num_g = tl.num_programs(0)
    s2 = tl.load(SCALE).to(tl.float32) * LOG2E_C  # logits in base-2 units
    cp = g.to(tl.int64) * m  # this program's row of the column partials
    if HAS_COL:
        for j0 in range(0, m, BN):
            offs_j = j0 + tl.arange(0, BN)
            mj = offs_j < m
            tl.store(CP_MAX + cp + offs_j, tl.full((BN,), float("-inf"), tl.float32), mask=mj)
            tl.store(CP_SUM + cp + offs_j, tl.zeros((BN,), tl.float32), mask=mj)
            if TMODE != 0:
                tl.store(CP_W + cp + offs_j, tl.zeros((BN,), tl.float32), mask=mj)
                tl.store(CP_WL + cp + offs_j, tl.zeros((BN,), tl.float32), mask=mj)
    for rb in range(g, tl.cdiv(n, BM), num_g):
        offs_i = rb * BM + tl.arange(0, BM)
        mi = offs_i < n
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        wl_i = tl.zeros((BM,), tl.float32)
        ws_i = tl.zeros((BM,), tl.float32)
        if TMODE != 0 and HAS_COL:
            rn = tl.load(RN + offs_i, mask=mi, other=1.0)
        else:
            rn = tl.full((BM,), 1.0, tl.float32)
        for j0 in range(0, m, BN):
            offs_j = j0 + tl.arange(0, BN)
            mj = offs_j < m
            valid = mi[:, None] & mj[None, :]
            z = _tile_dot(X, Y, offs_i, offs_j, mi, mj, D, sx, sy, BM, BN, BK, PREC) * s2
            zm = tl.where(valid, z, float("-inf"))
            if TMODE != 0:  # hard targets need no tile: the host reads the diagonal logits
                w = _target_weights(ro + offs_i, co + offs_j, mi, mj, T0, T1, T2, st0, lam, n_vocab, K, L,
                                    TMODE, BM, BN, BK, PREC)
                wz = w * tl.where(valid, z, 0.0)
            if HAS_ROW:
                m_new = tl.maximum(m_i, tl.max(zm, 1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(zm - m_new[:, None]), 1)
                m_i = m_new
                if TMODE != 0:
                    wl_i += tl.sum(wz, 1)
                    ws_i += tl.sum(w, 1)
            if HAS_COL:
                c_max = tl.max(zm, 0)
                c_sum = tl.sum(tl.exp2(zm - c_max[None, :]), 0)
                p_max = tl.load(CP_MAX + cp + offs_j, mask=mj, other=0.0)
                p_sum = tl.load(CP_SUM + cp + offs_j, mask=mj, other=0.0)
                new_max = tl.maximum(p_max, c_max)
                p_sum = p_sum * tl.exp2(p_max - new_max) + c_sum * tl.exp2(c_max - new_max)
                tl.store(CP_MAX + cp + offs_j, new_max, mask=mj)
                tl.store(CP_SUM + cp + offs_j, p_sum, mask=mj)
                if TMODE != 0:
                    inv_r = 1.0 / rn
                    p_w = tl.load(CP_W + cp + offs_j, mask=mj, other=0.0)
                    p_wl = tl.load(CP_WL + cp + offs_j, mask=mj, other=0.0)
                    tl.store(CP_W + cp + offs_j, p_w + tl.sum(w * inv_r[:, None], 0), mask=mj)
                    tl.store(CP_WL + cp + offs_j, p_wl + tl.sum(wz * inv_r[:, None], 0), mask=mj)
        if HAS_ROW:
            tl.store(ROW_LSE + offs_i, (m_i + tl.log2(l_i)) * LN2_C, mask=mi)
            tl.store(ROW_WL + offs_i, wl_i * LN2_C, mask=mi)
            tl.store(ROW_WS + offs_i, ws_i, mask=mi)


@triton.jit
def _row_sums_kernel(n, m, ro, co, T0, T1, T2, st0, lam, n_vocab, K, L, OUT,
                     TMODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    offs_i = tl.program_id(0) * BM + tl.arange(0, BM)
    mi = offs_i < n
    acc = tl.zeros((BM,), tl.float32)
    for j0 in range(0, m, BN):
        offs_j = j0 + tl.arange(0, BN)
        w = _target_weights(ro + offs_i, co + offs_j, mi, offs_j < m, T0, T1, T2, st0, lam, n_vocab, K, L,
                            TMODE, BM, BN, BK, PREC)
        acc += tl.sum(w, 1)
    tl.store(OUT + offs_i, acc, mask=mi)


@triton.jit
def _softmax_grad(z, lse_r2, lse_c2, valid, row_coef, col_coef, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr):
    """The softmax part of ∂loss/∂logits for one tile; z are base-2 logits, lse_*2 base-2 LSEs."""
    if HAS_ROW:
        d = row_coef * tl.exp2(z - lse_r2[:, None])
        if HAS_COL:
            d += col_coef * tl.exp2(z - lse_c2[None, :])
    else:
        d = col_coef * tl.exp2(z - lse_c2[None, :])
    return tl.where(valid, d, 0.0)


@triton.jit
def _identity_coef(row_coef, col_coef, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr):
    if HAS_ROW:
        if HAS_COL:
            c = row_coef + col_coef
        else:
            c = row_coef
    else:
        c = col_coef
    return c


@triton.jit
def _target_grad(w, rn, cn, row_coef, col_coef, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr):
    """The target part of ∂loss/∂logits (to subtract) for soft targets."""
    t = w / rn[:, None]
    if HAS_ROW:
        g = row_coef * t
        if HAS_COL:
            g += col_coef * t / cn[None, :]
    else:
        g = col_coef * t / cn[None, :]
    return g


@triton.jit
def _grad_tile(X, Y, offs_i, offs_j, mi, mj, D, sx, sy, s2, ro, co,
               T0, T1, T2, st0, lam, n_vocab, K, L, RN, CN, LSE_R, LSE_C, row_coef, col_coef,
               HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, TMODE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """∂loss/∂logits for one (BM, BN) tile, recomputed from the features and forward statistics."""
    valid = mi[:, None] & mj[None, :]
    z = _tile_dot(X, Y, offs_i, offs_j, mi, mj, D, sx, sy, BM, BN, BK, PREC) * s2
    lse_r2 = tl.zeros((BM,), tl.float32)
    if HAS_ROW:
        lse_r2 = tl.load(LSE_R + offs_i, mask=mi, other=0.0) * LOG2E_C
    lse_c2 = tl.zeros((BN,), tl.float32)
    if HAS_COL:
        lse_c2 = tl.load(LSE_C + offs_j, mask=mj, other=0.0) * LOG2E_C
    d = _softmax_grad(z, lse_r2, lse_c2, valid, row_coef, col_coef, HAS_ROW, HAS_COL)
    if TMODE != 0:
        w = _target_weights(ro + offs_i, co + offs_j, mi, mj, T0, T1, T2, st0, lam, n_vocab, K, L,
                            TMODE, BM, BN, BK, PREC)
        rn = tl.load(RN + offs_i, mask=mi, other=1.0)
        if HAS_COL:
            cn = tl.load(CN + offs_j, mask=mj, other=1.0)
        else:
            cn = tl.full((BN,), 1.0, tl.float32)
        d -= _target_grad(w, rn, cn, row_coef, col_coef, HAS_ROW, HAS_COL)
    return d


@triton.jit
def _grad_mma(d, f, acc, PREC: tl.constexpr, DOT16: tl.constexpr):
    """acc + d @ f for the gradient products: fp16 operands for 16-bit inputs (see ``backward``)."""
    if DOT16:
        return _mma(d.to(tl.float16), f.to(tl.float16), acc, PREC)
    else:
        return _mma(d.to(f.dtype), f, acc, PREC)


@triton.jit
def _bwd_rows_kernel(X, Y, SCALE, GSCALE, n, m, D, sx, sy, ro, co,
                     T0, T1, T2, st0, lam, n_vocab, K, L, RN, CN, LSE_R, LSE_C, row_coef, col_coef,
                     DX, sdx, DLS,
                     HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, TMODE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                     DOT16: tl.constexpr):
    offs_i = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mi = offs_i < n
    md = offs_d < D
    s2 = tl.load(SCALE).to(tl.float32) * LOG2E_C
    acc = tl.zeros((BM, BD), tl.float32)
    for j0 in range(0, m, BN):
        offs_j = j0 + tl.arange(0, BN)
        mj = offs_j < m
        d = _grad_tile(X, Y, offs_i, offs_j, mi, mj, D, sx, sy, s2, ro, co, T0, T1, T2, st0, lam, n_vocab, K, L,
                       RN, CN, LSE_R, LSE_C, row_coef, col_coef, HAS_ROW, HAS_COL, TMODE, BM, BN, BK, PREC)
        y = tl.load(Y + offs_j[:, None].to(tl.int64) * sy + offs_d[None, :], mask=mj[:, None] & md[None, :], other=0.0)
        acc = _grad_mma(d, y, acc, PREC, DOT16)
    if TMODE == 0:  # identity targets: subtract (row_coef + col_coef) · y of each row's partner
        pj = ro + offs_i - co
        mp = mi & (pj >= 0) & (pj < m)
        yp = tl.load(Y + pj[:, None].to(tl.int64) * sy + offs_d[None, :], mask=mp[:, None] & md[None, :], other=0.0)
        acc -= _identity_coef(row_coef, col_coef, HAS_ROW, HAS_COL) * yp.to(tl.float32)
    x = tl.load(X + offs_i[:, None].to(tl.int64) * sx + offs_d[None, :], mask=mi[:, None] & md[None, :], other=0.0)
    tl.store(DLS + tl.program_id(1).to(tl.int64) * n + offs_i, tl.sum(x.to(tl.float32) * acc, 1), mask=mi)
    gs = tl.load(GSCALE)
    tl.store(DX + offs_i[:, None].to(tl.int64) * sdx + offs_d[None, :], (acc * gs).to(DX.dtype.element_ty),
             mask=mi[:, None] & md[None, :])


@triton.jit
def _bwd_cols_kernel(X, Y, SCALE, GSCALE, n, m, D, sx, sy, ro, co,
                     T0, T1, T2, st0, lam, n_vocab, K, L, RN, CN, LSE_R, LSE_C, row_coef, col_coef,
                     DY, sdy,
                     HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, TMODE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                     DOT16: tl.constexpr):
    offs_j = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mj = offs_j < m
    md = offs_d < D
    s2 = tl.load(SCALE).to(tl.float32) * LOG2E_C
    acc = tl.zeros((BN, BD), tl.float32)
    for i0 in range(0, n, BM):
        offs_i = i0 + tl.arange(0, BM)
        mi = offs_i < n
        d = _grad_tile(X, Y, offs_i, offs_j, mi, mj, D, sx, sy, s2, ro, co, T0, T1, T2, st0, lam, n_vocab, K, L,
                       RN, CN, LSE_R, LSE_C, row_coef, col_coef, HAS_ROW, HAS_COL, TMODE, BM, BN, BK, PREC)
        x = tl.load(X + offs_i[:, None].to(tl.int64) * sx + offs_d[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        acc = _grad_mma(tl.trans(d), x, acc, PREC, DOT16)
    if TMODE == 0:  # identity targets: subtract (row_coef + col_coef) · x of each column's partner
        pi = co + offs_j - ro
        mp = mj & (pi >= 0) & (pi < n)
        xp = tl.load(X + pi[:, None].to(tl.int64) * sx + offs_d[None, :], mask=mp[:, None] & md[None, :], other=0.0)
        acc -= _identity_coef(row_coef, col_coef, HAS_ROW, HAS_COL) * xp.to(tl.float32)
    gs = tl.load(GSCALE)
    tl.store(DY + offs_j[:, None].to(tl.int64) * sdy + offs_d[None, :], (acc * gs).to(DY.dtype.element_ty),
             mask=mj[:, None] & md[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def _precision(dtype: torch.dtype, fp32_precision: str) -> str | None:
    return fp32_precision if dtype == torch.float32 else None


def _targets(block: Block, dummy: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, float, int, int, int]:
    """Kernel arguments (mode, T0, T1, T2, st0, lam, vocab, K, L) for the block's targets."""
    if block.targets is None:
        return HARD, dummy, dummy, dummy, 0, 0.0, 0, 0, 0
    mode, tensors, scalar = block.targets.triton_args()
    tensors = tuple(t.to(block.x.device) for t in tensors)
    if mode == 1:  # dense
        return mode, tensors[0], dummy, dummy, tensors[0].stride(0), 0.0, 0, 0, 0
    if mode in (2, 4):  # correlation: K is the embedding width
        u = tensors[0]
        return mode, u, dummy, dummy, u.stride(0), float(scalar), 0, u.shape[1], 0
    sim, a, b = tensors  # labels
    return mode, sim, a, b, 0, 0.0, sim.shape[0], a.shape[1], b.shape[1]


def _num_programs(rows: int, bm: int, device: torch.device) -> int:
    blocks = triton.cdiv(rows, bm)
    if device.type != "cuda":
        return min(blocks, 4)
    return min(blocks, torch.cuda.get_device_properties(device).multi_processor_count)


def _check_inputs(block: Block) -> None:
    for name, t in (("image_features", block.x), ("text_features", block.y)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"the Triton InfoNCE takes fp32/fp16/bf16 {name}, got {t.dtype}; use impl='torch'")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def row_sums(block: Block, config: TileConfig | None = None, fp32_precision: str = "tf32x3") -> torch.Tensor:
    config = config or default_config(block.x.dtype, fp32_precision)
    n, m = block.x.shape[0], block.y.shape[0]
    dummy = torch.empty(1, device=block.x.device)
    mode, t0, t1, t2, st0, lam, v, k, l = _targets(block, dummy)
    out = torch.empty(n, dtype=torch.float32, device=block.x.device)
    _row_sums_kernel[(triton.cdiv(n, config.fwd_bm),)](
        n, m, block.row_offset, block.col_offset, t0, t1, t2, st0, lam, v, k, l, out,
        TMODE=mode, BM=config.fwd_bm, BN=config.fwd_bn, BK=config.fwd_bk,
        PREC=_precision(t0.dtype, fp32_precision), num_warps=config.fwd_warps,
    )
    return out


def forward(block: Block, config: TileConfig | None = None, fp32_precision: str = "tf32x3") -> BlockStats:
    _check_inputs(block)
    config = config or default_config(block.x.dtype, fp32_precision)
    x, y = block.x, block.y
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    dummy = torch.empty(1, **f32)
    mode, t0, t1, t2, st0, lam, v, k, l = _targets(block, dummy)
    grid = _num_programs(n, config.fwd_bm, dev)
    row = [torch.empty(n, **f32) for _ in range(3)] if block.has_row else [dummy] * 3
    # column partials: (max, sum) per program, plus the target sums for soft targets
    n_parts = (4 if block.soft else 2) if block.has_col else 0
    parts = [torch.empty((grid, m), **f32) for _ in range(n_parts)] + [dummy] * (4 - n_parts)
    rn = block.row_norm.float().contiguous() if block.row_norm is not None else dummy
    scale = block.scale.float().reshape(1)
    _fwd_kernel[(grid,)](
        x, y, scale, n, m, d, x.stride(0), y.stride(0), block.row_offset, block.col_offset,
        t0, t1, t2, st0, lam, v, k, l, rn, *row, *parts,
        HAS_ROW=block.has_row, HAS_COL=block.has_col, TMODE=mode,
        BM=config.fwd_bm, BN=config.fwd_bn, BK=config.fwd_bk, PREC=_precision(x.dtype, fp32_precision),
        num_warps=config.fwd_warps, num_stages=config.fwd_stages,
    )
    stats = BlockStats()
    if block.has_row:
        stats.row_lse, stats.row_wl, stats.row_ws = row
        if not block.soft:  # image i's text is text row_offset + i, a column of this block
            stats.row_wl = _diagonal_logits(x, y[block.row_offset - block.col_offset :][:n], block.scale)
    if block.has_col:
        p_max, p_sum, p_w, p_wl = parts
        top = p_max.max(0).values
        stats.col_lse = (top + torch.log2((p_sum * torch.exp2(p_max - top)).sum(0))) * LN2
        if block.soft:
            stats.col_w, stats.col_wl = p_w.sum(0), p_wl.sum(0) * LN2
        elif block.has_row and block.row_offset == block.col_offset and n == m:
            stats.col_wl = stats.row_wl  # identity targets: both directions share the diagonal logits
        else:  # text j's target is image col_offset + j, a row of this block
            stats.col_wl = _diagonal_logits(x[block.col_offset - block.row_offset :][:m], y, block.scale)
    return stats


def _diagonal_logits(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``scale · x_j · y_j`` in float32, a chunk at a time (bounded temporary memory)."""
    return torch.cat([(x[i : i + chunk].float() * y[i : i + chunk].float()).sum(1) for i in range(0, x.shape[0], chunk)]) * scale.float()


def backward(
    block: Block, stats: BlockStats, row_coef: float, col_coef: float, grad: torch.Tensor,
    config: TileConfig | None = None, fp32_precision: str = "tf32x3", which: str = "both",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``which`` ("rows" or "cols") runs one of the two kernels: for profiling only."""
    config = config or default_config(block.x.dtype, fp32_precision)
    x, y = block.x, block.y
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    dev = x.device
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    mode, t0, t1, t2, st0, lam, v, k, l = _targets(block, dummy)
    scale = block.scale.float().reshape(1)
    gscale = (scale * grad.float()).reshape(1)
    lse_r = stats.row_lse if block.has_row else dummy
    lse_c = stats.col_lse if block.has_col else dummy
    rn = block.row_norm.float().contiguous() if block.row_norm is not None else dummy
    cn = block.col_norm.float().contiguous() if block.col_norm is not None else dummy
    bd = min(config.bwd_bd, triton.next_power_of_2(d))
    splits = triton.cdiv(d, bd)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    dls = torch.empty((splits, n), dtype=torch.float32, device=dev)
    # ∂loss/∂logits is computed divided by the larger coefficient (so it lies in [-2, 2]) and
    # multiplied back in the epilogue: with 16-bit inputs the products ∂loss/∂logits · features
    # then run in fp16 — 3 more mantissa bits than bf16 at the same tensor-core speed (bf16
    # features are exact in fp16 within ±65504).
    norm = max(row_coef, col_coef)
    gscale = gscale * norm
    common = (scale, gscale, n, m, d, x.stride(0), y.stride(0), block.row_offset, block.col_offset,
              t0, t1, t2, st0, lam, v, k, l, rn, cn, lse_r, lse_c, float(row_coef / norm), float(col_coef / norm))
    meta = dict(HAS_ROW=block.has_row, HAS_COL=block.has_col, TMODE=mode, BM=config.bwd_bm, BN=config.bwd_bn,
                BK=config.bwd_bk, BD=bd, PREC=_precision(x.dtype, fp32_precision),
                DOT16=config.bwd_dot16 and x.dtype != torch.float32, num_warps=config.bwd_warps, num_stages=config.bwd_stages)
    if which in ("both", "rows"):
        _bwd_rows_kernel[(triton.cdiv(n, config.bwd_bm), splits)](x, y, *common, dx, dx.stride(0), dls, **meta)
    if which in ("both", "cols"):
        _bwd_cols_kernel[(triton.cdiv(m, config.bwd_bn), splits)](x, y, *common, dy, dy.stride(0), **meta)
    dscale = dls.sum() * gscale[0]
    return dx, dy, dscale
