#!/usr/bin/env python3
"""Parameter alignment under the DeepSpeed engine, and what it costs a linear layer with a bias.

cuBLAS needs 16-byte-aligned operands for its fast kernels; DeepSpeed's ZeRO-1/2 optimizers pack
each parameter group into one flat buffer, so a parameter's address depends on what precedes it.
This builds the ResNet-50 + BERT-base worker (bf16, ZeRO-2, one rank), counts the parameters off
a 16-byte boundary (0 since ``hilum.trainer.engine.param_groups`` groups them by size; 228 of 359
before, on 2026-11-26), and times BERT's 768→3072 layer over 65 536 tokens with the engine's own
parameters against aligned copies. Needs CUDA:

    python benchmarks/gpu/linear_alignment.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def milliseconds(call, repeats: int = 20) -> float:  # noqa: ANN001 - any callable
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / repeats * 1e3, 3)


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29781", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    import torch.nn.functional as F

    from benchmarks.gradcache import RESNET50_BERT, overlay
    from hilum.launch.config import build_config, parse_yaml
    from hilum.trainer.loop import build_worker

    data = ROOT / "data" / "phantom-bench"  # small; not the demo's data/phantom, which `make demo` would reuse
    if not (data / "tokenizer").exists():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(str(data), n_train=256, n_test=64, size=64, seed=0, samples_per_shard=64)
    raw = overlay(parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text()), RESNET50_BERT)
    raw["model"]["text"]["tokenizer"] = str(data / "tokenizer")
    raw["data"]["batch_size"] = 512
    raw["monitoring"] = {"enabled": False}
    raw["run"]["output_dir"] = "/tmp/hilum-bench"
    w = build_worker(build_config(raw))

    params = list(w.engine.module.named_parameters())
    off = [(name, p.data_ptr() % 16, p.numel()) for name, p in params if p.data_ptr() % 16]
    print(f"{len(off)} of {len(params)} parameters not 16-byte aligned; first: {off[:6]}")
    layer = w.engine.module.text_tower.encoder.encoder.layer[0].intermediate.dense
    x = torch.randn(512 * 128, 768, device="cuda", dtype=torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    print("weight ptr%16", layer.weight.data_ptr() % 16, "bias ptr%16", layer.bias.data_ptr() % 16)
    print("linear ms: engine params", milliseconds(lambda: F.linear(x, layer.weight, layer.bias)),
          "| aligned copies", milliseconds(lambda: F.linear(x, weight, bias)),
          "| engine weight + aligned bias", milliseconds(lambda: F.linear(x, layer.weight, bias)),
          "| no bias", milliseconds(lambda: F.linear(x, layer.weight)))


if __name__ == "__main__":
    main()
