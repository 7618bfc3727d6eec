"""Model presets: a model id that ``dag-trl train`` knows by name (``--pretrained_model builtin:shapes``), with the
model's folder, its packaged recipe and what its report adds.

A preset is one file plus a registration: a function that returns a :class:`ModelPreset`, registered under the model
id in :data:`PRESETS` (the :class:`~dag_trl.registry.Registry` that rewards and prompt sets use too). The module that
registers it also registers the preset's reward and prompt set, which its recipe names.

The command line finds the presets that ship with dag_trl through :data:`PRESET_MODULES`, a table of module names
that :func:`load_presets` imports by name when a preset is first looked up: this table is the only place outside
``dag_trl/demo/`` that names the demo, and nothing imports it statically, so the layers below the demo never depend
on it. A preset of your own is registered by importing its module before the command line runs (or by adding the
module to :data:`PRESET_MODULES`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from .registry import Registry

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from .config import GFlowNetConfig
    from .trainer.evaluating import EvaluationHook

__all__ = ["PRESETS", "PRESET_MODULES", "ModelPreset", "get_preset", "load_presets"]


@dataclass(frozen=True)
class ModelPreset:
    """What ``dag-trl train`` needs to know about a model it knows by name.

    Parameters:
        model: the id users pass as ``--pretrained_model`` (e.g. ``"builtin:shapes"``).
        resolve: ``cache_dir -> folder``: the local folder (or Hub id) to load for it; ``cache_dir`` is the
            command line's ``--cache_dir`` (``None``: the preset's default).
        recipes: the folder of the preset's packaged recipes (``importlib.resources.files(package) / "assets"``).
        recipe: the file name in ``recipes`` of the YAML recipe that supplies the command line's defaults for this
            model; ``<stem>_<objective>.yaml`` beside it (e.g. ``shapes_recipe_rtb.yaml``) is merged over it when that
            objective is chosen (:meth:`recipe_settings`).
        evaluation_hook: ``config -> hook or None``: the trainer's ``evaluation_hook`` for this model
            (``(images, prompts, metadata, rewards) -> dict``, run at every evaluation and in the report's before
            and after evaluations).
        evaluation_figures: ``(trainer, images, prompts, seed) -> {name: compute}``: further figures of the report's
            before and after evaluations, each computed by calling ``compute()`` (a figure that fails is left out of
            the report, named).
        target_summary: ``(config, prompts) -> dict or None``: the summary's ``"target"`` entry (what training
            converges to, for the evaluation ``prompts``), or ``None`` where it is not known.
        summary_lines: ``summary -> lines``: the printed report's lines on this preset's figures.
    """

    model: str
    resolve: Callable[[Optional[str]], str]
    recipes: Traversable
    recipe: str
    evaluation_hook: Optional[Callable[[GFlowNetConfig], Optional[EvaluationHook]]] = None
    evaluation_figures: Optional[Callable[[Any, Any, list[str], int], dict[str, Callable[[], Any]]]] = None
    target_summary: Optional[Callable[[GFlowNetConfig, list[str]], Optional[dict[str, Any]]]] = None
    summary_lines: Optional[Callable[[dict[str, Any]], list[str]]] = None

    def recipe_settings(self, objective: Optional[str] = None) -> dict[str, Any]:
        """The packaged recipe's settings, with ``<stem>_<objective>.yaml``'s over them when ``objective`` has one."""
        import yaml

        settings = yaml.safe_load((self.recipes / self.recipe).read_text()) or {}
        if objective:
            specific = self.recipes / f"{self.recipe.rsplit('.', 1)[0]}_{objective}.yaml"
            if specific.is_file():
                settings.update(yaml.safe_load(specific.read_text()) or {})
        return settings


PRESETS: Registry[ModelPreset] = Registry("model preset")

# The modules that register the presets shipped with dag_trl, imported by name on first look-up.
PRESET_MODULES: tuple[str, ...] = ("dag_trl.demo.shapes.preset",)


def load_presets() -> None:
    """Import each module of :data:`PRESET_MODULES` (registering its presets, rewards and prompt sets); a module
    imported before is not run again."""
    for name in PRESET_MODULES:
        importlib.import_module(name)


def get_preset(model: str) -> Optional[ModelPreset]:
    """The preset registered under the model id ``model``, or ``None`` when ``model`` is not a preset's id (a Hub
    id or a folder)."""
    load_presets()
    if model not in PRESETS.names():
        return None
    return PRESETS.get(model)
