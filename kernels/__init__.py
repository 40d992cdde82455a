"""Compute kernels for hilum's objectives; no training knowledge, nothing stateful.

Each kernel has a pure-PyTorch reference with the same API. This package shares its import name
with Hugging Face's ``kernels``; transformers probes that name, so keep this module free of
side effects and of a ``__version__`` (tests/test_packaging.py checks the probe stays False).
Triton is imported only when the Triton path runs.
"""

from kernels.infonce import infonce_loss, infonce_loss_reference
from kernels.infonce_distributed import infonce_loss_distributed
from kernels.targets import DenseTargets, LabelSimilarityTargets, ReportCorrelationTargets, SoftTargets

__all__ = [
    "DenseTargets",
    "LabelSimilarityTargets",
    "ReportCorrelationTargets",
    "SoftTargets",
    "infonce_loss",
    "infonce_loss_distributed",
    "infonce_loss_reference",
]
