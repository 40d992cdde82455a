"""`hilum export`: a ZeRO checkpoint as one fp32 model that `from_pretrained` loads with nothing
but the export directory, giving the trained model's exact evaluation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import tiny_config, write_config
from tests.test_e2e import hilum


@pytest.mark.parametrize("stage", [0, 3])
def test_export_then_from_pretrained_reproduces_the_runs_evaluation(phantom_dir, tmp_path, stage):
    from hilum.launch.export import from_pretrained
    from hilum.trainer.data.phantom import ZERO_SHOT_PROMPTS
    from hilum.trainer.data.shards import load_manifest
    from hilum.trainer.data.stream import Preprocess
    from hilum.trainer.evaluate import evaluate

    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"zero_stage": stage, "max_steps": 4, "checkpoint_every": 4},
                      cluster={"launcher": "local"})
    hilum("train", "--config", str(write_config(tmp_path / "run.yaml", raw)))
    run_dir = tmp_path / "runs" / "t"
    out = tmp_path / "export"
    proc = hilum("export", str(run_dir), "--out", str(out))
    assert "exported step 4" in proc.stdout
    meta = json.loads((out / "export.json").read_text())
    assert meta["step"] == 4 and meta["parameters"] > 0
    # The export stands alone: the run (checkpoints, tokenizer path) can be gone.
    shutil.rmtree(run_dir / "checkpoints")
    pretrained = from_pretrained(out)
    cfg = pretrained.config
    d = cfg.data
    got = evaluate(pretrained.model, load_manifest(str(phantom_dir / "test.json")), Preprocess(d.image_size, d.in_chans, d.text, False),
                   pretrained.tokenize, ZERO_SHOT_PROMPTS, 32, torch.device("cpu"), torch.float32)
    want = json.loads((run_dir / "eval.json").read_text())
    assert got["zero_shot"]["accuracy"] == pytest.approx(want["zero_shot"]["accuracy"], abs=1e-9)
    for key, value in want["retrieval"].items():
        assert got["retrieval"][key] == pytest.approx(value, abs=1e-6), key
    sims = pretrained.similarity(torch.rand(2, d.in_chans, d.image_size, d.image_size), ["left effusion.", "no finding."])
    assert sims.shape == (2, 2) and bool((sims.abs() <= 1 + 1e-5).all())


def test_export_refuses_what_is_not_there(tmp_path):
    from hilum.launch.export import from_pretrained

    with pytest.raises(FileNotFoundError, match="not a hilum export: model.safetensors"):
        from_pretrained(tmp_path)
