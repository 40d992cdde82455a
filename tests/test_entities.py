"""MedFILIP's fine-grained entities from report text: negation, hedges, lists, severity and
location per mention, the phantom's known findings recovered exactly, the knowledge dictionary,
and entities stored by the shard build."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hilum.trainer.data import phantom
from hilum.trainer.data.entities import CATEGORIES, extract_entities, load_knowledge, structured_label

CASES = {
    # report text -> expected (severity, location, category, uncertain), sorted
    "No focal consolidation, pleural effusion or pneumothorax.": [],
    "No acute cardiopulmonary process. Heart size is normal.": [],
    "Small bilateral pleural effusions and bibasilar atelectasis.": [
        ("", "bilateral lower", "atelectasis", False), ("small", "bilateral", "pleural effusion", False)],
    "Lungs are clear without consolidation but there is a small left effusion.": [
        ("small", "left", "pleural effusion", False)],
    "The previously seen right pneumothorax has resolved.": [],
    "Right apical pneumothorax is no longer seen. New left lower lobe opacity.": [
        ("new", "left lower", "opacity", False)],
    "Possible left lower lobe pneumonia.": [("", "left lower", "pneumonia", True)],
    "Pneumonia cannot be excluded.": [("", "", "pneumonia", True)],
    "The cardiac silhouette is enlarged, consistent with moderate cardiomegaly.": [
        ("moderate", "cardiac", "cardiomegaly", False)],
    "Mild pulmonary edema; no pneumothorax.": [("mild", "", "pulmonary edema", False)],
    "Moderate right pleural effusion, unchanged. Chronic left rib fractures.": [
        ("chronic", "left", "fracture", False), ("moderate", "right", "pleural effusion", False)],
}


@pytest.mark.parametrize("text", sorted(CASES))
def test_realistic_sentences(text):
    got = sorted((e.severity, e.location, e.category, e.uncertain) for e in extract_entities(text))
    assert got == sorted(CASES[text])


def test_the_phantom_reports_findings_are_recovered_exactly():
    """The phantom writes reports from known findings, in varied wording with negated normals."""
    name = {"effusion": "pleural effusion"}
    rng = np.random.default_rng(11)
    seen = Counter()
    for _ in range(600):
        findings = phantom.sample_findings(rng)
        findings_text, impression = phantom.write_report(findings, rng)
        truth = sorted((f.severity, f.location(), name.get(f.category, f.category)) for f in findings)
        for text in (findings_text, impression):
            got = sorted((e.severity, e.location, e.category) for e in extract_entities(text))
            assert got == truth, text
        seen.update(f.category for f in findings)
    assert set(seen) == set(phantom.FINDINGS)  # every category was exercised


def test_knowledge_dictionary_explains_every_category():
    knowledge = load_knowledge()
    # every category, and "no finding" (MedFILIP's label for an image without one)
    assert set(knowledge) == set(CATEGORIES) | {"no finding"} and all(len(v.split()) >= 8 for v in knowledge.values())
    entity = extract_entities("Small left pleural effusion.")[0]
    assert structured_label(entity, knowledge) == (
        f"small left pleural effusion, where pleural effusion is {knowledge['pleural effusion']}")
    assert structured_label({"severity": "", "location": "", "category": "pneumonia"}, {}) == "pneumonia"


def test_shard_build_stores_the_entities(tmp_path):
    from hilum.trainer.data.phantom_dataset import write_mimic_layout
    from hilum.trainer.data.sources import Filters, mimic_records

    write_mimic_layout(str(tmp_path), 30, size=64)
    records = mimic_records(str(tmp_path))
    name = {"pleural effusion": "effusion"}
    for r in records:
        entities = r.sample_json()["entities"]
        positive = {k for k, v in r.labels.items() if v == 1.0 and k != phantom.NO_FINDING}
        assert {name.get(e["category"], e["category"]) for e in entities} == positive
    assert any(r.sample_json()["entities"] for r in records)
    assert "entities" not in mimic_records(str(tmp_path), filters=Filters(entities="none"))[0].sample_json()
