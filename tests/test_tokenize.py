"""Tokenising in loader workers: a thread pool per worker where CPUs allow, the same tokens either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from hilum.trainer.data.text import Tokenize, worker_tokenizer_threads

REPORTS = ["mild right lower lung opacity.", "no acute cardiopulmonary process. " * 20, "", "Small LEFT effusion."] * 8


class TokenizeInWorker(IterableDataset):
    """Yields one tokenised batch and the tokenizer settings the worker process ended up with."""

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize

    def __iter__(self):
        tokens = self.tokenize(REPORTS)
        yield tokens, os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAYON_NUM_THREADS")


def in_worker(tokenize: Tokenize):
    loader = DataLoader(TokenizeInWorker(tokenize), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    return next(iter(loader))


def test_a_worker_given_threads_tokenises_in_parallel_with_the_same_tokens(phantom_dir: Path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # as `hilum train` sets it for every process
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    path = str(phantom_dir / "tokenizer")
    one, switch_one, pool_one = in_worker(Tokenize(path, 48))
    three, switch_three, pool_three = in_worker(Tokenize(path, 48, threads=3))
    assert (switch_one, pool_one) == ("false", None)
    assert (switch_three, pool_three) == ("true", "3")
    assert torch.equal(one["input_ids"], three["input_ids"]) and torch.equal(one["attention_mask"], three["attention_mask"])
    # In the training process itself the setting changes nothing.
    main = Tokenize(path, 48, threads=3)
    assert torch.equal(main(REPORTS)["input_ids"], one["input_ids"])
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false" and "RAYON_NUM_THREADS" not in os.environ


def test_auto_threads_share_the_rank_s_cpus_among_its_processes():
    assert worker_tokenizer_threads(0, 1, 1) == 1  # the CPU demo: one CPU per rank
    assert worker_tokenizer_threads(0, 16, 4) == 3  # a 16-core GPU node, 4 loader workers
    assert worker_tokenizer_threads(0, 64, 2) == 4  # bounded
    assert worker_tokenizer_threads(0, 8, 0) == 4  # no loader workers: the training process tokenises (threads unused)
    assert worker_tokenizer_threads(2, 1, 4) == 2  # set explicitly: as set
    with pytest.raises(ValueError, match="threads must be at least 1"):
        Tokenize("unused", 16, threads=0)
