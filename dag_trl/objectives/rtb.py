"""RTB: relative trajectory balance towards the reward-tilted prior (Venkatraman et al., 2024, "Amortizing
intractable inference in diffusion models", arXiv 2405.20971)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..models.log_partition import LogPartitionHead
from .base import (
    PRIOR_SAMPLER_SETTINGS,
    Objective,
    TransitionBatch,
    check_guided_training,
    check_prior_available,
)
from .trajectories import Trajectories


def relative_trajectory_balance_residual(
    log_partition: torch.Tensor,
    policy_log_prob: torch.Tensor,
    prior_log_prob: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    r"""Per-trajectory RTB residual
    :math:`\delta = \log Z(c) + \sum_t \log P_F^\theta(x_{t-1} \mid x_t) - \sum_t \log P_F^{\text{prior}}(x_{t-1}
    \mid x_t) - \beta R(x_0)`; the loss is :math:`\delta^2`, zero for every trajectory exactly when the policy
    samples :math:`p^{\text{prior}}(x_0) e^{\beta R(x_0)} / Z(c)`. ``*_log_prob`` are ``(B, N)`` per transition."""
    return log_partition + policy_log_prob.sum(dim=1) - prior_log_prob.sum(dim=1) - beta * rewards


def batch_log_partition(residual: torch.Tensor, prompts: list[str], fallback: torch.Tensor) -> torch.Tensor:
    r"""Per-prompt batch estimate of :math:`\log Z(c)`: minus the mean of the residual without :math:`\log Z` over the
    trajectories of the same prompt, :math:`\hat{\log Z}(c) = \frac{1}{K_c} \sum_{i: c_i = c} (\beta R(x_0^i) -
    \sum_t \log P_F^\theta + \sum_t \log P_F^{\text{prior}})`; ``fallback`` where a prompt has a single trajectory.

    With it, :math:`\delta_i` is the deviation from the group mean, and :math:`2\delta_i \nabla \sum_t \log P_F^\theta`
    is the exact gradient of the group's log-variance loss :math:`\frac{1}{K}\sum_i (r_i - \bar r)^2` (VarGrad:
    Richter et al., 2020, arXiv 2010.10436), whose minimum is the same tilted target."""
    result = fallback.clone()
    for prompt in set(prompts):
        rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=residual.device)
        if len(rows) > 1:
            result[rows] = -residual[rows].mean()
    return result


class RelativeTrajectoryBalance(Objective):
    r"""RTB fine-tunes the denoiser's LoRA so that the sampler's distribution is the prior tilted by the reward,
    :math:`p^{\text{prior}}(x_0 \mid c)\, e^{\beta R(x_0)}`, where the prior is the pretrained model itself (the same
    network with its adapter switched off, sampled with the same guidance, eta and timesteps).

    The loss :math:`\delta^2` of a whole trajectory has the gradient
    :math:`2\delta\,(\nabla \log Z + \sum_t \nabla \log P_F^\theta(t))`: :math:`\delta` is computed once per window
    without gradient, from the current weights (:meth:`prepare_window`), and each transition is backpropagated on
    its own (one transition's memory at a time) with the surrogate :math:`N \cdot 2\delta \log P_F^\theta(t) +
    2\delta \log Z`, whose accumulation over the window's ``N`` transitions per trajectory is the exact gradient.
    ``log Z(c)`` in :math:`\delta` is, with ``train_log_z_estimate="batch"`` (the default), the per-prompt batch
    estimate of :func:`batch_log_partition` (the gradient is then the log-variance loss's), else the objective's own
    model (:class:`~dag_trl.models.log_partition.LogPartitionHead`), which is trained at
    ``train_log_z_learning_rate`` on its own residual in both cases.
    """

    name = "rtb"
    main_metric = "loss_rtb"
    display_name = "RTB"
    description = "relative trajectory balance towards the reward-tilted pretrained model"
    hyperparameters = ("train_log_z_learning_rate", "train_log_z_estimate")
    target_settings = Objective.target_settings + PRIOR_SAMPLER_SETTINGS + ("train_log_z_estimate",)
    model_folder = "log_partition"
    trajectory_fields = ("rtb_delta", "rtb_log_z_delta")
    uses_prior_log_probs = True

    paper = ("Venkatraman et al., 2024", "https://arxiv.org/abs/2405.20971")
    required_settings = {
        "train_timestep_fraction": (1.0, "RTB balances whole trajectories: every transition is trained"),
        "train_log_prob_reduction": ("sum", "the target is a distribution only with true (summed) log-densities"),
        "train_reward_exp_anneal": ("none", "an annealed beta moves the target under the learned log Z"),
    }

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        check_guided_training(config, cls.name)

    def create_model(self, pipeline) -> LogPartitionHead:
        check_prior_available(pipeline, self.name)
        return LogPartitionHead(pipeline.prompt_embedding_dim)

    def load_model(self, path: str) -> LogPartitionHead:
        return LogPartitionHead.from_pretrained(path)

    def learning_rate(self) -> float:
        return self.config.train_log_z_learning_rate

    def probe_model(self, model, latents, timesteps, prompt_embeds) -> torch.Tensor:
        return model(prompt_embeds.hidden_states)

    @torch.no_grad()
    def prepare_window(
        self,
        window: Trajectories,
        beta: float,
        policy_log_probs: Callable[[], torch.Tensor],
        model: Optional[torch.nn.Module],
    ) -> None:
        learned = model(window.prompt_embeds.hidden_states)
        residual_without_log_z = relative_trajectory_balance_residual(
            torch.zeros_like(learned), policy_log_probs(), window.prior_log_probs, window.rewards.float(), beta
        )
        window.extras["rtb_log_z_delta"] = learned + residual_without_log_z
        log_partition = learned
        if self.config.train_log_z_estimate == "batch":
            log_partition = batch_log_partition(residual_without_log_z, window.prompts, learned)
        window.extras["rtb_delta"] = log_partition + residual_without_log_z

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        delta = batch.trajectory["rtb_delta"]
        num_steps = self.config.sample_num_steps
        log_partition = model(batch.prompt_embeds.hidden_states)
        surrogate = (
            2 * delta * num_steps * batch.log_prob_forward + 2 * batch.trajectory["rtb_log_z_delta"] * log_partition
        )
        return surrogate.mean(), {
            "loss_rtb": (delta**2).mean().item(),
            "log_partition": log_partition.mean().item(),
            "log_prob_forward": batch.log_prob_forward.mean().item(),
            "ratio": torch.exp(batch.log_prob_forward - batch.sampled_log_prob).mean().item(),
        }
