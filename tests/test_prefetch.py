"""The prefetch thread: same batches in the same order, errors where they belong, a clean stop."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from hilum.trainer.data.prefetch import Prefetcher

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def numbered(n: int | None):
    for i in itertools.count() if n is None else range(n):
        yield {"x": torch.full((4,), float(i)), "_index": i}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("depth", [1, 3])
def test_batches_come_out_prepared_and_in_order(device, depth):
    dev = torch.device(device)

    def prepare(batch):
        batch["x"] = batch["x"].to(dev) * 2
        batch["thread"] = threading.current_thread().name
        return batch

    with Prefetcher(numbered(7), prepare, dev, depth) as batches:
        out = list(batches)
    assert [b["_index"] for b in out] == list(range(7))
    assert all(torch.equal(b["x"].cpu(), torch.full((4,), 2.0 * i)) for i, b in enumerate(out))
    assert {b["thread"] for b in out} == {"hilum-prefetch"}  # prepared off the training thread


def test_an_error_arrives_after_the_batches_before_it():
    def failing():
        yield from numbered(3)
        raise OSError("shard s3://b/x.tar: connection reset")

    batches = Prefetcher(failing(), lambda b: b, torch.device("cpu"), depth=2)
    assert [next(batches)["_index"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="connection reset"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_an_error_in_prepare_is_raised_in_the_training_thread():
    def prepare(batch):
        if batch["_index"] == 1:
            raise ValueError("sample k1: bad")
        return batch

    batches = Prefetcher(numbered(5), prepare, torch.device("cpu"))
    assert next(batches)["_index"] == 0
    with pytest.raises(ValueError, match="k1"):
        next(batches)


def test_close_stops_the_thread_on_an_endless_stream():
    pulled = []

    def endless():
        for b in numbered(None):
            pulled.append(b["_index"])
            yield b

    batches = Prefetcher(endless(), lambda b: b, torch.device("cpu"), depth=2)
    assert next(batches)["_index"] == 0
    time.sleep(0.3)  # the thread fills the queue and blocks
    assert len(pulled) <= 4  # bounded read-ahead: the one handed out, the queue, the one in hand
    batches.close()
    assert not batches.thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)


def test_depth_zero_is_refused():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(numbered(1), lambda b: b, torch.device("cpu"), depth=0)
