"""The former place of :mod:`dag_trl.objectives`, kept so that existing imports keep working (this name and its
submodules, e.g. ``dag_trl.trainer.objectives.losses``, are the same module objects). The objectives moved below the
trainer so that the config can look one up without importing the trainer."""

import sys

from ...objectives import *  # noqa: F403 (the same public names)
from ...objectives import __all__ as __all__
from ...objectives import base, dag_db, dag_kl, ddpo, kl_pg, losses, rdb, rtb

for _submodule in (base, dag_db, dag_kl, ddpo, kl_pg, losses, rdb, rtb):
    sys.modules[f"{__name__}.{_submodule.__name__.rsplit('.', 1)[1]}"] = _submodule
