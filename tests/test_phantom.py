"""Tests for the phantom generator: reports must say exactly what the pixels show.

The demo trains a tiny CLIP model on this data and expects zero-shot accuracy far above chance;
that only works if every report matches its image (category, severity, side and zone), so most
tests here check that correspondence, at the text level and at the pixel level.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from hilum.trainer.data.phantom import (
    CLASS_NAMES,
    FINDINGS,
    NO_FINDING,
    SEVERITIES,
    SIDES,
    ZERO_SHOT_PROMPTS,
    ZONES,
    Anatomy,
    Finding,
    PhantomCase,
    parse_report,
    render,
    render_with_anatomy,
    sample_case,
    sample_findings,
    write_report,
)

SIZE = 128
_YY, _XX = np.meshgrid((np.arange(SIZE) + 0.5) / SIZE, (np.arange(SIZE) + 0.5) / SIZE, indexing="ij")


def _all_findings() -> list[Finding]:
    out = []
    for cat in FINDINGS:
        for sev in SEVERITIES:
            if cat == "cardiomegaly":
                out.append(Finding(cat, sev))
                continue
            for side in SIDES:
                zones = {"effusion": ("lower",), "pneumothorax": ("upper",)}.get(cat, ZONES)
                for zone in zones:
                    out.append(Finding(cat, sev, side, zone))
    return out


ALL_FINDINGS = _all_findings()
LOCATED = [f for f in ALL_FINDINGS if f.category != "cardiomegaly"]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s.strip()]


def _pair(findings: list[Finding], seed: int) -> tuple[np.ndarray, np.ndarray, Anatomy]:
    """The same patient and noise rendered with and without ``findings``; returns (diff, image, anatomy)."""
    img, anat = render_with_anatomy(findings, np.random.default_rng(seed), SIZE)
    base = render([], np.random.default_rng(seed), SIZE)
    return img.astype(np.float64) - base.astype(np.float64), img, anat


# ---------------------------------------------------------------------------------------------
# Findings, labels, entities
# ---------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert CLASS_NAMES == (NO_FINDING, *FINDINGS)
    assert set(ZERO_SHOT_PROMPTS) == set(CLASS_NAMES)
    assert all(ZERO_SHOT_PROMPTS[c] for c in CLASS_NAMES)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(category="fracture", severity="mild", side="left", zone="upper"),
        dict(category="opacity", severity="huge", side="left", zone="upper"),
        dict(category="opacity", severity="mild", side=None, zone="upper"),
        dict(category="nodule", severity="mild", side="left", zone=None),
        dict(category="cardiomegaly", severity="mild", side="left", zone=None),
        dict(category="effusion", severity="mild", side="left", zone="upper"),
        dict(category="pneumothorax", severity="mild", side="left", zone="lower"),
    ],
)
def test_finding_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Finding(**kwargs)


def test_location() -> None:
    assert Finding("opacity", "moderate", "right", "lower").location() == "right lower"
    assert Finding("cardiomegaly", "mild").location() == "cardiac"


def test_sample_findings_rules() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3000):
        fs = sample_findings(rng)
        assert len(fs) <= 2
        assert len({f.category for f in fs}) == len(fs)
        located = [(f.side, f.zone) for f in fs if f.side is not None]
        assert len(set(located)) == len(located)


def test_distribution() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    counts = {c: 0 for c in CLASS_NAMES}
    sizes = [0, 0, 0]
    for _ in range(n):
        fs = sample_findings(rng)
        sizes[len(fs)] += 1
        counts[NO_FINDING] += not fs
        for f in fs:
            counts[f.category] += 1
    assert 0.25 <= counts[NO_FINDING] / n <= 0.45
    for cat in FINDINGS:
        assert 0.08 <= counts[cat] / n <= 0.20, (cat, counts[cat] / n)
    assert 0.38 <= sizes[1] / n <= 0.52 and 0.15 <= sizes[2] / n <= 0.25


def test_labels_and_entities() -> None:
    rng = np.random.default_rng(2)
    seen_empty = seen_full = False
    for _ in range(60):
        case = sample_case(rng, size=32)
        labels = case.labels()
        assert set(labels) == set(CLASS_NAMES)
        assert labels[NO_FINDING] == int(not case.findings)
        for cat in FINDINGS:
            assert labels[cat] == int(any(f.category == cat for f in case.findings))
        ents = case.entities()
        assert ents == [{"category": f.category, "severity": f.severity, "location": f.location()} for f in case.findings]
        assert case.view == "PA"
        seen_empty |= not case.findings
        seen_full |= bool(case.findings)
    assert seen_empty and seen_full
    empty = PhantomCase(np.zeros((4, 4), np.uint8), [], "", "")
    assert empty.labels() == {NO_FINDING: 1, **{c: 0 for c in FINDINGS}}


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def test_report_round_trip_every_finding() -> None:
    rng = np.random.default_rng(3)
    for f in ALL_FINDINGS:
        for _ in range(6):  # enough draws to hit every phrasing variant
            text, impression = write_report([f], rng)
            assert parse_report(text) == [f]
            # The category, severity, side and zone words always appear.
            low = text.lower()
            for word in (f.category, f.severity, f.side, f.zone):
                if word is not None:
                    assert re.search(rf"\b{word}\b", low), (word, text)
            assert impression.lower() in ZERO_SHOT_PROMPTS[f.category]


def test_report_round_trip_random_cases() -> None:
    rng = np.random.default_rng(4)
    for _ in range(2000):
        fs = sample_findings(rng)
        text, impression = write_report(fs, rng)
        parsed = parse_report(text)
        assert sorted(parsed, key=repr) == sorted(fs, key=repr)
        drawn = {f.category for f in fs}
        for sentence in _sentences(text):
            named = set(re.findall(r"\b(" + "|".join(FINDINGS) + r")\b", sentence.lower()))
            if re.match(r"^(no|there is no)\b", sentence.lower()):
                assert not named & drawn, (sentence, fs)  # never deny what was drawn
            else:
                assert named <= drawn, (sentence, fs)  # never assert what was not drawn
        # The no_finding prompts' phrases appear only in reports of normal studies.
        assert ("lungs are clear" in text.lower()) == (not fs)
        if not fs:
            assert impression == "No acute cardiopulmonary process."
            assert impression.lower() in ZERO_SHOT_PROMPTS[NO_FINDING]
        else:
            imp = _sentences(impression)
            assert len(imp) == len(fs)
            for f, s in zip(fs, imp):
                assert s.lower() in ZERO_SHOT_PROMPTS[f.category]


def test_normal_report() -> None:
    text, impression = write_report([], np.random.default_rng(5))
    assert parse_report(text) == []
    assert "clear" in text and "normal" in text
    assert impression == "No acute cardiopulmonary process."


def test_parse_rejects_ambiguous_sentences() -> None:
    with pytest.raises(ValueError):
        parse_report("There is a mild opacity and nodule in the right upper lung zone.")
    with pytest.raises(ValueError):
        parse_report("There is a mild opacity in the lung.")


def test_zero_shot_prompts_cover_the_grid() -> None:
    n = {"opacity": 18, "nodule": 18, "effusion": 6, "pneumothorax": 6, "cardiomegaly": 3}
    for cat, k in n.items():
        prompts = ZERO_SHOT_PROMPTS[cat]
        assert len(prompts) == len(set(prompts)) == k
        assert all(cat in p and p == p.lower() and p.endswith(".") for p in prompts)
    # Prompts never share wording with another class's category word.
    for cat in FINDINGS:
        for p in ZERO_SHOT_PROMPTS[cat]:
            assert all(other not in p for other in FINDINGS if other != cat)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_image_format_and_determinism() -> None:
    a = sample_case(np.random.default_rng(7))
    b = sample_case(np.random.default_rng(7))
    c = sample_case(np.random.default_rng(8))
    assert a.image.dtype == np.uint8 and a.image.shape == (SIZE, SIZE)
    assert np.array_equal(a.image, b.image)
    assert (a.findings, a.findings_text, a.impression_text) == (b.findings, b.findings_text, b.impression_text)
    assert not np.array_equal(a.image, c.image)
    small = render([Finding("nodule", "mild", "left", "upper")], np.random.default_rng(0), size=64)
    assert small.shape == (64, 64) and small.dtype == np.uint8


def test_looks_like_a_radiograph() -> None:
    """Dark air outside, dark lungs, bright mediastinum: the layout the findings rely on."""
    img, anat = render_with_anatomy([], np.random.default_rng(9), SIZE)
    f = img.astype(np.float64)
    corner = f[:6, :6].mean()
    lungs = []
    for lung in anat.lungs.values():
        y, x = int(lung.cy * SIZE), int(lung.cx * SIZE)
        lungs.append(f[y - 4 : y + 4, x - 4 : x + 4].mean())
    hy, hx = int(anat.heart_cy * SIZE), int(anat.heart_cx * SIZE)
    heart = f[hy - 3 : hy + 3, hx - 3 : hx + 3].mean()
    assert corner < 40
    assert all(corner + 20 < v < heart - 40 for v in lungs)


def _region(anat: Anatomy, f: Finding, band: float) -> np.ndarray:
    x0, x1, y0, y1 = anat.zone_box(f.side, f.zone)
    zh = y1 - y0
    half = _XX < anat.heart_cx if f.side == "right" else _XX >= anat.heart_cx
    return half & (_YY >= y0 - band * zh) & (_YY <= y1 + band * zh)


@pytest.mark.parametrize("f", LOCATED, ids=lambda f: f"{f.category}-{f.severity}-{f.side}-{f.zone}")
def test_finding_is_drawn_where_the_report_says(f: Finding) -> None:
    """"Right" is the patient's right, the image's left; the change sits in the stated zone."""
    for seed in range(3):
        diff, _, anat = _pair([f], seed)
        mass = np.abs(diff)
        total = mass.sum()
        assert total > 0
        half = _XX < anat.heart_cx if f.side == "right" else _XX >= anat.heart_cx
        assert (mass * half).sum() / total > 0.97
        if f.category == "effusion":
            # A severe effusion fills ~45% of the lung, so it climbs out of the lower third; it
            # must still sit in the lower half, with its mass centred in the lower zone's reach.
            assert (mass * _region(anat, f, 0.5)).sum() / total > 0.85
            x0, x1, y0, y1 = anat.zone_box(f.side, "lower")
            assert (mass * _YY).sum() / total > y0 - 0.5 * (y1 - y0)
        else:
            assert (mass * _region(anat, f, 0.15)).sum() / total > 0.7
        signed = diff[_region(anat, f, 0.5)].sum()
        if f.category == "pneumothorax":
            assert signed < 0  # air outside the collapsed lung is darker than lung
        else:
            assert signed > 0  # fluid, consolidation and nodules are denser than lung


@pytest.mark.parametrize("f", LOCATED, ids=lambda f: f"{f.category}-{f.severity}-{f.side}-{f.zone}")
def test_finding_survives_downscaling_to_64(f: Finding) -> None:
    diff, _, _ = _pair([f], 11)
    small = diff.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    assert np.abs(small).max() > 20  # grey levels, at the resolution the demo trains on


def test_severity_scales_the_finding() -> None:
    for cat, side, zone in [("opacity", "right", "middle"), ("effusion", "left", "lower"),
                            ("pneumothorax", "right", "upper"), ("nodule", "left", "middle")]:
        for seed in range(3):
            areas = [(np.abs(_pair([Finding(cat, s, side, zone)], seed)[0]) > 10).sum() for s in SEVERITIES]
            assert areas[0] < areas[1] < areas[2], (cat, seed, areas)


def test_nodules_are_smaller_than_opacities() -> None:
    for seed in range(4):
        for zone in ZONES:
            nod = (np.abs(_pair([Finding("nodule", "severe", "right", zone)], seed)[0]) > 10).sum()
            opa = (np.abs(_pair([Finding("opacity", "mild", "right", zone)], seed)[0]) > 10).sum()
            assert 0 < nod < 0.6 * opa


def test_pneumothorax_removes_lung_markings() -> None:
    """The collapsed space is darker than lung and featureless, bounded by a bright pleural line."""
    f = Finding("pneumothorax", "severe", "left", "upper")
    diff, img, anat = _pair([f], 12)
    dark = diff < -8
    assert dark.sum() > 50
    assert (diff > 8).sum() > 10  # the pleural line
    # Within the dark region, the local texture (markings) is flatter than in normal lung.
    lung = anat.lungs["right"]
    y, x = int(lung.cy * SIZE), int(lung.cx * SIZE)
    assert img[dark].astype(float).mean() < img[y - 6 : y + 6, x - 6 : x + 6].astype(float).mean()


def _measured_ctr(img: np.ndarray, anat: Anatomy) -> float:
    """Cardiothoracic ratio read off the pixels: the bright run through the heart at its widest
    level (threshold halfway between lung and heart), over the thoracic width."""
    row = int((anat.heart_cy - 0.25 * anat.heart_ry) * SIZE)
    line = img[row - 1 : row + 2].astype(np.float64).mean(axis=0)
    c = int(anat.heart_cx * SIZE)
    lung = anat.lungs["right"]
    ly, lx = int(lung.cy * SIZE), int(lung.cx * SIZE)
    thr = (np.median(line[c - 3 : c + 4]) + np.median(img[ly - 3 : ly + 4, lx - 3 : lx + 4])) / 2
    left = right = c
    while left > 0 and line[left - 1] > thr:
        left -= 1
    while right < SIZE - 1 and line[right + 1] > thr:
        right += 1
    return (right - left + 1) / SIZE / anat.thoracic_width


def test_cardiomegaly_widens_the_heart() -> None:
    for seed in range(8):
        ctrs = []
        for sev in (None, *SEVERITIES):
            fs = [] if sev is None else [Finding("cardiomegaly", sev)]
            img, anat = render_with_anatomy(fs, np.random.default_rng(seed), SIZE)
            ctrs.append(_measured_ctr(img, anat))
        assert ctrs[0] < 0.47, ctrs
        assert all(c > 0.49 for c in ctrs[1:]), ctrs
        assert ctrs[0] < ctrs[1] < ctrs[2] < ctrs[3], ctrs
        diff, _, anat = _pair([Finding("cardiomegaly", "moderate")], seed)
        assert diff.sum() > 0  # bright heart replaces dark lung
        lower = _YY > anat.heart_cy - 1.3 * anat.heart_ry
        assert (np.abs(diff) * lower).sum() / np.abs(diff).sum() > 0.9


def test_two_findings_are_both_drawn() -> None:
    rng = np.random.default_rng(13)
    checked = 0
    while checked < 15:
        fs = sample_findings(rng)
        if len(fs) != 2 or any(f.category == "cardiomegaly" for f in fs):
            continue
        seed = int(rng.integers(1 << 30))
        both, _, anat = _pair(fs, seed)
        for f in fs:
            alone, _, _ = _pair([f], seed)
            region = _region(anat, f, 0.15)
            # Each finding's own region changes the same way whether or not the other is drawn.
            assert np.abs(both[region] - alone[region]).mean() < 2.0
        checked += 1
