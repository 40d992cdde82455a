"""Checkpoint safety: weights-only loading of DeepSpeed files, completeness markers, RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hilum.trainer import checkpoint  # noqa: E402


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_deepspeed_files_load_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    checkpoint.use_weights_only_loading(engine)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19"}, good)
    assert torch.equal(engine.checkpoint_engine.load(str(good))["module"]["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(evil))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return checkpoint.CheckpointStore(str(tmp_path / "ckpts"))
    options = request.getfixturevalue("s3_server")
    import fsspec

    fsspec.filesystem("s3", **options).mkdir("ckpt-bucket")
    return checkpoint.CheckpointStore("s3://ckpt-bucket/runs/t", options)


def test_only_checkpoints_with_marker_count(store, tmp_path):
    for step, complete in ((5, True), (10, True), (15, False), (20, False)):
        staged = tmp_path / "staged" / checkpoint.tag_for(step)
        staged.mkdir(parents=True)
        (staged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
        store.upload(staged, checkpoint.tag_for(step))
        if complete:
            store.write_marker(checkpoint.tag_for(step), {"step": step, "world_size": 2, "saved_at": 1.0})
    assert [c.step for c in store.list_complete()] == [5, 10]
    assert store.latest_complete().step == 10 and store.find(5).world_size == 2
    assert store.size(store.find(5)) > 100
    with pytest.raises(FileNotFoundError, match="at step 15"):
        store.find(15)
    checkpoint.local_copy(store, store.find(5))
    got = checkpoint.local_copy(store, store.find(10))
    assert sorted(p.name for p in got.iterdir()) == [checkpoint.COMPLETE, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    if not store.is_local:  # downloaded into a node-local cache that keeps one checkpoint
        assert [p.name for p in got.parent.iterdir()] == [checkpoint.tag_for(10)]
    store.remove(checkpoint.tag_for(5))
    assert [c.step for c in store.list_complete()] == [10]


def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
