"""The model families the package trains, keyed by the diffusers pipeline class a checkpoint's ``model_index.json``
names, so that a model path or Hub id alone picks its family."""

from __future__ import annotations

import os
from typing import Optional

from ..registry import register_unique
from .diffusers_family import DiffusersGFlowNetPipeline
from .flux import DefaultGFlowNetFluxPipeline
from .stable_diffusion import DefaultGFlowNetStableDiffusionPipeline
from .stable_diffusion_3 import DefaultGFlowNetStableDiffusion3Pipeline
from .stable_diffusion_xl import DefaultGFlowNetStableDiffusionXLPipeline

PIPELINE_FAMILIES: dict[str, type[DiffusersGFlowNetPipeline]] = {
    family.diffusers_pipeline_class: family
    for family in (
        DefaultGFlowNetStableDiffusionPipeline,
        DefaultGFlowNetStableDiffusionXLPipeline,
        DefaultGFlowNetStableDiffusion3Pipeline,
        DefaultGFlowNetFluxPipeline,
    )
}


def register_pipeline_family(
    family: type[DiffusersGFlowNetPipeline], pipeline_class_name: Optional[str] = None
) -> type[DiffusersGFlowNetPipeline]:
    """Make :func:`pipeline_family` (and so ``dag-trl train``) pick ``family`` for checkpoints whose
    ``model_index.json`` names the diffusers pipeline ``pipeline_class_name`` (default: the family's
    ``diffusers_pipeline_class``); returns ``family``, so that it also works as a class decorator. A name is taken
    once (registering the same family again is allowed; another family under a built-in's name is not)."""
    if not (isinstance(family, type) and issubclass(family, DiffusersGFlowNetPipeline)):
        raise TypeError(f"register_pipeline_family expects a subclass of DiffusersGFlowNetPipeline; got {family!r}")
    name = getattr(family, "diffusers_pipeline_class", None) if pipeline_class_name is None else pipeline_class_name
    return register_unique(PIPELINE_FAMILIES, "pipeline family", name, family)


def pipeline_family(pretrained_model_name: str, revision: str = "main") -> type[DiffusersGFlowNetPipeline]:
    """The pipeline class for a Hub id or local folder, from the ``_class_name`` of its ``model_index.json`` (read
    with diffusers' ``DiffusionPipeline.load_config``: from the folder, or the Hub and its cache)."""
    from diffusers import DiffusionPipeline

    name = str(pretrained_model_name)
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1):
        # Not a Hub id ('name' or 'owner/name'): diffusers would answer about the Hub and the internet connection.
        raise ValueError(
            f"pretrained model {name!r} is not a folder that exists (looked for {os.path.abspath(name)!r}); pass a "
            "model folder written by save_pretrained, or a Hub id ('name' or 'owner/name')."
        )
    try:
        config = DiffusionPipeline.load_config(pretrained_model_name, revision=revision)
    except OSError as error:
        if os.path.isdir(name):
            raise
        raise OSError(
            f"pretrained model {name!r} is not a local folder, and its model_index.json could not be read from the "
            f"Hub or its cache ({error}). With no network (or HF_HUB_OFFLINE=1), download it beforehand where the Hub "
            f"can be reached (`hf download {name}`), or pass a local folder."
        ) from error
    class_name = config.get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{pretrained_model_name}: its model_index.json names the pipeline {class_name!r}, which has no model "
            f"family here; supported: {sorted(PIPELINE_FAMILIES)}."
        )
    return PIPELINE_FAMILIES[class_name]
