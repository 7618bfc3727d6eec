"""dag_trl: GFlowNet alignment of text-to-image diffusion models (DAG and DAG-KL, Zhang et al. 2024, arXiv 2406.00633)."""

from .config import GFlowNetConfig
from .flow_model import FlowNetwork
from .hub import HubPushError, create_model_card, push_folder_to_hub
from .math import DDIMStepOutput, ddim_step_with_logprob
from .pipeline import (
    DefaultGFlowNetStableDiffusionPipeline,
    GFlowNetPipelineOutput,
    GFlowNetStableDiffusionPipeline,
)
from .prompts import available_prompt_fns, get_prompt_fn
from .rewards import available_rewards, get_reward_fn
from .tracking import log_image_samples
from .trainer import GFlowNetDiffusionTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "DDIMStepOutput",
    "DefaultGFlowNetStableDiffusionPipeline",
    "FlowNetwork",
    "GFlowNetConfig",
    "GFlowNetDiffusionTrainer",
    "GFlowNetPipelineOutput",
    "GFlowNetStableDiffusionPipeline",
    "HubPushError",
    "available_prompt_fns",
    "available_rewards",
    "create_model_card",
    "ddim_step_with_logprob",
    "get_prompt_fn",
    "get_reward_fn",
    "log_image_samples",
    "push_folder_to_hub",
]
