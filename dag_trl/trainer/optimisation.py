"""The trained networks' optimisers: their creation, the hand-over to accelerate (as one DeepSpeed engine or network
by network), and the step that ends each optimiser window."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..config import GFlowNetConfig
from .checkpointing import accelerate_project_kwargs
from .distributed import TrainableModules
from .divergence import MAX_CONSECUTIVE_SKIPPED_STEPS

if TYPE_CHECKING:
    from ..models.pipeline import GFlowNetStableDiffusionPipeline


def create_accelerator(config: GFlowNetConfig) -> Any:
    """The run's ``Accelerator``: ``project_kwargs`` as TRL's DDPOTrainer takes them (checkpoint naming and
    ``total_limit`` are the trainer's own), and one optimiser step per window: accelerate averages the window's
    backward passes and, with several processes, synchronises gradients on the last one only."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        log_with=config.log_with,
        mixed_precision=config.mixed_precision,
        project_config=ProjectConfiguration(**accelerate_project_kwargs(config)),
        gradient_accumulation_steps=config.backward_passes_per_step,
        **config.accelerator_kwargs,
    )


def forward_autocast(
    pipeline: GFlowNetStableDiffusionPipeline, accelerator: Any, uses_deepspeed: bool, weight_dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """The context for model forwards: the pipeline's (its ``autocast`` factory), else the accelerator's mixed
    precision."""
    factory = pipeline.autocast
    if factory is not None:
        return factory()
    if uses_deepspeed and weight_dtype != torch.float32:
        # DeepSpeed keeps 16-bit weights and leaves autocasting to the script; accelerate's autocast is a no-op.
        return torch.autocast(accelerator.device.type, dtype=weight_dtype)
    return accelerator.autocast()


def create_optimizer(
    config: GFlowNetConfig,
    denoiser_parameters: list,
    objective_model: Optional[torch.nn.Module],
    objective_learning_rate: float,
) -> torch.optim.Optimizer:
    """AdamW (bitsandbytes' 8-bit AdamW with ``train_use_8bit_adam``) over the denoiser's trained parameters at
    ``train_learning_rate`` and, as a second group, ``objective_model``'s at ``objective_learning_rate``."""
    if config.train_use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    groups = [{"params": denoiser_parameters, "lr": config.train_learning_rate}] if denoiser_parameters else []
    if objective_model is not None:
        groups.append({"params": list(objective_model.parameters()), "lr": objective_learning_rate})
    return optimizer_class(
        groups,
        betas=(config.train_adam_beta1, config.train_adam_beta2),
        weight_decay=config.train_adam_weight_decay,
        eps=config.train_adam_epsilon,
    )


@dataclass
class PreparedModels:
    """The trained networks and their optimisers as accelerate prepared them.

    Attributes:
        denoiser: the denoiser to call (wrapped for DDP; the engine's module under DeepSpeed).
        objective_model: the objective's model to call, or ``None``.
        optimizer: the optimiser of the denoiser (and, unless it is outside the engine, of the objective's model).
        objective_optimizer: under DeepSpeed in bfloat16, the float32 objective model's own optimiser; else ``None``.
        prepared: what ``accelerator.accumulate`` takes: the engine, or the prepared networks.
    """

    denoiser: torch.nn.Module
    objective_model: Optional[torch.nn.Module]
    optimizer: Any
    objective_optimizer: Optional[torch.optim.Optimizer]
    prepared: tuple


def prepare_models(
    accelerator: Any,
    config: GFlowNetConfig,
    denoiser: torch.nn.Module,
    denoiser_parameters: list,
    objective_model: Optional[torch.nn.Module],
    objective_learning_rate: float,
    uses_deepspeed: bool,
) -> PreparedModels:
    """Create the optimisers and hand the networks to accelerate: under DeepSpeed as one
    :class:`TrainableModules` engine (in bfloat16 without the objective's model, which keeps float32 weights and its
    own optimiser, saved with the engine's checkpoint), else each network on its own."""
    # Under DeepSpeed in bfloat16 the objective's model (DAG's flow network, RTB's log Z) stays outside the engine,
    # which would train a 16-bit copy of it: summed log-flows reach hundreds of nats, where bfloat16's spacing is
    # several nats. It keeps float32 weights and its own optimiser (fp16 keeps it in the engine).
    outside_engine = uses_deepspeed and objective_model is not None and config.mixed_precision == "bf16"
    engine_objective_model = None if outside_engine else objective_model
    optimizer = create_optimizer(config, denoiser_parameters, engine_objective_model, objective_learning_rate)
    objective_optimizer = (
        create_optimizer(config, [], objective_model, objective_learning_rate) if outside_engine else None
    )
    if uses_deepspeed:
        engine, optimizer = accelerator.prepare(TrainableModules(denoiser, engine_objective_model), optimizer)
        if outside_engine:
            # Saved and restored with the engine's checkpoint (accelerate's custom_checkpoint_<i>.pkl files).
            accelerator.register_for_checkpointing(objective_model, objective_optimizer)
        # ZeRO stages 1-2 shard optimiser states and gradients, not parameters: the engine's modules can be called
        # directly, and `accelerate.backward` routes every backward pass through the engine.
        model = objective_model if outside_engine else engine.module.objective_model
        return PreparedModels(engine.module.unet, model, optimizer, objective_optimizer, (engine,))
    if objective_model is not None:
        denoiser, model, optimizer = accelerator.prepare(denoiser, objective_model, optimizer)
        return PreparedModels(denoiser, model, optimizer, None, (denoiser, model))
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    return PreparedModels(denoiser, None, optimizer, None, (denoiser,))


def clip_outside_engine(model: torch.nn.Module, accelerator: Any, max_norm: float) -> float:
    """Average the gradients of an objective model trained outside the DeepSpeed engine over the processes (DDP's
    all-reduce, which the engine does not do for it) and clip them as the DDP path does; returns their norm."""
    parameters = list(model.parameters())
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in parameters]), reduction="mean")
        for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters]), strict=True):
            parameter.grad.copy_(grad.view_as(parameter))
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


class OptimiserStep:
    """The end of an optimiser window: clip the gradients, step, and stop a diverging run.

    A non-finite gradient norm calls ``diverged`` (which raises) before the step. Under fp16 loss scaling
    (``uses_loss_scaling``) the gradient scaler skips the steps whose gradients overflow instead; they are counted
    (``skipped_steps``), and ``diverged`` is called only when more than ``MAX_CONSECUTIVE_SKIPPED_STEPS`` follow each
    other.

    Args:
        accelerator: the run's accelerator (unscaling, the skipped-step flag, the processes).
        max_norm: ``train_max_grad_norm``.
        uses_deepspeed: whether the DeepSpeed engine clips and steps (inside the window's last backward pass).
        uses_loss_scaling: whether fp16 scales the loss.
        objective_model_folder: the objective's ``model_folder``, naming its gradient norm in the metrics.
    """

    def __init__(
        self,
        accelerator: Any,
        max_norm: float,
        uses_deepspeed: bool,
        uses_loss_scaling: bool,
        objective_model_folder: Optional[str],
    ):
        self.accelerator = accelerator
        self.max_norm = max_norm
        self.uses_deepspeed = uses_deepspeed
        self.uses_loss_scaling = uses_loss_scaling
        self.objective_model_folder = objective_model_folder
        self.skipped_steps = self.consecutive_skipped_steps = 0

    def __call__(
        self,
        models: PreparedModels,
        diverged: Callable[[str], None],
    ) -> dict[str, float]:
        """Clip and step ``models``' optimisers; returns the gradient norms (and, under fp16, the skipped steps)."""
        objective_norm_name = f"grad_norm_{self.objective_model_folder}"
        if self.uses_deepspeed:
            # The engine clipped the global norm of all trained networks and stepped inside the last backward pass.
            # Its optimiser reports that norm under ZeRO-1/2 and 16-bit training, not with ZeRO-0's plain AdamW.
            grad_norm = models.prepared[0].get_global_grad_norm()
            metrics = {} if grad_norm is None else {"grad_norm": float(grad_norm)}
            if models.objective_optimizer is not None:
                norm = clip_outside_engine(models.objective_model, self.accelerator, self.max_norm)
                if not math.isfinite(norm):
                    diverged(f"{objective_norm_name} is {norm} (the step was not applied)")
                models.objective_optimizer.step()
                models.objective_optimizer.zero_grad(set_to_none=True)
                metrics[objective_norm_name] = norm
            return metrics
        # Unscale (fp16) once, then clip the denoiser and the objective's model separately, as the paper does.
        self.accelerator.unscale_gradients()
        denoiser_parameters = [p for p in models.denoiser.parameters() if p.requires_grad]
        metrics = {"grad_norm_unet": float(torch.nn.utils.clip_grad_norm_(denoiser_parameters, self.max_norm))}
        if models.objective_model is not None:
            norm = torch.nn.utils.clip_grad_norm_(models.objective_model.parameters(), self.max_norm)
            metrics[objective_norm_name] = float(norm)
        if not self.uses_loss_scaling:
            for name, value in metrics.items():
                if not math.isfinite(value):
                    diverged(f"{name} is {value} (the step was not applied)")
        models.optimizer.step()
        models.optimizer.zero_grad(set_to_none=True)
        if self.uses_loss_scaling:
            skipped = self.accelerator.optimizer_step_was_skipped
            self.skipped_steps += int(skipped)
            self.consecutive_skipped_steps = self.consecutive_skipped_steps + 1 if skipped else 0
            metrics["optimizer_steps_skipped"] = float(self.skipped_steps)
            if self.consecutive_skipped_steps > MAX_CONSECUTIVE_SKIPPED_STEPS:
                diverged(
                    f"the fp16 gradient scaler skipped {self.consecutive_skipped_steps} optimiser steps in a row "
                    "(their gradients overflowed at every loss scale it tried)"
                )
        return metrics
