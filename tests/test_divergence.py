"""MLIP divergence encoders: Eq. 8 against a direct transcription, the moving average's refusals,
and, on 2 gloo workers under ZeRO 0, 2 and 3, the encoders after k steps against Eq. 7 applied to
the same sequence of encoder parameters (exact in fp32), plus exact resume."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hilum.cluster.local import free_port
from hilum.trainer.moving_average import MovingAverage, MovingAverageError, eq7_update
from hilum.trainer.objectives import ObjectiveInputs
from hilum.trainer.objectives.mlip.divergence import PART, DivergenceConfig, DivergenceObjective
from tests.conftest import tiny_config

PER_RANK, STEPS = 6, 3


def _eq8_second_half(v, t, v_aug, t_aug, log_scale):
    """λ0-free second half of MLIP Eq. 8, written out: 1/(2N) Σ_i [L_v2a(v_i, t_aug_i) + L_a2t(v_aug_i, t_i)]."""
    s = torch.exp(log_scale)
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        v2a = -torch.log(torch.exp(s * v[i] @ t_aug[i]) / torch.exp(s * v[i] @ t_aug.T).sum())  # Eq. 4a, t → t_aug
        a2t = -torch.log(torch.exp(s * t[i] @ v_aug[i]) / torch.exp(s * t[i] @ v_aug.T).sum())  # Eq. 4b, v → v_aug
        total = total + v2a + a2t
    return total / (2 * n)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_divergence_term_is_eq_8(impl):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float64 if impl == "torch" else torch.float32
    v, t, v_aug, t_aug = (F.normalize(torch.randn(11, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(4))
    log_scale = torch.tensor(2.3, dtype=torch.float64)
    want = _eq8_second_half(v, t, v_aug, t_aug, log_scale)
    term = DivergenceObjective(DivergenceConfig(name="divergence", gather=False, impl=impl))
    vv, tt = v.to(dtype).detach().clone().requires_grad_(), t.to(dtype).detach().clone().requires_grad_()
    got = term(ObjectiveInputs({"image": vv, "text": tt, "image_aug": v_aug.to(dtype), "text_aug": t_aug.to(dtype)}, log_scale.to(dtype)))
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-10 if impl == "torch" else 1e-5)
    # gradients reach v and t only; the divergence features carry none
    got.backward()
    a, b = v.clone().requires_grad_(), t.clone().requires_grad_()
    _eq8_second_half(a, b, v_aug, t_aug, log_scale).backward()
    tol = dict(rtol=1e-9, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vv.grad.double(), a.grad, **tol)
    torch.testing.assert_close(tt.grad.double(), b.grad, **tol)


def test_moving_average_is_eq_7_and_refuses_what_it_cannot_do():
    src, tgt = nn.Linear(5, 3), nn.Linear(5, 3)
    tgt.requires_grad_(False)
    before = [p.detach().clone() for p in tgt.parameters()]
    MovingAverage(src, tgt).update(0.3)
    for s, old, new in zip(src.parameters(), before, tgt.parameters()):
        assert torch.equal(new, 0.3 * s.detach() + 0.7 * old)
    bf = nn.Linear(5, 3).to(torch.bfloat16).requires_grad_(False)
    expected = eq7_update(src.weight.detach(), bf.weight.detach(), 0.001).to(torch.bfloat16)  # computed in fp32
    MovingAverage(src.to(torch.bfloat16), bf).update(0.001)
    assert torch.equal(bf.weight, expected)
    with pytest.raises(MovingAverageError, match="NVMe"):
        MovingAverage(src, tgt, {"stage": 3, "offload_param": {"device": "nvme"}})
    with pytest.raises(MovingAverageError, match="shape"):
        MovingAverage(nn.Linear(5, 3), nn.Linear(5, 4).requires_grad_(False))
    with pytest.raises(MovingAverageError, match="must not be trained"):
        MovingAverage(nn.Linear(5, 3), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MovingAverage(src.float(), tgt).update(1.5)


# ----------------------------------------------------------------------------------------------


def _config(phantom_dir, run_root, stage, name=None):
    from hilum.launch.config import build_config

    raw = tiny_config(phantom_dir, run_root, train={"zero_stage": stage, "checkpoint_every": 0},
                      monitoring={"enabled": False})
    raw["objectives"] = [{"name": "clip"}, {"name": "divergence", "weight": 0.5}]
    raw["model"]["text"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raw["run"]["name"] = name or f"zero{stage}"
    return build_config(raw)


def _batch(rank, step, vocab):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "image": torch.randn(PER_RANK, 1, 64, 64, generator=g),
        "image_aug": torch.randn(PER_RANK, 1, 1, 64, 64, generator=g),
        "input_ids": torch.randint(5, vocab, (PER_RANK, 32), generator=g),
        "attention_mask": torch.ones(PER_RANK, 32, dtype=torch.long),
    }


PERSISTENT = "3-persistent"


def _mismatches(got, expected):
    """Which tensors differ, where and by how much: enough to tell a partition boundary from noise."""
    out = []
    for i, (a, b) in enumerate(zip(got, expected)):
        if not torch.equal(a, b):
            bad = (a != b).flatten().nonzero().flatten()
            out.append(f"#{i} {tuple(a.shape)}: {bad.numel()}/{a.numel()} differ, first at {bad[0].item()}, "
                       f"max |diff| {(a - b).abs().max().item():.3g}")
    return out


def _full(params):
    """Full values of (possibly ZeRO-3-partitioned) parameters; gathering is the test's business only.
    One parameter at a time: DeepSpeed gathers a list with one asynchronous all-gather each and
    waits on the last only, which gloo's two threads can finish out of order (trainer/engine.py)."""
    import deepspeed

    out = []
    for p in params:
        with deepspeed.zero.GatheredParameters([p]):
            out.append(p.detach().clone().cpu())
    return out


def _rank(rank, port, phantom_dir, run_root, stages):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from hilum.trainer import checkpoint, engine
    from hilum.trainer.checkpoint import TrainState
    from hilum.trainer.loop import build_worker, save_checkpoint, train_step

    for stage in stages:
        if stage == PERSISTENT:  # DeepSpeed's persistent parameters, as on GPUs, gathered safely on gloo
            engine.GLOO_ZERO3 = {"stage3_allgather_sequential": True}
        cfg = _config(phantom_dir, run_root, 3 if stage == PERSISTENT else stage, name=f"zero{stage}")
        w = build_worker(cfg)
        vocab = len(w.tokenize.tokenizer)
        pairs = w.engine.module.parts[PART].pairs(w.engine.module)
        encoders = {tower: _full(src.parameters()) for tower, (src, _) in pairs.items()}
        start = {tower: _full(tgt.parameters()) for tower, (_, tgt) in pairs.items()}
        history = []
        for step in range(STEPS):
            values = train_step(w, _batch(rank, step, vocab)).values
            history.append(({tower: _full(src.parameters()) for tower, (src, _) in pairs.items()},
                            {tower: values[f"s_{tower}"] for tower in pairs}, values))
        final = {tower: _full(tgt.parameters()) for tower, (_, tgt) in pairs.items()}
        kept = sum(getattr(p, "ds_persist", False) for _, tgt in pairs.values() for p in tgt.parameters())
        save_checkpoint(w, TrainState(step=STEPS))
        resumed = build_worker(cfg)
        state = checkpoint.load(resumed.engine, resumed.store, resumed.store.find(STEPS), rank, 2)
        resumed.objectives["divergence"].load_train_state(state.extra["objectives"]["divergence"])
        rpairs = resumed.engine.module.parts[PART].pairs(resumed.engine.module)
        restored = {tower: _full(tgt.parameters()) for tower, (_, tgt) in rpairs.items()}
        # one more step on the original and on the resumed worker: the same parameters after it
        nxt = _batch(rank, STEPS, vocab)
        train_step(w, nxt)
        train_step(resumed, nxt)
        after = {tower: _full(tgt.parameters()) for tower, (_, tgt) in pairs.items()}
        after_resumed = {tower: _full(tgt.parameters()) for tower, (_, tgt) in rpairs.items()}
        if rank == 0:  # through a file: a pipe would block on megabytes until the parent reads
            torch.save((stage, encoders, start, history, final, restored, after, after_resumed, kept),
                       run_root / f"result_zero{stage}.pt")


@pytest.mark.slow
def test_divergence_encoders_follow_eq_7_on_each_zero_partition_and_resume_exactly(phantom_dir, tmp_path):
    stages = [0, 2, 3, PERSISTENT]
    mp.start_processes(_rank, args=(free_port(), phantom_dir, tmp_path, stages), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"result_zero{stage}.pt", weights_only=True) for stage in stages]
    # hilum's ZeRO-3 on gloo keeps no parameter gathered between steps; DeepSpeed's default keeps the
    # small ones, and the moving average then updates their full copies too (trainer/moving_average.py).
    assert [r[-1] > 0 for r in results] == [False, False, False, True]
    for stage, encoders, start, history, final, restored, after, after_resumed, _ in results:
        for tower in ("image", "text"):
            label = f"zero{stage}/{tower}"
            assert all(torch.equal(a, b) for a, b in zip(start[tower], encoders[tower])), (  # o ← f at start
                label, _mismatches(start[tower], encoders[tower]))
            reference = start[tower]
            for theta, s, values in history:
                assert 0.0 < s[tower] <= 1.0 and "divergence" in values, label
                reference = [eq7_update(f, o, s[tower]) for f, o in zip(theta[tower], reference)]
            assert all(torch.equal(a, b) for a, b in zip(final[tower], reference)), label  # exact in fp32
            assert not all(torch.equal(a, b) for a, b in zip(final[tower], start[tower])), label  # it did move
            assert all(torch.equal(a, b) for a, b in zip(restored[tower], final[tower])), label
            assert all(torch.equal(a, b) for a, b in zip(after_resumed[tower], after[tower])), label
