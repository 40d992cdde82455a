"""The InfoNCE reference against a direct float64 formula, including soft targets and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import infonce_loss, infonce_loss_reference


def direct(img, txt, scale, targets=None):
    """Loops over rows in float64: the textbook definition, nothing shared with the implementation."""
    img, txt = img.double(), txt.double()
    s = math.exp(float(scale))
    b = img.shape[0]
    t = torch.eye(b, dtype=torch.float64) if targets is None else targets.double()
    total = 0.0
    for i in range(b):  # image -> text
        logits = [s * float(img[i] @ txt[j]) for j in range(b)]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += -sum(float(t[i, j]) * (logits[j] - lse) for j in range(b)) / b
    col = t.sum(0)
    for j in range(b):  # text -> image, column-normalised targets
        logits = [s * float(txt[j] @ img[i]) for i in range(b)]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        total += -sum(float(t[i, j] / col[j]) * (logits[i] - lse) for i in range(b)) / b
    return total / 2


def features(b, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


@pytest.mark.parametrize("b,d", [(1, 3), (5, 7), (17, 33), (64, 16)])
@pytest.mark.parametrize("log_scale", [0.0, math.log(1 / 0.07), math.log(100.0)])
def test_hard_targets_match_direct_formula(b, d, log_scale):
    img, txt = features(b, d, torch.float64, seed=b * d)
    got = infonce_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64))
    assert float(got) == pytest.approx(direct(img, txt, log_scale), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("b", [3, 10, 31])
def test_soft_targets_match_direct_formula(b):
    img, txt = features(b, 8, torch.float64, seed=b)
    g = torch.Generator().manual_seed(b)
    t = torch.rand(b, b, generator=g, dtype=torch.float64) + torch.eye(b, dtype=torch.float64) * 2
    t = t / t.sum(1, keepdim=True)
    got = infonce_loss(img, txt, torch.tensor(2.5, dtype=torch.float64), t)
    assert float(got) == pytest.approx(direct(img, txt, 2.5, t), rel=1e-10)


def test_identity_soft_targets_equal_hard_targets():
    img, txt = features(12, 6, torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    assert float(infonce_loss(img, txt, scale, torch.eye(12, dtype=torch.float64))) == pytest.approx(float(infonce_loss(img, txt, scale)), rel=1e-12)


def test_gradients_match_finite_differences():
    img, txt = features(6, 5, torch.float64, seed=3)
    t = torch.softmax(torch.randn(6, 6, dtype=torch.float64), dim=1)
    args = (img.requires_grad_(), txt.requires_grad_(), torch.tensor(1.7, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss_reference(a, b, s), args)
    assert torch.autograd.gradcheck(lambda a, b, s: infonce_loss_reference(a, b, s, t), args)


def test_low_precision_inputs_compute_in_float32():
    img64, txt64 = features(40, 32, torch.float64, seed=9)
    exact = direct(img64, txt64, math.log(100.0))
    got = infonce_loss(img64.bfloat16(), txt64.bfloat16(), torch.tensor(math.log(100.0)))
    assert got.dtype == torch.float32
    # only the bf16 rounding of the inputs remains
    assert float(got) == pytest.approx(exact, rel=2e-2)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        infonce_loss(torch.randn(3, 4), torch.randn(4, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="targets must be"):
        infonce_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(1.0), torch.eye(4))
