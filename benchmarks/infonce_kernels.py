#!/usr/bin/env python3
"""Per-kernel timings of the fused InfoNCE (forward, row-parallel and column-parallel backward)
for several tile configurations: where the time goes, and which tiles to make the default.

    python benchmarks/infonce_kernels.py --B 65536 --out kernels.jsonl

One JSON line per (kernel, configuration) with milliseconds and achieved TFLOP/s counting the
matrix products each kernel performs (forward 1, each backward kernel 2 products of 2·B²·D).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import infonce as bench  # noqa: E402  - its timing protocol and JSON-lines output
from infonce import emit, timed  # noqa: E402

from hilum.kernels import infonce_triton as tri  # noqa: E402
from hilum.kernels.infonce import make_backend, solve_block  # noqa: E402
from hilum.kernels.infonce_block import Block  # noqa: E402

FWD = {
    "f128x128k64w8s3": dict(fwd_bm=128, fwd_bn=128, fwd_bk=64, fwd_warps=8, fwd_stages=3),
    "f128x64k64w4s4": dict(fwd_bm=128, fwd_bn=64, fwd_bk=64, fwd_warps=4, fwd_stages=4),
    "f128x128k64w8s4": dict(fwd_bm=128, fwd_bn=128, fwd_bk=64, fwd_warps=8, fwd_stages=4),
    "f64x128k64w4s3": dict(fwd_bm=64, fwd_bn=128, fwd_bk=64, fwd_warps=4, fwd_stages=3),
    "f128x256k64w8s3": dict(fwd_bm=128, fwd_bn=256, fwd_bk=64, fwd_warps=8, fwd_stages=3),
    "f128x128k128w8s2": dict(fwd_bm=128, fwd_bn=128, fwd_bk=128, fwd_warps=8, fwd_stages=2),
    "f64x128k128w4s2": dict(fwd_bm=64, fwd_bn=128, fwd_bk=128, fwd_warps=4, fwd_stages=2),
    "f128x64k64w4s3": dict(fwd_bm=128, fwd_bn=64, fwd_bk=64, fwd_warps=4, fwd_stages=3),
}
BWD = {
    "b64x64d512w8s2": dict(bwd_bm=64, bwd_bn=64, bwd_bd=512, bwd_warps=8, bwd_stages=2),
    "b64x64d512w8s2-bf16dot": dict(bwd_bm=64, bwd_bn=64, bwd_bd=512, bwd_warps=8, bwd_stages=2, bwd_dot16=False),
    "b128x128d256w8s2": dict(bwd_bm=128, bwd_bn=128, bwd_bd=256, bwd_warps=8, bwd_stages=2),
    "b128x64d256w8s2": dict(bwd_bm=128, bwd_bn=64, bwd_bd=256, bwd_warps=8, bwd_stages=2),
    "b64x128d256w8s2": dict(bwd_bm=64, bwd_bn=128, bwd_bd=256, bwd_warps=8, bwd_stages=2),
    "b64x64d256w4s3": dict(bwd_bm=64, bwd_bn=64, bwd_bd=256, bwd_warps=4, bwd_stages=3),
    "b128x64d128w8s3": dict(bwd_bm=128, bwd_bn=64, bwd_bd=128, bwd_warps=8, bwd_stages=3),
    "b64x64d256k128w4s2": dict(bwd_bm=64, bwd_bn=64, bwd_bk=128, bwd_bd=256, bwd_warps=4, bwd_stages=2),
}


FWD_FP32 = {
    "f128x64k32w8s2": dict(fwd_bm=128, fwd_bn=64, fwd_bk=32, fwd_warps=8, fwd_stages=2),
    "f64x64k32w4s2": dict(fwd_bm=64, fwd_bn=64, fwd_bk=32, fwd_warps=4, fwd_stages=2),
}
BWD_FP32 = {
    "b64x64d128k32w8s1": dict(bwd_bm=64, bwd_bn=64, bwd_bk=32, bwd_bd=128, bwd_warps=8, bwd_stages=1),
    "b64x64d256k32w8s1": dict(bwd_bm=64, bwd_bn=64, bwd_bk=32, bwd_bd=256, bwd_warps=8, bwd_stages=1),
}
FWD.update(FWD_FP32)
BWD.update(BWD_FP32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--B", type=int, default=65536)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--precision", default="tf32x3")
    p.add_argument("--out", type=Path)
    p.add_argument("--fwd", default=",".join(FWD))
    p.add_argument("--bwd", default=",".join(BWD))
    p.add_argument("--pick", type=Path, help="write the fastest forward and backward tiles here (JSON)")
    args = p.parse_args()
    bench.OUT = args.out
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    b, d = args.B, args.D
    x = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype)
    y = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype)
    scale = torch.tensor(1 / 0.07, device="cuda")
    block = Block(x, y, scale, 0, 0, True, True, None)
    stats = solve_block(make_backend("triton"), block)
    flop = 2 * b * b * d
    grad = torch.ones((), device="cuda")
    base = dataclasses.asdict(tri.default_config(dtype, args.precision))
    best_fwd: tuple[float, str] = (float("inf"), "")
    best_bwd: dict[str, float] = {}
    for name in args.fwd.split(","):
        cfg = tri.TileConfig(**{**base, **FWD[name]})
        try:
            t0 = time.perf_counter()
            tri.forward(block, cfg, args.precision)
            torch.cuda.synchronize()
            ms = timed(lambda: tri.forward(block, cfg, args.precision))
            emit(kernel="forward", config=name, B=b, D=d, dtype=args.dtype, ms=ms, tflops=flop / ms / 1e9,
                 compile_s=time.perf_counter() - t0)
            best_fwd = min(best_fwd, (ms, name))
        except Exception as e:
            emit(kernel="forward", config=name, error=f"{type(e).__name__}: {str(e)[:200]}")
    for name in args.bwd.split(","):
        cfg = tri.TileConfig(**{**base, **BWD[name]})
        for which in ("rows", "cols"):
            try:
                t0 = time.perf_counter()
                tri.backward(block, stats, 0.5 / b, 0.5 / b, grad, cfg, args.precision, which)
                torch.cuda.synchronize()
                ms = timed(lambda: tri.backward(block, stats, 0.5 / b, 0.5 / b, grad, cfg, args.precision, which))
                emit(kernel=f"backward_{which}", config=name, B=b, D=d, dtype=args.dtype, ms=ms,
                     tflops=2 * flop / ms / 1e9, compile_s=time.perf_counter() - t0)
                best_bwd[name] = best_bwd.get(name, 0.0) + ms
            except Exception as e:
                emit(kernel=f"backward_{which}", config=name, error=f"{type(e).__name__}: {str(e)[:200]}")
    emit(kernel="peak", GiB=torch.cuda.max_memory_allocated() / 2**30)
    if args.pick and best_fwd[1] and best_bwd:
        bwd = min(best_bwd, key=best_bwd.get)
        tiles = {**base, **FWD[best_fwd[1]], **BWD[bwd]}
        emit(kernel="pick", forward=best_fwd[1], backward=bwd, tiles=tiles)
        args.pick.write_text(json.dumps(tiles))


if __name__ == "__main__":
    main()
