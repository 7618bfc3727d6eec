"""dag_trl: reward alignment of text-to-image diffusion models with GFlowNet objectives (DAG, DAG-KL; Zhang et al.
2024, arXiv 2406.00633) and, beside them, RTB and DDPO.

The public names below load their module on first use (as transformers and diffusers do), so that importing one
part, e.g. ``dag_trl.config``, does not load the trainer, the models or the rewards.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# Each public name and the module (relative to this package) that defines it.
_PUBLIC_NAMES = {
    "DDIMStepOutput": "samplers",
    "DefaultGFlowNetFluxPipeline": "models",
    "DefaultGFlowNetStableDiffusion3Pipeline": "models",
    "DefaultGFlowNetStableDiffusionPipeline": "models",
    "DefaultGFlowNetStableDiffusionXLPipeline": "models",
    "FlowNetwork": "models",
    "GFlowNetConfig": "config",
    "GFlowNetDiffusionTrainer": "trainer",
    "GFlowNetPipelineOutput": "models",
    "GFlowNetStableDiffusionPipeline": "models",
    "HubPushError": "io.hub",
    "PromptEmbeddings": "models",
    "StepOutput": "samplers",
    "TrainingDivergedError": "trainer",
    "TrainingInterrupted": "trainer",
    "available_prompt_fns": "prompts",
    "available_rewards": "rewards",
    "create_model_card": "io.hub",
    "ddim_step_with_logprob": "samplers",
    "get_prompt_fn": "prompts",
    "get_reward_fn": "rewards",
    "log_image_samples": "io.tracking",
    "push_folder_to_hub": "io.hub",
    "register_objective": "objectives",
    "register_pipeline_family": "models",
}

# The same names, written out for tools that read __all__ statically (tests/test_package.py checks all three lists).
__all__ = [
    "DDIMStepOutput",
    "DefaultGFlowNetFluxPipeline",
    "DefaultGFlowNetStableDiffusion3Pipeline",
    "DefaultGFlowNetStableDiffusionPipeline",
    "DefaultGFlowNetStableDiffusionXLPipeline",
    "FlowNetwork",
    "GFlowNetConfig",
    "GFlowNetDiffusionTrainer",
    "GFlowNetPipelineOutput",
    "GFlowNetStableDiffusionPipeline",
    "HubPushError",
    "PromptEmbeddings",
    "StepOutput",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "available_prompt_fns",
    "available_rewards",
    "create_model_card",
    "ddim_step_with_logprob",
    "get_prompt_fn",
    "get_reward_fn",
    "log_image_samples",
    "push_folder_to_hub",
    "register_objective",
    "register_pipeline_family",
]

if TYPE_CHECKING:  # what static analysers and IDEs read; at run time __getattr__ imports on first use
    from .config import GFlowNetConfig
    from .io.hub import HubPushError, create_model_card, push_folder_to_hub
    from .io.tracking import log_image_samples
    from .models import (
        DefaultGFlowNetFluxPipeline,
        DefaultGFlowNetStableDiffusion3Pipeline,
        DefaultGFlowNetStableDiffusionPipeline,
        DefaultGFlowNetStableDiffusionXLPipeline,
        FlowNetwork,
        GFlowNetPipelineOutput,
        GFlowNetStableDiffusionPipeline,
        PromptEmbeddings,
        register_pipeline_family,
    )
    from .objectives import register_objective
    from .prompts import available_prompt_fns, get_prompt_fn
    from .rewards import available_rewards, get_reward_fn
    from .samplers import DDIMStepOutput, StepOutput, ddim_step_with_logprob
    from .trainer import GFlowNetDiffusionTrainer, TrainingDivergedError, TrainingInterrupted


def __getattr__(name: str) -> Any:
    """A public name's value, importing its module on first use; a subpackage (``dag_trl.trainer``) is imported
    on attribute access too, as it was when this package imported everything."""
    if name in _PUBLIC_NAMES:
        value = getattr(importlib.import_module(f".{_PUBLIC_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC_NAMES))
