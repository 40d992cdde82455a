"""GradCache under DeepSpeed ZeRO 0, 2 and 3 on 2 gloo workers: one gradient-cached step gives
the gradients of one plain step over the same global batch (with a frozen text tower, for the
clip + cicl objective: soft targets over the global batch)."""

from __future__ import annotations

import os
import pytest
import torch
import torch.multiprocessing as mp

from hilum.cluster.local import free_port
from hilum.trainer.gradcache import RngState, chunk_slices
from tests.conftest import tiny_config

PER_RANK, CHUNK = 8, 3  # chunks of 3, 3, 2: the chunk does not divide the batch


def test_chunk_slices_cover_the_batch_once():
    assert chunk_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert chunk_slices(4, 4) == [slice(0, 4)]
    assert chunk_slices(5, 8) == [slice(0, 5)]


def test_rng_state_replays_dropout():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(64)
    state = RngState.capture(torch.device("cpu"))
    first = drop(x)
    assert not torch.equal(first, drop(x))
    state.restore()
    assert torch.equal(first, drop(x))


def test_chunk_larger_than_batch_is_refused(phantom_dir, tmp_path):
    from hilum.launch.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"gradcache.chunk_size \(16\) is larger than data.batch_size \(8\)"):
        build_config(tiny_config(phantom_dir, tmp_path, gradcache={"enabled": True, "chunk_size": 16}))


def _config(phantom_dir, run_root, stage, gradcache, dropout, freeze_text=False):
    from hilum.launch.config import build_config

    raw = tiny_config(phantom_dir, run_root, train={"zero_stage": stage}, monitoring={"enabled": False},
                      gradcache={"enabled": gradcache, "chunk_size": CHUNK})
    raw["model"]["image"]["kwargs"].update(drop_rate=dropout, proj_drop_rate=dropout, attn_drop_rate=dropout)
    raw["model"]["text"]["config"].update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    raw["model"]["text"]["freeze"] = freeze_text
    if freeze_text:  # IMITATE's setting: frozen text tower, clinical-informed soft targets over the global batch
        raw["objectives"] = [{"name": "clip"}, {"name": "cicl", "weight": 0.5}]
    return build_config(raw)


def _batch(rank, vocab):
    g = torch.Generator().manual_seed(100 + rank)
    image = torch.randn(PER_RANK, 1, 64, 64, generator=g)
    ids = torch.randint(5, vocab, (PER_RANK, 32), generator=g)
    mask = torch.ones(PER_RANK, 32, dtype=torch.long)
    mask[:, 20:] = (torch.arange(PER_RANK)[:, None] % 2).expand(-1, 12)  # some padding
    return {"image": image, "input_ids": ids, "attention_mask": mask}


def _grads(engine):
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p).detach().clone().double() for p in engine.module.parameters() if p.requires_grad]


def _chunked_plain_backward(w, batch, side=None):
    """The reference: one graph over the whole batch, encoded chunk by chunk (so dropout draws the
    same masks as GradCache's chunks), one backward."""
    from hilum.trainer.distributed import gather_with_grad
    from hilum.trainer.objectives import ObjectiveInputs

    outs = [w.engine({k: v[part] for k, v in batch.items()}) for part in chunk_slices(PER_RANK, CHUNK)]
    features = {k: torch.cat([o[k] for o in outs]) for k in w.loss.cached}
    total, _ = w.loss(ObjectiveInputs(features | (side or {}), outs[0]["logit_scale"].float(), gather=gather_with_grad))
    w.engine.backward(total)
    return float(total)


def _rel_err(a, b):
    """Largest relative error over the parameters whose gradient is not zero in exact arithmetic
    (attention key biases get rounding noise only: softmax ignores a per-row shift)."""
    total = float(torch.cat([y.flatten() for y in b]).norm())
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b) if float(y.norm()) > 1e-6 * total)


def _rank(rank, port, phantom_dir, run_root, stages, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from hilum.trainer.gradcache import gradcache_backward
    from hilum.trainer.loop import build_worker, plain_backward

    results = {}
    for stage in stages:
        for freeze in ([False, True] if stage == 2 else [False]):
            key = f"zero{stage}" + ("-frozen-text" if freeze else "")
            # dropout on: the reference encodes chunk by chunk with the same random draws
            w = build_worker(_config(phantom_dir, run_root, stage, False, 0.1, freeze))
            batch = _batch(rank, len(w.tokenize.tokenizer))
            ref_loss = _chunked_plain_backward(w, batch)
            ref = _grads(w.engine)
            w = build_worker(_config(phantom_dir, run_root, stage, True, 0.1, freeze))
            calls = []
            w.engine.module.text_tower.register_forward_hook(lambda *_: calls.append(1))
            loss, _, _ = gradcache_backward(w.engine, batch, CHUNK, w.loss, w.device)
            results[key] = dict(loss=float(loss), ref_loss=ref_loss, err=_rel_err(_grads(w.engine), ref),
                                text_tower_passes=len(calls) / len(chunk_slices(PER_RANK, CHUNK)))
            w.engine.step()  # the accumulation boundary: exactly one optimizer step
            results[key]["optimizer_steps"] = w.engine.global_steps
            if freeze:
                continue
            # the same without replaying the RNG state: dropout differs between the passes
            w = build_worker(_config(phantom_dir, run_root, stage, True, 0.1))
            gradcache_backward(w.engine, batch, CHUNK, w.loss, w.device, replay_rng=False)
            results[key]["err_without_replay"] = _rel_err(_grads(w.engine), ref)
            # dropout off: GradCache equals the plain step's single forward over the whole batch
            w = build_worker(_config(phantom_dir, run_root, stage, False, 0.0))
            plain_loss, _, _ = plain_backward(w, batch)
            ref = _grads(w.engine)
            w = build_worker(_config(phantom_dir, run_root, stage, True, 0.0))
            loss, _, _ = gradcache_backward(w.engine, batch, CHUNK, w.loss, w.device)
            results[key].update(plain_err=_rel_err(_grads(w.engine), ref), plain_loss=float(plain_loss), gc_loss=float(loss))
    queue.put((rank, results))


def test_gradcache_equals_plain_step_under_zero_0_2_3(phantom_dir, tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), phantom_dir, tmp_path, (0, 2, 3), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    for rank, per_stage in results.items():
        assert set(per_stage) == {"zero0", "zero2", "zero2-frozen-text", "zero3"}
        for key, r in per_stage.items():
            label = f"rank {rank} {key}: {r}"
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), label  # the full-batch loss
            assert r["err"] <= 1e-5, label
            assert r["optimizer_steps"] == 1, label
            # a frozen text tower runs in the first pass only; a trained one in both
            assert r["text_tower_passes"] == (1 if "frozen" in key else 2), label
            if "err_without_replay" in r:
                assert r["err_without_replay"] > 1e-3, label  # the test can tell a wrong replay
                # One forward over the whole batch sums in another order than chunk by chunk: fp32
                # rounding alone gives up to 1.3e-5 on the smallest-gradient parameters (deterministic
                # once DeepSpeed's shared-memory all-reduce op is built; 4e-6 in the run that builds
                # it), a wrong GradCache ≥ 1e-3 (err_without_replay above: ~2).
                assert r["plain_err"] <= 1e-4, label
                assert r["gc_loss"] == pytest.approx(r["plain_loss"], rel=1e-6), label


def _bn_rank(rank, port, phantom_dir, run_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    import copy

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from hilum.launch.config import build_config
    from hilum.trainer.loop import build_worker, train_step

    def first_bn(tower):
        return next(m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))

    results = {}
    for gradcache, stage, divergence in ((False, 2, False), (True, 2, False), (True, 1, False), (True, 3, False),
                                         (True, 2, True)):
        raw = tiny_config(phantom_dir, run_root, train={"zero_stage": stage, "precision": "bf16"}, monitoring={"enabled": False},
                          gradcache={"enabled": gradcache, "chunk_size": CHUNK})
        raw["model"]["image"] = {"model": "resnet10t", "kwargs": {}}
        if divergence:  # MLIP's divergence encoders run in GradCache's first pass only
            raw["objectives"] = [{"name": "clip"}, {"name": "divergence", "weight": 0.5}]
        w = build_worker(build_config(raw))
        batch = _batch(0, len(w.tokenize.tokenizer))
        image = batch["image"]
        if divergence:
            batch["image_aug"] = image.flip(-1)[:, None]
        bn = first_bn(w.engine.module.image_tower)
        before = bn.running_mean.detach().float().clone()
        # The batch norm statistics to expect: each chunk (plain: the batch) once through the tower.
        reference = copy.deepcopy(w.engine.module.image_tower).train() if stage != 3 else None
        values = train_step(w, batch).values
        optimizer = w.engine.optimizer
        accumulate = "fp32 (BF16_Optimizer)" if isinstance(optimizer, BF16_Optimizer) else str(optimizer.gradient_accumulation_dtype)
        # Every parameter that is a whole number of 16-byte units sits at a 16-byte boundary (cuBLAS's
        # fast kernels need it; DeepSpeed packs parameters back to back in each group's buffer).
        misaligned = [n for n, p in w.engine.module.named_parameters() if p.numel() % 8 == 0 and p.data_ptr() % 16]
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in w.engine.module.parameters() if p.requires_grad)
        stats_err = None
        if reference is not None:
            with torch.no_grad():
                for part in chunk_slices(PER_RANK, CHUNK if gradcache else PER_RANK):
                    reference(image[part].to(w.dtype))
            want = first_bn(reference).running_mean.float()
            stats_err = float((bn.running_mean.float() - want).norm() / (want - before).norm())
        results[(gradcache, stage, divergence)] = dict(
            misaligned=misaligned, loss=values["loss"], weight=str(bn.weight.dtype), stats=str(bn.running_mean.dtype),
            moved=float((bn.running_mean.float() - before).abs().max()), accumulate=accumulate,
            steps=w.engine.global_steps, bucket=getattr(optimizer, "reduce_bucket_size", None), trainable=trainable,
            tracked=int(bn.num_batches_tracked), stats_err=stats_err,
            divergence_tracked=int(first_bn(w.engine.module.parts["mlip_divergence"].image).num_batches_tracked) if divergence else None)
    queue.put(results)


def test_batchnorm_tower_trains_in_bf16_plain_and_gradcache(phantom_dir, tmp_path):
    """DeepSpeed casts parameters, not buffers, to bf16; a ResNet's batch norms must still run.
    With GradCache, each stage sums the chunks' gradients in fp32 and steps once, and the batch
    norms' running statistics take each chunk once although both passes run in training mode."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_bn_rank, args=(free_port(), phantom_dir, tmp_path, queue), nprocs=1, start_method="spawn")
    results = queue.get()
    chunks = len(chunk_slices(PER_RANK, CHUNK))
    for (gradcache, stage, divergence), r in results.items():
        label = (gradcache, stage, divergence, r)
        assert r["weight"] == r["stats"] == "torch.bfloat16", label
        assert torch.isfinite(torch.tensor(r["loss"])), label
        assert r["moved"] > 0, label  # running statistics update in training mode
        assert r["steps"] == 1, label
        assert r["misaligned"] == [], (label, r["misaligned"][:5])
        if stage != 1 or not gradcache:  # ZeRO's gradient bucket holds the model, not DeepSpeed's 5e8 elements
            assert r["trainable"] <= r["bucket"] < r["trainable"] + 1024, label
        if gradcache:  # the chunks' gradients are summed in fp32, at every ZeRO stage that can
            assert r["accumulate"] == ("fp32 (BF16_Optimizer)" if stage == 1 else "torch.float32"), label
        assert r["tracked"] == (chunks if gradcache else 1), label
        if r["stats_err"] is not None:  # equal here; a second update per chunk left them 73 % off
            assert r["stats_err"] < 0.05, label
        if divergence:  # first pass only, and kept
            assert r["divergence_tracked"] == chunks, label
