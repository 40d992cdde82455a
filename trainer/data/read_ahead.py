"""Shard bytes fetched by a background thread while the loader worker parses the ones before.

Why: a loader worker that reads its shards itself stops parsing while each GET is in flight (the
first byte's latency, then one connection's bandwidth; s3fs fetches 50 MB blocks, so a large shard
stalls the worker once per block and every shard stalls it at its start). On the H200 node, four
workers reached 5 610 samples/s from local disk and 3 269 from S3 (benchmarks/RESULTS.md). A
thread that keeps fetching, across block and shard boundaries, hides that wait whenever the store
delivers faster than the worker parses. fsspec's "background" block cache prefetches only inside
one file and webdataset reads nothing ahead, hence this module.

The thread stays at most ``limit_bytes`` ahead of the parser, so a worker holds a bounded amount
of memory whatever the shard size. Errors keep the meaning they have without read-ahead: a shard
that cannot be opened raises from :meth:`ShardReadAhead.next_stream`, and a read that fails after
:class:`~hilum.trainer.data.storage.RetryingReader`'s retries raises at the byte where it broke.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from typing import Any, BinaryIO, Callable, Sequence

BLOCK_BYTES = 1 << 20  # one read of the thread: small enough that a cancelled shard wastes little

_DATA, _END, _OPEN_ERROR, _READ_ERROR = "data", "end", "open_error", "read_error"


class ShardReadAhead:
    """Reads ``sources`` in order in a daemon thread; the consumer takes one stream per source, in order.

    A source is whatever ``open_stream`` opens (a URL; for the stream, a shard and the byte to start at).

    A consumer that closes a stream before its end (it needed only the shard's first samples)
    cancels the rest of that shard: the thread stops fetching it and moves on to the next one.
    :meth:`close` stops the thread (it exits after its current read).
    """

    def __init__(self, sources: Sequence[Any], open_stream: Callable[[Any], BinaryIO], limit_bytes: int,
                 block_bytes: int = BLOCK_BYTES) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive, got {limit_bytes}")
        self._sources, self._open, self._limit = list(sources), open_stream, limit_bytes
        self._block = min(block_bytes, limit_bytes)  # so the bytes held stay under twice the limit
        self._items: deque[tuple[int, str, Any]] = deque()
        self._buffered = 0  # bytes in _items
        self._done_upto = -1  # shards the consumer has closed: nothing more of them is kept
        self._next = 0  # the shard next_stream hands out next
        self._stopped = self._finished = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shard-read-ahead", daemon=True)
        self._thread.start()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for index, source in enumerate(self._sources):
                if self._stopped:
                    return
                try:
                    stream = self._open(source)
                except Exception as err:  # noqa: BLE001 - handed to the consumer, which counts it
                    self._put(index, _OPEN_ERROR, err)
                    continue
                try:
                    self._read_shard(index, stream)
                finally:
                    stream.close()
        finally:
            with self._cv:
                self._finished = True
                self._cv.notify_all()

    def _read_shard(self, index: int, stream: BinaryIO) -> None:
        while True:
            with self._cv:
                while self._buffered >= self._limit and not self._stopped and self._done_upto < index:
                    self._cv.wait()
                if self._stopped or self._done_upto >= index:
                    return  # stopped, or the consumer no longer wants this shard
            try:
                data = stream.read(self._block)
            except Exception as err:  # noqa: BLE001 - raised in the consumer at this byte
                self._put(index, _READ_ERROR, err)
                return
            if not data:
                self._put(index, _END, None)
                return
            self._put(index, _DATA, data)

    def _put(self, index: int, kind: str, payload: Any) -> None:
        with self._cv:
            if index <= self._done_upto or self._stopped:
                return
            self._items.append((index, kind, payload))
            if kind == _DATA:
                self._buffered += len(payload)
            self._cv.notify_all()

    # -- the consumer -------------------------------------------------------------------------

    def _take(self, index: int, peek: bool = False) -> tuple[str, Any]:
        with self._cv:
            while not self._items:
                if self._finished:
                    raise RuntimeError(f"read-ahead thread ended before shard {index} was read")
                self._cv.wait()
            got, kind, payload = self._items[0]
            assert got == index, f"read-ahead out of step: expected shard {index}, got {got}"
            if not peek:
                self._items.popleft()
                if kind == _DATA:
                    self._buffered -= len(payload)
                    self._cv.notify_all()
            return kind, payload

    def next_stream(self) -> io.RawIOBase:
        """The next source's bytes as a stream; raises the error that opening it raised."""
        index = self._next
        if index >= len(self._sources):
            raise IndexError("every shard was handed out already")
        self._next += 1
        kind, payload = self._take(index, peek=True)
        if kind == _OPEN_ERROR:
            self._take(index)
            self._release(index)
            raise payload
        return _AheadStream(self, index)

    def _release(self, index: int) -> None:
        with self._cv:
            self._done_upto = max(self._done_upto, index)
            while self._items and self._items[0][0] <= index:
                _, kind, payload = self._items.popleft()
                if kind == _DATA:
                    self._buffered -= len(payload)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._items.clear()
            self._buffered = 0
            self._cv.notify_all()


class _AheadStream(io.RawIOBase):
    """One shard's bytes as the read-ahead thread delivers them."""

    def __init__(self, owner: ShardReadAhead, index: int) -> None:
        super().__init__()
        self._owner, self._index = owner, index
        self._chunk = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._chunk:
            if self._eof:
                return 0
            kind, payload = self._owner._take(self._index)
            if kind == _END:
                self._eof = True
                return 0
            if kind == _READ_ERROR:
                self._eof = True  # the thread gave up on this shard: nothing follows the error
                raise payload
            self._chunk = memoryview(payload)
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._owner._release(self._index)
        super().close()
