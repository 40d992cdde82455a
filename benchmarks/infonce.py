#!/usr/bin/env python3
"""InfoNCE forward+backward on one GPU: hilum's fused kernel against open_clip and Inf-CL.

Measures, in one process so the ratios are honest:

* time (median CUDA-event time of forward+backward, the anchors' protocol) and peak memory
  above the inputs, for B = 8K … 262K, D = 512, bf16 and fp32 features;
* hilum with soft targets (IMITATE report correlation, MedFILIP label similarity) next to hard;
* each implementation's error against a float64 reference at B = 8K (loss, and relative
  gradient error);
* optionally (``--sweep``) a few tile configurations of the fused kernel.

The anchors' timing function comes from ../shared/anchors/bench_anchors.py (pass its folder
with ``--anchors``); open_clip and Inf-CL must be importable. One JSON line per measurement on
stdout (and appended to ``--out``). Needs a CUDA device.

    python benchmarks/infonce.py --anchors .anchors --out results.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hilum.kernels.infonce import infonce_loss  # noqa: E402
from hilum.kernels.infonce_triton import TileConfig, default_config  # noqa: E402
from hilum.kernels.targets import LabelSimilarityTargets, ReportCorrelationTargets

LOG_SCALE = math.log(1 / 0.07)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
OUT: Path | None = None
DEVICE = "cuda"
TILES: TileConfig | None = None  # bf16/fp16 tiles for the hilum runs; None = default_config
DEADLINE = math.inf  # perf_counter() after which measurements are skipped (--budget-s)


def emit(**kw) -> None:
    line = json.dumps(kw)
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def timed(fn, reps: int = 5, warm: int = 2) -> float:
    """Median milliseconds over ``reps`` (the anchors' protocol; replaced by theirs with --anchors)."""
    for _ in range(warm):
        fn()
    if DEVICE == "cpu":  # smoke runs (TRITON_INTERPRET=1): wall time
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def features(b: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    img = F.normalize(torch.randn(b, d, device=DEVICE, generator=g), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=DEVICE, generator=g), dim=-1).to(dtype).requires_grad_()
    return img, txt


def make_targets(kind: str, b: int, dtype: torch.dtype, emb_dim: int = 512, seed: int = 1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if kind == "hard":
        return None
    if kind == "correlation":
        emb = torch.randn(b, emb_dim, device=DEVICE, generator=g) + torch.randn(1, emb_dim, device=DEVICE, generator=g)
        return ReportCorrelationTargets(emb.to(dtype))
    if kind == "labels":  # MedFILIP-style: up to 3 findings per report from a 64-label vocabulary
        vocab = torch.randn(64, 384, device=DEVICE, generator=g)
        labels = torch.randint(-1, 64, (b, 3), device=DEVICE, generator=g)
        labels[:, 0] = labels[:, 0].clamp_min(0)
        return LabelSimilarityTargets.from_label_embeddings(vocab, labels)
    raise ValueError(kind)


def loss_fn(impl: str, targets=None, config: TileConfig | None = None, precision: str = "tf32x3"):
    """A callable (img, txt, log_scale) -> loss for each implementation."""
    if impl == "hilum":
        def f(a, b, s):
            tiles = config or (TILES if a.dtype != torch.float32 else None)
            return infonce_loss(a, b, s, targets, impl="triton", tile_config=tiles, fp32_precision=precision)

        return f
    if impl == "hilum-torch":
        return lambda a, b, s: infonce_loss(a, b, s, targets, impl="torch", chunk_size=4096)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda a, b, s: loss(a, b, s.exp())
    if impl == "inf_cl":
        from inf_cl import cal_flash_loss

        return lambda a, b, s: 0.5 * (cal_flash_loss(a, b, scale=s.exp()).mean() + cal_flash_loss(b, a, scale=s.exp()).mean())
    raise ValueError(impl)


def bench(impl: str, b: int, d: int, dtype_name: str, kind: str = "hard", reps: int = 5, warm: int = 1,
          config: TileConfig | None = None, precision: str = "tf32x3", tag: str | None = None) -> None:
    dtype = DTYPES[dtype_name]
    row = dict(what="loss", impl=impl, B=b, D=d, dtype=dtype_name, targets=kind)
    if tag:
        row["tag"] = tag
    if impl == "hilum" and dtype == torch.float32:
        row["fp32_precision"] = precision
    if time.perf_counter() > DEADLINE:
        emit(**row, skipped="time budget")
        return
    sync()
    img, txt = features(b, d, dtype)
    targets = make_targets(kind, b, dtype)
    scale = torch.tensor(LOG_SCALE, device=DEVICE, requires_grad=True)

    def step():
        img.grad = txt.grad = scale.grad = None
        loss = f(img, txt, scale)
        loss.backward()
        return loss

    sync()
    base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        f = loss_fn(impl, targets, config, precision)
        t0 = time.perf_counter()
        loss = step()
        sync()
        first_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if DEVICE == "cuda" else float("nan")
        ms = timed(step, reps=reps, warm=warm)
        emit(**row, loss=float(loss), ms=ms, peak_extra_MiB=peak / 2**20, first_call_s=first_s)
    except torch.OutOfMemoryError:
        emit(**row, oom=True)
    except Exception as e:  # keep measuring the rest; the line says what failed
        emit(**row, error=f"{type(e).__name__}: {str(e)[:300]}")
    del img, txt, targets
    sync()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def errors(b: int, d: int, impls: list[str], dtypes: list[str], kinds: list[str]) -> None:
    """Loss and gradient error of each implementation against float64 on the same rounded inputs."""
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for kind in kinds if dtype != torch.float32 else ["hard"]:
            if time.perf_counter() > DEADLINE:
                emit(what="error", dtype=dtype_name, targets=kind, skipped="time budget")
                continue
            img, txt = features(b, d, dtype, seed=3)
            targets = make_targets(kind, b, dtype, seed=4)
            ref_a = img.detach().double().requires_grad_()
            ref_b = txt.detach().double().requires_grad_()
            ref_s = torch.tensor(LOG_SCALE, dtype=torch.float64, device=DEVICE, requires_grad=True)
            ref = infonce_loss(ref_a, ref_b, ref_s, targets, impl="torch", chunk_size=2048)
            ref.backward()
            for impl in impls:
                if kind != "hard" and (impl not in ("hilum", "hilum-torch") or dtype == torch.float32):
                    continue  # soft targets: only hilum has them; float32 soft kernels cost long compiles
                precisions = ["tf32x3", "tf32"] if impl == "hilum" and dtype == torch.float32 else ["tf32x3"]
                for precision in precisions:
                    a = img.detach().clone().requires_grad_()
                    bb = txt.detach().clone().requires_grad_()
                    s = torch.tensor(LOG_SCALE, device=DEVICE, requires_grad=True)
                    row = dict(what="error", impl=impl, B=b, D=d, dtype=dtype_name, targets=kind)
                    if impl == "hilum" and dtype == torch.float32:
                        row["fp32_precision"] = precision
                    try:
                        loss = loss_fn(impl, targets, None, precision)(a, bb, s)
                        loss.backward()
                        rel = lambda g, r: float((g.double() - r).norm() / r.norm())  # noqa: E731
                        emit(**row, loss=float(loss), ref=float(ref), loss_rel_err=abs(float(loss) - float(ref)) / abs(float(ref)),
                             grad_img_rel_err=rel(a.grad, ref_a.grad), grad_txt_rel_err=rel(bb.grad, ref_b.grad),
                             grad_scale_rel_err=abs(float(s.grad) - float(ref_s.grad)) / abs(float(ref_s.grad)))
                    except Exception as e:
                        emit(**row, error=f"{type(e).__name__}: {str(e)[:300]}")


SWEEP = {
    "default": TileConfig(),
    "bwd_bd256": TileConfig(bwd_bd=256),
    "bwd_128x64_bd256": TileConfig(bwd_bm=128, bwd_bn=64, bwd_bd=256),
    "fwd_128x64_w4_bwd_s3": TileConfig(fwd_bn=64, fwd_warps=4, fwd_stages=4, bwd_stages=3),
}


def main() -> None:
    global OUT, DEVICE, DEADLINE, timed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="error,loss,soft", help="comma list of: sweep, error, loss, soft")
    p.add_argument("--sizes", default="8192,32768,65536,131072,262144")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--anchor-max", type=int, default=65536, help="largest B for open_clip / Inf-CL (they are slow or OOM beyond)")
    p.add_argument("--anchors", help="folder with bench_anchors.py: use its timing function")
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--sweep-size", type=int, default=65536)
    p.add_argument("--out", type=Path)
    p.add_argument("--tiles", type=Path, help="JSON of TileConfig fields for bf16/fp16 runs (benchmarks/infonce_kernels.py --pick)")
    p.add_argument("--budget-s", type=float, default=math.inf, help="skip measurements after this many seconds")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    args = p.parse_args()
    OUT, DEVICE = args.out, args.device
    DEADLINE = time.perf_counter() + args.budget_s
    if args.anchors:
        sys.path.insert(0, args.anchors)
        import bench_anchors

        timed = bench_anchors.timed  # noqa: F811 - the very same protocol as the anchors' numbers
    global TILES
    if args.tiles and args.tiles.exists():
        TILES = TileConfig(**json.loads(args.tiles.read_text()))
        emit(what="tiles", **dataclasses.asdict(TILES))
    what = args.what.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    anchors = [] if args.no_anchors else ["open_clip", "inf_cl"]
    emit(what="env", gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
         triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"))
    if "sweep" in what:
        for name, cfg in SWEEP.items():
            bench("hilum", args.sweep_size, args.dim, "bf16", config=cfg, tag=f"sweep:{name}")
    if "error" in what:
        errors(8192 if DEVICE == "cuda" else 100, args.dim, ["hilum", "hilum-torch", *anchors], dtypes, ["hard", "correlation", "labels"])
    if "loss" in what:
        for b in sizes:
            for dtype in dtypes:
                if dtype == "fp32" and b > args.anchor_max:
                    bench("hilum", b, args.dim, dtype, precision="tf32", reps=3)  # tf32x3: ~4x slower
                    continue
                bench("hilum", b, args.dim, dtype, reps=5 if b <= 131072 else 3)
                if dtype == "fp32":
                    bench("hilum", b, args.dim, dtype, precision="tf32", reps=5 if b <= 131072 else 3)
                for impl in anchors:
                    if b <= args.anchor_max:
                        bench(impl, b, args.dim, dtype)
    if "soft" in what:
        for b in [s for s in sizes if s in (65536, 262144)] or sizes[:1]:
            for kind in ("hard", "correlation", "labels"):  # hard again: the ratio from adjacent runs
                if kind == "labels" and b > 65536:
                    continue  # 9 table lookups per logit: slow at 262K, measured at 65K
                bench("hilum", b, args.dim, "bf16", kind=kind, reps=5 if b <= 131072 else 3, tag="soft")
    if "config" in what:
        emit(what="config", bf16=dataclasses.asdict(default_config(torch.bfloat16)),
             fp32_tf32x3=dataclasses.asdict(default_config(torch.float32)),
             fp32_tf32=dataclasses.asdict(default_config(torch.float32, "tf32")))


if __name__ == "__main__":
    main()
