r"""The losses of the objectives as small pure functions (formula in each docstring).

Zhang et al., "Improving GFlowNets for Text-to-Image Diffusion Alignment" (arXiv 2406.00633) for the detailed-balance
and KL terms; Schulman et al. (2017) for the clipped surrogate; Kool et al. (2019) for leave-one-out baselines;
Fan et al. (2023, DPOK) and Uehara et al. (2024) for the KL-regularised policy gradient with per-step KL terms;
Venkatraman et al. (2024) for the prior-relative balance that relative detailed balance applies per transition.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ..samplers.gaussian import _per_sample, reduce_over_sample


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


def kl_regularised_returns(rewards: torch.Tensor, step_kls: torch.Tensor, beta: float) -> torch.Tensor:
    r"""The return of each transition of the KL-regularised objective
    :math:`J = \mathbb E_\pi[\beta R(z_N) - \sum_n k_n(z_n)]`:

    .. math::
        G_n = \beta R(z_N) - \sum_{m > n} k_m(z_m),

    with transitions in sampling order (``z_0`` the start, ``z_N`` the sample), ``rewards`` ``(B,)``, ``step_kls``
    ``(B, N)`` (:func:`~dag_trl.samplers.ddim.gaussian_step_kl`). Only strictly later steps count: the action of step ``n`` (its
    :math:`z_{n+1}`) changes the later states' KLs but not :math:`k_n`, whose own gradient is pathwise; summing
    :math:`m \ge n` is unbiased but noisier, dropping :math:`m = n + 1` is biased (DPOK: Fan et al., 2023, arXiv
    2305.16381; Uehara et al., 2024, arXiv 2402.15194). Returns ``(B, N)``.
    """
    if rewards.ndim != 1 or step_kls.ndim != 2 or step_kls.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"kl_regularised_returns needs rewards of shape (B,) and step_kls of shape (B, N); got "
            f"{tuple(rewards.shape)} and {tuple(step_kls.shape)}."
        )
    kl_to_go = step_kls.flip(1).cumsum(1).flip(1) - step_kls
    return beta * rewards.unsqueeze(1) - kl_to_go


def leave_one_out_baseline(values: torch.Tensor, groups: Sequence[Hashable]) -> torch.Tensor:
    r"""Each row's baseline: the mean of the other rows of its group (Kool et al., 2019, "Buy 4 REINFORCE samples,
    get a baseline for free"),

    .. math::
        b_i = \frac{1}{K_g - 1} \sum_{j \in g,\, j \ne i} v_j \qquad (K_g \text{ rows in row } i\text{'s group } g),

    and 0 for a row alone in its group. It depends only on other, independent trajectories, so subtracting it keeps
    a score-function gradient unbiased; unlike :func:`leave_one_out_advantages` nothing is standardised or clipped,
    which would reweight the score term against a pathwise one and move the optimum. ``values`` is ``(B, ...)``,
    ``groups`` one key per row (a prompt, say). Returns the shape of ``values``.
    """
    if len(groups) != values.shape[0]:
        raise ValueError(
            f"leave_one_out_baseline needs one group key per row: got {len(groups)} keys for {values.shape[0]} rows."
        )
    index_of = {}
    group_index = torch.tensor([index_of.setdefault(key, len(index_of)) for key in groups], device=values.device)
    sums = values.new_zeros((len(index_of),) + values.shape[1:]).index_add_(0, group_index, values)
    counts = torch.bincount(group_index, minlength=len(index_of))[group_index]
    others = _per_sample((counts - 1).to(values.dtype), values)
    return torch.where(others > 0, (sums[group_index] - values) / others.clamp(min=1), torch.zeros_like(values))


def relative_detailed_balance_residual(
    log_flow: torch.Tensor,
    log_prob_forward: torch.Tensor,
    next_log_flow: torch.Tensor,
    prior_log_prob: torch.Tensor,
) -> torch.Tensor:
    r"""Relative detailed-balance residual of a transition :math:`z_n \to z_{n+1}`: DAG's detailed balance (Zhang et
    al., 2024, arXiv 2406.00633) with the prior's forward kernel in place of the backward kernel, the per-transition
    form of relative trajectory balance (Venkatraman et al., 2024, arXiv 2405.20971):

    .. math::
        \delta = \log F(z_n) + \log \pi(z_{n+1} \mid z_n) - \log F(z_{n+1}) - \log p(z_{n+1} \mid z_n),

    with :math:`\log F(z_N) = \beta R(z_N)` at the sample. The loss is :math:`\delta^2`; at zero loss the
    residuals telescope to :math:`\pi(\tau \mid z_0) = p(\tau \mid z_0) e^{\beta R(z_N)} / F(z_0)`, the prior
    tilted given its start, with :math:`F(z_0) = \mathbb E_p[e^{\beta R} \mid z_0]`. All terms ``(B,)``.
    """
    return log_flow + log_prob_forward - next_log_flow - prior_log_prob
