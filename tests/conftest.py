"""Shared fixtures. Tests build everything they need: tiny models, generated shards, no downloads."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU, the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# triton is first imported.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
# The `hilum` console script installed beside this interpreter, run (cwd=OUTSIDE) from a directory
# outside the repository, as a user runs it: nothing may depend on the repository root being on
# sys.path.
HILUM = [shutil.which("hilum", path=str(Path(sys.executable).parent)) or "hilum"]
OUTSIDE = Path(tempfile.gettempdir())


def png_bytes(rng: np.random.Generator, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def simple_samples(n: int, prefix: str = "s", seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {
            "__key__": f"{prefix}{i:05d}",
            "png": png_bytes(rng),
            "json": {"findings": f"finding number {i}.", "impression": f"impression {i}.", "labels": {}},
        }


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom data set (shards, manifests, tokenizer) shared by the end-to-end tests."""
    from hilum.trainer.data.phantom_dataset import build_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    build_phantom_dataset(str(out), n_train=256, n_test=64, size=64, seed=0, samples_per_shard=64)
    return out


def tiny_config(phantom_dir: Path, run_root: Path, **sections) -> dict:
    """The tiny-clip config shrunk for tests, pointing at a phantom data set."""
    from hilum.launch.config import parse_yaml

    raw = parse_yaml((ROOT / "configs" / "tiny-clip.yaml").read_text())
    raw["run"].update(output_dir=str(run_root), name="t")
    raw["data"].update(
        train_manifest=str(phantom_dir / "train.json"),
        eval_manifest=str(phantom_dir / "test.json"),
        batch_size=8,
        num_workers=0,
        shuffle_buffer=16,
        context_length=32,
    )
    raw["model"]["text"]["tokenizer"] = str(phantom_dir / "tokenizer")
    raw["model"]["image"]["kwargs"].update(depth=1)
    raw["model"]["text"]["config"].update(num_hidden_layers=1)
    raw["train"].update(max_steps=6, log_every=2, checkpoint_every=3)
    raw["monitoring"].update(metrics_port=0)
    raw["eval"].update(batch_size=32)
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; yields fsspec storage options pointing at it."""
    from tests.s3server import moto_s3_server

    with moto_s3_server() as options:
        yield options


def train_shipped_config(name: str, phantom_dir: Path, run_root: Path, steps: int = 300) -> tuple[list[float], dict]:
    """Train ``configs/NAME.yaml`` on the test phantom set through `hilum train` (2 local workers,
    16 per rank, GradCache chunks of 6); return the logged values of its term and the zero-shot
    evaluation."""
    from hilum.launch.config import parse_yaml
    from tests.test_e2e import hilum

    raw = parse_yaml((ROOT / "configs" / f"{name}.yaml").read_text())
    raw["run"].update(output_dir=str(run_root), name=name)
    raw["data"].update(train_manifest=str(phantom_dir / "train.json"), eval_manifest=str(phantom_dir / "test.json"),
                       batch_size=16, num_workers=0)
    raw["model"]["text"]["tokenizer"] = str(phantom_dir / "tokenizer")
    raw["train"].update(max_steps=steps, log_every=steps // 10, checkpoint_every=0)
    raw["optim"].update(warmup_steps=20)
    raw["gradcache"] = {"enabled": True, "chunk_size": 6}
    raw["cluster"].update(launcher="local")
    raw["monitoring"].update(metrics_port=0)
    hilum("train", "--config", str(write_config(run_root / f"{name}.yaml", raw)))
    run_dir = run_root / name
    term = raw["objectives"][0]["name"]
    values = [json.loads(line)[term] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    zero_shot = json.loads((run_dir / "eval.json").read_text())["zero_shot"]
    print(name, "losses", values, "zero-shot", zero_shot)  # shown with -rP
    return values, zero_shot

