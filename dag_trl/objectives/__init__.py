"""Training objectives, one file each, chosen by ``GFlowNetConfig.train_objective``.

To add one: write a subclass of :class:`Objective` in a new file and register it with :func:`register_objective`
(or add it to :data:`OBJECTIVES`, a plain dict). This package sits below the trainer (it imports the models and
samplers, never the trainer or the config), so that the config can look an objective up by name without loading the
trainer; ``dag_trl.trainer.objectives`` is its former name.
"""

from __future__ import annotations

from ..registry import register_unique
from .base import Objective, TransitionBatch
from .dag_db import DAGDetailedBalance
from .dag_kl import DAGKL
from .ddpo import DDPO
from .kl_pg import KLRegularisedPolicyGradient
from .rdb import RelativeDetailedBalance
from .rtb import RelativeTrajectoryBalance
from .trajectories import Trajectories

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        DAGDetailedBalance,
        DAGKL,
        DDPO,
        RelativeTrajectoryBalance,
        KLRegularisedPolicyGradient,
        RelativeDetailedBalance,
    )
}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` selectable as ``GFlowNetConfig(train_objective=cls.name)`` and return it, so that it also works
    as a class decorator. Register before a config names the objective: configs validate at construction. A name is
    taken once (registering the same class again is allowed; another class under a built-in's name is not)."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"register_objective expects a subclass of Objective; got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective class {cls.__name__} needs a non-empty string class attribute name; got {name!r}")
    return register_unique(OBJECTIVES, "objective", name, cls)


def default_objective_name(train_klpf: float) -> str:
    """The objective of a config whose ``train_objective`` is ``None``: DAG-KL when ``train_klpf > 0``, else DAG-DB
    (the DAG paper's code chose between the two by the KL weight alone, and configs written that way keep their
    meaning). The config reads it here, so that it names no objective itself."""
    return DAGKL.name if train_klpf > 0 else DAGDetailedBalance.name


def get_objective_class(name: str) -> type[Objective]:
    """The objective class registered as ``name``; ``ValueError`` naming the accepted values otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(
            f"GFlowNetConfig.train_objective={name!r} is invalid: expected one of {sorted(OBJECTIVES)} (or None)."
        )
    return OBJECTIVES[name]


__all__ = [
    "DAGDetailedBalance",
    "DAGKL",
    "DDPO",
    "KLRegularisedPolicyGradient",
    "OBJECTIVES",
    "Objective",
    "RelativeDetailedBalance",
    "RelativeTrajectoryBalance",
    "Trajectories",
    "TransitionBatch",
    "default_objective_name",
    "get_objective_class",
    "register_objective",
]
