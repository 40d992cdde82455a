"""Communication per step, predicted weak scaling, and a check of the byte model on CPU ranks.

    python benchmarks/scaling.py predict                 # the README's table: ResNet-50 + BERT-base on A100s
    python benchmarks/scaling.py measure --ranks 2 4     # bytes each rank sends per step, measured vs the model

The byte model counts what each rank sends per step with bandwidth-optimal (ring) collectives,
for a model of Ψ trainable parameters, b samples per rank, embedding width d, N ranks, p bytes
per value (2 in bf16, 4 in fp32), and the collectives DeepSpeed 0.19 actually issues (checked by
``measure``):

* ZeRO-0: the gradients all-reduced: 2·(N−1)/N·Ψ·p;
* ZeRO-1/2: the gradient buckets all-reduced (DeepSpeed's default ``use_multi_rank_bucket_allreduce``;
  a reduce-scatter would send half), then the updated partitions all-gathered: 3·(N−1)/N·Ψ·p;
* ZeRO-3: gradients reduce-scattered, parameters above the persistence threshold (Ψ_g of them)
  gathered for the forward and again for the backward, the persistent rest all-gathered after
  the step: (N−1)/N·(2Ψ + Ψ_g)·p;
* contrastive loss, per tower: the features all-gathered, (N−1)·b·d·p bytes (features stay in the
  training dtype), and their gradient all-reduced on the way back, 2·(N−1)·b·d·p
  (hilum.trainer.distributed.gather_with_grad: one all-reduce works on every backend, where a
  reduce-scatter would send half as much).

Under GradCache (``--chunks C``: C chunks per rank's batch; DeepSpeed accumulates C micro-steps)
ZeRO-0 and ZeRO-1 still reduce the gradients once per step, but ZeRO-2 partitions gradients and so
reduces every chunk's as it is produced: (2C + 1)·(N−1)/N·Ψ·p. Gradients travel in the training
dtype even where hilum sums them in fp32. ZeRO-3 under GradCache is measured, not modelled.

``measure`` runs the real training step on N CPU ranks (gloo) with every torch.distributed
collective wrapped to count those bytes, and prints measured against predicted per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bytes_per_step(psi: int, b: int, d: int, n: int, stage: int, p: int = 2, towers: int = 2,
                   gathered: int | None = None, chunks: int = 1) -> dict[str, float]:
    """Bytes one rank sends per step (see the module docstring); ``gathered``: Ψ_g for ZeRO-3;
    ``chunks``: GradCache chunks per rank's batch (1: a plain step)."""
    share = (n - 1) / n
    if stage == 3:
        if chunks > 1:
            raise ValueError("ZeRO-3 under GradCache is not modelled (measure it: `scaling.py measure --stage 3 --chunks C`)")
        params = share * (2 * psi + (psi if gathered is None else gathered)) * p
    elif stage == 2:  # gradients reduced at every chunk's backward, updated partitions gathered once
        params = share * (2 * chunks + 1) * psi * p
    elif stage == 1:  # gradients reduced once per step, whatever the number of chunks
        params = 3 * share * psi * p
    else:
        params = 2 * share * psi * p
    contrastive = towers * 3 * (n - 1) * b * d * p  # features in the training dtype
    return {"params": params, "contrastive": contrastive, "total": params + contrastive}


# ---------------------------------------------------------------------------------------------
# Prediction for a cluster.

# Assumptions, stated in the README: A100-SXM 80GB nodes of 8 (DGX A100 class), NVLink within a
# node, 8x HDR InfiniBand 200 Gb/s per node (one NIC per GPU). Collectives that cross nodes run at
# the per-GPU NIC's bandwidth; 80 % of line rate is what NCCL's all-reduce bus bandwidth reaches.
INTRA_NODE_GBPS = 200.0  # NCCL bus bandwidth over NVLink 3 on A100, GB/s
INTER_NODE_GBPS = 0.8 * 200 / 8  # 20 GB/s per GPU over HDR InfiniBand
GPUS_PER_NODE = 8
A100_BF16_TFLOPS = 312.0


def predict(psi: int, gathered: int, b: int, d: int, stage: int, step_s: float, gpus: list[int],
            overlap: float, chunks: int = 1) -> list[dict[str, float]]:
    """Step time and weak-scaling efficiency at each size. ``step_s``: one GPU's step at batch ``b``;
    ``overlap``: the share of the gradient reduce-scatter hidden behind the backward (DeepSpeed's
    overlap_comm); parameter all-gathers and the contrastive collectives are counted as exposed."""
    rows = []
    for n in gpus:
        comm = bytes_per_step(psi, b, d, n, stage, gathered=gathered, chunks=chunks)
        bandwidth = (INTRA_NODE_GBPS if n <= GPUS_PER_NODE else INTER_NODE_GBPS) * 1e9
        reductions = chunks if stage == 2 else 1  # ZeRO-2 reduces every GradCache chunk's gradients
        grads = (1.0 if stage == 3 else 2.0) * reductions * (n - 1) / n * psi * 2  # the gradient reduction's share
        exposed = (comm["params"] - overlap * grads + comm["contrastive"]) / bandwidth
        # The loss over the global batch: b x (n·b) logits, forward and backward (3 matmuls of 2·b·n·b·d),
        # for both directions' shared matrix, at 40 % of peak; one GPU already pays for b x b.
        loss = 3 * 2 * b * (n - 1) * b * d / (0.4 * A100_BF16_TFLOPS * 1e12)
        total = step_s + exposed + loss
        rows.append({"gpus": n, "bytes_per_rank_MB": comm["total"] / 1e6, "params_MB": comm["params"] / 1e6,
                     "contrastive_MB": comm["contrastive"] / 1e6, "comm_s": exposed, "loss_extra_s": loss,
                     "step_s": total, "efficiency": step_s / total})
    return rows


PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


def gathered_parameters(params) -> int:
    """Ψ_g: trainable parameters that ZeRO-3 partitions and gathers at every use."""
    return sum(n for n in params if n > PERSISTENCE_THRESHOLD)


def resnet50_bert_parameters() -> tuple[int, int]:
    """(Ψ, Ψ_g) of hilum's ResNet-50 + BERT-base dual encoder (built on the meta device)."""
    import torch

    from benchmarks.gradcache import RESNET50_BERT, overlay
    from hilum.launch.config import build_config, parse_yaml
    from hilum.trainer.models.dual_encoder import build_model

    raw = overlay(parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text()), RESNET50_BERT)
    cfg = build_config(raw)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.in_chans, 30522)  # BERT-base's vocabulary
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(sizes), gathered_parameters(sizes)


def cmd_predict(args: argparse.Namespace) -> None:
    psi, gathered = resnet50_bert_parameters()
    print(f"ResNet-50 + BERT-base: {psi / 1e6:.1f} M trainable parameters ({gathered / 1e6:.1f} M above ZeRO-3's "
          f"persistence threshold); b={args.batch}/GPU, d={args.dim}, "
          f"one GPU's step {args.step_s:.2f}s")
    if args.chunks > 1:
        print(f"GradCache: {args.batch} samples per GPU in {args.chunks} chunks")
    for stage in args.stages:
        if stage == 3 and args.chunks > 1:
            print("\nZeRO-3: not modelled under GradCache (measure it)")
            continue
        print(f"\nZeRO-{stage}")
        print(f"{'GPUs':>5} {'MB/rank/step':>13} {'params':>8} {'contrastive':>12} {'comm s':>8} {'loss s':>8} {'step s':>8} {'efficiency':>10}")
        for r in predict(psi, gathered, args.batch, args.dim, stage, args.step_s, args.gpus, args.overlap, args.chunks):
            print(f"{r['gpus']:>5} {r['bytes_per_rank_MB']:>13.0f} {r['params_MB']:>8.0f} {r['contrastive_MB']:>12.0f} "
                  f"{r['comm_s']:>8.3f} {r['loss_extra_s']:>8.4f} {r['step_s']:>8.3f} {100 * r['efficiency']:>9.1f}%")


# ---------------------------------------------------------------------------------------------
# Measurement on CPU ranks.

SENT = {"bytes": 0.0}


def _count_collectives() -> None:
    """Wrap torch.distributed's collectives to add up what a ring algorithm sends from this rank."""
    import torch.distributed as dist

    def nbytes(t):
        return t.numel() * t.element_size()

    def wrap(name, sent):
        original = getattr(dist, name)

        def counted(*a, **k):
            n = dist.get_world_size(k.get("group"))
            SENT["bytes"] += sent(n, *a, **k)
            return original(*a, **k)

        setattr(dist, name, counted)

    first = lambda a, k, key: a[0] if a else k[key]  # noqa: E731
    second = lambda a, k, key: a[1] if len(a) > 1 else k[key]  # noqa: E731
    wrap("all_reduce", lambda n, *a, **k: 2 * (n - 1) / n * nbytes(first(a, k, "tensor")))
    wrap("all_gather", lambda n, *a, **k: (n - 1) * nbytes(second(a, k, "tensor")))
    wrap("all_gather_into_tensor", lambda n, *a, **k: (n - 1) / n * nbytes(first(a, k, "output_tensor")))
    wrap("reduce_scatter_tensor", lambda n, *a, **k: (n - 1) / n * nbytes(second(a, k, "input")))
    wrap("reduce", lambda n, *a, **k: (n - 1) / n * nbytes(first(a, k, "tensor")))
    wrap("broadcast", lambda n, *a, **k: (n - 1) / n * nbytes(first(a, k, "tensor")))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch

    _count_collectives()
    from hilum.launch.config import build_config, parse_yaml
    from hilum.trainer.loop import build_worker, train_step

    raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
    raw["model"]["text"]["tokenizer"] = str(Path(args.data) / "tokenizer")
    raw["data"]["batch_size"] = args.batch
    raw["train"]["zero_stage"] = args.stage
    raw["train"]["precision"] = args.precision
    if args.chunks > 1:
        raw["gradcache"] = {"enabled": True, "chunk_size": -(-args.batch // args.chunks)}
    raw["monitoring"] = {"enabled": False}
    raw["cluster"]["cpus_per_worker"] = max(1, (os.cpu_count() or 1) // world)
    raw["run"]["output_dir"] = "/tmp/hilum-bench"
    cfg = build_config(raw)
    w = build_worker(cfg)
    d = cfg.data
    g = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(args.batch, d.in_chans, d.image_size, d.image_size, generator=g),
             "input_ids": torch.randint(5, len(w.tokenize.tokenizer), (args.batch, d.context_length), generator=g),
             "attention_mask": torch.ones(args.batch, d.context_length, dtype=torch.long)}
    train_step(w, batch)  # warm-up: one-time collectives (parameter broadcast, optimizer state)
    SENT["bytes"] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(w, batch)
    seconds = (time.perf_counter() - t0) / args.steps
    if rank == 0:
        sizes = [getattr(p, "ds_numel", p.numel()) for p in w.engine.module.parameters() if p.requires_grad]
        psi = sum(sizes)
        predicted = bytes_per_step(psi, args.batch, cfg.model.embed_dim, world, args.stage, p=w.dtype.itemsize,
                                   gathered=gathered_parameters(sizes), chunks=args.chunks)
        out.write_text(json.dumps({"ranks": world, "stage": args.stage, "parameters": psi, "batch_per_rank": args.batch,
                                   "precision": str(w.dtype).split(".")[-1], "gradcache_chunks": args.chunks,
                                   "measured_bytes": SENT["bytes"] / args.steps, "predicted_bytes": predicted["total"],
                                   "step_s": seconds}))


def cmd_measure(args: argparse.Namespace) -> None:
    import tempfile

    import torch.multiprocessing as mp

    from hilum.cluster.local import free_port

    if not (Path(args.data) / "tokenizer").is_dir():
        from hilum.trainer.data.phantom_dataset import build_phantom_dataset

        build_phantom_dataset(args.data, n_train=64, n_test=16, size=64, seed=0, samples_per_shard=64)
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            mp.start_processes(_rank, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
            result = json.loads(out.read_text())
        result["measured_over_predicted"] = result["measured_bytes"] / result["predicted_bytes"]
        result["date"] = time.strftime("%Y-%m-%d")
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--batch", type=int, default=512, help="samples per GPU")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--step-s", type=float, default=0.79,
                   help="one A100's step at --batch (default: hilum's measured H200 step, 0.361 s, x 2.2, A100/H100 for this mix)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--overlap", type=float, default=0.0, help="share of the gradient reduce-scatter hidden by the backward")
    p.add_argument("--chunks", type=int, default=1, help="GradCache chunks per GPU's batch (--step-s: one GPU's GradCache step)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("measure")
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", type=int, default=1, help="GradCache chunks per rank's batch (1: a plain step)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--data", default="/tmp/hilum-bench-data/scaling")
    p.add_argument("--out", help="append results (JSON lines) here")
    p.set_defaults(func=cmd_measure)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
