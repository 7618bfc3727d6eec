"""Checks of what user callables return: rewards and prompts, with errors that name the problem."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def validate_rewards(rewards: Any, prompts: list[str], epoch: int, device: torch.device) -> torch.Tensor:
    """Convert a reward function's output to a float32 tensor of shape ``(B,)``, or raise naming the bad prompts.

    Accepts a tensor, an array or a list of ``B`` numbers; rejects the wrong length, non-numbers, NaN and inf.
    """
    try:
        values = torch.as_tensor(
            rewards.detach().cpu() if torch.is_tensor(rewards) else np.asarray(rewards, dtype=np.float64)
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"reward_function returned {type(rewards).__name__} {rewards!r:.200} at epoch {epoch}: expected a tensor, "
            f"array or list of {len(prompts)} numbers (one per prompt)."
        ) from error
    if values.dtype == torch.bool or not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"reward_function returned values of dtype {values.dtype} at epoch {epoch}: expected numbers."
        )
    values = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if values.ndim != 1 or values.shape[0] != len(prompts):
        raise ValueError(
            f"reward_function returned shape {tuple(values.shape)} at epoch {epoch} for {len(prompts)} prompts: "
            f"expected ({len(prompts)},), one reward per image."
        )
    values = values.to(torch.float32)
    bad = [prompt for prompt, ok in zip(prompts, torch.isfinite(values).tolist()) if not ok]
    if bad:
        raise ValueError(
            f"reward_function returned NaN or inf at epoch {epoch} for prompt(s) {bad[:5]!r}"
            f"{' ...' if len(bad) > 5 else ''}: rewards must be finite numbers."
        )
    return values.to(device)


def validate_prompt(output: Any) -> tuple[str, dict]:
    """Check a prompt function's output: a ``(prompt: str, metadata: dict)`` pair."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(
            f"prompt_function returned {type(output).__name__} {output!r:.200}: expected a (prompt, metadata) tuple."
        )
    prompt, metadata = output
    if not isinstance(prompt, str):
        raise TypeError(f"prompt_function returned a prompt of type {type(prompt).__name__}: expected str.")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"prompt_function returned metadata of type {type(metadata).__name__}: expected dict.")
    return prompt, metadata
