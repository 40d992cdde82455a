"""WebDataset shards and the manifest that lists them.

A manifest is a small JSON file: ``{"shards": [{"url": ..., "num_samples": ...}, ...]}``. Sample
counts make epochs exact (every rank knows the epoch's length before reading a byte) and let a
resumed run find its position. Shard URLs may be relative to the manifest's own location, so a
data directory can be copied to object storage unchanged. Every URL goes through fsspec.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import webdataset as wds

from trainer.data.storage import open_with_retry, redact_url, url_to_fs


@dataclass(frozen=True)
class ShardSpec:
    url: str
    num_samples: int


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
        specs.append(ShardSpec(_join(url, s["url"]), s["num_samples"]))
    return Manifest(tuple(specs), source=url)


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
        count = 0
        with fs.open(posixpath.join(root, name), "wb") as raw, wds.TarWriter(raw) as sink:
            for sample in it:
                sink.write(sample)
                count += 1
                if count == samples_per_shard:
                    break
            else:
                done = True
        if count == 0:
            fs.rm(posixpath.join(root, name))
        else:
            specs.append(ShardSpec(name, count))
    manifest = {"shards": [asdict(s) for s in specs]}
    with fs.open(posixpath.join(root, f"{prefix}.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return load_manifest(posixpath.join(out_dir, f"{prefix}.json"), storage_options)
