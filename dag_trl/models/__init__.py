"""Model families (pipelines) and the small networks the objectives train beside them."""

from .diffusers_family import DiffusersGFlowNetPipeline
from .families import PIPELINE_FAMILIES, pipeline_family, register_pipeline_family
from .flow_matching import FlowMatchingGFlowNetPipeline
from .flow_network import FlowNetwork
from .flux import DefaultGFlowNetFluxPipeline
from .log_partition import LogPartitionHead
from .pipeline import GFlowNetPipelineOutput, GFlowNetStableDiffusionPipeline, PromptEmbeddings
from .stable_diffusion import DefaultGFlowNetStableDiffusionPipeline
from .stable_diffusion_3 import DefaultGFlowNetStableDiffusion3Pipeline
from .stable_diffusion_xl import DefaultGFlowNetStableDiffusionXLPipeline

__all__ = [
    "PIPELINE_FAMILIES",
    "DefaultGFlowNetFluxPipeline",
    "DefaultGFlowNetStableDiffusion3Pipeline",
    "DefaultGFlowNetStableDiffusionPipeline",
    "DefaultGFlowNetStableDiffusionXLPipeline",
    "DiffusersGFlowNetPipeline",
    "FlowMatchingGFlowNetPipeline",
    "FlowNetwork",
    "GFlowNetPipelineOutput",
    "GFlowNetStableDiffusionPipeline",
    "LogPartitionHead",
    "PromptEmbeddings",
    "pipeline_family",
    "register_pipeline_family",
]
