"""Write the phantom data set: train and test WebDataset shards, their manifests, and a tokenizer."""

from __future__ import annotations

import io
import posixpath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from trainer.data import phantom
from trainer.data.shards import Manifest, write_shards
from trainer.data.stream import report_text
from trainer.data.text import train_wordpiece


def phantom_samples(n: int, seed: int, size: int, split: str) -> Iterator[dict[str, Any]]:
    """``n`` webdataset samples; the split name enters the seed so train and test never coincide."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2)])
    for i in range(n):
        case = phantom.sample_case(rng, size)
        buf = io.BytesIO()
        Image.fromarray(case.image, mode="L").save(buf, format="PNG")
        key = f"{split}{i:07d}"
        yield {
            "__key__": key,
            "png": buf.getvalue(),
            "json": {
                "findings": case.findings_text,
                "impression": case.impression_text,
                "labels": case.labels(),
                "entities": case.entities(),
                "view": case.view,
                "study_id": key,
            },
        }


def build_phantom_dataset(
    out_dir: str,
    n_train: int = 2048,
    n_test: int = 256,
    size: int = 128,
    seed: int = 0,
    samples_per_shard: int = 256,
) -> dict[str, Manifest]:
    """Shards and ``train.json``/``test.json`` manifests under ``out_dir``, and ``tokenizer/`` beside them."""
    manifests = {}
    texts: list[str] = []
    for split, n in (("train", n_train), ("test", n_test)):
        if n <= 0:
            continue

        def tracked(split: str = split, n: int = n) -> Iterator[dict[str, Any]]:
            for sample in phantom_samples(n, seed, size, split):
                if split == "train":
                    texts.append(report_text(sample["json"], "report"))
                yield sample

        manifests[split] = write_shards(tracked(), out_dir, split, samples_per_shard)
    if texts and "://" not in out_dir:
        train_wordpiece(texts, posixpath.join(out_dir, "tokenizer"), vocab_size=1000)
    return manifests
