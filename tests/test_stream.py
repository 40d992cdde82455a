"""The stream: exact epoch coverage across ranks × loader workers, resume, corrupt samples, fsspec."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from hilum.trainer.data.shards import Manifest, ShardSpec, load_manifest, write_shards
from hilum.trainer.data.stream import (
    Preprocess,
    ShardStream,
    StreamPosition,
    StreamSpec,
    batches_per_epoch,
    iter_raw_samples,
    make_loader,
    resume_position,
    short_batches_warning,
)
from tests.conftest import simple_samples


class FakeTokenize:
    """Stands in for a tokenizer only where text content is irrelevant to the property tested."""

    def __call__(self, texts):
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long), "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}


PRE = Preprocess(image_size=16, augment=True, brightness=0.1, contrast=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(simple_samples(96), str(out), "train", samples_per_shard=20)  # 5 shards: 20,20,20,20,16
    return out / "train.json"


def keys_of(batches):
    return [k["__key__"] for b in batches for k in b["meta"]]


def rank_batches(manifest, spec, rank, position=None, read_ahead=0):
    stream = ShardStream(manifest, spec, PRE, FakeTokenize(), rank, position, read_ahead_bytes=read_ahead)
    return list(make_loader(stream))


# With read-ahead: a limit below one tar record, so the thread waits on the parser at every block.
READ_AHEAD = [pytest.param(0, id="direct"), pytest.param(700, id="read-ahead")]


def test_manifest_counts_and_relative_urls(shards):
    m = load_manifest(str(shards))
    assert [s.num_samples for s in m.shards] == [20, 20, 20, 20, 16]
    assert all(Path(s.url).is_file() for s in m.shards)


def test_written_shards_are_reproducible_plain_tar_without_pax_headers(shards, tmp_path):
    # Two writes of the same samples give the same bytes, and no member carries a PAX header
    # (a float mtime would add one before every member: more bytes, a second header to parse).
    again = tmp_path / "again"
    write_shards(simple_samples(96), str(again), "train", samples_per_shard=20)
    first = sorted(shards.parent.glob("train-*.tar"))
    assert [p.read_bytes() for p in first] == [(again / p.name).read_bytes() for p in first]
    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and m.isfile() for m in members)


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(shards):
    m = load_manifest(str(shards))
    spec = StreamSpec(batch_size=6, world_size=2, num_workers=2, seed=3, shuffle_buffer=8)
    per_rank = [rank_batches(m, spec, r) for r in range(2)]
    assert [len(b) for b in per_rank] == [batches_per_epoch(m, spec)] * 2 == [8, 8]
    # equal batch shapes on both ranks, step by step (distributed steps stay in lockstep)
    assert [b["image"].shape for b in per_rank[0]] == [b["image"].shape for b in per_rank[1]]
    keys = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert len(keys) == len(set(keys)) == 96
    # batches alternate between the two loader workers
    assert [b["_worker"] for b in per_rank[0]] == [0, 1] * 4


def test_epochs_reshuffle_and_are_reproducible(shards):
    m = load_manifest(str(shards))
    spec = StreamSpec(batch_size=8, world_size=1, num_workers=0, seed=1)
    e0 = keys_of(rank_batches(m, spec, 0, StreamPosition(epoch=0)))
    e1 = keys_of(rank_batches(m, spec, 0, StreamPosition(epoch=1)))
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert keys_of(rank_batches(m, spec, 0, StreamPosition(epoch=0))) == e0


def test_resume_mid_epoch_continues_with_the_next_unseen_batch(shards):
    m = load_manifest(str(shards))
    spec = StreamSpec(batch_size=5, world_size=2, num_workers=2, seed=7, shuffle_buffer=10)
    full = rank_batches(m, spec, 1)
    for consumed in (1, 3, 4):
        offsets = [0, 0]
        for b in full[:consumed]:
            offsets[b["_worker"]] = b["_offset"]
        rest = rank_batches(m, spec, 1, StreamPosition(0, consumed, offsets))
        assert keys_of(rest) == keys_of(full[consumed:])
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[consumed:]))  # same augmentation


@pytest.mark.parametrize("read_ahead", READ_AHEAD)
def test_union_before_and_after_resume_is_one_epoch_for_2_ranks_x_2_workers(shards, read_ahead):
    m = load_manifest(str(shards))
    spec = StreamSpec(batch_size=4, world_size=2, num_workers=2, seed=11, shuffle_buffer=8)
    epoch = sorted(k for rank in (0, 1) for k in keys_of(rank_batches(m, spec, rank, read_ahead=read_ahead)))
    assert len(epoch) == len(set(epoch)) == 96
    seen = []
    for rank, consumed in ((0, 3), (1, 6)):
        before = rank_batches(m, spec, rank, read_ahead=read_ahead)[:consumed]
        offsets = [0, 0]
        for b in before:
            offsets[b["_worker"]] = b["_offset"]
        after = rank_batches(m, spec, rank, StreamPosition(0, consumed, offsets), read_ahead)
        seen += keys_of(before) + keys_of(after)
    assert sorted(seen) == epoch  # no duplicates, no gaps


def test_resume_with_other_loader_worker_count_restarts_the_epoch(shards, caplog):
    m = load_manifest(str(shards))
    old = StreamPosition(epoch=2, batch=5, worker_offsets=[12, 8])
    spec = StreamSpec(batch_size=4, world_size=1, num_workers=3, seed=1)
    pos = resume_position(old, spec)
    assert pos == StreamPosition(epoch=2) and "seen twice" in caplog.text
    assert keys_of(rank_batches(m, spec, 0, pos)) == keys_of(rank_batches(m, spec, 0, StreamPosition(epoch=2)))
    same = StreamSpec(batch_size=4, world_size=1, num_workers=2, seed=1)
    assert resume_position(old, same) is old


def _corrupt_copy(src: Path, dst_dir: Path) -> Path:
    """Copy the shards, replacing one sample's PNG bytes with garbage and another's JSON."""
    dst_dir.mkdir()
    m = load_manifest(str(src))
    for spec in m.shards:
        with tarfile.open(spec.url) as tin, tarfile.open(dst_dir / Path(spec.url).name, "w") as tout:
            for member in tin.getmembers():
                data = tin.extractfile(member).read()
                if member.name == "s00003.png":
                    data = b"not a png"
                if member.name == "s00010.json":
                    data = b"{broken"
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
    (dst_dir / "train.json").write_text(src.read_text())
    return dst_dir / "train.json"


def test_corrupt_samples_are_skipped_counted_and_shapes_hold(shards, tmp_path, caplog):
    m = load_manifest(str(_corrupt_copy(shards, tmp_path / "bad")))
    spec = StreamSpec(batch_size=8, world_size=1, num_workers=0, seed=0, shuffle=False)
    batches = rank_batches(m, spec, 0)
    skipped = {}
    for b in batches:
        for reason, n in b["_skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"bad_image": 1, "bad_json": 1}
    assert all(b["image"].shape[0] == 8 for b in batches)
    keys = keys_of(batches)
    assert "s00003" not in keys and "s00010" not in keys
    assert "s00003" in caplog.text and "s00010" in caplog.text  # named in the log


def test_missing_shard_is_logged_not_fatal(shards, tmp_path, caplog):
    import json

    raw = json.loads(shards.read_text())
    for spec in raw["shards"]:
        spec["url"] = str(shards.parent / spec["url"])
    raw["shards"].append({"url": str(tmp_path / "gone.tar"), "num_samples": 20})
    (tmp_path / "m.json").write_text(json.dumps(raw))
    m = load_manifest(str(tmp_path / "m.json"))
    batches = rank_batches(m, StreamSpec(batch_size=8, world_size=1, num_workers=0, shuffle=False), 0)
    assert len(batches) == batches_per_epoch(m, StreamSpec(batch_size=8)) and "gone.tar" in caplog.text


@pytest.mark.parametrize("read_ahead", READ_AHEAD)
def test_every_kind_of_bad_input_is_skipped_and_counted_by_reason(shards, tmp_path, caplog, read_ahead):
    """A missing report, an empty tar, a tar cut mid-sample and a listed-but-missing shard, in one
    epoch: nothing crashes, and every lost sample is counted under its reason."""
    import json

    dst = tmp_path / "bad"
    dst.mkdir()
    raw = json.loads(shards.read_text())
    urls = [shards.parent / s["url"] for s in raw["shards"]]  # 5 shards: 20, 20, 20, 20, 16 samples
    with tarfile.open(urls[0]) as tin, tarfile.open(dst / "a.tar", "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name == "s00001.json":
                data = b'{"findings": "", "impression": "  ", "labels": {}}'  # a sample without a report
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    (dst / "b.tar").write_bytes(b"")  # empty
    data = urls[2].read_bytes()
    (dst / "c.tar").write_bytes(data[: len(data) // 2])  # cut mid-shard
    (dst / "d.tar").write_bytes(urls[3].read_bytes())
    raw["shards"] = [{"url": n, "num_samples": s["num_samples"]} for n, s in zip(["a.tar", "b.tar", "c.tar", "d.tar", "e.tar"], raw["shards"])]
    (dst / "train.json").write_text(json.dumps(raw))  # e.tar is listed but does not exist
    m = load_manifest(str(dst / "train.json"))
    batches = rank_batches(m, StreamSpec(batch_size=8, world_size=1, num_workers=0, shuffle=False), 0,
                           read_ahead=read_ahead)
    skipped = Counter()
    for b in batches:
        skipped.update(b["_skipped"])
    read_of_c = len({k for k in keys_of(batches) if 40 <= int(k[1:]) < 60})  # the slot refills: repeats
    assert 0 < read_of_c < 20
    assert skipped == {"empty_report": 1, "truncated_shard": 20 + (20 - read_of_c), "missing_shard": 16}
    assert all(b["image"].shape[0] == 8 for b in batches)
    assert "e.tar" in caplog.text and "b.tar" in caplog.text and "c.tar" in caplog.text


def test_a_slot_with_no_usable_sample_fails_instead_of_spinning(tmp_path):
    broken = ({**s, "json": b"{broken"} for s in simple_samples(12))
    write_shards(broken, str(tmp_path), "train", samples_per_shard=6)
    m = load_manifest(str(tmp_path / "train.json"))
    with pytest.raises(RuntimeError, match="no usable samples"):
        rank_batches(m, StreamSpec(batch_size=4, world_size=1, num_workers=0), 0)


def _without_offsets(m):
    return dataclasses.replace(m, shards=tuple(dataclasses.replace(s, offsets=None) for s in m.shards))


@pytest.mark.parametrize("read_ahead", READ_AHEAD)
def test_slots_starting_mid_shard_read_from_the_recorded_offset_with_the_same_batches(shards, read_ahead):
    m = load_manifest(str(shards))
    assert all(s.offsets is not None and s.offsets[0] == 0 for s in m.shards)
    spec = StreamSpec(batch_size=4, world_size=2, num_workers=2, seed=3, shuffle_buffer=8)  # 4 slots of 24
    for rank in (0, 1):
        fast = rank_batches(m, spec, rank, read_ahead=read_ahead)
        slow = rank_batches(_without_offsets(m), spec, rank, read_ahead=read_ahead)
        assert keys_of(fast) == keys_of(slow)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(fast, slow))


def test_the_bytes_before_a_slot_are_not_read(shards, tmp_path):
    """Garbage where a shard's first samples were: a range that starts after them never sees it."""
    m = load_manifest(str(shards))
    shard = m.shards[0]
    data = bytearray(Path(shard.url).read_bytes())
    data[: shard.offsets[5]] = b"\xff" * shard.offsets[5]
    (tmp_path / "s.tar").write_bytes(bytes(data))
    damaged = Manifest((dataclasses.replace(shard, url=str(tmp_path / "s.tar")),))
    errors = []
    samples = list(iter_raw_samples(damaged, [0], 5, 20, lambda *e: errors.append(e)))
    assert [s["__key__"] for s in samples] == [f"s{i:05d}" for i in range(5, 20)] and not errors
    samples = list(iter_raw_samples(_without_offsets(damaged), [0], 5, 20, lambda *e: errors.append(e)))
    assert not samples and errors[0][0] == "truncated_shard" and errors[0][3] == 15  # read from byte 0: lost


def test_malformed_offsets_are_refused_with_the_shard_named(shards, tmp_path):
    import json

    raw = json.loads(shards.read_text())
    raw["shards"][2]["offsets"] = raw["shards"][2]["offsets"][:-1]
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"shards\[2\]: 'offsets'"):
        load_manifest(str(tmp_path / "m.json"))


def test_stream_reads_through_fsspec_memory_filesystem():
    write_shards(simple_samples(24, prefix="m"), "memory://hilum-test/shards", "train", samples_per_shard=10)
    m = load_manifest("memory://hilum-test/shards/train.json")
    assert m.shards[0].url.startswith("memory://")
    batches = rank_batches(m, StreamSpec(batch_size=6, world_size=1, num_workers=0), 0)
    assert sorted(keys_of(batches)) == [f"m{i:05d}" for i in range(24)]


def test_impossible_split_is_refused_up_front(shards):
    m = load_manifest(str(shards))
    with pytest.raises(ValueError, match="cannot feed"):
        ShardStream(m, StreamSpec(batch_size=1, world_size=64, num_workers=2), PRE, FakeTokenize())


def test_endless_stream_crosses_epochs_in_order_after_resume(shards):
    import itertools

    from hilum.trainer.loop import advance

    m = load_manifest(str(shards))
    spec = StreamSpec(batch_size=6, world_size=2, num_workers=2, seed=5, shuffle_buffer=8)
    per_epoch = batches_per_epoch(m, spec)

    def take(position, n):
        stream = ShardStream(m, spec, PRE, FakeTokenize(), 0, position, epochs=None)
        return list(itertools.islice(iter(make_loader(stream)), n))

    full = take(StreamPosition(), 2 * per_epoch + 2)
    assert [b["_epoch"] for b in full] == [0] * per_epoch + [1] * per_epoch + [2, 2]
    position = StreamPosition()
    for b in full[:3]:
        position = advance(position, b, spec.workers)
    rest = take(position, len(full) - 3)
    assert keys_of(rest) == keys_of(full[3:])
    assert [b["_epoch"] for b in rest] == [b["_epoch"] for b in full[3:]]


def test_short_batches_are_named_at_launch_when_slots_hold_about_a_batch():
    """Each loader worker ends its slot of the epoch with a partial batch; with slots of about a
    batch or less every step is short, and the launch says so with the numbers."""
    m = Manifest(tuple(ShardSpec(f"s{i}.tar", n) for i, n in enumerate([128] * 6 + [52])), source="train.json")  # 820
    msg = short_batches_warning(m, StreamSpec(batch_size=512, num_workers=4))
    assert msg is not None and "205 samples" in msg and "[205]" in msg and "data.batch_size 512" in msg
    # Two ranks halve the slot again; the message names both factors.
    msg = short_batches_warning(m, StreamSpec(batch_size=512, world_size=2, num_workers=2))
    assert msg is not None and "2 ranks × 2 workers" in msg and "205 samples" in msg
    # A slot of two full batches and a 1-sample remainder: steps average 342 of 512.
    five = Manifest((ShardSpec("x.tar", 4100),))
    assert "average 342 samples" in short_batches_warning(five, StreamSpec(batch_size=512, num_workers=4))
    # Slots of many batches (a real epoch), or a remainder that leaves the mean near the batch: silent.
    assert short_batches_warning(m, StreamSpec(batch_size=64, num_workers=4)) is None  # 64,64,64,13
    assert short_batches_warning(Manifest((ShardSpec("x.tar", 8200),)), StreamSpec(512, num_workers=4)) is None
    assert short_batches_warning(Manifest((ShardSpec("x.tar", 2048),)), StreamSpec(32, world_size=2, num_workers=1)) is None
