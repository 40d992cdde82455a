"""Fine-grained entities from report text: (severity, location, category) triplets (MedFILIP §III-A).

MedFILIP extracts them with an LLM; hilum's default extractor works offline, so a shard build
needs no endpoint and gives the same answer every time. It is rule-based, in the spirit of
NegEx (Chapman et al. 2001) and the CheXpert labeller:

* Sentences are cut into clauses at ``;``, ``:`` and contrastive words ("but", "however",
  "although", "except"), clauses into segments at commas, "and", "with" and "or".
* A category is a phrase of :data:`CATEGORIES` (synonyms map to one canonical name).
* A negation trigger ("no", "without", "free of", "negative for", "no evidence of", "resolved",
  "clear of" ...) negates every category after it in its clause — so "No focal consolidation,
  pleural effusion or pneumothorax" yields nothing — and a trailing trigger ("... is not seen",
  "... has resolved") negates the categories before it. Negated mentions are dropped.
* A hedge ("possible", "may represent", "cannot be excluded", "concerning for", "likely" ...)
  anywhere in the clause marks its mentions ``uncertain``; they are kept, flagged.
* Severity and location are the words of :data:`SEVERITIES` and side/zone words found in the
  mention's segment ("small bilateral pleural effusions and bibasilar atelectasis": two
  entities, each with its own words). Missing ones are empty strings, as MedFILIP keeps
  triplets without severity or location; a mention without a category cannot exist here.
  A vaguer mention of a finding that a more specific mention also describes is merged into it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

# canonical category -> phrases (regular expressions, lower case, matched on word boundaries)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "pleural effusion": (r"pleural effusions?", r"effusions?", r"hydrothorax"),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax"),
    "consolidation": (r"consolidations?", r"consolidative (?:opacit(?:y|ies)|process)"),
    "pneumonia": (r"pneumonias?", r"infectious process"),
    "atelectasis": (r"atelectas[ie]s", r"atelectatic", r"collapse"),
    "pulmonary edema": (r"(?:pulmonary |interstitial |alveolar )?edema", r"vascular congestion", r"fluid overload"),
    "cardiomegaly": (r"cardiomegaly", r"(?:enlarged|enlargement of the) (?:heart|cardiac silhouette)",
                     r"cardiac (?:silhouette )?(?:is )?enlarged"),
    "enlarged cardiomediastinum": (r"(?:widened|enlarged) (?:cardio)?mediastinum", r"mediastinal widening"),
    "nodule": (r"(?:pulmonary |lung )?nodules?", r"nodular (?:opacit(?:y|ies)|densit(?:y|ies))"),
    "mass": (r"mass(?:es)?",),
    "opacity": (r"opacit(?:y|ies)", r"opacification", r"densit(?:y|ies)", r"infiltrates?"),
    "fracture": (r"fractures?",),
    "emphysema": (r"emphysema", r"hyperinflation", r"hyperinflated"),
    "fibrosis": (r"fibrosis", r"fibrotic changes?", r"scarring"),
    "hernia": (r"hiatal hernia", r"hernias?"),
}
SEVERITIES = ("trace", "tiny", "minimal", "mild", "small", "subtle", "moderate", "large", "severe", "extensive",
              "massive", "marked", "acute", "chronic", "subacute", "new", "worsening", "increasing", "improving")
SIDES = {"left": "left", "right": "right", "bilateral": "bilateral", "bilaterally": "bilateral", "both": "bilateral",
         "bibasilar": "bilateral lower", "bibasal": "bilateral lower"}
ZONES = {"upper": "upper", "middle": "middle", "mid": "middle", "lower": "lower", "apical": "upper", "apex": "upper",
         "apices": "upper", "basilar": "lower", "basal": "lower", "base": "lower", "bases": "lower",
         "perihilar": "perihilar", "retrocardiac": "retrocardiac", "lingular": "lingular", "lingula": "lingular"}
# a category whose location is implied when the text names none
DEFAULT_LOCATION = {"cardiomegaly": "cardiac", "enlarged cardiomediastinum": "mediastinal"}

NEGATIONS_BEFORE = (r"no", r"not", r"without", r"free of", r"negative for", r"no evidence of", r"no signs? of",
                    r"absence of", r"resolution of", r"resolved", r"clear of", r"rules? out", r"ruled out", r"nor")
NEGATIONS_AFTER = (r"(?:is|are|was|were) not (?:seen|present|identified|appreciated|visualized)", r"(?:has|have) resolved",
                   r"(?:is|are) absent", r"(?:is|are) no longer (?:seen|present|visualized)")
HEDGES = (r"possible", r"possibly", r"probable", r"probably", r"may (?:be|represent|reflect)", r"might", r"could (?:be|represent)",
          r"cannot be (?:excluded|ruled out)", r"can ?not exclude", r"not excluded", r"concerning for", r"suspicious for",
          r"suggestive of", r"questionable", r"likely", r"versus", r"vs\.?", r"differential")

_CONTRAST = re.compile(r"[;:]|\b(?:but|however|although|though|except|whereas)\b")
_SEGMENT = re.compile(r",|\b(?:and|with|or)\b")
_NEG_BEFORE = re.compile(r"\b(?:" + "|".join(NEGATIONS_BEFORE) + r")\b")
_NEG_AFTER = re.compile(r"\b(?:" + "|".join(NEGATIONS_AFTER) + r")\b")
_HEDGE = re.compile(r"\b(?:" + "|".join(HEDGES) + r")\b")
_CATEGORY = re.compile(r"\b(" + "|".join(f"(?:{p})" for ps in CATEGORIES.values() for p in ps) + r")\b")
_CANONICAL = [(re.compile(rf"^(?:{p})$"), name) for name, ps in CATEGORIES.items() for p in ps]
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Entity:
    severity: str
    location: str
    category: str
    uncertain: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _canonical(phrase: str) -> str:
    return next(name for pattern, name in _CANONICAL if pattern.match(phrase))


def canonical_category(name: str) -> str:
    """A category as the vocabulary and the knowledge dictionary name it ("effusion" → "pleural
    effusion"; underscores read as spaces); a name no synonym matches passes through."""
    text = " ".join(name.replace("_", " ").lower().split())
    return next((canon for pattern, canon in _CANONICAL if pattern.match(text)), text)


def _segment_of(clause: str, start: int) -> str:
    """The segment (between commas/and/with/or) of ``clause`` holding position ``start``."""
    bounds = [0] + [m.end() for m in _SEGMENT.finditer(clause) if m.end() <= start]
    lo = bounds[-1]
    nxt = next((m.start() for m in _SEGMENT.finditer(clause) if m.start() > start), len(clause))
    return clause[lo:nxt]


def _location(words: list[str]) -> str:
    side = next((SIDES[w] for w in words if w in SIDES), "")
    zone = next((ZONES[w] for w in words if w in ZONES), "")
    if side.endswith("lower") and zone in ("", "lower"):
        return side
    return " ".join(p for p in (side, zone) if p)


def extract_entities(text: str) -> list[Entity]:
    """Positive and uncertain (flagged) findings of ``text``, one per (category, location, severity)."""
    found: dict[tuple[str, str, str], Entity] = {}
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text.lower()):
        for clause in _CONTRAST.split(sentence):
            negated_from = min((m.start() for m in _NEG_BEFORE.finditer(clause)), default=len(clause) + 1)
            negated_until = max((m.start() for m in _NEG_AFTER.finditer(clause)), default=-1)
            uncertain = bool(_HEDGE.search(clause))
            for m in _CATEGORY.finditer(clause):
                if m.start() > negated_from or m.start() < negated_until:
                    continue
                category = _canonical(m.group(1))
                words = _WORD.findall(_segment_of(clause, m.start()))
                severity = next((w for w in words if w in SEVERITIES), "")
                location = _location(words) or DEFAULT_LOCATION.get(category, "")
                key = (category, location, severity)
                if key not in found or (found[key].uncertain and not uncertain):
                    found[key] = Entity(severity, location, category, uncertain)
    entities = list(found.values())
    # "The cardiac silhouette is enlarged, consistent with severe cardiomegaly": a vaguer mention of
    # a finding that a more specific one also describes is the same finding.
    return [e for e in entities if not any(_refines(f, e) for f in entities)]


def _refines(f: Entity, e: Entity) -> bool:
    """``f`` describes the same finding as ``e`` with more detail."""
    return (f != e and f.category == e.category and e.severity in ("", f.severity) and e.location in ("", f.location)
            and f.uncertain <= e.uncertain)


KNOWLEDGE_FILE = Path(__file__).with_name("knowledge") / "chest_xray.json"


def load_knowledge(path: str | Path = KNOWLEDGE_FILE) -> dict[str, str]:
    """Category → image-specific explanation (MedFILIP Eq. 3's ``Dict``)."""
    raw = json.loads(Path(path).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def structured_label(entity: Entity | dict[str, object], knowledge: dict[str, str]) -> str:
    """"{severity} {location} {category}, where {category} is {explanation}" (MedFILIP §III-B);
    the explanation is left out for a category the dictionary does not know."""
    e = entity if isinstance(entity, dict) else entity.to_dict()
    head = " ".join(str(e[k]) for k in ("severity", "location", "category") if e.get(k))
    explanation = knowledge.get(str(e["category"]))
    return f"{head}, where {e['category']} is {explanation}" if explanation else head
