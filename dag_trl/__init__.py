"""dag_trl: reward alignment of text-to-image diffusion models with GFlowNet objectives (DAG, DAG-KL; Zhang et al.
2024, arXiv 2406.00633) and, beside them, RTB and DDPO."""

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
)
from .prompts import available_prompt_fns, get_prompt_fn
from .rewards import available_rewards, get_reward_fn
from .samplers import DDIMStepOutput, ddim_step_with_logprob
from .trainer import GFlowNetDiffusionTrainer, TrainingDivergedError, TrainingInterrupted

__version__ = "0.1.0.dev0"

__all__ = [
    "DDIMStepOutput",
    "DefaultGFlowNetFluxPipeline",
    "DefaultGFlowNetStableDiffusion3Pipeline",
    "DefaultGFlowNetStableDiffusionPipeline",
    "DefaultGFlowNetStableDiffusionXLPipeline",
    "FlowNetwork",
    "GFlowNetConfig",
    "GFlowNetDiffusionTrainer",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "GFlowNetPipelineOutput",
    "GFlowNetStableDiffusionPipeline",
    "HubPushError",
    "PromptEmbeddings",
    "available_prompt_fns",
    "available_rewards",
    "create_model_card",
    "ddim_step_with_logprob",
    "get_prompt_fn",
    "get_reward_fn",
    "log_image_samples",
    "push_folder_to_hub",
]
