"""WebDataset shards and the manifest that lists them.

A manifest is a small JSON file: ``{"shards": [{"url": ..., "num_samples": ...}, ...]}``. Sample
counts make epochs exact (every rank knows the epoch's length before reading a byte) and let a
resumed run find its position. Shard URLs may be relative to the manifest's own location, so a
data directory can be copied to object storage unchanged. Every URL goes through fsspec.

hilum's writers also record ``offsets``: the byte where each sample's first tar member starts. A
loader worker whose slot begins mid-shard then starts reading there instead of downloading and
parsing the samples before it, which are another slot's; with many ranks a slot spans only a few
shards, and that prefix would be a large share of what each worker reads. Manifests without
offsets (any other WebDataset writer) read the prefix as before.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import webdataset as wds

from hilum.trainer.data.storage import open_with_retry, redact_url, url_to_fs

# Every member's mtime in the shards hilum writes. Fixed, so that the same samples give
# byte-identical tars; and an integer, because webdataset's TarWriter otherwise stamps
# ``time.time()``, a float, which tarfile can only store in a PAX header before each member:
# 512 more bytes a member and a second header for every reader to parse (one stream read such
# shards at 0.7 of the rate, benchmarks/RESULTS.md).
SHARD_MTIME = 1_577_836_800  # 2020-01-01T00:00:00Z


@dataclass(frozen=True)
class ShardSpec:
    url: str
    num_samples: int
    offsets: tuple[int, ...] | None = None  # byte offset of each sample in the tar; None: not recorded

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "num_samples": self.num_samples}
        if self.offsets is not None:
            out["offsets"] = list(self.offsets)
        return out


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardSpec, ...]
    source: str = ""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _join(base: str, url: str) -> str:
    if "://" in url or url.startswith("/"):
        return url
    return posixpath.join(posixpath.dirname(base), url)


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read a manifest through fsspec, resolving relative shard URLs against its location."""
    try:
        with open_with_retry(url, "r", storage_options) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {redact_url(url)}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {redact_url(url)} is not valid JSON: {err}") from None
    shards = raw.get("shards") if isinstance(raw, dict) else None
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"manifest {redact_url(url)}: expected a non-empty 'shards' list")
    specs = []
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str) or not isinstance(s.get("num_samples"), int):
            raise ValueError(f"manifest {redact_url(url)}: shards[{i}] needs 'url' (string) and 'num_samples' (integer)")
        specs.append(ShardSpec(_join(url, s["url"]), s["num_samples"], _offsets(s, f"{redact_url(url)}: shards[{i}]")))
    return Manifest(tuple(specs), source=url)


def _offsets(shard: dict[str, Any], where: str) -> tuple[int, ...] | None:
    offsets = shard.get("offsets")
    if offsets is None:
        return None
    ok = (isinstance(offsets, list) and len(offsets) == shard["num_samples"]
          and all(isinstance(o, int) and o >= 0 and o % 512 == 0 for o in offsets)
          and all(a < b for a, b in zip(offsets, offsets[1:])))
    if not ok:
        raise ValueError(f"manifest {where}: 'offsets' must list num_samples increasing multiples of 512 (tar blocks)")
    return tuple(offsets)


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str,
    prefix: str,
    samples_per_shard: int,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write samples (webdataset dicts with ``__key__``) into tar shards; return their manifest.

    The manifest is written last, beside the shards, as ``{prefix}.json``: a reader that finds
    it knows every shard it names is complete.
    """
    fs, root = url_to_fs(out_dir, storage_options)
    fs.makedirs(root, exist_ok=True)
    specs: list[ShardSpec] = []
    it: Iterator[dict[str, Any]] = iter(samples)
    done = False
    while not done:
        name = f"{prefix}-{len(specs):06d}.tar"
        offsets: list[int] = []
        with fs.open(posixpath.join(root, name), "wb") as raw, wds.TarWriter(raw, mtime=SHARD_MTIME) as sink:
            for sample in it:
                offsets.append(sink.tarstream.offset)
                sink.write(sample)
                if len(offsets) == samples_per_shard:
                    break
            else:
                done = True
        if not offsets:
            fs.rm(posixpath.join(root, name))
        else:
            specs.append(ShardSpec(name, len(offsets), tuple(offsets)))
    manifest = {"shards": [s.to_json() for s in specs]}
    with fs.open(posixpath.join(root, f"{prefix}.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return load_manifest(posixpath.join(out_dir, f"{prefix}.json"), storage_options)
