"""`hilum shards build` / `verify`: section extraction on realistic report text, the MIMIC-CXR-JPG
and CSV layouts, filters and their counts, resize, resuming an interrupted build, verification
of broken shards, stock webdataset and tar reading our shards, and S3 as the destination."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from PIL import Image

from hilum.trainer.data.phantom_dataset import write_mimic_layout
from hilum.trainer.data.reports import count_words, extract_sections
from hilum.trainer.data.shard_build import BUILD_DIR, ImageOptions, build, encode_image, verify
from hilum.trainer.data.sources import Filters, csv_records, mimic_records
from tests.conftest import HILUM, OUTSIDE, tiny_config, write_config

BANNER = "                                 FINAL REPORT\n"

REPORTS = {
    "mimic_usual": (
        BANNER + " EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with new onset ascites  // eval for infection\n"
        " \n TECHNIQUE:  Chest PA and lateral\n \n COMPARISON:  None.\n \n FINDINGS: \n \n There is no focal consolidation,"
        " pleural effusion or pneumothorax.  Bilateral\n nodular opacities that most likely represent nipple shadows. The\n"
        " cardiomediastinal silhouette is normal.\n \n IMPRESSION: \n \n No acute cardiopulmonary process.\n",
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that most likely "
        "represent nipple shadows. The cardiomediastinal silhouette is normal.",
        "No acute cardiopulmonary process.",
    ),
    "inline_headers_then_notification": (
        BANNER + " HISTORY:  Shortness of breath.\n \n FINDINGS:  PA and lateral views of the chest: the lungs are\n"
        " clear. Dr. ___ was paged at 10:30 AM.\n \n IMPRESSION:  No acute process.\n \n NOTIFICATION:  Discussed with"
        " Dr. ___ by telephone.\n",
        "PA and lateral views of the chest: the lungs are clear. Dr. ___ was paged at 10:30 AM.",
        "No acute process.",
    ),
    "wet_read_above_banner": (
        " WET READ: ___ ___ 4:27 PM\n  Left lower lobe pneumonia.\n ______________________________________\n" + BANNER
        + " FINDINGS:\n Mild cardiomegaly.\n \n CONCLUSION:\n Mild cardiomegaly, no edema.\n",
        "Mild cardiomegaly.",
        "Mild cardiomegaly, no edema.",
    ),
    "combined_header": (
        BANNER + " INDICATION:  Line placement.\n \n FINDINGS AND IMPRESSION:  Right IJ line ends in the SVC.\n",
        "Right IJ line ends in the SVC.",
        "Right IJ line ends in the SVC.",
    ),
    "impression_only": (
        BANNER + " PORTABLE CHEST OF ___\n \n COMPARISON:  ___\n \n IMPRESSION:  \n \n 1. Stable small left effusion.\n"
        " 2. No pneumothorax.\n",
        "",
        "1. Stable small left effusion. 2. No pneumothorax.",
    ),
    "lower_case_and_bare_headers": (
        "Findings:\nThe heart is enlarged.\nImpression\nCardiomegaly.\nRECOMMENDATION(S):  Echocardiogram.\n",
        "The heart is enlarged.",
        "Cardiomegaly.",
    ),
    "no_headers": ("The patient was seen in clinic today.\n", "", ""),
}


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_sections_of_realistic_reports(name):
    text, findings, impression = REPORTS[name]
    s = extract_sections(text)
    assert (s.findings, s.impression) == (findings, impression)


def test_word_count_ignores_placeholders_and_numbers():
    assert count_words("___ 1. ___") == 0 and count_words("No acute process.") == 3


# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mimic(tmp_path) -> tuple[Path, dict[str, int]]:
    """A phantom MIMIC-CXR-JPG tree with the usual defects of a real download added."""
    root = tmp_path / "mimic"
    frontal = write_mimic_layout(str(root), 60, size=96, seed=3)
    meta = _table(root, "metadata")
    frontal_per_study = Counter(r[2] for r in meta[1:] if r[4] in ("PA", "AP"))
    pa = [r for r in meta[1:] if r[4] == "PA" and frontal_per_study[r[2]] == 1]  # one image per defect
    # 1. a truncated JPEG; 2. an image listed but missing; 3. a report without sections;
    # 4. a two-word report; 5. a report file missing; 6. an image without a split row.
    truncated, missing, unsectioned, short, no_report, no_split = pa[2], pa[5], pa[7], pa[8], pa[11], pa[13]
    path = _image(root, truncated)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _image(root, missing).unlink()
    _report(root, unsectioned).write_text(BANNER + " The patient was seen.\n")
    _report(root, short).write_text(BANNER + " IMPRESSION:  Normal chest.\n")
    _report(root, no_report).unlink()
    split = _table(root, "split")
    _write_table(root, "split", [r for r in split if r[0] != no_split[0]])
    return root, {"frontal": sum(frontal.values()), "split_of": {r[0]: r[3] for r in split[1:]},
                  "broken": {"bad_image": truncated, "missing_image": missing, "no_sections": unsectioned,
                             "too_short": short, "no_report": no_report, "no_split": no_split}}


def _table(root: Path, name: str) -> list[list[str]]:
    with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "rt") as f:
        return [line.rstrip("\n").split(",") for line in f]


def _write_table(root: Path, name: str, rows: list[list[str]]) -> None:
    with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as f:
        f.writelines(",".join(r) + "\n" for r in rows)


def _image(root: Path, row: list[str]) -> Path:
    dicom, subject, study = row[0], row[1], row[2]
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def _report(root: Path, row: list[str]) -> Path:
    return root / "files" / f"p{row[1][:2]}" / f"p{row[1]}" / f"s{row[2]}.txt"


def _samples(out: Path, split: str) -> list[dict]:
    """Our shards read back with stock webdataset."""
    manifest = json.loads((out / f"{split}.json").read_text())
    urls = [str(out / s["url"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def test_mimic_layout_builds_with_official_split_filters_and_counts(mimic, tmp_path):
    root, facts = mimic
    skipped: Counter[str] = Counter()
    records = mimic_records(str(root), filters=Filters(), skipped=skipped)
    out = tmp_path / "shards"
    summary = build(records, str(out), samples_per_shard=16, workers=2, progress=False, source_skipped=skipped)

    laterals = sum(1 for r in _table(root, "metadata")[1:] if r[4] == "LATERAL")
    # every reason counted once per image; `no_split` images never reach the report check
    expected_skips = {"view": laterals, **{k: 1 for k in facts["broken"]}}
    assert dict(summary.skipped) == expected_skips
    kept = facts["frontal"] - sum(v for k, v in expected_skips.items() if k != "view")
    assert sum(summary.samples.values()) == kept
    assert set(summary.manifests) == {"train", "validate", "test"}

    broken_ids = {row[0] for row in facts["broken"].values()}
    for split, manifest in summary.manifests.items():
        samples = _samples(out, split)
        assert len(samples) == manifest.num_samples == summary.samples[split]
        for s in samples:
            meta = s["json"]
            assert meta["split"] == split == facts["split_of"][meta["dicom_id"]]
            assert meta["view"] in ("PA", "AP") and meta["dicom_id"] not in broken_ids
            assert meta["findings"] and meta["impression"] and "FINAL REPORT" not in meta["findings"]
            assert s["__key__"] == f"s{meta['study_id']}-{meta['dicom_id']}"
            assert isinstance(s["jpg"], Image.Image) and s["jpg"].size == (96, 96)
            assert all(v == 1.0 for v in meta["labels"].values())
    # plain tar reads them too: one .jpg and one .json per sample
    manifest = json.loads((out / "train.json").read_text())
    with tarfile.open(out / manifest["shards"][0]["url"]) as tar:
        names = tar.getnames()
    assert len(names) == 2 * manifest["shards"][0]["num_samples"]
    assert {Path(n).suffix for n in names} == {".jpg", ".json"}
    assert manifest["build"]["samples"] == summary.samples["train"]


def test_views_and_min_words_are_configurable(mimic):
    root, facts = mimic
    skipped: Counter[str] = Counter()
    records = mimic_records(str(root), filters=Filters(views=(), min_words=0, unsectioned="findings"), skipped=skipped)
    assert {r.view for r in records} == {"PA", "AP", "LATERAL"}
    assert "too_short" not in skipped and "no_sections" not in skipped
    unsectioned = next(r for r in records if r.extra["dicom_id"] == facts["broken"]["no_sections"][0])
    assert unsectioned.findings == "FINAL REPORT The patient was seen." and unsectioned.impression == ""


def test_resize_keeps_aspect_and_leaves_small_images_alone():
    big = Image.new("L", (300, 200), 128)
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    data, ext = encode_image(buf.getvalue(), "jpg", ImageOptions(resize=100))
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (150, 100) and ext == "jpg"
    same, _ = encode_image(buf.getvalue(), "jpg", ImageOptions(resize=512))
    assert same == buf.getvalue()
    sixteen = io.BytesIO()
    Image.new("I;16", (64, 40)).save(sixteen, format="PNG")
    data, ext = encode_image(sixteen.getvalue(), "png", ImageOptions(resize=20))
    with Image.open(io.BytesIO(data)) as im:
        assert ext == "png" and im.mode.startswith("I") and im.size == (32, 20)


def test_rerun_finishes_an_interrupted_build_and_rebuilds_what_changed(mimic, tmp_path):
    root, _ = mimic
    records = mimic_records(str(root))
    out = tmp_path / "shards"
    first = build(records, str(out), samples_per_shard=8, progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    # Interrupted: one shard never finished (no completion record), no manifests written yet.
    (out / BUILD_DIR / "train-000002.json").unlink()
    (out / "train-000002.tar").write_bytes(b"partial")
    for split in first.manifests:
        (out / f"{split}.json").unlink()
    again = build(records, str(out), samples_per_shard=8, progress=False)
    assert again.shards_written == 1 and again.shards_reused == first.shards_written - 1
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert again.samples == first.samples
    shards = json.loads((out / "train.json").read_text())["shards"]
    assert all(len(s["offsets"]) == s["num_samples"] for s in shards)  # reused shards keep their offsets
    # A changed option invalidates every shard it touches.
    resized = build(records, str(out), samples_per_shard=8, image=ImageOptions(resize=48), progress=False)
    assert resized.shards_reused == 0


def test_verify_passes_good_shards_and_names_each_problem(mimic, tmp_path):
    root, _ = mimic
    out = tmp_path / "shards"
    build(mimic_records(str(root)), str(out), samples_per_shard=8, progress=False)
    assert verify(str(out / "train.json"), progress=False).ok
    manifest = json.loads((out / "train.json").read_text())
    shards = [s["url"] for s in manifest["shards"]]
    # a truncated tar, a missing shard, a corrupt image inside an otherwise good tar
    data = (out / shards[0]).read_bytes()
    (out / shards[0]).write_bytes(data[: len(data) // 2])
    (out / shards[1]).unlink()
    with tarfile.open(out / shards[2]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(out / shards[2], "w") as tar:
        for m, payload in members:
            if m.name == bad:
                payload = payload[:100]
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    report = verify(str(out / "train.json"), workers=2, progress=False)
    text = "\n".join(report.problems)
    assert not report.ok and report.samples < report.expected
    assert f"{shards[0]}: manifest says" in text and "cannot open" in text and shards[1] in text
    assert f"sample {Path(bad).stem}: image does not decode" in text
    # the cut image moved every later sample: the manifest's offsets no longer hold there
    assert f"{shards[2]}: manifest offsets do not match the tar: sample 1 " in text


def test_csv_layout_with_report_files_text_sections_and_labels(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for i in range(4):
        Image.new("L", (40, 30), 40 * i).save(img_dir / f"{i}.png")
    (tmp_path / "r0.txt").write_text("FINDINGS: Small left effusion.\nIMPRESSION: Effusion.\n")
    rows = [
        "image,report,report_file,split,view,effusion,site",
        "images/0.png,,r0.txt,train,PA,1,a",
        'images/1.png,"Lungs are clear, heart normal.",,train,PA,,b',
        "images/2.png,Ok.,,test,PA,0,c",
        "images/3.png,IMPRESSION: Right apical pneumothorax.,,test,LATERAL,0,d",
    ]
    table = tmp_path / "data.csv"
    table.write_text("\n".join(rows) + "\n")
    skipped: Counter[str] = Counter()
    records = csv_records(str(table), Filters(views=("PA",), unsectioned="findings"), ("effusion",), skipped=skipped)
    assert [r.key for r in records] == ["r00000000", "r00000001"]
    assert skipped == {"too_short": 1, "view": 1}
    assert records[0].findings == "Small left effusion." and records[0].labels == {"effusion": 1.0}
    assert records[1].findings == "Lungs are clear, heart normal." and records[1].labels == {}
    assert records[0].sample_json()["site"] == "a" and records[0].image == str(img_dir / "0.png")
    with pytest.raises(ValueError, match="label columns"):
        csv_records(str(table), Filters(), ("missing",))
    (tmp_path / "bad.csv").write_text("path,report\nx.png,FINDINGS: a b c\n")
    with pytest.raises(ValueError, match="'image' column"):
        csv_records(str(tmp_path / "bad.csv"))


def test_missing_tables_fail_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        mimic_records(str(tmp_path))


# ----------------------------------------------------------------------------------------------


def test_cli_builds_into_s3_verifies_and_trains_from_it(mimic, s3_server, phantom_dir, tmp_path):
    root, _ = mimic
    fsspec.filesystem("s3", **s3_server).mkdir("hilum-build")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]}
    endpoint = ["--endpoint-url", s3_server["endpoint_url"]]
    build_cmd = [*HILUM, "shards", "build", "--mimic", str(root), "--out", "s3://hilum-build/mimic", "--resize", "64",
                 "--samples-per-shard", "10", "--workers", "2", *endpoint]
    proc = subprocess.run(build_cmd, capture_output=True, text=True, timeout=300, cwd=OUTSIDE, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train:" in proc.stdout and "bad_image 1" in proc.stdout and "view" in proc.stdout
    assert "testing" not in proc.stdout + proc.stderr
    again = subprocess.run(build_cmd, capture_output=True, text=True, timeout=300, cwd=OUTSIDE, env=env)
    assert again.returncode == 0 and "0 shards written" in again.stdout
    verify_cmd = [*HILUM, "shards", "verify", "s3://hilum-build/mimic/train.json", "--workers", "1", *endpoint]
    proc = subprocess.run(verify_cmd, capture_output=True, text=True, timeout=300, cwd=OUTSIDE, env=env)
    assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    fs = fsspec.filesystem("s3", **s3_server)
    with fs.open("s3://hilum-build/mimic/train-000000.tar", "rb") as f:
        first = next(iter(wds.WebDataset([f"pipe:cat {_local_copy(f, tmp_path)}"], shardshuffle=False).decode("pil")))
    assert min(first["jpg"].size) == 64

    # Train from the bucket: credentials from the environment, only the endpoint in the config.
    raw = tiny_config(phantom_dir, tmp_path / "runs", train={"max_steps": 4, "checkpoint_every": 0},
                      cluster={"launcher": "local", "num_workers": 1}, eval={"at_end": True})
    raw["data"].update(train_manifest="s3://hilum-build/mimic/train.json", eval_manifest="s3://hilum-build/mimic/test.json",
                       storage_options={"endpoint_url": s3_server["endpoint_url"]})
    cfg = write_config(tmp_path / "s3.yaml", raw)
    proc = subprocess.run([*HILUM, "train", "--config", str(cfg)], capture_output=True, text=True, timeout=600, cwd=OUTSIDE, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ev = json.loads((tmp_path / "runs" / "t" / "eval.json").read_text())
    test_samples = json.loads(fs.cat("s3://hilum-build/mimic/test.json"))["build"]["samples"]
    assert ev["samples"] == test_samples and "step 4/4" in proc.stderr
    assert "testing" not in proc.stdout + proc.stderr


def _local_copy(f, tmp_path: Path) -> Path:
    path = tmp_path / "copy.tar"
    with open(path, "wb") as out:
        shutil.copyfileobj(f, out)
    return path
