"""Object storage: shards and manifests on a real S3 protocol server (moto_server on loopback, as
s3fs's own tests do), retries of transient errors, and URLs that keep credentials out of logs."""

from __future__ import annotations

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from hilum.trainer.data.shards import load_manifest, write_shards
from hilum.trainer.data.storage import open_with_retry, redact_url
from hilum.trainer.data.stream import ShardStream, StreamSpec, make_loader
from tests.conftest import simple_samples
from tests.test_stream import PRE, FakeTokenize, keys_of


def test_redact_url_drops_credentials_and_signatures():
    assert redact_url("s3://bucket/shards/a.tar") == "s3://bucket/shards/a.tar"
    assert redact_url("/data/a.tar") == "/data/a.tar"
    assert redact_url("https://user:secret@host:9000/b/a.tar?X-Amz-Signature=abc") == "https://host:9000/b/a.tar"
    assert redact_url("https://host/a.tar?token=t") == "https://host/a.tar"


class CutConnectionFile:
    """A file whose connection drops once, ``after`` bytes into the read (a flaky object store)."""

    drops = 0

    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def read(self, n=-1):
        if type(self).drops > 0 and self.inner.tell() >= self.after:
            type(self).drops -= 1
            raise ConnectionError("connection reset by peer")
        return self.inner.read(n)

    def seek(self, *args):
        return self.inner.seek(*args)

    def close(self):
        self.inner.close()


class FlakyMemoryFileSystem(MemoryFileSystem):
    """An fsspec filesystem whose first ``failures`` opens fail like a dropped connection, and
    whose files can drop their connection mid-read."""

    protocol = "flakymem"
    failures = 0
    opens = 0
    cut_after: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flakymem://"))

    def _open(self, path, mode="rb", **kwargs):
        type(self).opens += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            raise ConnectionError("connection reset by peer")
        f = super()._open(path, mode, **kwargs)
        return f if self.cut_after is None or "r" not in mode else CutConnectionFile(f, self.cut_after)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    fs = FlakyMemoryFileSystem()
    fs.pipe("/flaky/a.bin", b"payload")
    FlakyMemoryFileSystem.opens = 0
    yield FlakyMemoryFileSystem
    FlakyMemoryFileSystem.cut_after, FlakyMemoryFileSystem.failures, CutConnectionFile.drops = None, 0, 0


def test_transient_errors_are_retried_with_backoff(flaky, caplog):
    flaky.failures = 2
    with open_with_retry("flakymem://flaky/a.bin", backoff_s=0.01) as f:
        assert f.read() == b"payload"
    assert flaky.opens == 3 and caplog.text.count("retry") == 2


def test_persistent_errors_give_up_and_missing_files_are_not_retried(flaky):
    flaky.failures = 10
    with pytest.raises(ConnectionError):
        open_with_retry("flakymem://flaky/a.bin", attempts=3, backoff_s=0.01)
    assert flaky.opens == 3
    flaky.failures, flaky.opens = 0, 0
    with pytest.raises(FileNotFoundError):
        open_with_retry("flakymem://flaky/missing.bin", backoff_s=0.01)
    assert flaky.opens <= 1


@pytest.mark.parametrize("read_ahead", [0, 4096], ids=["direct", "read-ahead"])
def test_a_connection_dropped_mid_shard_is_resumed_at_the_same_byte(flaky, caplog, read_ahead):
    write_shards(simple_samples(30, prefix="f"), "flakymem://flaky/shards", "train", samples_per_shard=30)
    manifest = load_manifest("flakymem://flaky/shards/train.json")
    flaky.cut_after, CutConnectionFile.drops = 20_000, 2
    spec = StreamSpec(batch_size=5, world_size=1, num_workers=0, shuffle=False)
    with patch_backoff():
        batches = list(make_loader(ShardStream(manifest, spec, PRE, FakeTokenize(), read_ahead_bytes=read_ahead)))
    assert keys_of(batches) == [f"f{i:05d}" for i in range(30)]
    assert CutConnectionFile.drops == 0 and caplog.text.count("reopening") == 2
    assert not any(b["_skipped"] for b in batches)
    # A connection that keeps dropping: the shard's tail is lost, counted, and the slot refilled.
    flaky.cut_after, CutConnectionFile.drops = 20_000, 100
    with patch_backoff():
        batches = list(make_loader(ShardStream(manifest, spec, PRE, FakeTokenize(), read_ahead_bytes=read_ahead)))
    assert len(batches) == 6 and sum(b["_skipped"].get("truncated_shard", 0) for b in batches) > 0


def patch_backoff():
    from unittest import mock

    return mock.patch("hilum.trainer.data.storage.time.sleep")


@pytest.mark.parametrize("read_ahead", [0, 1 << 20], ids=["direct", "read-ahead"])
def test_shards_round_trip_through_s3(s3_server, caplog, read_ahead):
    fs = fsspec.filesystem("s3", **s3_server)
    bucket = f"hilum-data-{read_ahead}"  # the server outlives the test: one bucket per case
    fs.mkdir(bucket)
    write_shards(simple_samples(30, prefix="s"), f"s3://{bucket}/phantom", "train", samples_per_shard=8,
                 storage_options=s3_server)
    manifest = load_manifest(f"s3://{bucket}/phantom/train.json", s3_server)
    assert [s.num_samples for s in manifest.shards] == [8, 8, 8, 6]
    assert all(s.url.startswith(f"s3://{bucket}/phantom/") for s in manifest.shards)
    spec = StreamSpec(batch_size=5, world_size=1, num_workers=0)
    batches = list(make_loader(ShardStream(manifest, spec, PRE, FakeTokenize(), storage_options=s3_server,
                                           read_ahead_bytes=read_ahead)))
    assert sorted(keys_of(batches)) == [f"s{i:05d}" for i in range(30)]
    # A shard that disappears is skipped, named in the log, and its slot refilled.
    fs.rm(manifest.shards[1].url)
    batches = list(make_loader(ShardStream(manifest, spec, PRE, FakeTokenize(), storage_options=s3_server,
                                           read_ahead_bytes=read_ahead)))
    assert len(batches) == 6 and manifest.shards[1].url in caplog.text
    assert "testing" not in caplog.text  # credentials stay out of the log


def test_credentials_in_a_config_are_environment_references_resolved_where_used(s3_server, monkeypatch):
    from hilum.launch.config import ConfigError, build_config
    from hilum.trainer.data.storage import resolve_env_refs

    with pytest.raises(ConfigError, match=r"data.storage_options.*\(key, client_kwargs.aws_session_token\)"):
        build_config({"data": {"storage_options": {"key": "AKIA123", "client_kwargs": {"aws_session_token": "t"}}}})
    refs = {"endpoint_url": s3_server["endpoint_url"], "key": "${HILUM_TEST_KEY}", "secret": "${HILUM_TEST_SECRET}"}
    cfg = build_config({"data": {"storage_options": refs}})
    assert cfg.data.storage_options == refs  # what a saved config holds: the references
    with pytest.raises(ValueError, match="storage_options.key: environment variable HILUM_TEST_KEY is not set"):
        resolve_env_refs(refs)
    monkeypatch.setenv("HILUM_TEST_KEY", s3_server["key"])
    monkeypatch.setenv("HILUM_TEST_SECRET", s3_server["secret"])
    fs = fsspec.filesystem("s3", **s3_server)
    fs.mkdir("hilum-refs")
    write_shards(simple_samples(4, prefix="r"), "s3://hilum-refs/d", "train", samples_per_shard=4, storage_options=refs)
    assert load_manifest("s3://hilum-refs/d/train.json", refs).num_samples == 4
