"""A shard's samples straight from its tar stream, grouped by key exactly as webdataset groups them.

Why by hand: webdataset reads a shard through Python's ``tarfile`` (a ``TarInfo`` object, header
checks and PAX/GNU dispatch in Python for every member) and three generator layers above it. A
GPU-decode loader worker does little else (it parses, tokenises and ships the JPEG bytes), and
there that path was half of the worker's time (52 % of its profile on the 2-core CPU machine; one
stream read 1.5× as many samples per second without it, benchmarks/RESULTS.md).
This reader does one ``read`` for each header and one for each member's data, and nothing per
member that a sample does not need. It reads what every tar writer produces (POSIX ustar, GNU, and
PAX extended headers for long names and sizes; webdataset's ``TarWriter``, GNU tar and
``tarfile`` among them). Compressed shards (``.tar.gz`` and the like) go through webdataset as
before. The output is webdataset's: dicts of ``__key__``, ``__url__`` and one ``bytes`` value per
lower-cased extension, metadata members (``__...__``) skipped, non-regular members ignored; the
tests compare both on every kind of member. Stock webdataset still reads hilum's shards: this
changes how fast they are read, not what they hold. ``hilum shards verify`` reads through it too,
with each sample's start byte, so a shard it passes is one a loader worker reads, offsets included.

A header whose checksum does not match, or data that ends mid-member, raises ``ValueError`` or
``EOFError`` naming the byte, where ``tarfile`` would stop quietly at the bad header: the stream
then counts the rest of the shard as lost (``truncated_shard``) either way.
"""

from __future__ import annotations

import io
import re
from typing import Any, BinaryIO, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

BLOCK = 512
BUFFER_BYTES = 64 << 10  # one read of the underlying stream per few samples; fsspec and read-ahead buffer beyond
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous: tarfile's REGULAR_TYPES less sparse
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: tarfile skips no data for these
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile's "r|*" detects these
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _number(field: bytes, where: str) -> int:
    """A numeric header field: octal text, or GNU's base-256 for values that octal cannot hold."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"invalid tar header at {where}: numeric field {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156], "the checksum field")
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32  # old writers
    return stored == signed


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """A PAX extended header's ``"<length> <key>=<value>\\n"`` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= 0 or pos + length > len(data):
            raise ValueError(f"invalid PAX header at {where}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_exact(read: Any, n: int, at: int, what: str) -> bytes:
    data = read(n)
    if len(data) != n:
        raise EOFError(f"tar stream ends inside {what} at byte {at + len(data)}")
    return data


def tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes, int]]:
    """``(name, data, start)`` of each regular file member, in stream order (webdataset's metadata
    members excluded); ``start`` is the byte where the member's headers begin, its extended headers
    included: where a reader must start to meet it. ``stream`` should be buffered: reads are a
    header or one member's data."""
    read = stream.read
    at = 0  # the stream's byte count (a shard read from an offset counts from there)
    start: int | None = None  # where the next member's extended headers began
    pax: dict[str, str] = {}  # the next member's PAX overrides
    long_name: str | None = None  # the next member's GNU long name
    while True:
        header = read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # the end-of-archive blocks, or the end of a stream without them (tarfile accepts both)
        if len(header) != BLOCK:
            raise EOFError(f"tar stream ends inside a header at byte {at + len(header)}")
        if not _checksum_ok(header):
            raise ValueError(f"invalid tar header at byte {at}: checksum mismatch")
        where = f"byte {at}"
        start = at if start is None else start
        size = int(pax["size"]) if "size" in pax else _number(header[124:136], where)
        kind = header[156:157]
        data_at = at + BLOCK
        padded = -(-size // BLOCK) * BLOCK
        at = data_at + padded
        name = pax.get("path") or long_name
        if name is None:
            name = _text(header[:100])
            if header[345] != 0:  # ustar's path prefix (read whatever the magic, as tarfile does)
                name = f"{_text(header[345:500])}/{name}"
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old-style regular member named like a directory is one (tarfile agrees)
        if kind in _REGULAR:
            member_start, start, pax, long_name = start, None, {}, None
            data = _read_exact(read, size, data_at, f"member {name!r}")
            if padded > size:
                _read_exact(read, padded - size, data_at + size, f"member {name!r}'s padding")
            if _META.match(name):  # webdataset's metadata members
                continue
            yield name, data, member_start
            continue
        if kind in _NO_DATA:  # whatever their size field says, as tarfile reads them
            at = data_at
            start, pax, long_name = None, {}, None
            continue
        body = _read_exact(read, padded, data_at, "an extended header" if kind in b"xLgK" else "a member")
        if kind == b"x":
            pax = _pax_records(body[:size], where)
        elif kind == b"L":
            long_name = _text(body[:size])
        elif kind == b"S":
            raise ValueError(f"sparse tar member at {where}: not supported in shards")
        elif kind not in b"gK":  # global PAX headers and GNU long link names leave the next member's name as it is
            start, pax, long_name = None, {}, None  # a member type tarfile does not know: its data skipped


def tar_samples(stream: BinaryIO, url: str, starts: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The shard's samples: webdataset's ``group_by_keys(tar_file_expander(...))`` output, faster.

    ``starts``, when given, receives the byte where each sample begins (what a manifest's
    ``offsets`` must say); a compressed shard has no such bytes and raises ``ValueError`` then."""
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream, BUFFER_BYTES)
    if buffered.peek(6)[:6].startswith(_COMPRESSED_MAGIC):
        if starts is not None:
            raise ValueError("a compressed shard cannot be read from sample offsets")
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": buffered}], handler=_reraise), handler=_reraise)
        return
    sample: dict[str, Any] | None = None
    for name, data, start in tar_files(buffered):
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
            if starts is not None:
                starts.append(start)
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {sample.keys()}")
        sample[ext] = data
    if sample is not None:
        yield sample


def _reraise(exn: Exception) -> bool:
    raise exn
