"""IMITATE (Liu et al.): clinical-informed contrastive loss (``cicl``) and hierarchical alignment
(``imitate``), with the multi-level aggregation block and the FINDINGS as a second text."""

from hilum.trainer.objectives.imitate import cicl as _cicl  # noqa: F401
from hilum.trainer.objectives.imitate import term as _term  # noqa: F401
