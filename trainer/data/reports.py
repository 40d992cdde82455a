"""FINDINGS and IMPRESSION sections from free-text radiology reports.

MIMIC-CXR ships its reports as free text, one file per study; the public research code expects a
"sectioned CSV" that users must produce themselves with a separate script (and many get stuck
there: HKU-MedAI/MGCA issues #4, #9, #16, #41, #42). hilum extracts the two sections while it
builds shards, so the free text goes straight to training data.

Rules (written for MIMIC-CXR, general enough for other English radiology reports):

* A *header* starts a line and ends with a colon: ``FINDINGS:``, ``IMPRESSION:`` and their
  variants (``FINDING``, ``IMPRESSIONS``, ``CONCLUSION(S)``, ``SUMMARY``, any case) open a section;
  text after the colon on the same line belongs to it. A known header alone on its line, without
  a colon, counts as well.
* Combined headers (``FINDINGS AND IMPRESSION:``, ``IMPRESSION/FINDINGS:`` …) fill *both*
  sections with the same text: the report's author did not separate them, and a tower trained
  on either section should still see it.
* Any other all-capitals header (``INDICATION:``, ``COMPARISON:``, ``NOTIFICATION:``,
  ``RECOMMENDATION(S):`` …) ends the open section. Mixed-case text followed by a colon
  ("views of the chest: …") and times ("at 10:30") are ordinary text.
* When a report repeats the ``FINAL REPORT`` banner, only the text after the last one counts,
  so a preliminary ``WET READ`` above it never leaks into a section.
* Whitespace is collapsed to single spaces and separator rules (``_____``) removed; MIMIC's
  de-identification placeholders (``___``) are kept as written.

A report with neither section yields two empty strings; the shard builder counts and skips it
(or, for caption-like corpora, can use the whole text as findings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FINDINGS = {"FINDINGS", "FINDING"}
_IMPRESSION = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY"}

# A candidate header: up to six words of letters (and / & , ( ) -) at the start of a line, then a
# colon, or a known header word alone on its line.
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&(),-]{0,60}?)[ \t]*(:|$)", re.MULTILINE)
_BANNER = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"_{5,}")
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Sections:
    findings: str
    impression: str

    @property
    def empty(self) -> bool:
        return not self.findings and not self.impression

    def text(self) -> str:
        """Both sections as one report, in the form the stream's ``report`` text uses."""
        parts = [f"FINDINGS: {self.findings}" if self.findings else "", f"IMPRESSION: {self.impression}" if self.impression else ""]
        return " ".join(p for p in parts if p)


def _classify(name: str, has_colon: bool) -> str | None:
    """'findings', 'impression', 'both', 'other' (ends a section) or None (not a header)."""
    words = [w.removesuffix("(S)") for w in re.split(r"[\s/&,]+|\bAND\b", name.strip().upper()) if w]
    if not words or len(words) > 6:
        return None
    if words[0] in _FINDINGS | _IMPRESSION:
        # "FINDINGS AND IMPRESSION", "IMPRESSION AND RECOMMENDATIONS": the known words decide.
        kinds = {"findings" for w in words if w in _FINDINGS} | {"impression" for w in words if w in _IMPRESSION}
        return "both" if len(kinds) == 2 else kinds.pop()
    if has_colon and name.strip().isupper():
        return "other"
    return None


def _clean(text: str) -> str:
    return " ".join(_RULE.sub(" ", text).split())


def extract_sections(report: str) -> Sections:
    """The FINDINGS and IMPRESSION of a free-text report (see the module docstring for the rules)."""
    banners = list(_BANNER.finditer(report))
    if banners:
        report = report[banners[-1].end():]
    found = {"findings": [], "impression": []}
    current: str | None = None
    start = 0
    for m in _HEADER.finditer(report):
        kind = _classify(m.group(1), has_colon=m.group(2) == ":")
        if kind is None:
            continue
        if current is not None:
            _append(found, current, report[start:m.start()])
        current = None if kind == "other" else kind
        start = m.end()
    if current is not None:
        _append(found, current, report[start:])
    return Sections(" ".join(found["findings"]).strip(), " ".join(found["impression"]).strip())


def _append(found: dict[str, list[str]], kind: str, text: str) -> None:
    text = _clean(text)
    if not text:
        return
    for section in ("findings", "impression") if kind == "both" else (kind,):
        found[section].append(text)


def count_words(text: str) -> int:
    """Words (runs of letters) in ``text``: the length the "fewer than 3 tokens" filter counts.

    Words rather than a tokenizer's pieces, so the filter does not depend on which text tower a
    shard set will later train; placeholders such as ``___`` are not words.
    """
    return len(_WORD.findall(text))
