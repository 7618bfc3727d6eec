"""Model families (pipelines) and the small networks the objectives train beside them."""

from .flow_network import FlowNetwork
from .log_partition import LogPartitionHead
from .pipeline import GFlowNetPipelineOutput, GFlowNetStableDiffusionPipeline, PromptEmbeddings
from .stable_diffusion import DefaultGFlowNetStableDiffusionPipeline

__all__ = [
    "DefaultGFlowNetStableDiffusionPipeline",
    "FlowNetwork",
    "GFlowNetPipelineOutput",
    "GFlowNetStableDiffusionPipeline",
    "LogPartitionHead",
    "PromptEmbeddings",
]
