"""Bytes a loader reads per epoch, with and without the manifest's sample offsets.

Every (rank, loader worker) slot reads its range of the epoch's sample order; a slot that starts
mid-shard either starts at its first sample's byte (offsets recorded) or reads and parses the
shard's earlier samples, which belong to another slot. This counts the bytes each way, for the
benchmark data set (the same one `data_throughput.py` builds) cut into ``--slots`` slots.

    python benchmarks/slot_reads.py --samples 1024 --slots 4,8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_throughput import machine, prepare, record  # noqa: E402


class CountingReader:
    """Counts what the tar parser takes from a shard stream."""

    total = 0

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def readinto(self, buffer: Any) -> int:
        n = self.inner.readinto(buffer)
        CountingReader.total += n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        CountingReader.total += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slots", default="4,8", help="ranks × loader workers to cut the epoch into")
    p.add_argument("--cache", default="/tmp/hilum-bench-data")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import hilum.trainer.data.stream as stream
    from hilum.trainer.data.shards import load_manifest

    shards, _, _ = prepare(Path(args.cache) / f"n{args.samples}-s{args.size}", args.samples, args.size)
    manifest = load_manifest(str(shards / "train.json"))
    if any(s.offsets is None for s in manifest.shards):
        sys.exit(f"{shards}: built before manifests recorded offsets; remove it (or use another --cache)")
    plain = dataclasses.replace(manifest, shards=tuple(dataclasses.replace(s, offsets=None) for s in manifest.shards))
    shard_bytes = sum(Path(s.url).stat().st_size for s in manifest.shards)
    opener = stream.open_shard
    stream.open_shard = lambda *a, **k: CountingReader(opener(*a, **k))  # the stream's only way in
    for slots in map(int, args.slots.split(",")):
        row: dict[str, Any] = {"bench": "slot_reads", "date": datetime.date.today().isoformat(), "machine": machine(),
                               "samples": manifest.num_samples, "shards": len(manifest.shards), "slots": slots,
                               "shard_bytes": shard_bytes}
        for name, m in (("offsets", manifest), ("no_offsets", plain)):
            spec = stream.StreamSpec(batch_size=1, world_size=1, num_workers=slots, seed=0, shuffle=True)
            per, order = stream.slot_size(m, spec), stream.epoch_order(m, 0, 0, True)
            CountingReader.total = 0
            for slot in range(slots):
                for _ in stream.iter_raw_samples(m, order, slot * per, (slot + 1) * per, lambda *e: None):
                    pass
            row[f"read_bytes_{name}"] = CountingReader.total
            row[f"read_vs_shards_{name}"] = round(CountingReader.total / shard_bytes, 3)
        record(row, args.out)


if __name__ == "__main__":
    main()
