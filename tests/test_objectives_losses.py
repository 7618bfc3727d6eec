"""Closed-form checks of the objectives' pure loss functions in ``dag_trl.objectives.losses``."""

import math

import pytest
import torch

from dag_trl.objectives.losses import (
    detailed_balance_residual,
    forward_looking_log_flow,
    kl_regularised_returns,
    leave_one_out_advantages,
    leave_one_out_baseline,
    ppo_clipped_loss,
    proximal_regulariser,
    relative_detailed_balance_residual,
    reward_exponent,
)
from dag_trl.samplers.ddim import gaussian_step_kl


def test_reward_exponent_schedule():
    assert reward_exponent(0, 100, 10.0, "linear") == 0.0
    assert reward_exponent(25, 100, 10.0, "linear") == pytest.approx(5.0)
    assert reward_exponent(50, 100, 10.0, "linear") == pytest.approx(10.0)
    assert reward_exponent(99, 100, 10.0, "linear") == pytest.approx(10.0)
    assert reward_exponent(0, 100, 10.0, "none") == 10.0
    with pytest.raises(ValueError, match="train_reward_exp_anneal='cosine' is invalid"):
        reward_exponent(0, 1, 1.0, "cosine")


def test_detailed_balance_residual_and_forward_looking_flow_on_numbers():
    flow = torch.tensor([0.5, -1.0])
    reward = torch.tensor([0.2, 0.4])
    log_flow = forward_looking_log_flow(flow, reward, beta=10.0)
    torch.testing.assert_close(log_flow, torch.tensor([2.5, 3.0]))
    residual = detailed_balance_residual(
        log_flow, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), torch.tensor([3.0, 3.0])
    )
    torch.testing.assert_close(residual, torch.tensor([2.5 + 1.0 - 0.5 - 3.0, 3.0 + 2.0 - 0.5 - 3.0]))


def test_leave_one_out_advantages_on_numbers():
    # By hand for the signals (1, 2, 6): each one's baseline is the mean of the other two, (4, 3.5, 1.5), so the
    # centred signals are (-3, -1.5, 4.5) with squares (9, 2.25, 20.25); each one's variance is the mean of the other
    # two squares, (11.25, 14.625, 5.625) = (45/4, 117/8, 45/8). Advantages: -3 / sqrt(45/4) = -2 / sqrt(5),
    # -1.5 / sqrt(117/8), and 4.5 / sqrt(45/8) = 1.897..., which a clip of 1.5 cuts to 1.5.
    signal = torch.tensor([1.0, 2.0, 6.0])
    unclipped = [-2 / math.sqrt(5), -1.5 * math.sqrt(8 / 117), 4.5 * math.sqrt(8 / 45)]
    assert unclipped[2] == pytest.approx(1.8973666)
    torch.testing.assert_close(leave_one_out_advantages(signal, clip_max=10.0), torch.tensor(unclipped))
    torch.testing.assert_close(leave_one_out_advantages(signal, clip_max=1.5), torch.tensor(unclipped[:2] + [1.5]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.tensor([1.0]), 5.0)


def test_ppo_clipped_loss_on_numbers():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    loss = ppo_clipped_loss(advantages, new, old, clip_range=0.2)
    # A>0: min(rho, clip(rho)) * A -> -1.2 and -0.5; A<0: max(...) -> 1.5 and 0.8.
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))
    ratio_one = ppo_clipped_loss(advantages, old, old, clip_range=1e-4)
    torch.testing.assert_close(ratio_one, -advantages)


def test_proximal_regulariser_is_mean_squared_difference_per_sample():
    now = torch.zeros(2, 4, 2, 2)
    sampled = torch.ones(2, 4, 2, 2)
    sampled[1] *= 3
    torch.testing.assert_close(proximal_regulariser(now, sampled), torch.tensor([1.0, 9.0]))
    assert proximal_regulariser(sampled, sampled).abs().max().item() == 0.0


def test_gaussian_step_kl_is_the_kl_of_two_gaussians_with_one_variance():
    generator = torch.Generator().manual_seed(0)
    mean, prior_mean = (torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = torch.stack(
        [
            torch.distributions.kl_divergence(
                torch.distributions.Normal(mean[i], std[i]), torch.distributions.Normal(prior_mean[i], std[i])
            ).sum()
            for i in range(3)
        ]
    )
    torch.testing.assert_close(gaussian_step_kl(mean, prior_mean, std), expected)
    # The sampler's per-sample std (B, 1, 1, 1) and a shared scalar std give the same values.
    torch.testing.assert_close(gaussian_step_kl(mean, prior_mean, std.reshape(3, 1, 1, 1)), expected)
    shared = gaussian_step_kl(mean, prior_mean, torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(shared, ((mean - prior_mean) ** 2).flatten(1).sum(1) / 0.5)


def test_gaussian_step_kl_gradient_is_the_pathwise_pull_to_the_prior():
    mean = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    prior_mean = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    gaussian_step_kl(mean, prior_mean, torch.tensor([0.5], dtype=torch.float64)).sum().backward()
    # d/dmu ||mu - mu_p||^2 / (2 s^2) = (mu - mu_p) / s^2
    torch.testing.assert_close(mean.grad, torch.tensor([[0.5, -2.0]], dtype=torch.float64) / 0.25)


def test_kl_regularised_returns_sum_only_strictly_later_steps():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, generator=generator, dtype=torch.float64)
    step_kls = torch.rand(3, 5, generator=generator, dtype=torch.float64)
    beta = 2.5
    expected = torch.empty(3, 5, dtype=torch.float64)
    for i in range(3):
        for n in range(5):
            expected[i, n] = beta * rewards[i] - sum(step_kls[i, m] for m in range(n + 1, 5))
    torch.testing.assert_close(kl_regularised_returns(rewards, step_kls, beta), expected)
    torch.testing.assert_close(kl_regularised_returns(rewards, step_kls, beta)[:, -1], beta * rewards)
    with pytest.raises(
        ValueError, match=r"rewards of shape \(B,\) and step_kls of shape \(B, N\); got \(3,\) and \(2, 5\)"
    ):
        kl_regularised_returns(rewards, step_kls[:2], beta)


def test_leave_one_out_baseline_is_the_mean_of_the_other_rows_of_the_group():
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 60.0], [5.0, 50.0], [7.0, 70.0], [3.0, 30.0]])
    groups = ["cat", "dog", "cat", "dog", "bird", "cat"]
    expected = torch.zeros_like(values)
    for i, group in enumerate(groups):
        others = [values[j] for j, other in enumerate(groups) if other == group and j != i]
        if others:
            expected[i] = torch.stack(others).mean(0)
    torch.testing.assert_close(leave_one_out_baseline(values, groups), expected)
    # "bird" is alone: no baseline; "dog" has two rows: each is the other's baseline.
    torch.testing.assert_close(leave_one_out_baseline(values, groups)[[4, 1, 3], 0], torch.tensor([0.0, 5.0, 2.0]))
    with pytest.raises(ValueError, match="one group key per row: got 5 keys for 6 rows"):
        leave_one_out_baseline(values, groups[:5])


def test_relative_detailed_balance_residual_on_numbers():
    residual = relative_detailed_balance_residual(
        torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.25]), torch.tensor([0.75, -2.0])
    )
    torch.testing.assert_close(residual, torch.tensor([2.0 + 0.5 - 1.0 - 0.75, -1.0 + 1.5 - 0.25 + 2.0]))
