"""The method interface: a term from outside hilum (tests/plugins/toy_method.py) with its own
module and a declared input trains through `hilum train` with GradCache on and off; GradCache's
generic caching and chunk-local replay give the plain step's gradients; the towers' feature
access matches references; the core names no method."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from hilum.cluster.local import free_port
from tests.conftest import HILUM, OUTSIDE, ROOT, tiny_config, write_config

PLUGINS = ROOT / "tests" / "plugins"


# ----------------------------------------------------------------------------------------------
# The boundary


CORE = ["trainer/loop.py", "trainer/gradcache.py", "trainer/engine.py", "trainer/loss.py", "trainer/data/stream.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "trainer" / "models").glob("*.py"))]


def test_the_core_names_no_method():
    """No registered term and no method package is named in the loop, GradCache, the engine, the
    stream or the model: they read declarations."""
    from hilum.trainer.objectives import objective_config_types

    methods = {p.name for p in (ROOT / "trainer" / "objectives").iterdir() if p.is_dir() and not p.name.startswith("_")}
    terms = {t.model_fields["name"].annotation.__args__[0] for t in objective_config_types()}
    names = sorted(methods | terms | {"mmclip"})
    assert {"imitate", "mlip", "medfilip", "clip", "cicl", "divergence"} <= set(names)
    hits = {f"{path}: {name}": len(found) for path in CORE for name in names
            if (found := re.findall(rf"\b{name}\b", (ROOT / path).read_text(), flags=re.IGNORECASE))}
    # "CLIP" as the kind of model (a "CLIP-style dual encoder") is the architecture, not the method.
    hits = {k: n for k, n in hits.items() if not k.startswith("trainer/models/dual_encoder.py: clip")}
    assert hits == {}


# ----------------------------------------------------------------------------------------------
# Generic feature access


def test_image_tower_gives_tokens_levels_and_last_block_attention():
    import timm

    from hilum.trainer.models.towers import TowerRequest, image_tower_outputs

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = image_tower_outputs(vit, x, TowerRequest(levels=(0,), tokens=True, attention=True))
        torch.testing.assert_close(out["pooled"], vit(x))
        torch.testing.assert_close(out["tokens"], vit.forward_features(x))
        assert out["tokens"].shape == (3, 17, 32) and len(out["levels"]) == 1
        # the reference: softmax(q kᵀ / √d) of the last block, from its input, in float64
        seen = {}
        vit.blocks[-1].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        vit(x)
        attn = vit.blocks[-1].attn.double()
        h = vit.blocks[-1].norm1.double()(seen["x"].double())
        q, k, _ = attn.qkv(h).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        want = (q @ k.transpose(-2, -1) / 16 ** 0.5).softmax(-1)
    torch.testing.assert_close(out["attention"].double(), want, rtol=1e-4, atol=1e-5)
    assert vit.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()  # restored after the pass
    cnn = timm.create_model("resnet18", num_classes=0, in_chans=1).eval()
    with torch.no_grad():
        out = image_tower_outputs(cnn, torch.randn(2, 1, 64, 64), TowerRequest(tokens=True))
    assert out["tokens"].shape == (2, 4, 512)  # the last map's 2 × 2 positions
    with pytest.raises(ValueError, match="attention maps need a tower with timm attention blocks"):
        image_tower_outputs(cnn, torch.randn(2, 1, 64, 64), TowerRequest(attention=True))


def test_text_tower_gives_tokens_and_last_layer_attention():
    from hilum.trainer.models.towers import TextTower, TowerRequest

    torch.manual_seed(0)
    tower = TextTower(None, {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 32}, 50, "mean").eval()
    ids = torch.randint(5, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        plain = tower(ids, mask)
        out = tower.outputs(ids, mask, TowerRequest(tokens=True, attention=True))
        want = tower.encoder(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out["pooled"], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["tokens"], want.last_hidden_state)
    assert out["attention"].shape == (3, 2, 7, 7)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, 2, 7))
    assert float(out["attention"][0, :, :, 5:].abs().max()) == 0.0  # padding gets no attention
    with pytest.raises(ValueError, match="image-tower request"):
        tower.outputs(ids, mask, TowerRequest(levels=(1,)))


# ----------------------------------------------------------------------------------------------
# The toy method from outside hilum


def _toy_config(phantom_dir, run_root, gradcache, local=True, stage=2):
    raw = tiny_config(phantom_dir, run_root, train={"zero_stage": stage}, monitoring={"enabled": False},
                      gradcache={"enabled": gradcache, "chunk_size": 3})
    raw["model"]["text"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # one graph = chunks
    raw["plugins"] = ["toy_method"]
    raw["objectives"] = [{"name": "clip"}, {"name": "toy_words", "weight": 0.5, "local": local}]
    return raw


def _toy_rank(rank, port, phantom_dir, run_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    sys.path.insert(0, str(PLUGINS))
    from hilum.launch.config import build_config
    from hilum.trainer.data.shards import load_manifest
    from hilum.trainer.data.stream import ShardStream, StreamSpec
    from hilum.trainer.loop import build_worker, step_backward
    from tests.test_gradcache import _grads, _rel_err

    results = {}
    for stage, local in ((2, True), (3, False)):
        plain = build_worker(build_config(_toy_config(phantom_dir, run_root, False, local, stage)))
        batch = next(iter(ShardStream(load_manifest(str(phantom_dir / "train.json")), StreamSpec(8, 2, 0, 0, True, 16),
                                      plain.train_preprocess, plain.tokenize, rank)))
        ref_loss, ref_terms, _ = step_backward(plain, batch)
        ref = _grads(plain.engine)
        w = build_worker(build_config(_toy_config(phantom_dir, run_root, True, local, stage)))
        loss, terms, _ = step_backward(w, batch)
        results[(stage, local)] = dict(
            loss=float(loss), ref_loss=float(ref_loss), toy=float(terms["toy_words"]), ref_toy=float(ref_terms["toy_words"]),
            err=_rel_err(_grads(w.engine), ref), cached=w.loss.cached, head=sum(
                getattr(p, "ds_numel", p.numel()) for n, p in w.engine.module.named_parameters()
                if n.startswith("parts.toy_words_head.")),
            words=batch["toy_words"].tolist())
    queue.put((rank, results))


def test_a_plugin_term_under_gradcache_equals_the_plain_step(phantom_dir, tmp_path):
    """The toy term's head and declared value through GradCache on two ranks: chunk-local (its
    loss computed on each replayed chunk, nothing of it cached) and on the cached batch (its
    output cached and replayed like any feature) both give the plain step's loss and gradients."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_toy_rank, args=(free_port(), phantom_dir, tmp_path, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    for rank, cases in results.items():
        for (stage, local), r in cases.items():
            label = (rank, stage, local, r)
            assert r["cached"] == (("image", "text") if local else ("image", "text", "toy_words_pred")), label
            assert r["head"] > 0 and min(r["words"]) >= 1, label
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), label
            assert r["toy"] == pytest.approx(r["ref_toy"], rel=1e-6), label
            assert r["err"] <= 1e-5, label


def test_a_plugin_method_trains_through_hilum_train_without_a_core_edit(phantom_dir, tmp_path):
    """The toy method lives outside the package, in a module the config's `plugins:` imports;
    `hilum train` (the installed console script, from outside the repository) trains it with
    GradCache off and on, and its term, its head's parameters and its declared value arrive."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for gradcache in (False, True):
        raw = _toy_config(phantom_dir, tmp_path, gradcache)
        raw["run"]["name"] = f"toy-gc{int(gradcache)}"
        raw["cluster"].update(launcher="local", num_workers=1)
        raw["train"].update(max_steps=4, log_every=2, checkpoint_every=0)
        raw["eval"].update(at_end=False)
        cfg = write_config(tmp_path / f"toy{int(gradcache)}.yaml", raw)
        done = subprocess.run([*HILUM, "train", "--config", str(cfg)], cwd=OUTSIDE, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / raw["run"]["name"] / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [2, 4], lines
        assert all(x["toy_words"] > 0 and x["clip"] > 0 for x in lines), lines
        assert "toy_words" in done.stderr  # the console line shows the term
    # without the plugin on the path (this process has none), the config is refused before any worker starts
    from hilum.launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="plugins: cannot import 'toy_method': No module named 'toy_method'"):
        load_config(str(cfg))


def test_declarations_are_checked_before_any_worker_starts(phantom_dir, tmp_path):
    from hilum.launch.config import ConfigError, build_config

    raw = tiny_config(phantom_dir, tmp_path)
    raw["objectives"] = [{"name": "imitate"}]
    raw["data"]["text"] = "report"
    with pytest.raises(ConfigError, match="set data.text to 'impression'"):
        build_config(raw)
    raw["objectives"] = [{"name": "imitate", "multi_level": {"dim": 30, "heads": 4}}]
    raw["data"]["text"] = "impression"
    with pytest.raises(ConfigError, match=r"objectives.0.multi_level: .*dim \(30\) must be a multiple of heads \(4\)"):
        build_config(raw)
    with pytest.raises(ConfigError, match=r"objectives.0.name: unknown objective 'toy_wrds'"):
        build_config({**raw, "objectives": [{"name": "toy_wrds"}]})
