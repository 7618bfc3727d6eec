"""The training loop and what it is made of: objectives, the state-reward cache, checkpointing, distributed set-up."""

from ..objectives import OBJECTIVES, Objective, TransitionBatch, get_objective_class
from .checkpointing import TRAINER_STATE_NAME, checkpoint_dir, list_checkpoints, resolve_resume_from
from .distributed import TrainableModules, configure_deepspeed
from .divergence import TrainingDivergedError
from .inputs import validate_prompt, validate_rewards
from .trainer import GFlowNetDiffusionTrainer, TrainingInterrupted, WorkCounters, derive_seed

__all__ = [
    "OBJECTIVES",
    "TRAINER_STATE_NAME",
    "GFlowNetDiffusionTrainer",
    "Objective",
    "TrainableModules",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "TransitionBatch",
    "WorkCounters",
    "checkpoint_dir",
    "configure_deepspeed",
    "derive_seed",
    "get_objective_class",
    "list_checkpoints",
    "resolve_resume_from",
    "validate_prompt",
    "validate_rewards",
]
