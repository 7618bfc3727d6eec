"""The model families the package trains, keyed by the diffusers pipeline class a checkpoint's ``model_index.json``
names, so that a model path or Hub id alone picks its family."""

from __future__ import annotations

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


def pipeline_family(pretrained_model_name: str, revision: str = "main") -> type[DiffusersGFlowNetPipeline]:
    """The pipeline class for a Hub id or local folder, from the ``_class_name`` of its ``model_index.json`` (read
    with diffusers' ``DiffusionPipeline.load_config``: from the folder, or the Hub and its cache)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(pretrained_model_name, revision=revision)
    class_name = config.get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{pretrained_model_name}: its model_index.json names the pipeline {class_name!r}, which has no model "
            f"family here; supported: {sorted(PIPELINE_FAMILIES)}."
        )
    return PIPELINE_FAMILIES[class_name]
