"""Shard read-ahead: the same bytes as reading directly, bounded memory, errors where they happened."""

from __future__ import annotations

import io
import os
import threading
import time
from contextlib import closing

import pytest

from hilum.trainer.data.read_ahead import ShardReadAhead


class CountingFile(io.BytesIO):
    """A shard's bytes; counts what the read-ahead thread took, and can fail at a byte offset."""

    def __init__(self, data: bytes, fail_at: int | None = None, taken: list[int] | None = None) -> None:
        super().__init__(data)
        self.fail_at, self.taken = fail_at, taken

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.tell() >= self.fail_at:
            raise ConnectionError("connection reset by peer")
        if self.fail_at is not None and n > 0:
            n = min(n, self.fail_at - self.tell())
        data = super().read(n)
        if self.taken is not None:
            self.taken.append(len(data))
        return data


def read_all(stream, sizes=(1, 7, 4096)) -> bytes:
    """Reads with varied request sizes, as the tar parser's buffered reads do."""
    out, i = bytearray(), 0
    while True:
        buf = bytearray(sizes[i % len(sizes)])
        n = stream.readinto(buf)
        if n == 0:
            return bytes(out)
        out += buf[:n]
        i += 1


def read_n(stream, n: int) -> bytes:
    """Exactly ``n`` bytes (a raw stream's read returns at most one delivered block)."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("limit,block", [(1, 1), (5, 3), (1 << 20, 1 << 16)])
def test_every_shard_arrives_whole_and_in_order(limit, block):
    shards = {f"s{i}": os.urandom(n) for i, n in enumerate([0, 1, 1000, 4097, 33])}  # one empty
    with closing(ShardReadAhead(list(shards), lambda url: CountingFile(shards[url]), limit, block)) as ahead:
        for data in shards.values():
            with ahead.next_stream() as stream:
                assert read_all(stream) == data
        with pytest.raises(IndexError):
            ahead.next_stream()


def test_the_thread_stays_within_its_limit_of_the_consumer():
    taken: list[int] = []
    data = os.urandom(100_000)
    ahead = ShardReadAhead(["a"], lambda url: CountingFile(data, taken=taken), limit_bytes=10_000, block_bytes=1_000)
    with closing(ahead):
        stream = ahead.next_stream()
        # The consumer reads nothing: the thread must reach the limit and stop there.
        assert wait_until(lambda: sum(taken) >= 10_000)
        time.sleep(0.2)
        assert sum(taken) <= 10_000 + 1_000
        assert read_n(stream, 25_000) == data[:25_000]
        assert wait_until(lambda: sum(taken) >= 35_000)  # and catch up once the consumer moves on
        time.sleep(0.2)
        assert sum(taken) <= 35_000 + 1_000
        assert stream.read() == data[25_000:]
        stream.close()


def test_a_shard_that_cannot_be_opened_raises_at_its_turn_and_the_others_still_arrive():
    shards = {"a": b"first", "gone": None, "c": b"third"}

    def open_stream(url):
        if shards[url] is None:
            raise FileNotFoundError(url)
        return CountingFile(shards[url])

    with closing(ShardReadAhead(list(shards), open_stream, limit_bytes=2, block_bytes=1)) as ahead:
        with ahead.next_stream() as s:
            assert s.read() == b"first"
        with pytest.raises(FileNotFoundError, match="gone"):
            ahead.next_stream()
        with ahead.next_stream() as s:
            assert s.read() == b"third"


def test_a_read_that_fails_raises_after_the_bytes_before_it():
    data = os.urandom(5000)
    files = {"a": CountingFile(data, fail_at=3000), "b": CountingFile(b"next")}
    with closing(ShardReadAhead(list(files), files.__getitem__, limit_bytes=1024, block_bytes=512)) as ahead:
        s = ahead.next_stream()
        assert read_n(s, 3000) == data[:3000]
        with pytest.raises(ConnectionError):
            s.read(1)
        assert s.read(1) == b""  # nothing follows the error
        s.close()
        with ahead.next_stream() as s:
            assert s.read() == b"next"


def test_closing_a_shard_early_cancels_its_tail_and_the_next_one_starts_clean():
    taken: list[int] = []
    big, small = os.urandom(200_000), os.urandom(300)
    files = {"big": CountingFile(big, taken=taken), "small": CountingFile(small)}
    with closing(ShardReadAhead(list(files), files.__getitem__, limit_bytes=4_000, block_bytes=1_000)) as ahead:
        s = ahead.next_stream()
        assert read_n(s, 10) == big[:10]
        s.close()  # the consumer needed only the shard's first samples
        with ahead.next_stream() as s:
            assert s.read() == small
        assert sum(taken) < 20_000  # the big shard's tail was not fetched


def test_close_stops_the_thread_even_while_it_waits_at_its_limit():
    ahead = ShardReadAhead(["a", "b"], lambda url: CountingFile(os.urandom(50_000)), limit_bytes=1_000, block_bytes=100)
    ahead.next_stream()
    time.sleep(0.05)
    ahead.close()
    ahead._thread.join(timeout=5)
    assert not ahead._thread.is_alive()
    assert not any(t.name == "shard-read-ahead" and t is ahead._thread for t in threading.enumerate())


def test_a_non_positive_limit_is_refused():
    with pytest.raises(ValueError, match="limit_bytes"):
        ShardReadAhead(["a"], lambda url: CountingFile(b""), limit_bytes=0)
