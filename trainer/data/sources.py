"""Where shard builds read from: the official MIMIC-CXR-JPG layout, or a CSV naming the files.

Both produce :class:`Record` lists, one record per image, already filtered the way the seed papers
filter (frontal views, reports with at least a few words) and with every dropped record counted by
reason, so a build can say exactly why 377,110 images became 213,384 samples.

MIMIC-CXR-JPG 2.x as downloaded::

    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
    ROOT/mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id, study_id, 14 CheXpert labels (optional)
    ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
    REPORTS/files/pXX/pSUBJECT/sSTUDY.txt    free-text reports (MIMIC-CXR's mimic-cxr-reports.zip)

The generic layout is one CSV with a header row; see :func:`csv_records` for its columns.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import posixpath
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec

from hilum.trainer.data.entities import extract_entities
from hilum.trainer.data.llm_entities import LLMExtractor
from hilum.trainer.data.reports import Sections, count_words, extract_sections
from hilum.trainer.data.storage import open_with_retry, redact_url, url_to_fs

log = logging.getLogger("hilum.data")

FRONTAL_VIEWS = ("PA", "AP")
MIMIC_TABLE = "mimic-cxr-2.0.0-{}.csv"


@dataclass(frozen=True)
class Record:
    """One image and what its sample's JSON will hold."""

    key: str  # the WebDataset key: unique, no dots
    image: str  # URL or path of the image file
    split: str
    findings: str
    impression: str
    view: str = ""
    study_id: str = ""
    labels: dict[str, float] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    entities: tuple[dict[str, Any], ...] | None = None  # (severity, location, category) triplets; None: not extracted

    def sample_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"findings": self.findings, "impression": self.impression, "labels": self.labels,
                               "view": self.view, "study_id": self.study_id, "split": self.split}
        if self.entities is not None:
            out["entities"] = list(self.entities)
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


@dataclass(frozen=True)
class Filters:
    """What a build keeps, and what it adds. ``views`` empty keeps every view; ``unsectioned`` says
    what to do with a report in which neither section is found: ``skip`` it (MIMIC's reports all
    have headers, so one without is broken or an addendum), or use the whole text as ``findings``
    (caption-style corpora); ``entities`` picks the extractor of MedFILIP's fine-grained entities."""

    views: tuple[str, ...] = FRONTAL_VIEWS
    min_words: int = 3
    unsectioned: str = "skip"
    entities: str = "rules"  # "rules": hilum.trainer.data.entities' offline extractor; "llm": ``llm``; "none": no entities
    llm: LLMExtractor | None = None

    def __post_init__(self) -> None:
        if self.unsectioned not in ("skip", "findings"):
            raise ValueError(f"unsectioned must be 'skip' or 'findings', got {self.unsectioned!r}")
        if self.entities not in ("rules", "llm", "none"):
            raise ValueError(f"entities must be 'rules', 'llm' or 'none', got {self.entities!r}")
        if (self.entities == "llm") != (self.llm is not None):
            raise ValueError("entities 'llm' needs an LLM extractor (endpoint URL and model), and only it uses one")
        if self.min_words < 0:
            raise ValueError(f"min_words must be >= 0, got {self.min_words}")


def _join(base_dir: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(base_dir, path)


def read_table(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Rows of a CSV (optionally gzip-compressed) as dicts; header names are stripped."""
    try:
        with open_with_retry(url, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"table not found: {redact_url(url)}") from None
    if url.endswith(".gz"):
        data = gzip.decompress(data)
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    if reader.fieldnames is None:
        raise ValueError(f"{redact_url(url)} is empty (expected a CSV header row)")
    reader.fieldnames = [h.strip() for h in reader.fieldnames]
    return list(reader)


def _find_table(root: str, name: str, fs: fsspec.AbstractFileSystem, required: bool) -> str | None:
    for candidate in (name, name + ".gz"):
        url = posixpath.join(root, candidate)
        if fs.exists(url):
            return url
    if required:
        raise FileNotFoundError(f"{redact_url(posixpath.join(root, name))}[.gz] not found: is {redact_url(root)} the MIMIC-CXR-JPG root?")
    return None


def _read_texts(urls: list[str], storage_options: dict[str, Any] | None, threads: int = 32) -> list[str | None]:
    """Small text files, read concurrently (object stores answer one request at a time per file)."""

    def read(url: str) -> str | None:
        try:
            with open_with_retry(url, "rb", storage_options) as f:
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(read, urls))


def _sections(text: str, filters: Filters) -> tuple[Sections | None, str]:
    """The report's sections, or None and the reason it is dropped."""
    sections = extract_sections(text)
    if sections.empty:
        if filters.unsectioned == "skip":
            return None, "no_sections"
        sections = Sections(" ".join(text.split()), "")
    if count_words(sections.findings + " " + sections.impression) < filters.min_words:
        return None, "too_short"
    return sections, ""


def _entities(sections: list[Sections], filters: Filters, skipped: Counter[str]) -> list[tuple[dict[str, Any], ...] | None]:
    """Each report's entities (None: not extracted). An LLM reply that cannot be parsed leaves
    the sample without entities, counted as ``entities_unparsed`` (training with ``medfilip``
    then skips it as ``no_entities``)."""
    if filters.entities == "none":
        return [None] * len(sections)
    texts = [s.findings + "\n" + s.impression for s in sections]
    if filters.llm is not None:
        found = filters.llm.extract_many(texts)
        skipped["entities_unparsed"] += sum(f is None for f in found)
    else:
        found = [extract_entities(t) for t in texts]
    return [None if f is None else tuple(e.to_dict() for e in f) for f in found]


def _labels(row: dict[str, str], names: Iterable[str]) -> dict[str, float]:
    """Numeric labels; blanks (CheXpert: "not mentioned") are left out rather than read as 0."""
    out = {}
    for name in names:
        value = (row.get(name) or "").strip()
        if value:
            out[name] = float(value)
    return out


def mimic_records(
    root: str,
    reports_root: str | None = None,
    filters: Filters = Filters(),
    storage_options: dict[str, Any] | None = None,
    skipped: Counter[str] | None = None,
) -> list[Record]:
    """Records of MIMIC-CXR-JPG 2.x (see the module docstring), with the official split."""
    skipped = Counter() if skipped is None else skipped
    root = root.rstrip("/")
    reports_root = (reports_root or root).rstrip("/")
    fs, _ = url_to_fs(root, storage_options)
    meta_rows = read_table(_find_table(root, MIMIC_TABLE.format("metadata"), fs, True), storage_options)
    split_rows = read_table(_find_table(root, MIMIC_TABLE.format("split"), fs, True), storage_options)
    chexpert_url = _find_table(root, MIMIC_TABLE.format("chexpert"), fs, False)
    chexpert: dict[str, dict[str, float]] = {}
    if chexpert_url:
        rows = read_table(chexpert_url, storage_options)
        names = [n for n in (rows[0].keys() if rows else []) if n not in ("subject_id", "study_id")]
        chexpert = {r["study_id"]: _labels(r, names) for r in rows}
    split_of = {r["dicom_id"]: r["split"] for r in split_rows}

    kept = []
    for row in meta_rows:
        for column in ("dicom_id", "subject_id", "study_id"):
            if not row.get(column):
                raise ValueError(f"mimic metadata table: a row lacks {column!r}: {row}")
        view = (row.get("ViewPosition") or "").strip()
        if filters.views and view not in filters.views:
            skipped["view"] += 1
            continue
        if row["dicom_id"] not in split_of:
            skipped["no_split"] += 1
            continue
        kept.append(row)

    def report_url(row: dict[str, str]) -> str:
        s = row["subject_id"]
        return f"{reports_root}/files/p{s[:2]}/p{s}/s{row['study_id']}.txt"

    studies = sorted({report_url(r) for r in kept})
    log.info("reading %d reports for %d images", len(studies), len(kept))
    texts = dict(zip(studies, _read_texts(studies, storage_options)))
    sections_of = {url: _sections(text, filters) for url, text in texts.items() if text is not None}
    studies_kept = [url for url, (sec, _) in sections_of.items() if sec is not None]
    entities_of = dict(zip(studies_kept, _entities([sections_of[u][0] for u in studies_kept], filters, skipped)))  # once per study
    records = []
    for row in kept:
        url = report_url(row)
        if url not in sections_of:
            skipped["no_report"] += 1
            continue
        sections, reason = sections_of[url]
        if sections is None:
            skipped[reason] += 1  # per image, like every other reason
            continue
        s, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        records.append(Record(
            key=f"s{study}-{dicom}",
            image=f"{root}/files/p{s[:2]}/p{s}/s{study}/{dicom}.jpg",
            split=split_of[dicom],
            findings=sections.findings,
            impression=sections.impression,
            view=(row.get("ViewPosition") or "").strip(),
            study_id=study,
            labels=chexpert.get(study, {}),
            extra={"subject_id": s, "dicom_id": dicom},
            entities=entities_of[url],
        ))
    return records


CSV_COLUMNS = ("image", "report", "report_file", "findings", "impression", "split", "view", "study_id", "key")


def csv_records(
    table: str,
    filters: Filters = Filters(views=()),
    label_columns: tuple[str, ...] = (),
    storage_options: dict[str, Any] | None = None,
    skipped: Counter[str] | None = None,
) -> list[Record]:
    """Records of a generic CSV. Columns (header names):

    * ``image`` (required): path or URL of the image; relative paths are relative to the CSV.
    * the report, one of: ``report`` (free text, sections extracted), ``report_file`` (path of a
      text file, idem), or ``findings`` and/or ``impression`` (already sectioned).
    * optional: ``split`` (default ``train``), ``view`` (filtered by ``filters.views`` when
      given), ``study_id``, ``key`` (default: the row number).
    * ``label_columns``: numeric labels; blank cells are left out. Every other column is kept
      verbatim in the sample's JSON.
    """
    skipped = Counter() if skipped is None else skipped
    rows = read_table(table, storage_options)
    base = posixpath.dirname(table)
    header = set(rows[0]) if rows else set()
    if "image" not in header:
        raise ValueError(f"{redact_url(table)}: needs an 'image' column (has {sorted(header)})")
    if not header & {"report", "report_file", "findings", "impression"}:
        raise ValueError(f"{redact_url(table)}: needs a 'report', 'report_file', 'findings' or 'impression' column")
    missing = [c for c in label_columns if c not in header]
    if missing:
        raise ValueError(f"{redact_url(table)}: label columns {missing} not in the header")
    report_files = [_join(base, r["report_file"]) for r in rows if (r.get("report_file") or "").strip()]
    texts = dict(zip(report_files, _read_texts(report_files, storage_options))) if report_files else {}

    records = []
    for n, row in enumerate(rows):
        where = f"{redact_url(table)} row {n + 2}"
        if not (row.get("image") or "").strip():
            raise ValueError(f"{where}: empty 'image'")
        view = (row.get("view") or "").strip()
        if filters.views and view not in filters.views:
            skipped["view"] += 1
            continue
        if "findings" in header or "impression" in header:
            sections = Sections(" ".join((row.get("findings") or "").split()), " ".join((row.get("impression") or "").split()))
            if sections.empty or count_words(sections.findings + " " + sections.impression) < filters.min_words:
                skipped["too_short"] += 1
                continue
        else:
            text = row.get("report") or ""
            if (row.get("report_file") or "").strip():
                text = texts[_join(base, row["report_file"])]
                if text is None:
                    skipped["no_report"] += 1
                    continue
            sections, reason = _sections(text, filters)
            if sections is None:
                skipped[reason] += 1
                continue
        key = (row.get("key") or "").strip() or f"r{n:08d}"
        if "." in key:
            raise ValueError(f"{where}: key {key!r} contains a dot (WebDataset splits keys at dots)")
        records.append(Record(
            key=key,
            image=_join(base, row["image"].strip()),
            split=(row.get("split") or "").strip() or "train",
            findings=sections.findings,
            impression=sections.impression,
            view=view,
            study_id=(row.get("study_id") or "").strip(),
            labels=_labels(row, label_columns),
            extra={k: v for k, v in row.items() if k not in CSV_COLUMNS and k not in label_columns and k},
        ))
    found = _entities([Sections(r.findings, r.impression) for r in records], filters, skipped)
    records = [dataclasses.replace(r, entities=e) for r, e in zip(records, found)]
    keys = Counter(r.key for r in records)
    dupes = [k for k, c in keys.items() if c > 1]
    if dupes:
        raise ValueError(f"{redact_url(table)}: duplicate keys {dupes[:5]}")
    return records


def split_records(records: list[Record], seed: int) -> dict[str, list[Record]]:
    """Records by split, each in a seeded random order.

    Shuffled at build time so a shard mixes patients: a study's several frontal images carry the
    same report, and if they sat side by side they would often share a batch as false negatives.
    """
    by_split: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.key):
        by_split.setdefault(r.split, []).append(r)
    for name, rs in by_split.items():
        random.Random(f"{seed}:{name}").shuffle(rs)
    return by_split
