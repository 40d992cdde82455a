"""Under 2 gloo processes, the clip term and the sharded InfoNCE equal one process on the global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hilum.cluster.local import free_port
from hilum.launch.config import build_config
from hilum.trainer.distributed import gather_with_grad
from hilum.trainer.objectives import ObjectiveInputs, build_objectives


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def _clip_term():
    return build_objectives(build_config({}).objectives)["clip"]


def _rank(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    img, txt = _features()
    rows = slice(rank * 4, rank * 4 + 4)
    local_img, local_txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = _clip_term()(ObjectiveInputs({"image": local_img, "text": local_txt}, scale, gather=gather_with_grad))
    loss.backward()
    # The engine averages parameter gradients over ranks; do the same for the features' share.
    # Plain lists: tensors would travel as shared memory that dies with this process.
    queue.put((rank, float(loss.detach()), (local_img.grad / 2).tolist(), (local_txt.grad / 2).tolist(), float(scale.grad)))
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_global_batch():
    img, txt = _features()
    img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = _clip_term()(ObjectiveInputs({"image": img, "text": txt}, scale))
    loss.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for rank, r_loss, g_img, g_txt, g_scale in results:
        rows = slice(rank * 4, rank * 4 + 4)
        assert r_loss == pytest.approx(float(loss.detach()), rel=1e-12)
        # Gradients come back scaled by the world size; the engine's mean over ranks undoes it.
        torch.testing.assert_close(torch.tensor(g_img, dtype=torch.float64), img.grad[rows], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.tensor(g_txt, dtype=torch.float64), txt.grad[rows], rtol=1e-12, atol=1e-14)
    # each rank's temperature gradient is twice its stripes' share; the engine's mean is the total
    assert sum(r[4] for r in results) / 2 == pytest.approx(float(scale.grad), rel=1e-12)


# --------------------------------------------------------------------------------------------
# infonce_loss_distributed: sharded stripes + reduce-scatter vs one process on the whole batch

CASES = [(kind, impl, "both") for kind in ("hard", "correlation", "labels") for impl in ("torch", "triton")] + [
    ("hard", "triton", "image_to_text"), ("correlation", "torch", "text_to_image"), ("labels", "triton", "text_to_image"),
    ("correlation", "triton", "image_to_text"),
]
PER_RANK, WIDTH = 5, 7  # awkward sizes: not a multiple of any tile


def _global_problem(kind):
    """Global features and, per sample, the data soft targets are built from."""
    g = torch.Generator().manual_seed(42)
    n = 2 * PER_RANK
    img = torch.nn.functional.normalize(torch.randn(n, WIDTH, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, WIDTH, generator=g, dtype=torch.float64), dim=1)
    data = {}
    if kind == "correlation":
        data["emb"] = torch.randn(n, 6, generator=g, dtype=torch.float64) + 2 * torch.randn(1, 6, generator=g, dtype=torch.float64)
    if kind == "labels":
        data["vocab"] = torch.randn(5, 4, generator=g, dtype=torch.float64)
        labels = torch.randint(-1, 5, (n, 2), generator=g)
        labels[:, 0] = labels[:, 0].clamp_min(0)
        data["labels"] = labels
    return img, txt, data


def _targets(kind, data, rows):
    from hilum.kernels.targets import LabelSimilarityTargets, ReportCorrelationTargets

    if kind == "correlation":
        return ReportCorrelationTargets(data["emb"][rows])
    if kind == "labels":
        return LabelSimilarityTargets.from_label_embeddings(data["vocab"], data["labels"][rows], data["labels"][rows])
    return None


def _dist_rank(rank, port, queue, cases):
    from hilum.kernels.infonce_distributed import infonce_loss_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for kind, impl, directions in cases:
        img, txt, data = _global_problem(kind)
        dtype = torch.float64 if impl == "torch" else torch.float32
        for mode in ("exact", "data_parallel"):
            a = img[rows].to(dtype).clone().requires_grad_()
            b = txt[rows].to(dtype).clone().requires_grad_()
            s = torch.tensor(2.2, dtype=dtype, requires_grad=True)
            loss = infonce_loss_distributed(a, b, s, _targets(kind, data, rows), grad_reduction=mode, impl=impl,
                                            chunk_size=3, fp32_precision="ieee", directions=directions)
            loss.backward()
            queue.put(((kind, impl, directions), mode, rank, float(loss.detach()), a.grad.double().tolist(),
                       b.grad.double().tolist(), float(s.grad)))
    dist.destroy_process_group()


def test_distributed_loss_equals_single_process_global_batch():
    from hilum.kernels.infonce import infonce_loss_reference

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_dist_rank, args=(free_port(), queue, CASES), nprocs=2, start_method="spawn")
    results = [queue.get() for _ in range(len(CASES) * 2 * 2)]
    for (kind, impl, directions), mode, rank, loss, g_img, g_txt, g_scale in results:
        img, txt, data = _global_problem(kind)
        img.requires_grad_(), txt.requires_grad_()
        s = torch.tensor(2.2, dtype=torch.float64, requires_grad=True)
        want = infonce_loss_reference(img, txt, s, _targets(kind, data, slice(None)), directions)
        want.backward()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        factor = 2.0 if mode == "data_parallel" else 1.0  # the engine's average over 2 ranks undoes it
        tol = dict(rtol=1e-9, atol=1e-12) if impl == "torch" else dict(rtol=1e-4, atol=1e-6)
        label = f"{kind}/{impl}/{directions}/{mode}/rank{rank}"
        assert loss == pytest.approx(float(want), rel=tol["rtol"]), label
        torch.testing.assert_close(torch.tensor(g_img, dtype=torch.float64) / factor, img.grad[rows], **tol, msg=label)
        torch.testing.assert_close(torch.tensor(g_txt, dtype=torch.float64) / factor, txt.grad[rows], **tol, msg=label)
        # data_parallel: each rank holds world × its stripes' share; their mean is the global gradient
        if mode == "exact":
            assert g_scale == pytest.approx(float(s.grad), rel=tol["rtol"]), label
    for kind, impl, directions in CASES:
        shares = [r[6] for r in results if r[:2] == ((kind, impl, directions), "data_parallel")]
        img, txt, data = _global_problem(kind)
        s = torch.tensor(2.2, dtype=torch.float64, requires_grad=True)
        infonce_loss_reference(img, txt, s, _targets(kind, data, slice(None)), directions).backward()
        assert sum(shares) / 2 == pytest.approx(float(s.grad), rel=1e-9 if impl == "torch" else 1e-4), (kind, impl, directions)
