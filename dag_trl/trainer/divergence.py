"""Divergence detection: a non-finite loss, gradient or parameter stops training before it reaches the weights, and
weights that fail a health check (:func:`weights_problem`) never reach a checkpoint or a saved model; each error says
where and what, and which checkpoint to resume from."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Optional

import torch

# fp16 training: the gradient scaler skips a step whose gradients overflowed and halves its scale. From accelerate's
# initial scale of 2**16, 16 skips in a row reach a scale of 1; past that the overflow is not the scale's: stop.
MAX_CONSECUTIVE_SKIPPED_STEPS = 20
# The largest LoRA update a checkpoint or saved model may hold, as the ratio ||s B A||_F / ||W||_F of
# lora_update_ratios: past it the adapter outweighs the pretrained layer tenfold, which no fine-tuning here comes near
# (docs/reliability.md: the main job ends at 0.043), while an epoch at a learning rate of 1e12 gives above 1e9.
MAX_LORA_UPDATE_RATIO = 10.0


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
    return (
        f"Training diverged at epoch {epoch}, optimiser window {window}: {what}. Loss terms: {terms}; rewards of the "
        f"window in {reward_range}; beta={beta:g}. Nothing non-finite was applied or saved. "
        f"{how_to_go_on(last_checkpoint)}"
    )


def how_to_go_on(last_checkpoint: Optional[str]) -> str:
    """The end of a divergence message: the checkpoint to resume from (every checkpoint passed the weights health
    check when it was written), or that none was written, and what to change."""
    resume = (
        f"The last checkpoint, {last_checkpoint!r}, passed the weights health check: resume from it"
        if last_checkpoint
        else "No checkpoint was written yet: restart"
    )
    return (
        f"{resume} with a lower train_learning_rate, a smaller train_reward_exp or rescaled rewards, or a larger "
        "sample_eta."
    )


def weights_problem(
    parameters: Iterable[torch.Tensor],
    lora_ratios: dict[str, float],
    probe: Callable[[], dict[str, torch.Tensor]],
) -> Optional[str]:
    """What fails the weights health check, or ``None`` when the weights pass it. In order: a trainable parameter
    with a NaN or infinite entry; a LoRA layer whose update ratio (:func:`lora_update_ratios`) exceeds
    :data:`MAX_LORA_UPDATE_RATIO`; a non-finite output of the fixed probe (``probe()``: name -> output of the trained
    modules on fixed inputs, run only when the weights pass the first two checks)."""
    bad = first_non_finite(parameters)
    if bad is not None:
        return f"trainable parameter {bad} holds NaN or infinite values"
    if lora_ratios:
        layer = max(lora_ratios, key=lora_ratios.__getitem__)
        if not lora_ratios[layer] <= MAX_LORA_UPDATE_RATIO:
            return (
                f"the LoRA update of layer {layer!r} is {lora_ratios[layer]:.3g} times the frozen weight it adds to "
                f"(||s B A||_F / ||W||_F; the health check allows at most {MAX_LORA_UPDATE_RATIO:g})"
            )
    for name, output in probe().items():
        if first_non_finite([output]) is not None:
            return f"the fixed probe's {name} hold NaN or infinite values"
    return None


def lora_update_ratios(module: torch.nn.Module) -> dict[str, float]:
    r"""Per LoRA layer of ``module`` (peft's, by module name), the size of the adapter's update against the frozen
    weight it adds to (Hu et al., 2022, "LoRA", arXiv 2106.09685):

    .. math:: \rho = \frac{\lVert s\, B A \rVert_F}{\lVert W \rVert_F}, \qquad
              \lVert B A \rVert_F^2 = \langle B^\top B,\; A A^\top \rangle_F,

    with ``s`` peft's ``scaling`` (``lora_alpha / r``) and convolution kernels flattened to matrices. The second form
    needs only ``r x r`` products. ``B`` starts at zero, so ``rho`` starts at 0 and measures how far training moved
    the layer; the largest over a layer's adapters is kept."""
    ratios: dict[str, float] = {}
    for name, layer in module.named_modules():
        lora_a, lora_b, base = (getattr(layer, key, None) for key in ("lora_A", "lora_B", "base_layer"))
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict) or base is None:
            continue
        frozen = base.weight.detach().double().norm().item()
        for adapter, a_layer in lora_a.items():
            a = a_layer.weight.detach().double().flatten(1)
            b = lora_b[adapter].weight.detach().double().flatten(1)
            squared = ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).item()
            update = abs(layer.scaling[adapter]) * math.sqrt(squared)
            ratio = update / frozen if frozen > 0 else (math.inf if update > 0 else 0.0)
            ratios[name] = max(ratios.get(name, 0.0), ratio)
    return ratios
