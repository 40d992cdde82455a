"""Tokenizers: a picklable wrapper for loader workers, and a WordPiece trainer for generated corpora."""

from __future__ import annotations

import os
from typing import Iterable

import torch
from torch.utils.data import get_worker_info

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenize:
    """Batch tokenizer loaded lazily from a local directory (so it pickles into spawned workers).

    Nothing is downloaded: transformers is told the hub is offline.

    ``threads``: how many threads a data-loader worker tokenises a batch with. Tokenising is a
    third of a GPU-decode loader worker's time, and the Rust tokenizer splits a batch across a
    thread pool (64 reports: 5.9 ms on one thread, 4.0 ms on two). Training processes turn that
    pool off (``TOKENIZERS_PARALLELISM=false``: one pool per worker, each as large as the machine,
    would oversubscribe it); a worker given ``threads`` > 1 turns it back on at that size, for
    itself only, before its first batch. Elsewhere (the training process) this setting does nothing.
    """

    def __init__(self, path: str, context_length: int, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.path, self.context_length, self.threads = path, context_length, threads
        self._tok = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "threads": self.threads, "_tok": None}

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        if self._tok is None:
            if self.threads > 1 and get_worker_info() is not None:
                # Read by the Rust side: the switch at every batch, the pool size when the pool starts
                # (at this worker's first batch, as nothing in a spawned worker tokenised before).
                os.environ["TOKENIZERS_PARALLELISM"] = "true"
                os.environ["RAYON_NUM_THREADS"] = str(self.threads)
            self._tok = load_tokenizer(self.path)
        return self._tok

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            # NumPy arrays, then shared as tensors: transformers builds "pt" tensors from Python
            # lists, 6.7 ms for 64 reports × 128 tokens against 4.2 ms this way; the 2.5 ms saved
            # are an eighth of a GPU-decode loader worker's time per batch.
            return_tensors="np",
        )
        return {"input_ids": torch.from_numpy(enc["input_ids"]), "attention_mask": torch.from_numpy(enc["attention_mask"])}


def worker_tokenizer_threads(configured: int, cpus_per_rank: float, loader_workers: int) -> int:
    """``data.tokenizer_threads``, with 0 resolved: the CPUs a rank was granted, shared by its
    training process and its loader workers, at most 4 (a bound, not a measured optimum: two
    threads took a batch of 64 reports from 5.9 to 4.0 ms on a 2-core machine). One CPU per rank,
    the CPU demo's, gives 1: one thread, as before this setting existed."""
    if configured:
        return configured
    return max(1, min(4, int(cpus_per_rank) // (loader_workers + 1)))


def load_tokenizer(path: str):  # noqa: ANN201 - a transformers tokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model.text.tokenizer: {path} is not a directory (generate phantom data with "
            "`hilum shards phantom`, or point it at a local tokenizer directory)"
        )
    return AutoTokenizer.from_pretrained(path)


def train_wordpiece(texts: Iterable[str], out_dir: str, vocab_size: int = 2000) -> None:
    """Train a lower-cased BERT-style WordPiece tokenizer on ``texts`` and save it for AutoTokenizer.

    For data sets generated here (the phantom corpus), whose vocabulary no pretrained tokenizer
    was built for; real corpora use the tokenizer of their pretrained text tower.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(out_dir)
