"""The shard reader against webdataset's own tar iteration: the same samples from every kind of tar."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from hilum.trainer.data.tar_samples import _number, tar_samples


def webdataset_samples(data: bytes, url: str = "mem://shard.tar") -> list[dict]:
    def reraise(exn):
        raise exn

    files = tar_file_expander([{"url": url, "stream": io.BytesIO(data)}], handler=reraise)
    return list(group_by_keys(files, handler=reraise))


def ours(data: bytes, url: str = "mem://shard.tar") -> list[dict]:
    return list(tar_samples(io.BytesIO(data), url))


def make_tar(members: list[tuple[str, object]], fmt: int, mtime: float = 1_577_836_800) -> bytes:
    """``members``: (name, bytes) for files, (name, "dir") and (name, "->target") for the others."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, what in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if what == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(what, str) and what.startswith("->"):
                # A size field but no data: tarfile reads the next header right after it.
                info.type, info.linkname, info.size = tarfile.SYMTYPE, what[2:], 1000
                tar.addfile(info)
            else:
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
    return buf.getvalue()


def random_members(rng: random.Random) -> list[tuple[str, object]]:
    """Samples of one to three files, with the names and sizes that trip tar readers up."""
    members: list[tuple[str, object]] = []
    deep = "/".join(f"dir{i:02d}" for i in range(12))  # 71 chars: with a key, past ustar's 100-char name
    for i in range(rng.randint(1, 12)):
        base = rng.choice([f"s{i:04d}", f"{deep}/p10/p{i:08d}/s{i:08d}", f"ünï/cøde{i}", f"x{i}" * 60])
        for ext in rng.sample(["jpg", "JSON", "txt", "seg.png", "cls", "Report.TXT"], rng.randint(1, 3)):
            size = rng.choice([0, 1, 511, 512, 513, 1024, rng.randint(2, 5000)])
            members.append((f"{base}.{ext}", rng.randbytes(size)))
        if rng.random() < 0.3:
            members.append((rng.choice(["__meta__", "dir00/", f"{base}_dir"]), "dir" if rng.random() < 0.5 else b"m"))
        if rng.random() < 0.2:
            members.append((f"{base}.lnk", f"->{base}.jpg"))
        if rng.random() < 0.1:
            members.append((f"nodot{i}", b"skipped: no extension"))
        if rng.random() < 0.2:  # webdataset's metadata members, skipped
            members.append((rng.choice([f"__info__/s{i:04d}.json", "__index__.cls__"]), b"{}"))
    return members


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("seed", range(6))
def test_same_samples_as_webdataset_for_every_tar_format(fmt, seed):
    rng = random.Random(seed)
    members = random_members(rng)
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold long names without a "/" split, nor non-ASCII
        members = [(n, w) for n, w in members if len(n.encode()) <= 100 and n.isascii()]
    data = make_tar(members, fmt, mtime=rng.choice([1_577_836_800, 1_577_836_800.25]))
    expected = webdataset_samples(data)
    assert expected, "the case must hold samples"
    assert ours(data) == expected


def test_same_samples_from_webdataset_s_own_writer_and_a_compressed_shard():
    import webdataset as wds

    buf, written = io.BytesIO(), []
    with wds.TarWriter(buf) as sink:  # a float mtime: every member behind a PAX header
        for i in range(7):
            written.append(sink.tarstream.offset)  # where the writer put the sample: a manifest's offsets
            sink.write({"__key__": f"k{i}", "jpg": bytes([i]) * (100 * i), "json": b'{"i": %d}' % i})
    starts: list[int] = []
    assert list(tar_samples(io.BytesIO(buf.getvalue()), "mem://shard.tar", starts)) == webdataset_samples(buf.getvalue()) != []
    assert starts == written  # each sample's first header, its PAX header included
    packed = gzip.compress(buf.getvalue())  # .tar.gz: read through webdataset, as before
    assert ours(packed) == webdataset_samples(packed) == webdataset_samples(buf.getvalue())
    with pytest.raises(ValueError, match="compressed shard cannot be read from sample offsets"):
        list(tar_samples(io.BytesIO(packed), "mem://shard.tar.gz", []))


def test_a_name_split_into_ustar_prefix_is_joined():
    name = "a" * 90 + "/" + "b" * 60 + ".jpg"  # fits only as prefix + name
    data = make_tar([(name, b"x")], tarfile.USTAR_FORMAT)
    assert ours(data) == webdataset_samples(data) == [{"__key__": name[:-4], "__url__": "mem://shard.tar", "jpg": b"x"}]


def test_duplicate_extension_in_one_sample_is_refused_like_webdataset():
    data = make_tar([("k.jpg", b"1"), ("k.JPG", b"2")], tarfile.GNU_FORMAT)
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(data)
    with pytest.raises(ValueError, match="duplicate file name"):
        ours(data)


def test_truncated_and_corrupt_streams_raise_naming_the_byte():
    data = make_tar([(f"k{i}.jpg", bytes(1000)) for i in range(4)], tarfile.GNU_FORMAT)
    # Each member: a 512-byte header and 1000 bytes padded to 1024, so k1's header starts at 1536.
    with pytest.raises(EOFError, match="inside member 'k1.jpg' at byte 2148"):
        ours(data[:2048 + 100])  # k1's header and 100 of its bytes
    with pytest.raises(EOFError, match="inside a header at byte 3082"):
        ours(data[:3072 + 10])
    corrupt = bytearray(data)
    corrupt[1536 + 5] ^= 0xFF  # k1's header: the checksum no longer matches
    with pytest.raises(ValueError, match="invalid tar header at byte 1536: checksum mismatch"):
        ours(bytes(corrupt))
    assert ours(b"") == [] == webdataset_samples(make_tar([], tarfile.GNU_FORMAT))


def test_sizes_beyond_octal_use_gnu_base_256():
    for value in (0, 7, 8**11 - 1, 8**11, 2**40 + 3):
        field = tarfile.itn(value, 12, tarfile.GNU_FORMAT)
        assert _number(field, "test") == value
    with pytest.raises(ValueError, match="numeric field"):
        _number(b"12x4\0", "byte 0")


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_same_samples_as_webdataset_from_gnu_tar(tmp_path, fmt):
    # Shards packed by hand with the `tar` command, as many users make them, in each of its formats
    # (v7 marks files with the old-style type and directories by a trailing slash).
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar command")
    root = tmp_path / "files"
    rng = random.Random(fmt)
    long_ok = fmt in ("gnu", "oldgnu", "posix")
    for i in range(9):
        folder = root / ("study" + "x" * (70 if long_ok and i % 3 == 0 else 3)) / f"p{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for ext in ("jpg", "JSON", "seg.png")[: 1 + i % 3]:
            (folder / f"s{i:03d}.{ext}").write_bytes(rng.randbytes(rng.choice([0, 511, 512, 513, 3000])))
    shard = tmp_path / "shard.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(shard), "-C", str(root), "."], check=True)
    data = shard.read_bytes()
    expected = webdataset_samples(data)
    assert len(expected) == 9
    assert ours(data) == expected
