"""The methods and their loss terms: each a room of its own (see ``base`` for the interface).

A run's loss is the weighted sum of the terms listed under ``objectives:`` in the config. A term
registers itself with :func:`register_objective`; the config schema accepts every registered
term, so adding one touches only its method's package (and, outside hilum, the config's
``plugins:`` list that imports it).
"""

# Importing a method registers its terms.
from hilum.trainer.objectives import clip as _clip  # noqa: E402,F401
from hilum.trainer.objectives import imitate as _imitate  # noqa: E402,F401
from hilum.trainer.objectives import medfilip as _medfilip  # noqa: E402,F401
from hilum.trainer.objectives import mlip as _mlip  # noqa: E402,F401
from hilum.trainer.objectives.base import (
    DataNeeds,
    MethodNeeds,
    Objective,
    ObjectiveInputs,
    TermConfig,
    build_objectives,
    method_needs,
    objective_class,
    objective_config_types,
    register_objective,
)

__all__ = [
    "DataNeeds",
    "MethodNeeds",
    "Objective",
    "ObjectiveInputs",
    "TermConfig",
    "build_objectives",
    "method_needs",
    "objective_class",
    "objective_config_types",
    "register_objective",
]
