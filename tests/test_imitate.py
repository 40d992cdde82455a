"""IMITATE's hierarchical alignment: the six-term loss against a float64 transcription of
§III-E with Eq. 3–4's targets, the multi-level aggregation block, the FINDINGS/IMPRESSION split in
the stream, and GradCache on two ranks giving the plain step's gradients."""

from __future__ import annotations

import io
import json
import os
import tarfile
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from hilum.cluster.local import free_port
from hilum.trainer.objectives import ObjectiveInputs
from hilum.trainer.objectives.imitate.term import ImitateConfig, ImitateObjective
from tests.conftest import tiny_config, train_shipped_config
from tests.test_cicl import _cicl_transcribed


def _six_terms_transcribed(x, log_scale, lam, correlation):
    """§III-E's total loss, each CICL term from Eq. 3–5 (tests/test_cicl.py's transcription)."""
    if correlation == "section":
        r_i, r_f = x["e_imp"], x["e_find"]
    else:
        r_i = r_f = torch.cat([x["e_imp"], x["e_find"]], dim=1)
    c = partial(_cicl_transcribed, log_scale=log_scale, lam=lam)
    return (c(x["h1"], x["z_i"], r_i) + c(x["m1"], x["z_f"], r_f) + c(x["h2"], x["z_i"], r_i) + c(x["m2"], x["z_f"], r_f)
            + c(x["h1"], x["h2"], r_i) + c(x["m1"], x["m2"], r_f))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("correlation", ["section", "report"])
def test_imitate_is_the_six_cicl_terms(impl, correlation):
    g = torch.Generator().manual_seed(5)
    b = 11
    feats = {k: F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1)
             for k in ("h1", "h2", "m1", "m2", "z_i", "z_f")}
    common = torch.randn(1, 20, generator=g, dtype=torch.float64)
    emb = {k: torch.randn(b, 20, generator=g, dtype=torch.float64) + 2 * common for k in ("e_imp", "e_find")}
    log_scale = torch.tensor(2.0, dtype=torch.float64)
    want_x = {k: v.clone().requires_grad_() for k, v in feats.items()} | emb
    want = _six_terms_transcribed(want_x, log_scale, 0.2, correlation)
    want.backward()

    dtype = torch.float64 if impl == "torch" else torch.float32
    got_x = {k: v.to(dtype).clone().requires_grad_() for k, v in feats.items()}
    outputs = {"image": got_x["h1"], "text": got_x["z_i"], "image_multi": got_x["m1"], "image_2": got_x["h2"],
               "image_multi_2": got_x["m2"], "findings": got_x["z_f"],
               "text_pooled": emb["e_imp"].to(dtype), "findings_pooled": emb["e_find"].to(dtype)}
    term = ImitateObjective(ImitateConfig(name="imitate", gather=False, impl=impl, correlation=correlation))
    got = term(ObjectiveInputs(outputs, log_scale.to(dtype)))
    got.backward()
    tol = dict(rtol=1e-9, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=tol["rtol"])
    for k in feats:
        torch.testing.assert_close(got_x[k].grad.double(), want_x[k].grad, **tol, msg=k)


def test_imitate_names_what_the_model_did_not_give():
    v = F.normalize(torch.randn(4, 8), dim=1)
    term = ImitateObjective(ImitateConfig(name="imitate", gather=False, impl="torch"))
    with pytest.raises(KeyError, match="no model output or side input named 'findings_pooled'"):
        term(ObjectiveInputs({"image": v, "text": v, "text_pooled": v}, torch.tensor(1.0)))


@pytest.mark.parametrize("name,kwargs,levels,channels", [
    ("resnet18", {}, 4, [64, 128, 256, 512]),
    ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 6, "num_heads": 2}, 3, [32] * 3),
])
def test_aggregation_block_over_cnn_and_vit_levels(name, kwargs, levels, channels):
    import timm

    from hilum.trainer.models.towers import TowerRequest, image_tower_outputs
    from hilum.trainer.objectives.imitate.hierarchy import HierarchicalAggregator

    tower = timm.create_model(name, num_classes=0, in_chans=1, **kwargs).eval()
    block = HierarchicalAggregator(tower, levels, grid=4, dim=16, heads=2, depth=1, drop_shallowest=0.85, drop_others=0.9)
    assert block.channels == channels
    if name.startswith("vit"):
        assert block.indices == [1, 3, 5]  # spread over the depth, the last block included
    x = torch.randn(3, 1, 64, 64)
    out = image_tower_outputs(tower, x, TowerRequest(levels=tuple(block.indices)))
    pooled, maps = out["pooled"], out["levels"]
    torch.testing.assert_close(pooled, tower(x))  # z_v,h is the tower's usual output
    block.train()
    kept = [len(block.kept_channels(i, torch.device("cpu"))) for i in range(levels)]
    assert kept == [max(1, round(c * (1 - d))) for c, d in zip(channels, block.drop)]
    assert block.drop[0] == 0.85 and set(block.drop[1:]) == {0.9}
    torch.manual_seed(0)
    a = block(maps)
    torch.manual_seed(0)
    assert torch.equal(a, block(maps))  # the drop draws from the global RNG: GradCache replays it
    block.eval()
    assert [len(block.kept_channels(i, torch.device("cpu"))) for i in range(levels)] == channels
    assert block(maps).shape == (3, 16)
    with pytest.raises(ValueError, match="levels"):
        HierarchicalAggregator(tower, 9, 4, 16, 2, 1, 0.85, 0.9)


def _sample(key, findings, impression):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "json": json.dumps({"findings": findings, "impression": impression}).encode()}


def test_findings_are_read_apart_and_a_missing_section_is_counted():
    from hilum.trainer.data.stream import DECLARED, DECLARED_COUNTS, Preprocess
    from hilum.trainer.objectives.imitate.term import FindingsText

    pre = Preprocess(32, 1, "impression", False, texts=(FindingsText(),))
    gen = torch.Generator().manual_seed(0)
    _, text, meta = pre(_sample("a", "Small left effusion.", "Left effusion."), gen)
    assert (text, meta[DECLARED]["findings"], meta[DECLARED_COUNTS]) == (
        "Left effusion.", "Small left effusion.", {"findings_from_impression": 0})
    _, text, meta = pre(_sample("b", "", "No acute process."), gen)
    assert (meta[DECLARED]["findings"], meta[DECLARED_COUNTS]) == ("No acute process.", {"findings_from_impression": 1})


def test_stream_tokenizes_findings_and_counts_fills(phantom_dir, tmp_path):
    """A shard with one report lacking FINDINGS: every sample is used, the fill is counted."""
    from hilum.trainer.data.shards import Manifest, ShardSpec
    from hilum.trainer.data.stream import Preprocess, ShardStream, StreamSpec
    from hilum.trainer.data.text import Tokenize
    from hilum.trainer.objectives.imitate.term import FindingsText

    samples = [_sample(f"s{i}", "" if i == 2 else f"finding {i} here", f"impression {i}") for i in range(4)]
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for s in samples:
            for ext in ("png", "json"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tar.addfile(info, io.BytesIO(s[ext]))
    manifest = Manifest((ShardSpec(str(shard), 4),), str(tmp_path / "train.json"))
    pre = Preprocess(32, 1, "impression", False, texts=(FindingsText(),))
    stream = ShardStream(manifest, StreamSpec(4, 1, 0, 0, False, 0), pre, Tokenize(str(phantom_dir / "tokenizer"), 16), 0)
    batch = next(iter(stream))
    assert batch["findings_input_ids"].shape == batch["input_ids"].shape == (4, 16)
    assert batch["_filled"] == {"findings_from_impression": 1}
    assert not torch.equal(batch["findings_input_ids"][0], batch["input_ids"][0])


def _imitate_config(phantom_dir, run_root, stage, gradcache, freeze):
    from hilum.launch.config import build_config
    from tests.test_gradcache import CHUNK

    raw = tiny_config(phantom_dir, run_root, train={"zero_stage": stage}, monitoring={"enabled": False},
                      gradcache={"enabled": gradcache, "chunk_size": CHUNK})
    raw["data"]["text"] = "impression"
    raw["model"]["image"]["kwargs"].update(depth=2)
    raw["model"]["text"]["freeze"] = freeze
    raw["objectives"] = [{"name": "imitate", "multi_level": {"levels": 2, "grid": 4, "dim": 16, "heads": 2}}]
    return build_config(raw)


def _imitate_rank(rank, port, phantom_dir, run_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from hilum.trainer.gradcache import gradcache_backward
    from hilum.trainer.loop import build_worker
    from tests.test_gradcache import CHUNK, _batch, _chunked_plain_backward, _grads, _rel_err

    results = {}
    for stage, freeze in ((2, True), (3, False)):
        w = build_worker(_imitate_config(phantom_dir, run_root, stage, False, freeze))
        image, ids, mask = _batch(rank, len(w.tokenize.tokenizer)).values()
        g = torch.Generator().manual_seed(7 + rank)
        batch = {"image": image, "input_ids": ids, "attention_mask": mask,
                 "image_aug": torch.randn(image.shape, generator=g)[:, None], "findings_input_ids": ids.roll(3, dims=1),
                 "findings_attention_mask": mask}
        torch.manual_seed(11 + rank)
        # The reference: one graph over the batch, encoded chunk by chunk (the same channel drops).
        ref_loss = _chunked_plain_backward(w, batch)
        ref = _grads(w.engine)
        w = build_worker(_imitate_config(phantom_dir, run_root, stage, True, freeze))
        torch.manual_seed(11 + rank)
        loss, _, _ = gradcache_backward(w.engine, batch, CHUNK, w.loss, w.device)
        results[f"zero{stage}{'-frozen-text' if freeze else ''}"] = dict(
            loss=float(loss), ref_loss=ref_loss, err=_rel_err(_grads(w.engine), ref))
    queue.put((rank, results))


def test_imitate_under_gradcache_on_two_ranks_equals_the_plain_step(phantom_dir, tmp_path):
    """Six terms, two views, findings and the multi-level block through GradCache's two passes:
    the gradients of one plain step over the global batch (R over the global batch)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_imitate_rank, args=(free_port(), phantom_dir, tmp_path, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    for rank, per_case in results.items():
        assert set(per_case) == {"zero2-frozen-text", "zero3"}
        for key, r in per_case.items():
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), (rank, key, r)
            assert r["err"] <= 1e-5, (rank, key, r)


def test_imitate_config_trains_on_phantom_data_with_gradcache(phantom_dir, tmp_path):
    """configs/imitate.yaml through `hilum train` (2 local workers, GradCache chunks of 6): the
    six-term loss falls and the held-out zero-shot accuracy of z_v,h ends well above chance."""
    losses, zero_shot = train_shipped_config("imitate", phantom_dir, tmp_path)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.2, losses
    # 55 held-out samples, 24 of them 'no finding': the class-balanced accuracy is the steadier figure
    assert zero_shot["balanced_accuracy"] > 1.5 * zero_shot["chance"], zero_shot
    assert zero_shot["accuracy"] > zero_shot["chance"], zero_shot
