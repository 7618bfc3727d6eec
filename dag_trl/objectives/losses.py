r"""The losses of the objectives as small pure functions (formula in each docstring).

Zhang et al., "Improving GFlowNets for Text-to-Image Diffusion Alignment" (arXiv 2406.00633) for the detailed-balance
and KL terms; Schulman et al. (2017) for the clipped surrogate; Kool et al. (2019) for leave-one-out baselines.
"""

from __future__ import annotations

import torch

from ..samplers.ddim import reduce_over_sample


def reward_exponent(epoch: int, num_epochs: int, reward_exp: float, anneal: str = "linear") -> float:
    r"""The reward exponent :math:`\beta` of an epoch.

    ``"linear"``: :math:`\beta_e = \beta \min(1, e / (0.5 N))`, 0 at epoch 0 and :math:`\beta` from half of the
    ``N`` epochs on. ``"none"``: constant :math:`\beta`.
    """
    if anneal == "none":
        return float(reward_exp)
    if anneal == "linear":
        return float(reward_exp) * min(1.0, epoch / (0.5 * num_epochs))
    raise ValueError(f"train_reward_exp_anneal={anneal!r} is invalid: expected 'linear' or 'none'.")


def forward_looking_log_flow(flow: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Forward-looking log-flow of a non-terminal state (Pan et al., 2023; DAG eq. 9):
    :math:`\log F(x_t) = F_\phi(x_t, t, c) + \beta\, r(\hat x_0(x_t))`, where ``reward`` is the (constant) reward of
    the decoded one-step prediction :math:`\hat x_0`."""
    return flow + beta * reward.detach()


def detailed_balance_residual(
    log_flow: torch.Tensor,
    log_prob_forward: torch.Tensor,
    log_prob_backward: torch.Tensor,
    next_log_flow: torch.Tensor,
) -> torch.Tensor:
    r"""Detailed-balance residual of a transition :math:`x_t \to x_s` (Bengio et al., 2023):
    :math:`\delta = \log F(x_t) + \log P_F(x_s \mid x_t) - \log P_B(x_t \mid x_s) - \log F(x_s)`.
    The DB loss is :math:`\delta^2`; for the terminal state :math:`\log F(x_0) = \beta R(x_0)`."""
    return log_flow + log_prob_forward - log_prob_backward - next_log_flow


def leave_one_out_advantages(signal: torch.Tensor, clip_max: float) -> torch.Tensor:
    r"""Standardised leave-one-out (RLOO, Kool et al., 2019) advantages of a mini-batch of ``n > 1`` signals.

    :math:`b_i = (\sum_j r_j - r_i)/(n-1)`, :math:`v_i = (\sum_j (r_j - b_j)^2 - (r_i - b_i)^2)/(n-1)`,
    :math:`A_i = \mathrm{clip}((r_i - b_i) / (\sqrt{v_i} + 10^{-8}), -c, c)`.
    """
    n = signal.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out advantages need a batch of at least 2 samples, got {n}.")
    signal = signal.detach()
    baseline = (signal.sum() - signal) / (n - 1)
    centred = signal - baseline
    squared = centred**2
    variance = (squared.sum() - squared) / (n - 1)
    return torch.clamp(centred / (variance.sqrt() + 1e-8), -clip_max, clip_max)


def ppo_clipped_loss(
    advantages: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float
) -> torch.Tensor:
    r"""Per-sample PPO clipped surrogate (Schulman et al., 2017), to be minimised:
    :math:`\max(-A\rho, -A\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon))` with
    :math:`\rho = \exp(\log P_F - \log P_F^{\text{old}})`."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def proximal_regulariser(noise_pred: torch.Tensor, sampled_noise_pred: torch.Tensor) -> torch.Tensor:
    r"""Per-sample proximal term :math:`u = \mathrm{mean}_{C,H,W}(\epsilon_\theta - \epsilon_{\text{sampled}})^2`
    that keeps the policy near the one that sampled the data (DAG, section 4)."""
    return reduce_over_sample((noise_pred.float() - sampled_noise_pred.float().detach()) ** 2, "mean")
