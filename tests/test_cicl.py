"""IMITATE's clinical-informed contrastive loss against a direct float64 transcription of
Eq. 3–5 (with hilum's documented target normalisation), for both loss implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hilum.trainer.objectives import ObjectiveInputs
from hilum.trainer.objectives.imitate.cicl import CiclConfig, CiclObjective


def _cicl_transcribed(v, t, e, log_scale, lam):
    r = torch.corrcoef(e)  # Eq. 3: Pearson correlation between reports' embeddings
    w = 1 - torch.exp(-lam * r)  # Eq. 4
    w.fill_diagonal_(1.0)
    target_rows = w / w.sum(1, keepdim=True)  # image -> text targets
    target_cols = (target_rows / target_rows.sum(0, keepdim=True)).T  # text -> image targets
    logits = log_scale.exp() * v @ t.T
    i2t = -(target_rows * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(target_cols * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (i2t + t2i) / 2


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("embedding", ["report", "text_features"])
def test_cicl_is_eq_3_to_5(impl, embedding):
    g = torch.Generator().manual_seed(3)
    b = 13
    v, t = (F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    report = torch.randn(b, 24, generator=g, dtype=torch.float64) + 2 * torch.randn(1, 24, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(2.5, dtype=torch.float64)
    e = report if embedding == "report" else t
    want_v, want_t = v.clone().requires_grad_(), t.clone().requires_grad_()
    want = _cicl_transcribed(want_v, want_t, e, log_scale, 0.2)
    want.backward()

    dtype = torch.float64 if impl == "torch" else torch.float32
    term = CiclObjective(CiclConfig(name="cicl", gather=False, impl=impl, embedding=embedding))
    got_v, got_t = v.to(dtype).clone().requires_grad_(), t.to(dtype).clone().requires_grad_()
    got = term(ObjectiveInputs({"image": got_v, "text": got_t, "text_pooled": report.to(dtype)}, log_scale.to(dtype)))
    got.backward()
    tol = dict(rtol=1e-9, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=tol["rtol"])
    torch.testing.assert_close(got_v.grad.double(), want_v.grad, **tol)
    torch.testing.assert_close(got_t.grad.double(), want_t.grad, **tol)


def test_cicl_with_identical_reports_everywhere_is_not_clip():
    """Sanity: with clinically similar reports the targets spread beyond the diagonal."""
    from hilum.kernels.infonce import infonce_loss

    g = torch.Generator().manual_seed(0)
    v, t = (F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    report = torch.randn(1, 16, generator=g, dtype=torch.float64).repeat(6, 1) + 0.01 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    s = torch.tensor(1.0, dtype=torch.float64)
    term = CiclObjective(CiclConfig(name="cicl", gather=False, impl="torch"))
    cicl = float(term(ObjectiveInputs({"image": v, "text": t, "text_pooled": report}, s)))
    assert cicl != pytest.approx(float(infonce_loss(v, t, s, impl="torch")), rel=1e-3)
    with pytest.raises(KeyError, match="no model output or side input named 'text_pooled'"):
        term(ObjectiveInputs({"image": v, "text": t}, s))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cicl_code_form_is_the_authors_prior(impl):
    """form: code — the one-hot target plus prior_scale · max(R, 0) off the diagonal (the authors'
    code), through both loss implementations, against a float64 transcription."""
    g = torch.Generator().manual_seed(8)
    b = 10
    v, t = (F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    report = torch.randn(b, 24, generator=g, dtype=torch.float64) + torch.randn(1, 24, generator=g, dtype=torch.float64)
    log_scale = torch.tensor(2.0, dtype=torch.float64)
    prior = torch.corrcoef(report).clamp_min(0).fill_diagonal_(0)
    w = torch.eye(b, dtype=torch.float64) + 0.07 * prior
    rows = w / w.sum(1, keepdim=True)
    cols = (rows / rows.sum(0, keepdim=True)).T
    want_v = v.clone().requires_grad_()
    logits = log_scale.exp() * want_v @ t.T
    want = (-(rows * F.log_softmax(logits, 1)).sum(1).mean() - (cols * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2
    want.backward()
    dtype = torch.float64 if impl == "torch" else torch.float32
    term = CiclObjective(CiclConfig(name="cicl", gather=False, impl=impl, form="code", prior_scale=0.07))
    got_v = v.to(dtype).clone().requires_grad_()
    got = term(ObjectiveInputs({"image": got_v, "text": t.to(dtype), "text_pooled": report.to(dtype)}, log_scale.to(dtype)))
    got.backward()
    tol = dict(rtol=1e-9, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=tol["rtol"])
    torch.testing.assert_close(got_v.grad.double(), want_v.grad, **tol)
