"""Building and verifying WebDataset shards from :mod:`hilum.trainer.data.sources` records.

A build is a plan of shard tasks that depends only on the records and the options: each split's
records in a seeded order, cut into shards of ``samples_per_shard``. Each task reads its images,
checks that every one decodes (a truncated JPEG is found here, not mid-training), optionally
resizes, and writes a plain WebDataset tar (``KEY.jpg``/``KEY.png`` + ``KEY.json``) to any fsspec
URL. When the tar is complete, a small completion record goes to ``_build/NAME.json`` beside it;
the split's manifest is written last, from those records. Re-running the same command skips
every task whose completion record matches its plan, so an interrupted build resumes where it
stopped; a changed option or record set rebuilds the shards it affects.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import posixpath
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import fsspec
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from hilum.trainer.data.shards import SHARD_MTIME, Manifest, ShardSpec, load_manifest
from hilum.trainer.data.sources import Record, split_records
from hilum.trainer.data.storage import open_with_retry, redact_url, url_to_fs
from hilum.trainer.data.tar_samples import tar_samples

log = logging.getLogger("hilum.data")

BUILD_DIR = "_build"
IMAGE_TYPES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


@dataclass(frozen=True)
class ImageOptions:
    """``resize``: shorter side in pixels (larger images only; None keeps each file's bytes as they
    are). Resized 8-bit images are stored as JPEG at ``quality``, 16-bit ones as PNG."""

    resize: int | None = None
    quality: int = 95


@dataclass(frozen=True)
class ShardTask:
    out: str
    name: str
    records: tuple[Record, ...]
    image: ImageOptions
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.image), sort_keys=True).encode())
        for r in self.records:
            h.update(json.dumps([r.key, r.image, r.sample_json()], sort_keys=True).encode())
        return h.hexdigest()[:16]


@dataclass
class ShardResult:
    name: str
    num_samples: int
    skipped: dict[str, int]
    bytes: int
    reused: bool = False
    offsets: list[int] | None = None  # each sample's byte offset (absent from records of older builds)


def encode_image(data: bytes, ext: str, options: ImageOptions) -> tuple[bytes, str]:
    """Decode fully (so corrupt files fail at build time); resize when asked; return (bytes, ext)."""
    with Image.open(io.BytesIO(data)) as im:
        side = options.resize
        shrink = bool(side) and min(im.size) > side
        if shrink and im.format == "JPEG":
            im.draft(im.mode, (side, side))  # libjpeg's DCT scaling: decode at 1/2, 1/4, 1/8 when it can
        im.load()
        if not shrink:
            return data, ext
        w, h = im.size
        scale = side / min(w, h)
        small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        if small.mode in SIXTEEN_BIT:
            small.save(buf, format="PNG")
            return buf.getvalue(), "png"
        if small.mode not in ("L", "RGB"):
            small = small.convert("RGB")
        small.save(buf, format="JPEG", quality=options.quality)
        return buf.getvalue(), "jpg"


def _record_path(root: str, task: ShardTask) -> str:
    """Where a task's completion record lives, in the filesystem's own path form."""
    return posixpath.join(root, BUILD_DIR, f"{task.name}.json")


def build_shard(task: ShardTask) -> ShardResult:
    """Write one shard and then its completion record. Runs in a build worker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fs, root = url_to_fs(task.out, task.storage_options)
    tar_path = posixpath.join(root, f"{task.name}.tar")
    skipped: Counter[str] = Counter()
    offsets: list[int] = []
    with fs.open(tar_path, "wb") as raw, wds.TarWriter(raw, mtime=SHARD_MTIME) as sink:
        for r in task.records:
            ext = IMAGE_TYPES.get(posixpath.splitext(r.image)[1].lower())
            try:
                if ext is None:
                    raise ValueError("not a .jpg/.jpeg/.png file")
                with open_with_retry(r.image, "rb", task.storage_options) as f:
                    data = f.read()
                data, ext = encode_image(data, ext, task.image)
            except FileNotFoundError:
                skipped["missing_image"] += 1
                log.warning("sample %s: image %s not found; skipped", r.key, redact_url(r.image))
                continue
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                skipped["bad_image"] += 1
                log.warning("sample %s: image %s unusable (%s: %s); skipped", r.key, redact_url(r.image), type(err).__name__, err)
                continue
            offsets.append(sink.tarstream.offset)
            sink.write({"__key__": r.key, ext: data, "json": r.sample_json()})
    size = fs.size(tar_path)
    if not offsets:
        fs.rm(tar_path)
        size = 0
    result = ShardResult(task.name, len(offsets), dict(skipped), size, offsets=offsets)
    with fs.open(_record_path(root, task), "w") as f:
        json.dump({**asdict(result), "fingerprint": task.fingerprint}, f)
    return result


def _finished(task: ShardTask, fs: fsspec.AbstractFileSystem, root: str) -> ShardResult | None:
    """The result of an earlier build of exactly this task, if its completion record says so."""
    try:
        with fs.open(_record_path(root, task), "r") as f:
            done = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    if done.get("fingerprint") != task.fingerprint:
        return None
    done.pop("fingerprint")
    return ShardResult(**{**done, "reused": True})


@dataclass
class BuildSummary:
    manifests: dict[str, Manifest]
    skipped: Counter[str]
    samples: dict[str, int]
    shards_written: int
    shards_reused: int


def plan(
    records: list[Record], out: str, samples_per_shard: int, image: ImageOptions, seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, list[ShardTask]]:
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    tasks: dict[str, list[ShardTask]] = {}
    for split, rs in split_records(records, seed).items():
        tasks[split] = [
            ShardTask(out.rstrip("/"), f"{split}-{i // samples_per_shard:06d}", tuple(rs[i:i + samples_per_shard]), image,
                      dict(storage_options or {}))
            for i in range(0, len(rs), samples_per_shard)
        ]
    return tasks


def build(
    records: list[Record],
    out: str,
    samples_per_shard: int = 1000,
    image: ImageOptions = ImageOptions(),
    workers: int = 1,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    source_skipped: Counter[str] | None = None,
) -> BuildSummary:
    """Write every split's shards (in ``workers`` processes) and then its manifest ``SPLIT.json``."""
    fs, root = url_to_fs(out, storage_options)
    fs.makedirs(posixpath.join(root, BUILD_DIR), exist_ok=True)
    tasks = plan(records, out, samples_per_shard, image, seed, storage_options)
    results: dict[str, ShardResult] = {}
    todo = []
    for task in (t for ts in tasks.values() for t in ts):
        done = _finished(task, fs, root)
        if done is not None:
            results[task.name] = done
        else:
            todo.append(task)
    if results:
        log.info("%d of %d shards already built; building the other %d", len(results), len(results) + len(todo), len(todo))

    bar = tqdm(total=sum(len(t.records) for t in todo), unit="img", desc=f"shards -> {redact_url(out)}",
               disable=not progress or None, dynamic_ncols=True)
    for result in _run(build_shard, todo, workers):
        results[result.name] = result
        bar.update(result.num_samples + sum(result.skipped.values()))
    bar.close()

    skipped: Counter[str] = Counter(source_skipped or {})
    manifests, samples = {}, {}
    for split, ts in tasks.items():
        rs = [results[t.name] for t in ts]
        for r in rs:
            skipped.update(r.skipped)
        specs = [ShardSpec(f"{r.name}.tar", r.num_samples, tuple(r.offsets) if r.offsets else None)
                 for r in rs if r.num_samples]
        samples[split] = sum(s.num_samples for s in specs)
        if not specs:
            log.warning("split %s: no usable samples; no manifest written", split)
            continue
        manifest = {"shards": [s.to_json() for s in specs],
                    "build": {"samples": samples[split], "skipped": dict(sum((Counter(r.skipped) for r in rs), Counter()))}}
        with fs.open(posixpath.join(root, f"{split}.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        manifests[split] = load_manifest(posixpath.join(out.rstrip("/"), f"{split}.json"), storage_options)
    reused = sum(r.reused for r in results.values())
    return BuildSummary(manifests, skipped, samples, len(results) - reused, reused)


def _run(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterable[Any]:
    """``fn`` over ``items`` in ``workers`` spawned processes (inline for one), as they finish."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # spawn, not fork: s3fs keeps an event-loop thread that a forked child would inherit broken.
    with ProcessPoolExecutor(min(workers, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(fn, item) for item in items]):
            yield fut.result()


# ----------------------------------------------------------------------------------------------
# Verification


@dataclass
class ShardCheck:
    url: str
    expected: int
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_shard(args: tuple[ShardSpec, dict[str, Any]]) -> ShardCheck:
    """Read every sample of one shard: the image decodes, the JSON parses and holds a report."""
    spec, storage_options = args
    check = ShardCheck(redact_url(spec.url), spec.num_samples)
    try:
        stream = open_with_retry(spec.url, "rb", storage_options)
    except Exception as err:  # noqa: BLE001 - any failure to open is the finding
        check.problems.append(f"{check.url}: cannot open ({type(err).__name__}: {err})")
        return check
    starts: list[int] = []  # where each sample's first member begins, to check the manifest's offsets
    try:  # the reader training uses: what passes here is what a loader worker reads
        for sample in tar_samples(stream, spec.url, starts if spec.offsets is not None else None):
            key = sample.get("__key__", "?")
            check.samples += 1
            check.keys.append(key)
            problem = _sample_problem(sample)
            if problem:
                check.problems.append(f"{check.url}: sample {key}: {problem}")
    except Exception as err:  # noqa: BLE001 - a truncated tar is a finding, not a crash
        check.problems.append(f"{check.url}: unreadable after {check.samples} samples ({type(err).__name__}: {err})")
    finally:
        stream.close()
    if check.samples != spec.num_samples:
        check.problems.append(f"{check.url}: manifest says {spec.num_samples} samples, shard has {check.samples}")
    elif spec.offsets is not None and list(spec.offsets) != starts:
        first = next(i for i, (a, b) in enumerate(zip(spec.offsets, starts)) if a != b)
        check.problems.append(f"{check.url}: manifest offsets do not match the tar: sample {first} "
                              f"({check.keys[first]}) starts at byte {starts[first]}, not {spec.offsets[first]}")
    return check


def _sample_problem(sample: dict[str, Any]) -> str | None:
    image = next((sample[e] for e in ("png", "jpg", "jpeg") if e in sample), None)
    if image is None:
        return "no image"
    if "json" not in sample:
        return "no json"
    try:
        meta = json.loads(sample["json"])
    except ValueError as err:
        return f"bad json ({err})"
    if not isinstance(meta, dict) or not (str(meta.get("findings") or "").strip() or str(meta.get("impression") or "").strip()):
        return "json has no findings or impression"
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
        return f"image does not decode ({type(err).__name__}: {err})"
    return None


@dataclass
class VerifyReport:
    manifest: str
    shards: int
    samples: int
    expected: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(url: str, storage_options: dict[str, Any] | None = None, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Decode every sample of a manifest's shards and check the counts and keys."""
    manifest = load_manifest(url, storage_options)
    problems: list[str] = []
    seen: Counter[str] = Counter()
    samples = 0
    bar = tqdm(total=manifest.num_samples, unit="sample", desc=f"verify {redact_url(url)}", disable=not progress or None,
               dynamic_ncols=True)
    for check in _run(check_shard, [(s, dict(storage_options or {})) for s in manifest.shards], workers):
        problems.extend(check.problems)
        seen.update(check.keys)
        samples += check.samples
        bar.update(check.samples)
    bar.close()
    dupes = [k for k, c in seen.items() if c > 1]
    if dupes:
        problems.append(f"{len(dupes)} keys occur more than once, e.g. {dupes[:3]}")
    return VerifyReport(redact_url(url), len(manifest.shards), samples, manifest.num_samples, problems)
