"""The objective registry: each named term is a config class plus a module computing it.

A run's loss is the weighted sum of the terms listed under ``objectives:`` in the config. A term
registers itself with :func:`register_objective`; the config schema collects every registered
config class into a discriminated union on ``name``, so adding a term touches only its module.
"""

# Importing a term module registers it.
from hilum.trainer.objectives import cicl as _cicl  # noqa: E402,F401
from hilum.trainer.objectives import clip as _clip  # noqa: E402,F401
from hilum.trainer.objectives import divergence as _divergence  # noqa: E402,F401
from hilum.trainer.objectives import imitate as _imitate  # noqa: E402,F401
from hilum.trainer.objectives import medfilip as _medfilip  # noqa: E402,F401
from hilum.trainer.objectives.base import (
    Objective,
    ObjectiveInputs,
    TermConfig,
    build_objectives,
    objective_class,
    objective_config_types,
    register_objective,
)

__all__ = [
    "Objective",
    "ObjectiveInputs",
    "TermConfig",
    "build_objectives",
    "objective_class",
    "objective_config_types",
    "register_objective",
]
