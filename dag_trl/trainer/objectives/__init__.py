"""Training objectives, one file each, chosen by ``GFlowNetConfig.train_objective``.

To add one: write a subclass of :class:`Objective` in a new file and add it to :data:`OBJECTIVES`.
"""

from __future__ import annotations

from .base import Objective, TransitionBatch
from .dag_db import DAGDetailedBalance
from .dag_kl import DAGKL
from .ddpo import DDPO
from .kl_pg import KLRegularisedPolicyGradient
from .rdb import RelativeDetailedBalance
from .rtb import RelativeTrajectoryBalance

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
    "TransitionBatch",
    "get_objective_class",
]
