"""DDPO: the reward-maximising baseline (Black et al., 2024, "Training Diffusion Models with Reinforcement Learning",
arXiv 2305.13301), as TRL's ``DDPOTrainer`` trained it."""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import numpy as np
import torch

from .base import Objective, TransitionBatch, process_share
from .losses import ppo_clipped_loss
from .trajectories import Trajectories

ADVANTAGE_EPSILON = 1e-6


def standardised(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    r""":math:`(r - \mathrm{mean}(\text{reference})) / (\mathrm{std}(\text{reference}) + 10^{-6})`."""
    return (values - reference.mean()) / (reference.std() + ADVANTAGE_EPSILON)


class PerPromptStatTracker:
    """DDPO's per-prompt reward statistics: a buffer of each prompt's latest ``buffer_size`` rewards; a prompt's
    rewards are standardised by its buffer once it holds ``min_count`` rewards, by the whole batch before that."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add ``rewards`` to their prompts' buffers and return their standardised values."""
        prompts_array = np.array(prompts, dtype=object)
        result = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mask = prompts_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            result[mask] = standardised(rewards[mask], reference)
        return result

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}


class DDPO(Objective):
    r"""DDPO with importance sampling and clipping: for each transition, the PPO-clipped surrogate
    :math:`\max(-A\rho, -A\,\mathrm{clip}(\rho, 1 \pm \epsilon))` (``train_clip_range``) with
    :math:`\rho = P_F^\theta(x_s \mid x_t) / P_F^{\text{sampled}}(x_s \mid x_t)` and the trajectory's advantage
    :math:`A`, the epoch's rewards standardised over all processes (or per prompt with
    ``per_prompt_stat_tracking``), clipped to ``train_adv_clip_max``. No flow network, no intermediate rewards.
    """

    name = "ddpo"
    display_name = "DDPO"
    description = "PPO-clipped policy gradient on standardised rewards, a reward maximiser"
    paper = ("Black et al., 2024", "https://arxiv.org/abs/2305.13301")
    hyperparameters = (
        "train_clip_range",
        "train_adv_clip_max",
        "per_prompt_stat_tracking",
        "per_prompt_stat_tracking_buffer_size",
        "per_prompt_stat_tracking_min_count",
    )
    trajectory_fields = ("advantages",)
    # DDPO maximises the reward itself: the reward exponent and its anneal are not read.
    target_settings = ("train_log_prob_reduction", "lora_min_timestep")

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        buffer, minimum = config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count
        if config.per_prompt_stat_tracking and minimum > buffer:
            raise ValueError(
                f"GFlowNetConfig.per_prompt_stat_tracking_min_count={minimum} is invalid with "
                f"per_prompt_stat_tracking_buffer_size={buffer}: a prompt's buffer never holds more than {buffer} "
                f"rewards, so per-prompt statistics would never start; expected an integer in [1, {buffer}]."
            )

    def __init__(self, config):
        super().__init__(config)
        self.stat_tracker = (
            PerPromptStatTracker(
                config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count
            )
            if config.per_prompt_stat_tracking
            else None
        )

    def prepare_samples(self, samples: Trajectories, accelerator: Any) -> None:
        """Advantages of the epoch's trajectories, from the rewards of every process (as DDPO computes them)."""
        from accelerate.utils import gather_object

        rewards = accelerator.gather(samples.rewards).cpu().numpy().astype(np.float64)
        if self.stat_tracker is not None:
            advantages = self.stat_tracker.advantages(gather_object(list(samples.prompts)), rewards)
        else:
            advantages = standardised(rewards, rewards)
        mine = process_share(advantages, accelerator, len(samples))
        samples.extras["advantages"] = torch.as_tensor(mine, dtype=torch.float32, device=samples.rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.stat_tracker is None else {"per_prompt_stats": self.stat_tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None and "per_prompt_stats" in state:
            self.stat_tracker.load_state_dict(state["per_prompt_stats"])

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        advantages = batch.trajectory["advantages"].clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
        loss = ppo_clipped_loss(advantages, batch.log_prob_forward, batch.sampled_log_prob, config.train_clip_range)
        ratio = torch.exp(batch.log_prob_forward - batch.sampled_log_prob)
        return loss.mean(), {
            "loss_total": loss.mean().item(),
            "advantage_abs": advantages.abs().mean().item(),
            "log_prob_forward": batch.log_prob_forward.mean().item(),
            "ratio": ratio.mean().item(),
            "clip_fraction": ((ratio - 1).abs() > config.train_clip_range).float().mean().item(),
        }
