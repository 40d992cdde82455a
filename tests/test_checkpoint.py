"""Checkpoint safety: weights-only loading of DeepSpeed files, completeness markers, RNG round trip."""

from __future__ import annotations

import json
import os
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from trainer import checkpoint  # noqa: E402


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


def test_only_checkpoints_with_marker_count(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    for step, complete in ((5, True), (10, True), (15, False)):
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "saved_at": 1.0}))
    (root / "step_00000020").mkdir()  # a crash mid-save: no marker
    assert [c.step for c in checkpoint.list_complete(tmp_path)] == [5, 10]
    assert checkpoint.latest_complete(tmp_path).step == 10


def test_rng_state_round_trips_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
