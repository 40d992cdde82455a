#!/usr/bin/env python3
"""Data path throughput: samples/s of augmented 224×224 training batches, from local disk and
from an S3 server, CPU decode at 1/2/4/8 loader workers, GPU decode when a GPU is present.

The data: phantom radiographs written in MIMIC-CXR-JPG's layout as 512×512 8-bit JPEGs (the
size DESIGN.md's anchor measured), turned into shards by ``hilum shards build`` (its speed is
reported too), then uploaded to a moto S3 server on loopback (or to ``--s3-endpoint``). Each
configuration streams ``--batches`` batches through the real ShardStream + DataLoader + tokenizer
(across epochs when the data set is smaller), timed once every loader worker has delivered its
first batch (steady state; loader start-up is reported separately as ``startup_s``).

    python benchmarks/data_throughput.py                      # CPU: local and S3, 1/2/4/8 workers
    python benchmarks/data_throughput.py --gpu-workers 1,2,4  # adds GPU decode (needs CUDA)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gradcache import record  # noqa: E402


def machine() -> str:
    import torch

    cpu = f"{os.cpu_count()} CPUs"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {cpu}"
    return f"{platform.processor() or platform.machine()}, {cpu}"


def prepare(cache: Path, samples: int, size: int) -> tuple[Path, Path, dict]:
    """Shards (local) and a tokenizer for ``samples`` phantom JPEGs, built once per cache dir."""
    from collections import Counter

    from hilum.trainer.data.phantom_dataset import write_mimic_layout
    from hilum.trainer.data.shard_build import build
    from hilum.trainer.data.sources import Filters, mimic_records
    from hilum.trainer.data.text import train_wordpiece

    layout, shards, tok = cache / "mimic", cache / "shards", cache / "tokenizer"
    info_file = cache / "build.json"
    if info_file.is_file():
        return shards, tok, json.loads(info_file.read_text())
    t0 = time.perf_counter()
    write_mimic_layout(str(layout), n_studies=int(samples / 1.25) + 1, size=size, quality=90)
    t_layout = time.perf_counter() - t0
    skipped: Counter[str] = Counter()
    records = mimic_records(str(layout), filters=Filters(), skipped=skipped)
    t0 = time.perf_counter()
    summary = build(records, str(shards), samples_per_shard=128, workers=os.cpu_count() or 1, progress=False,
                    source_skipped=skipped)
    t_build = time.perf_counter() - t0
    train_wordpiece([r.findings + " " + r.impression for r in records], str(tok), vocab_size=1000)
    info = {"samples": sum(summary.samples.values()), "train_samples": summary.samples["train"],
            "layout_seconds": round(t_layout, 1), "build_seconds": round(t_build, 2),
            "build_samples_per_s": round(len(records) / t_build, 1), "build_workers": os.cpu_count() or 1,
            "shard_bytes": sum(p.stat().st_size for p in shards.glob("*.tar"))}
    info_file.write_text(json.dumps(info))
    return shards, tok, info


def repeated(shards: Path, times: int) -> Path:
    """The training shards' samples ``times`` over, each copy's keys renamed, as a new data set.

    Why: the rendered set is small (rendering 512² phantoms costs ~30 ms an image), and with four
    workers an epoch of it is ~200 samples a worker, less than the shuffle buffer. Each epoch then
    starts with a worker reading its whole slot (opening its shards afresh) before its first
    batch, a cost a MIMIC-scale epoch (hundreds of thousands of samples) pays once in minutes.
    Copies give a real epoch's proportions at the cost of rewriting tar files."""
    if times <= 1:
        return shards
    from hilum.trainer.data.shards import load_manifest, write_shards
    from hilum.trainer.data.stream import iter_raw_samples

    out = shards.parent / f"shards-x{times}"
    if (out / "train.json").is_file():
        return out
    manifest = load_manifest(str(shards / "train.json"))

    def fail(reason: str, where: str, err: Exception, lost: int) -> None:
        raise RuntimeError(f"{reason}: {where}") from err

    def samples():
        order = list(range(len(manifest.shards)))
        for copy in range(times):
            for s in iter_raw_samples(manifest, order, 0, manifest.num_samples, fail):
                yield {k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": f"{copy}-{s['__key__']}"}

    write_shards(samples(), str(out), "train", samples_per_shard=128)
    return out


def stream_rate(manifest_url: str, storage: dict, tokenizer: Path, workers: int, batch: int, image_size: int,
                gpu: bool, batches: int, decode_device: str = "cuda", read_ahead_mb: int = 32,
                tokenizer_threads: int = 1) -> dict:
    """Steady-state rate: the stream runs across epochs; timing starts once every loader worker
    has delivered its first batch (spawned workers import torch first: seconds each).

    GPU decode runs as in training, in the prefetch thread on its own stream (``Prefetcher``);
    ``decode_samples_per_s`` is the decode alone, on batches already in memory."""
    import torch

    from hilum.trainer.data.device_decode import DeviceDecoder
    from hilum.trainer.data.prefetch import Prefetcher
    from hilum.trainer.data.shards import load_manifest
    from hilum.trainer.data.stream import Preprocess, ShardStream, StreamSpec, make_loader
    from hilum.trainer.data.text import Tokenize

    manifest = load_manifest(manifest_url, storage)
    pre = Preprocess(image_size, 1, "report", True, 0.8, 0.1, 0.1, defer_jpeg=gpu)
    device = torch.device("cpu" if decode_device == "none" else decode_device)
    decode = DeviceDecoder(pre.augment_spec, 1, device) if gpu and decode_device != "none" else None
    spec = StreamSpec(batch, 1, workers, seed=0, shuffle=True, shuffle_buffer=256)
    stream = ShardStream(manifest, spec, pre, Tokenize(str(tokenizer), 128, tokenizer_threads), storage_options=storage, epochs=None,
                          read_ahead_bytes=read_ahead_mb << 20)
    warm = max(1, workers)
    t0 = time.perf_counter()
    loader = iter(make_loader(stream))
    it = Prefetcher(loader, decode, device) if decode is not None else loader
    for i in range(warm + batches):
        b = next(it)
        if decode is not None and device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the images exist: decode included
        if i == warm - 1:
            start = time.perf_counter()
    end = time.perf_counter()
    result = {"samples_per_s": round(batches * batch / (end - start), 1), "startup_s": round(start - t0, 2),
              "timed_samples": batches * batch}
    if decode is not None:
        it.close()
        kept = [next(loader) for _ in range(4)]
        decode(dict(kept[0]))  # warm-up (the decoder takes the batch's "jpeg" entry: give it copies)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in kept:
            decode(dict(b))
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["decode_samples_per_s"] = round(len(kept) * batch / (time.perf_counter() - t), 1)
    del it, loader
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024, help="images in the generated data set (about)")
    p.add_argument("--size", type=int, default=512, help="stored JPEG side")
    p.add_argument("--image-size", type=int, default=224, help="training crop side")
    p.add_argument("--repeat", type=int, default=1,
                   help="train on the training samples this many times over (copies with renamed keys): epochs of a "
                        "real data set's proportions without rendering more images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=32, help="timed batches per configuration, after warm-up")
    p.add_argument("--workers", default="1,2,4,8", help="CPU-decode loader workers to try")
    p.add_argument("--gpu-workers", default="1,2,4", help="GPU-decode loader workers to try (only with CUDA)")
    p.add_argument("--sources", default="local,s3")
    p.add_argument("--read-ahead-mb", default="32", help="data.read_ahead_mb values to try (0 = off)")
    p.add_argument("--tokenizer-threads", default="1", help="data.tokenizer_threads values to try (threads per loader worker)")
    p.add_argument("--s3-endpoint", help="use this S3 endpoint (credentials: AWS_* environment) instead of a moto server")
    p.add_argument("--cache", default="/tmp/hilum-bench-data", help="where the generated data set is kept between runs")
    p.add_argument("--decode-device", default="cuda",
                   help="device of the --gpu-workers runs: cuda; cpu to try the batched device path without a GPU; "
                        "none for the loader alone (workers parse and ship the JPEG bytes, nothing decodes them)")
    p.add_argument("--out", type=Path, help="append JSON lines here")
    args = p.parse_args()
    # As `hilum train` runs its loader workers: one tokenizer thread each, not a pool per worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import contextlib

    import fsspec
    import torch

    cache = Path(args.cache) / f"n{args.samples}-s{args.size}"
    shards, tok, info = prepare(cache, args.samples, args.size)
    shards = repeated(shards, args.repeat)
    info = {**info, "repeat": args.repeat, "epoch_samples": info["train_samples"] * args.repeat}
    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "torch": torch.__version__}
    record({"bench": "shards_build", **stamp, **info}, args.out)

    sources = args.sources.split(",")
    with contextlib.ExitStack() as stack:
        urls = {"local": (str(shards / "train.json"), {})}
        if "s3" in sources:
            if args.s3_endpoint:
                storage = {"endpoint_url": args.s3_endpoint}
            else:
                from tests.s3server import moto_s3_server

                storage = stack.enter_context(moto_s3_server())
            fs = fsspec.filesystem("s3", **storage)
            bucket = f"hilum-bench-{os.getpid()}"
            fs.mkdir(bucket)
            fs.put(str(shards) + "/", f"{bucket}/shards/", recursive=True)
            urls["s3"] = (f"s3://{bucket}/shards/train.json", storage)
        ahead = [int(mb) for mb in args.read_ahead_mb.split(",")]
        threads = [int(t) for t in args.tokenizer_threads.split(",")]
        plans = [(src, int(w), False, mb, t) for src in sources for w in args.workers.split(",") if w for mb in ahead
                 for t in threads]
        if torch.cuda.is_available() or args.decode_device != "cuda":
            plans += [(src, int(w), True, mb, t) for src in sources for w in args.gpu_workers.split(",") if w
                      for mb in ahead for t in threads]
        for src, workers, gpu, mb, t in plans:
            url, storage = urls[src]
            try:
                r = stream_rate(url, storage, tok, workers, args.batch, args.image_size, gpu, args.batches,
                                args.decode_device, mb, t)
            except Exception as err:  # one failing configuration must not cost the others' figures
                r = {"error": f"{type(err).__name__}: {err}"[:300]}
            decode = "cpu"
            if gpu:
                decode = {"cuda": "gpu", "none": "none (loader only)"}.get(args.decode_device, f"device:{args.decode_device}")
            record({"bench": "stream", **stamp, "source": src, "decode": decode, "workers": workers, "read_ahead_mb": mb, "tokenizer_threads": t,
                    "batch": args.batch, "image_size": args.image_size, "stored_size": args.size, **r}, args.out)


if __name__ == "__main__":
    main()
