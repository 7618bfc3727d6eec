"""Divergence detection: a non-finite loss, gradient or parameter stops training before it reaches the weights, a
checkpoint or a saved model, with an error that says where and what."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch

# fp16 training: the gradient scaler skips a step whose gradients overflowed and halves its scale. From accelerate's
# initial scale of 2**16, 16 skips in a row reach a scale of 1; past that the overflow is not the scale's: stop.
MAX_CONSECUTIVE_SKIPPED_STEPS = 20


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss, gradient or weight. Nothing non-finite was applied or written: the last
    checkpoint holds the last good weights."""


def first_non_finite(tensors: Iterable[torch.Tensor]) -> Optional[int]:
    """Index of the first tensor with a NaN or infinite entry, or ``None``."""
    for index, tensor in enumerate(tensors):
        if not bool(torch.isfinite(tensor.detach()).all()):
            return index
    return None


def divergence_message(
    what: str,
    epoch: int,
    window: int,
    parts: dict[str, float],
    rewards: torch.Tensor,
    beta: float,
    last_checkpoint: Optional[str],
) -> str:
    """The error text: where (epoch, window), what (``what``), the loss terms, the reward range, beta, and how to go
    on from the last good checkpoint."""
    terms = ", ".join(f"{name}={value:.4g}" for name, value in parts.items()) or "none computed"
    rewards = rewards.detach().float().cpu()
    finite = rewards[torch.isfinite(rewards)]
    reward_range = f"[{finite.min().item():.4g}, {finite.max().item():.4g}]" if finite.numel() else "none finite"
    resume = (
        f"The last checkpoint, {last_checkpoint!r}, holds finite weights: resume from it"
        if last_checkpoint
        else "No checkpoint was written yet: restart"
    )
    return (
        f"Training diverged at epoch {epoch}, optimiser window {window}: {what}. Loss terms: {terms}; rewards of the "
        f"window in {reward_range}; beta={beta:g}. Nothing non-finite was applied or saved. {resume} with a lower "
        "train_learning_rate, a smaller train_reward_exp or rescaled rewards, or a larger sample_eta."
    )


def refuse_non_finite_weights(parameters: Iterable[torch.Tensor], destination: str) -> None:
    """Raise :class:`TrainingDivergedError` instead of writing weights with a NaN or infinite entry to
    ``destination`` (a model folder or checkpoint): a non-finite model must never replace a good one."""
    bad = first_non_finite(parameters)
    if bad is not None:
        raise TrainingDivergedError(
            f"Refusing to write {destination!r}: trainable parameter {bad} holds NaN or infinite values. The earlier "
            "checkpoints are kept."
        )
