"""MLIP (Li et al. 2024): divergence encoders updated by a similarity-weighted moving average, and
the augmented global alignment (``divergence``)."""

from hilum.trainer.objectives.mlip import divergence as _divergence  # noqa: F401
