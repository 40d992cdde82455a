"""MedFILIP's structured labels (Liang et al., §III-A to III-C): per image, the texts
"{severity} {location} {category}, where {category} is {explanation}" built from the report's
fine-grained entities and the image-specific knowledge dictionary; per step, the vocabulary of
the global batch's labels and its semantic-similarity table (Eq. 4–5's cosines).

The loader workers turn each sample's stored entities into label texts (:func:`image_labels`)
and tokenize them; the training process gathers every rank's label texts, numbers the distinct
ones in one order on every rank, and embeds them with a frozen similarity encoder
(:class:`LabelVocabulary`), so the loss kernel regenerates the image × label similarity tile by
tile from a (V, V) table and per-sample indices instead of a B×M matrix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hilum.trainer.data.entities import CATEGORIES, canonical_category, load_knowledge, structured_label

NO_FINDING = "no finding"


@dataclass(frozen=True)
class LabelSpec:
    """How a sample's entities become its label texts (picklable: loader workers hold it)."""

    knowledge: dict[str, str]
    max_labels: int = 4
    uncertain: str = "keep"  # or "drop"

    @classmethod
    def load(cls, knowledge_file: str | None, max_labels: int, uncertain: str) -> "LabelSpec":
        return cls(load_knowledge(knowledge_file) if knowledge_file else load_knowledge(), max_labels, uncertain)


def image_labels(entities: list[dict[str, Any]], spec: LabelSpec) -> tuple[list[str], int]:
    """The distinct label texts of one image (at most ``spec.max_labels``) and how many were cut.

    Triplets without a category are dropped (MedFILIP keeps those lacking severity or location);
    an image with no finding gets the one label "no finding, where no finding is ...".
    """
    texts: list[str] = []
    for e in entities:
        category = str(e.get("category") or "").strip()
        if not category or (spec.uncertain == "drop" and e.get("uncertain")):
            continue
        text = structured_label({**e, "category": canonical_category(category)}, spec.knowledge)
        if text not in texts:
            texts.append(text)
    if not texts:
        texts = [structured_label({"category": NO_FINDING}, spec.knowledge)]
    return texts[: spec.max_labels], max(0, len(texts) - spec.max_labels)


@dataclass(frozen=True)
class LabelTexts:
    """MedFILIP's structured label texts as a declared per-sample text (up to ``max_labels`` each,
    batched as ``label_input_ids`` (B, K, T) with ``label_valid``). A sample stored without
    entities is skipped as ``no_entities``: build the shards with ``--entities rules``."""

    spec: LabelSpec
    name: str = "label"

    @property
    def per_sample(self) -> int:
        return self.spec.max_labels

    def read(self, meta: dict[str, Any], text: str) -> tuple[list[str], dict[str, int]]:
        from hilum.trainer.data.stream import SampleError

        entities = meta.get("entities")
        if not isinstance(entities, list):
            raise SampleError("no_entities", f"sample {meta.get('__key__', '?')}: no 'entities' list in its json "
                                             "(shards build --entities rules)")
        texts, cut = image_labels(entities, self.spec)
        return texts, {"labels_beyond_max_labels_dropped": cut}


def label_category(text: str) -> str:
    """The category a label text was built from (its head's last words matching the vocabulary)."""
    head = text.split(",", 1)[0]
    for name in sorted({*CATEGORIES, NO_FINDING}, key=len, reverse=True):
        if head.endswith(name):
            return name
    return head.split()[-1] if head.split() else ""


class BagOfWordsEncoder:
    """The default frozen similarity encoder: hashed word and word-pair counts, L2-normalised.

    Offline and deterministic; it scores labels alike when they share words ("mild left pleural
    effusion" vs "moderate left pleural effusion" > vs "mild left pneumothorax"). A sentence
    encoder pretrained on medical text (``similarity.model``: a local transformers directory)
    captures synonymy as well.
    """

    def __init__(self, dim: int = 4096) -> None:
        self.dim = dim

    def _index(self, token: str) -> int:
        return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") % self.dim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim, dtype=torch.float64)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                out[i, self._index(token)] += 1.0
        return F.normalize(out, dim=1)


class ModelEncoder:
    """A local transformers encoder, mean-pooled: E_sim as MedFILIP uses it (frozen)."""

    def __init__(self, path: str, context_length: int = 128) -> None:
        from hilum.trainer.data.text import Tokenize
        from hilum.trainer.models.towers import TextTower

        self.tokenize = Tokenize(path, context_length)
        self.model = TextTower(path, {}, len(self.tokenize.tokenizer), "mean").eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        return F.normalize(self.model(tokens["input_ids"], tokens["attention_mask"]).double(), dim=1)


@dataclass
class LabelVocabulary:
    """Numbers the global batch's label texts and keeps their similarity-encoder embeddings.

    ``same_category_only`` is the authors' code: similarity only between labels of one category.
    """

    encoder: Any = field(default_factory=BagOfWordsEncoder)
    same_category_only: bool = False
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def embed(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in texts if t not in self.cache]
        if new:
            for text, e in zip(new, self.encoder(new)):
                self.cache[text] = e
        return torch.stack([self.cache[t] for t in texts])

    def similarity(self, vocab: list[str]) -> torch.Tensor:
        """Eq. 5's cosines between every pair of labels, clamped at 0 (float32, (V, V))."""
        e = self.embed(vocab)
        sim = (e @ e.T).clamp_min(0.0)
        if self.same_category_only:
            cats = [label_category(t) for t in vocab]
            same = torch.tensor([[a == b for b in cats] for a in cats])
            sim = torch.where(same, sim, torch.zeros_like(sim))
        return sim.float()

    def prepare(self, labels: list[list[str]], max_labels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (B, max_labels) indices into the global vocabulary (-1 = empty slot) and the
        vocabulary's (V, V) similarity, the same on every rank."""
        everyone = [labels]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, labels)
        vocab = sorted({t for rank in everyone for image in rank for t in image})
        number = {t: i for i, t in enumerate(vocab)}
        index = torch.full((len(labels), max_labels), -1, dtype=torch.long)
        for i, image in enumerate(labels):
            for k, text in enumerate(image[:max_labels]):
                index[i, k] = number[text]
        return index.to(device), self.similarity(vocab).to(device)
