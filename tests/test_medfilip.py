"""MedFILIP's semantic-similarity alignment: structured labels from entities, the similarity
matrix of Eq. 4–5 and the loss of Eq. 9 against a direct float64 transcription (paper and code
forms), the label stream, GradCache on two ranks, and a phantom training run."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from hilum.cluster.local import free_port
from hilum.trainer.objectives.medfilip.labels import BagOfWordsEncoder, LabelSpec, LabelVocabulary, image_labels, label_category
from hilum.trainer.objectives import ObjectiveInputs
from hilum.trainer.objectives.medfilip.term import MedfilipConfig, MedfilipObjective, semantic_mse
from tests.conftest import tiny_config, train_shipped_config

SPEC = LabelSpec.load(None, max_labels=3, uncertain="keep")
ENTITIES = [  # per image, as stored in the shards' JSON
    [{"severity": "small", "location": "left lower", "category": "pleural effusion"}],
    [{"severity": "moderate", "location": "left lower", "category": "effusion"},
     {"severity": "", "location": "right upper", "category": "pneumothorax"}],
    [],
    [{"severity": "mild", "location": "right", "category": "opacity"}, {"severity": "mild", "location": "left", "category": ""}],
    [{"severity": "large", "location": "right", "category": "pneumothorax"}, {"severity": "mild", "location": "", "category": "cardiomegaly"}],
]


def test_structured_labels_from_entities():
    labels, cut = image_labels(ENTITIES[1], SPEC)
    assert cut == 0 and labels[0].startswith("moderate left lower pleural effusion, where pleural effusion is fluid")
    assert labels[1].startswith("right upper pneumothorax, where pneumothorax is air")  # no severity: kept
    assert image_labels(ENTITIES[2], SPEC)[0] == [f"no finding, where no finding is {SPEC.knowledge['no finding']}"]
    assert len(image_labels(ENTITIES[3], SPEC)[0]) == 1  # a triplet without a category is dropped
    many = [{"severity": s, "location": "left", "category": "nodule"} for s in ("mild", "small", "large", "severe")]
    labels, cut = image_labels(many + many[:1], SPEC)
    assert (len(labels), cut) == (3, 1)  # duplicates merged, then cut at max_labels
    hedged = [{"severity": "", "location": "", "category": "pneumonia", "uncertain": True}]
    assert image_labels(hedged, LabelSpec(SPEC.knowledge, 3, "drop"))[0][0].startswith("no finding")
    assert label_category(labels[0]) == "nodule" and label_category(image_labels(ENTITIES[2], SPEC)[0][0]) == "no finding"


def _transcribed(image, label_feats, label_texts, log_scale, form):
    """Eq. 4–5 (s_ij: max over image i's labels of the cosine of E_sim embeddings) and Eq. 9 —
    MSE + CE (the CE as the cross-entropy of softmax(scale · y) against s's rows normalised), or
    the authors' code form (same-category similarity only, MSE + BCE of sigmoid(scale · y))."""
    enc = BagOfWordsEncoder()
    columns = [t for texts in label_texts for t in texts]  # the M structured labels
    e_sim = {t: enc([t])[0] for t in set(columns)}
    n, m = len(label_texts), len(columns)
    s = torch.zeros(n, m, dtype=torch.float64)
    for i, texts in enumerate(label_texts):
        for j, lj in enumerate(columns):
            cos = [float(e_sim[lt] @ e_sim[lj]) for lt in texts]
            if form == "code":
                cos = [c if label_category(lt) == label_category(lj) else 0.0 for c, lt in zip(cos, texts)]
            s[i, j] = max(0.0, max(cos))  # Eq. 4's argmax, Eq. 5's cosine
    y = image @ label_feats.T  # Eq. 8: cosine (unit features)
    mse = ((y - s) ** 2).mean()
    if form == "paper":
        second = -((s / s.sum(1, keepdim=True)) * F.log_softmax(log_scale.exp() * y, dim=1)).sum(1).mean()
    else:
        second = F.binary_cross_entropy_with_logits(log_scale.exp() * y, s)
    return mse + second


@pytest.mark.parametrize("form,impl", [("paper", "torch"), ("paper", "triton"), ("code", "torch")])
def test_medfilip_is_eq_4_5_and_9(form, impl):
    g = torch.Generator().manual_seed(4)
    label_texts = [image_labels(e, SPEC)[0] for e in ENTITIES]
    k = max(len(t) for t in label_texts)
    image = F.normalize(torch.randn(len(ENTITIES), 8, generator=g, dtype=torch.float64), dim=1)
    slots = torch.zeros(len(ENTITIES), k, 8, dtype=torch.float64)
    for i, texts in enumerate(label_texts):
        slots[i, : len(texts)] = F.normalize(torch.randn(len(texts), 8, generator=g, dtype=torch.float64), dim=1)
    log_scale = torch.tensor(1.5, dtype=torch.float64)

    want_image = image.clone().requires_grad_()
    want_labels = torch.cat([slots[i, : len(t)] for i, t in enumerate(label_texts)]).requires_grad_()
    want = _transcribed(want_image, want_labels, label_texts, log_scale, form)
    want.backward()

    dtype = torch.float64 if impl == "torch" else torch.float32
    term = MedfilipObjective(MedfilipConfig(name="medfilip", form=form, max_labels=k, impl=impl))
    index, sim = term.vocabulary.prepare(label_texts, k, torch.device("cpu"))
    got_image, got_slots = image.to(dtype).clone().requires_grad_(), slots.to(dtype).clone().requires_grad_()
    got = term(ObjectiveInputs({"image": got_image, "labels": got_slots, "label_index": index, "label_similarity": sim},
                               log_scale.to(dtype)))
    got.backward()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    # the similarity table is float32 (what the kernel reads): float32-grade agreement at best
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=tol["rtol"])
    torch.testing.assert_close(got_image.grad.double(), want_image.grad, **tol)
    got_label_grads = torch.cat([got_slots.grad[i, : len(t)] for i, t in enumerate(label_texts)]).double()
    torch.testing.assert_close(got_label_grads, want_labels.grad, **tol)
    assert float(got_slots.grad[2, 1:].abs().sum()) == 0.0  # empty slots take no gradient


def test_semantic_mse_without_the_n_by_m_matrix():
    g = torch.Generator().manual_seed(1)
    n, m, v, e = 7, 12, 5, 6
    x, y = torch.randn(n, e, generator=g, dtype=torch.float64), torch.randn(m, e, generator=g, dtype=torch.float64)
    table = torch.rand(v, v, generator=g, dtype=torch.float64)
    rows = torch.randint(0, v, (n, 3), generator=g)
    rows[::2, 2] = -1
    cols = torch.randint(0, v, (m,), generator=g)
    s = torch.stack([torch.stack([max(table[a, cols[j]] for a in rows[i] if a >= 0) for j in range(m)]) for i in range(n)])
    want = ((x @ y.T - s.clamp_min(0)) ** 2).mean()
    assert float(semantic_mse(x, y, rows, cols, table.float())) == pytest.approx(float(want), rel=1e-5)


def test_zero_shot_prompts_follow_eq_10():
    term = MedfilipObjective(MedfilipConfig(name="medfilip"))
    prompts = term.zero_shot_prompts(["no_finding", "effusion", "nodule"])
    k = SPEC.knowledge
    assert prompts["effusion"] == [f"pleural effusion, where pleural effusion is {k['pleural effusion']}"]
    assert prompts["no_finding"] == [f"no finding, where no finding is {k['no finding']}"]


def test_vocabulary_is_shared_and_category_mask_is_the_code_form():
    texts = [image_labels(e, SPEC)[0] for e in ENTITIES]
    paper, code = LabelVocabulary(), LabelVocabulary(same_category_only=True)
    index, sim = paper.prepare(texts, 3, torch.device("cpu"))
    _, sim_code = code.prepare(texts, 3, torch.device("cpu"))
    vocab = sorted({t for image in texts for t in image})
    assert index.shape == (5, 3) and int(index.max()) == len(vocab) - 1 and int((index >= 0).sum()) == 7
    assert torch.allclose(sim.diagonal(), torch.ones(len(vocab)))
    cats = [label_category(t) for t in vocab]
    for a in range(len(vocab)):
        for b in range(len(vocab)):
            if cats[a] != cats[b]:
                assert float(sim_code[a, b]) == 0.0
            else:
                assert float(sim_code[a, b]) == pytest.approx(float(sim[a, b]))
    assert float(sim[vocab.index(texts[0][0]), vocab.index(texts[1][0])]) > 0.5  # two left pleural effusions


def _medfilip_rank(rank, port, phantom_dir, run_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    from hilum.launch.config import build_config
    from hilum.trainer.data.shards import load_manifest
    from hilum.trainer.data.stream import ShardStream, StreamSpec
    from hilum.trainer.gradcache import gradcache_backward
    from hilum.trainer.loop import build_worker, model_inputs, side_inputs
    from tests.test_gradcache import CHUNK, PER_RANK, _batch, _chunked_plain_backward, _grads, _rel_err

    def config(gradcache):
        raw = tiny_config(phantom_dir, run_root, train={"zero_stage": 2}, monitoring={"enabled": False},
                          gradcache={"enabled": gradcache, "chunk_size": CHUNK})
        raw["objectives"] = [{"name": "medfilip", "max_labels": 2}]
        return build_config(raw)

    w = build_worker(config(False))
    stream = ShardStream(load_manifest(str(phantom_dir / "train.json")), StreamSpec(PER_RANK, 2, 0, 0, True, 16),
                         w.train_preprocess, w.tokenize, rank)
    batch = next(iter(stream))
    inputs, side = model_inputs(batch) | {"image": _batch(rank, 10)["image"]}, side_inputs(w, batch)
    ref_loss = _chunked_plain_backward(w, inputs, side)
    ref = _grads(w.engine)
    w = build_worker(config(True))
    loss, _, _ = gradcache_backward(w.engine, inputs, CHUNK, w.loss, w.device, side=side)
    queue.put((rank, dict(loss=float(loss), ref_loss=ref_loss, err=_rel_err(_grads(w.engine), ref),
                          vocab=int(side["label_similarity"].shape[0]), filled=int(batch["label_valid"].sum()))))


def test_medfilip_under_gradcache_on_two_ranks_equals_the_plain_step(phantom_dir, tmp_path):
    """Labels from the phantom shards' entities through the stream, the vocabulary of both ranks'
    labels, and GradCache's two passes give the plain step's gradients."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_medfilip_rank, args=(free_port(), phantom_dir, tmp_path, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results[0]["vocab"] == results[1]["vocab"] > 1  # one vocabulary over the global batch
    for rank, r in results.items():
        assert r["filled"] >= 8, r  # every image has at least one label
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), (rank, r)
        assert r["err"] <= 1e-5, (rank, r)


def test_medfilip_config_trains_on_phantom_data_with_gradcache(phantom_dir, tmp_path):
    """configs/medfilip.yaml through `hilum train` (2 local workers, GradCache): the loss falls and
    zero-shot accuracy with Eq. 10's prompts ends above chance."""
    losses, zero_shot = train_shipped_config("medfilip", phantom_dir, tmp_path)
    # One step's loss moves with its number of label columns (the CE's log M): compare windows' means.
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.05, losses
    # 55 held-out samples, 24 of them 'no finding': the class-balanced accuracy is the steadier figure
    assert zero_shot["balanced_accuracy"] > 1.5 * zero_shot["chance"], zero_shot
    assert zero_shot["accuracy"] > zero_shot["chance"], zero_shot
