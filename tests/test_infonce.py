"""InfoNCE: every implementation against a float64 loop formula, open_clip and F.cross_entropy.

The Triton kernel runs on CUDA when there is a GPU and in Triton's CPU interpreter otherwise
(conftest sets TRITON_INTERPRET=1), so its masking, online max and target regeneration are
tested on every machine. Sizes are chosen not to be multiples of any block size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hilum.kernels.infonce import infonce_loss, infonce_loss_reference
from hilum.kernels.targets import DenseTargets, LabelSimilarityTargets, ReportCorrelationTargets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def direct(img, txt, scale, targets=None):
    """Loops over rows in float64: the textbook definition, nothing shared with the implementation."""
    img, txt = img.double().cpu(), txt.double().cpu()
    s = math.exp(float(scale))
    n, m = img.shape[0], txt.shape[0]
    t = torch.eye(n, dtype=torch.float64) if targets is None else targets.double().cpu()
    t = t / t.sum(1, keepdim=True)
    total = 0.0
    for i in range(n):  # image -> text
        logits = [s * float(img[i] @ txt[j]) for j in range(m)]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
        total += -sum(float(t[i, j]) * (logits[j] - lse) for j in range(m)) / n
    col = t.sum(0)
    for j in range(m):  # text -> image, column-normalised targets
        logits = [s * float(txt[j] @ img[i]) for i in range(n)]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
        total += -sum(float(t[i, j] / col[j]) * (logits[i] - lse) for i in range(n)) / m
    return total / 2


def features(b, d, dtype=torch.float32, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(m or b, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


def make_targets(kind, n, m=None, seed=0):
    """One instance of every kind of target over an (n, m) batch."""
    m = m or n
    g = torch.Generator().manual_seed(seed)
    if kind == "hard":
        return None
    if kind == "dense":
        w = torch.rand(n, m, generator=g, dtype=torch.float64)
        w[:, : min(n, m)] += torch.eye(n, min(n, m), dtype=torch.float64) * 3
        return w
    if kind == "correlation":
        # shared structure so correlations are mostly positive, as between real reports
        emb = torch.randn(n, 13, generator=g, dtype=torch.float64) + 2 * torch.randn(1, 13, generator=g, dtype=torch.float64)
        return ReportCorrelationTargets(emb, lam=0.2)
    if kind == "labels":
        vocab = torch.randn(9, 6, generator=g, dtype=torch.float64)
        rows = torch.randint(-1, 9, (n, 3), generator=g)
        rows[:, 0] = rows[:, 0].clamp_min(0)
        cols = rows[:m] if m <= n else torch.randint(0, 9, (m, 1), generator=g)
        return LabelSimilarityTargets.from_label_embeddings(vocab, rows, cols)
    raise ValueError(kind)


def dense_of(targets):
    if targets is None or isinstance(targets, torch.Tensor):
        return targets
    return targets.dense(torch.float64)


def oracle(img, txt, log_scale, targets, directions="both"):
    """Loss and gradients of the float64 dense formula (autograd through F.log_softmax)."""
    a = img.detach().double().cpu().requires_grad_()
    b = txt.detach().double().cpu().requires_grad_()
    s = torch.tensor(float(log_scale), dtype=torch.float64, requires_grad=True)
    loss = infonce_loss_reference(a, b, s, targets, directions)
    loss.backward()
    return float(loss.detach()), a.grad, b.grad, float(s.grad)


def run(img, txt, log_scale, targets, **kw):
    a = img.detach().clone().requires_grad_()
    b = txt.detach().clone().requires_grad_()
    s = torch.tensor(float(log_scale), dtype=torch.float32 if img.dtype != torch.float64 else torch.float64,
                     device=img.device, requires_grad=True)
    loss = infonce_loss(a, b, s, targets, **kw)
    loss.backward()
    return float(loss.detach()), a.grad.double().cpu(), b.grad.double().cpu(), float(s.grad)


# ---------------------------------------------------------------------------------- references


@pytest.mark.parametrize("b,d", [(1, 3), (5, 7), (17, 33)])
@pytest.mark.parametrize("log_scale", [0.0, math.log(1 / 0.07), math.log(100.0)])
def test_dense_reference_matches_loop_formula(b, d, log_scale):
    img, txt = features(b, d, torch.float64, seed=b * d)
    got = infonce_loss_reference(img, txt, torch.tensor(log_scale, dtype=torch.float64))
    assert float(got) == pytest.approx(direct(img, txt, log_scale), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["dense", "correlation", "labels"])
def test_soft_targets_match_loop_formula(kind):
    img, txt = features(11, 8, torch.float64, seed=4)
    t = make_targets(kind, 11, seed=5)
    got = infonce_loss_reference(img, txt, torch.tensor(2.5, dtype=torch.float64), t)
    assert float(got) == pytest.approx(direct(img, txt, 2.5, dense_of(t)), rel=1e-10)


def test_soft_targets_match_cross_entropy_with_probabilities():
    img, txt = features(13, 9, torch.float64, seed=6)
    t = make_targets("correlation", 13, seed=7).dense(torch.float64)
    logits = math.exp(2.0) * img @ txt.T
    expected = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, (t / t.sum(0, keepdim=True)).T))
    for impl in ("dense", "torch"):
        got = infonce_loss(img, txt, torch.tensor(2.0, dtype=torch.float64), t, impl=impl, chunk_size=4)
        assert float(got) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("impl", ["dense", "torch", "triton"])
def test_hard_targets_match_open_clip(impl):
    from open_clip.loss import ClipLoss

    dtype = torch.float32 if impl == "triton" else torch.float64
    img, txt = features(23, 17, dtype, seed=8)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    if impl == "dense":
        ours = oracle(img, txt, scale, None)
    else:
        ours = run(img.to(DEVICE), txt.to(DEVICE), float(scale), None, impl=impl, chunk_size=5, fp32_precision="ieee")
    img, txt = img.double(), txt.double()
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = scale.exp().clone().requires_grad_()  # open_clip takes the scale itself, we take its log
    loss = ClipLoss()(a, b, s)
    loss.backward()
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert ours[0] == pytest.approx(float(loss.detach()), rel=tol["rtol"])
    torch.testing.assert_close(ours[1], a.grad, **tol)
    torch.testing.assert_close(ours[2], b.grad, **tol)
    # open_clip takes the scale itself: chain rule through exp
    assert ours[3] == pytest.approx(float(s.grad) * float(s.detach()), rel=tol["rtol"], abs=tol["atol"])


def test_identity_soft_targets_equal_hard_targets():
    img, txt = features(12, 6, torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    for impl in ("dense", "torch"):
        soft = infonce_loss(img, txt, scale, torch.eye(12, dtype=torch.float64), impl=impl)
        assert float(soft) == pytest.approx(float(infonce_loss(img, txt, scale, impl=impl)), rel=1e-12)


# ------------------------------------------------------------------------- chunked PyTorch path


@pytest.mark.parametrize("kind", ["hard", "dense", "correlation", "labels"])
@pytest.mark.parametrize("b,d,chunk", [(1, 5, 4), (19, 7, 4), (37, 33, 16), (64, 16, 64)])
def test_chunked_reference_matches_float64_oracle(kind, b, d, chunk):
    img, txt = features(b, d, torch.float64, seed=b + d)
    t = make_targets(kind, b, seed=b)
    want = oracle(img, txt, 2.7, t)
    got = run(img, txt, 2.7, t, impl="torch", chunk_size=chunk)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-13)
    assert got[3] == pytest.approx(want[3], rel=1e-9, abs=1e-13)


def test_rectangular_soft_targets_medfilip_style():
    """Images against one text per structured label (MedFILIP's N × M label matrix)."""
    img, txt = features(10, 8, torch.float64, seed=1, m=14)
    t = make_targets("labels", 10, 14, seed=2)
    assert tuple(t.dense().shape) == (10, 14)
    want = oracle(img, txt, 1.5, t)
    assert want[0] == pytest.approx(direct(img, txt, 1.5, t.dense()), rel=1e-10)
    got = run(img, txt, 1.5, t, impl="torch", chunk_size=3)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["hard", "correlation"])
def test_chunked_gradients_pass_gradcheck(kind):
    img, txt = features(7, 5, torch.float64, seed=3)
    t = make_targets(kind, 7, seed=3)
    args = (img.requires_grad_(), txt.requires_grad_(), torch.tensor(1.7, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss(a, b, s, t, impl="torch", chunk_size=3), args)


def test_temperature_gradient_gradcheck_at_large_scale():
    img, txt = features(9, 6, torch.float64, seed=4)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: infonce_loss(img, txt, s, impl="torch", chunk_size=4), (scale,))


def test_huge_logits_stay_finite():
    # Unnormalised features at scale 100: logits in the thousands, a naive exp overflows.
    img, txt = features(21, 8, torch.float64, seed=5)
    img, txt = img * 30, txt * 30
    want = oracle(img, txt, math.log(100.0), None)
    assert math.isfinite(want[0])
    got = run(img.float(), txt.float(), math.log(100.0), None, impl="torch", chunk_size=5)
    assert got[0] == pytest.approx(want[0], rel=1e-5)


# -------------------------------------------------------------------------------- Triton path


@pytest.mark.parametrize("kind", ["hard", "dense", "correlation", "labels"])
@pytest.mark.parametrize("b,d", [(1, 3), (45, 19), (70, 40)])
def test_triton_matches_float64_oracle(kind, b, d):
    img, txt = features(b, d, torch.float32, seed=b * 3 + d)
    t = make_targets(kind, b, seed=d)
    want = oracle(img, txt, math.log(20.0), t)
    dev_t = t.to(DEVICE) if isinstance(t, torch.Tensor) else t
    got = run(img.to(DEVICE), txt.to(DEVICE), math.log(20.0), dev_t, impl="triton", fp32_precision="ieee")
    assert got[0] == pytest.approx(want[0], rel=2e-6, abs=1e-6)
    # GPUs' exp2/log2 are approximate to a few ulp: 1e-5 absolute at logit scale 20
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)
    assert got[3] == pytest.approx(want[3], rel=1e-4, abs=1e-6)


def test_single_directions_of_the_reference_are_the_two_halves():
    img, txt = features(9, 5, torch.float64, seed=4)
    s = torch.tensor(1.7, dtype=torch.float64)
    logits = s.exp() * img @ txt.T
    labels = torch.arange(9)
    i2t = infonce_loss_reference(img, txt, s, directions="image_to_text")
    t2i = infonce_loss_reference(img, txt, s, directions="text_to_image")
    assert float(i2t) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    assert float(t2i) == pytest.approx(float(F.cross_entropy(logits.T, labels)), rel=1e-12)
    t = make_targets("correlation", 9)
    halves = infonce_loss_reference(img, txt, s, t, "image_to_text") + infonce_loss_reference(img, txt, s, t, "text_to_image")
    assert float(halves) / 2 == pytest.approx(direct(img, txt, 1.7, t.dense()), rel=1e-12)
    with pytest.raises(ValueError, match="directions"):
        infonce_loss(img, txt, s, directions="sideways")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["hard", "correlation", "labels"])
@pytest.mark.parametrize("directions", ["image_to_text", "text_to_image"])
def test_single_direction_matches_float64_oracle(impl, kind, directions):
    img, txt = features(21, 11, torch.float64 if impl == "torch" else torch.float32, seed=6)
    targets = make_targets(kind, 21, seed=2)
    want = oracle(img, txt, 2.0, targets, directions)
    got = run(img, txt, 2.0, targets, impl=impl, chunk_size=4, fp32_precision="ieee", directions=directions)
    tol = dict(rtol=1e-10, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
    assert got[0] == pytest.approx(want[0], rel=tol["rtol"])
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2], **tol)
    assert got[3] == pytest.approx(want[3], rel=tol["rtol"], abs=tol["atol"])


def test_triton_rectangular_labels():
    img, txt = features(33, 12, torch.float32, seed=11, m=50)
    t = make_targets("labels", 33, 50, seed=12)
    want = oracle(img, txt, 2.0, t)
    got = run(img.to(DEVICE), txt.to(DEVICE), 2.0, t, impl="triton", fp32_precision="ieee")
    assert got[0] == pytest.approx(want[0], rel=2e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs_accumulate_in_float32(dtype):
    img, txt = features(67, 24, dtype, seed=13)
    # the oracle sees exactly the rounded inputs, so only accumulation error remains
    want = oracle(img, txt, math.log(100.0), None)
    got = run(img.to(DEVICE), txt.to(DEVICE), math.log(100.0), None, impl="triton")
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    # gradients are returned in the input dtype (and the backward multiplies in it, like
    # FlashAttention): compare at its resolution, relative to the gradient's size
    for g, w in ((got[1], want[1]), (got[2], want[2])):
        assert float((g - w).abs().max()) <= 1e-2 * float(w.abs().max())


def test_triton_huge_logits_and_determinism():
    img, txt = features(40, 16, torch.float32, seed=14)
    img, txt = (img * 30).to(DEVICE), (txt * 30).to(DEVICE)
    want = oracle(img, txt, math.log(100.0), None)
    first = run(img, txt, math.log(100.0), None, impl="triton", fp32_precision="ieee")
    second = run(img, txt, math.log(100.0), None, impl="triton", fp32_precision="ieee")
    assert math.isfinite(first[0]) and first[0] == pytest.approx(want[0], rel=1e-5)
    assert first[0] == second[0] and first[3] == second[3]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


# ------------------------------------------------------------------------------------- errors


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="same width"):
        infonce_loss(torch.randn(3, 4), torch.randn(3, 5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="as many images as texts"):
        infonce_loss(torch.randn(3, 4), torch.randn(4, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="targets must be"):
        infonce_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(1.0), torch.eye(4))
    with pytest.raises(ValueError, match="impl must be"):
        infonce_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(1.0), impl="cuda")
    with pytest.raises(TypeError, match="targets must be"):
        infonce_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(1.0), [[1.0]])


def test_target_rows_that_do_not_sum_to_a_positive_number_are_refused():
    w = torch.eye(4, dtype=torch.float64)
    w[2] = 0.0
    with pytest.raises(ValueError, match="row 2 has weights summing to 0"):
        infonce_loss(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                     torch.tensor(1.0), w, impl="torch")


def test_label_targets_refuse_a_sample_without_labels():
    labels = torch.tensor([[0, -1], [-1, -1]])
    with pytest.raises(ValueError, match="sample 1 has no label"):
        LabelSimilarityTargets(torch.eye(3), labels, labels)
    with pytest.raises(ValueError, match="outside"):
        LabelSimilarityTargets(torch.eye(3), torch.tensor([[5]]), torch.tensor([[0]]))


def test_dense_targets_wrapper_is_what_a_tensor_becomes():
    img, txt = features(6, 4, torch.float64)
    w = make_targets("dense", 6)
    s = torch.tensor(1.0, dtype=torch.float64)
    assert float(infonce_loss(img, txt, s, w)) == float(infonce_loss(img, txt, s, DenseTargets(w)))


# --------------------------------------------------------------------------- target definitions


def test_report_correlation_targets_follow_imitate_eq_3_and_4():
    """R is the Pearson correlation of two samples' report embeddings (torch.corrcoef); the
    smoothed weights are 1 − exp(−λR) off the diagonal and 1 on it."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 16, generator=g, dtype=torch.float64) + torch.randn(1, 16, generator=g, dtype=torch.float64)
    t = ReportCorrelationTargets(emb, lam=0.3)
    r = torch.corrcoef(emb)
    expected = 1 - torch.exp(-0.3 * r)
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(t.weights(slice(0, 9), slice(0, 9), torch.float64), expected)
    # any tile is the matching slice of the whole
    torch.testing.assert_close(t.weights(slice(2, 7), slice(4, 9), torch.float64), expected[2:7, 4:9])
    torch.testing.assert_close(t.dense(), expected / expected.sum(1, keepdim=True))


def test_label_similarity_targets_follow_medfilip_eq_4_and_5():
    """s_ij = max over the labels of i and of j of the cosine similarity of their embeddings."""
    g = torch.Generator().manual_seed(1)
    vocab = torch.randn(7, 5, generator=g, dtype=torch.float64)
    rows = torch.tensor([[0, 3, -1], [2, -1, -1], [6, 1, 4]])
    cols = torch.tensor([[5], [0], [3], [2]])
    t = LabelSimilarityTargets.from_label_embeddings(vocab, rows, cols)
    unit = F.normalize(vocab, dim=1)
    for i in range(3):
        for j in range(4):
            best = max(float(unit[a] @ unit[b]) for a in rows[i].tolist() if a >= 0 for b in cols[j].tolist() if b >= 0)
            assert float(t.weights(slice(i, i + 1), slice(j, j + 1), torch.float64)) == pytest.approx(max(best, 0.0), abs=1e-6)

