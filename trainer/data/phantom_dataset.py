"""Write the phantom data set: train and test WebDataset shards, their manifests, and a tokenizer."""

from __future__ import annotations

import io
import posixpath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from hilum.trainer.data import phantom
from hilum.trainer.data.shards import Manifest, write_shards
from hilum.trainer.data.stream import report_text
from hilum.trainer.data.text import train_wordpiece


def phantom_samples(n: int, seed: int, size: int, split: str) -> Iterator[dict[str, Any]]:
    """``n`` webdataset samples; the split name enters the seed so train and test never coincide."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2)])
    for i in range(n):
        case = phantom.sample_case(rng, size)
        buf = io.BytesIO()
        Image.fromarray(case.image, mode="L").save(buf, format="PNG")
        key = f"{split}{i:07d}"
        yield {
            "__key__": key,
            "png": buf.getvalue(),
            "json": {
                "findings": case.findings_text,
                "impression": case.impression_text,
                "labels": case.labels(),
                "entities": case.entities(),
                "view": case.view,
                "study_id": key,
            },
        }


def build_phantom_dataset(
    out_dir: str,
    n_train: int = 2048,
    n_test: int = 256,
    size: int = 128,
    seed: int = 0,
    samples_per_shard: int = 256,
) -> dict[str, Manifest]:
    """Shards and ``train.json``/``test.json`` manifests under ``out_dir``, and ``tokenizer/`` beside them."""
    manifests = {}
    texts: list[str] = []
    for split, n in (("train", n_train), ("test", n_test)):
        if n <= 0:
            continue

        def tracked(split: str = split, n: int = n) -> Iterator[dict[str, Any]]:
            for sample in phantom_samples(n, seed, size, split):
                if split == "train":
                    texts.append(report_text(sample["json"], "report"))
                yield sample

        manifests[split] = write_shards(tracked(), out_dir, split, samples_per_shard)
    if texts and "://" not in out_dir:
        # The knowledge dictionary's explanations too: MedFILIP's label texts quote them.
        from hilum.trainer.data.entities import load_knowledge

        texts += list(load_knowledge().values())
        train_wordpiece(texts, posixpath.join(out_dir, "tokenizer"), vocab_size=1000)
    return manifests


# ----------------------------------------------------------------------------------------------
# The phantom in MIMIC-CXR-JPG's layout, for `hilum shards build --mimic` without credentials.

_REPORT_STYLES = (
    # MIMIC's usual form: headers on their own lines, a preamble of other sections.
    " {banner}\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___ with cough  // eval for pneumonia\n \n"
    " COMPARISON:  ___\n \n FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}\n",
    # Text on the header's line, a notification after the impression.
    " {banner}\n HISTORY:  Shortness of breath.\n \n FINDINGS:  {findings}\n \n IMPRESSION:  {impression}\n \n"
    " NOTIFICATION:  The findings were discussed with Dr. ___ at 10:22 AM.\n",
    # A preliminary wet read above the final report's banner.
    " WET READ: ___ ___ 4:27 PM\n  Preliminary read, see final.\n ______________________________________________\n"
    " {banner}\n TECHNIQUE:  Single frontal view.\n \n FINDINGS:\n {findings}\n \n CONCLUSION:\n {impression}\n",
)


def _mimic_report(findings: str, impression: str, style: int) -> str:
    return _REPORT_STYLES[style % len(_REPORT_STYLES)].format(banner="                FINAL REPORT",
                                                             findings=findings, impression=impression)


def write_mimic_layout(root: str, n_studies: int, size: int = 128, seed: int = 0, quality: int = 90) -> dict[str, int]:
    """Phantom studies as MIMIC-CXR-JPG 2.x lays them out (local directory ``root``).

    Each study has one or two frontal images (PA or AP) and, every third study, a lateral one
    (the builder must drop it); the three tables, gzip-compressed like the download; reports in
    MIMIC-CXR's free-text form, in a few header styles. Every tenth study goes to ``test``, every
    tenth-plus-one to ``validate``. Returns the number of frontal images per split.
    """
    import csv
    import gzip
    import os

    rng = np.random.default_rng([seed, 7])
    meta = [["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"]]
    split_rows = [["dicom_id", "study_id", "subject_id", "split"]]
    # CheXpert's table shape (1.0 positive, blank not mentioned), with the phantom's class names
    # so that zero-shot evaluation reads them.
    chex = [["subject_id", "study_id", *phantom.FINDINGS, phantom.NO_FINDING]]
    frontal: dict[str, int] = {}
    for i in range(n_studies):
        subject, study = f"{10000000 + i // 2}", f"{50000000 + i}"
        split = "test" if i % 10 == 0 else "validate" if i % 10 == 1 else "train"
        case = phantom.sample_case(rng, size)
        study_dir = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}")
        os.makedirs(os.path.join(study_dir, f"s{study}"), exist_ok=True)
        with open(os.path.join(study_dir, f"s{study}.txt"), "w") as f:
            f.write(_mimic_report(case.findings_text, case.impression_text, i))
        views = ["PA"] + (["AP"] if i % 4 == 0 else []) + (["LATERAL"] if i % 3 == 0 else [])
        for j, view in enumerate(views):
            dicom = f"{i:08x}-{j:08x}-{seed:08x}-0000{view[:1]}"
            # Views of one study differ slightly (positioning, exposure), as real ones do.
            image = np.clip(case.image.astype(np.int16) + int(rng.integers(-6, 7)), 0, 255).astype(np.uint8)
            Image.fromarray(image, mode="L").save(os.path.join(study_dir, f"s{study}", f"{dicom}.jpg"), quality=quality)
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, size, size])
            split_rows.append([dicom, study, subject, split])
            frontal[split] = frontal.get(split, 0) + (view != "LATERAL")
        labels = case.labels()
        chex.append([subject, study, *[("1.0" if labels[f] else "") for f in phantom.FINDINGS],
                     "1.0" if labels[phantom.NO_FINDING] else ""])
    for name, rows in (("metadata", meta), ("split", split_rows), ("chexpert", chex)):
        with gzip.open(os.path.join(root, f"mimic-cxr-2.0.0-{name}.csv.gz"), "wt", newline="") as f:
            csv.writer(f).writerows(rows)
    return frontal
