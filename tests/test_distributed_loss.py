"""The clip term under 2 gloo processes equals the single-process global-batch loss and gradient."""

from __future__ import annotations

import os

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.local import free_port
from trainer.distributed import gather_with_grad
from trainer.objectives import ObjectiveInputs, build_objectives
from launch.config import build_config


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
    loss = _clip_term()(ObjectiveInputs(local_img, local_txt, scale, gather=gather_with_grad))
    loss.backward()
    # The engine averages parameter gradients over ranks; do the same for the features' share.
    # Plain lists: tensors would travel as shared memory that dies with this process.
    queue.put((rank, float(loss), (local_img.grad / 2).tolist(), (local_txt.grad / 2).tolist(), float(scale.grad)))
    dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_global_batch():
    img, txt = _features()
    img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = _clip_term()(ObjectiveInputs(img, txt, scale))
    loss.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for rank, r_loss, g_img, g_txt, g_scale in results:
        rows = slice(rank * 4, rank * 4 + 4)
        assert r_loss == float(loss)
        # The gather's backward sums over ranks (x2); the engine's mean over ranks halves it.
        torch.testing.assert_close(torch.tensor(g_img, dtype=torch.float64), img.grad[rows], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.tensor(g_txt, dtype=torch.float64), txt.grad[rows], rtol=1e-12, atol=1e-14)
        assert g_scale == pytest.approx(float(scale.grad), rel=1e-12)
