"""MedFILIP (Liang et al.): structured labels from fine-grained entities and the semantic-similarity
alignment (``medfilip``)."""

from hilum.trainer.objectives.medfilip import term as _term  # noqa: F401
