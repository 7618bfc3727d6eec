"""The closed-form Gaussian toy (``dag_trl.testing.gaussian_toy``): its closed forms against Monte Carlo sampling with
the trainer's step, and the tilted-target objectives (RTB, the KL-regularised policy gradient, relative detailed
balance) converging to the conditional tilt, not the marginal one (issue 18, point 4).

Monte Carlo tolerances are ``Z`` standard errors of the estimate, computed from the closed-form variances.
"""

import math

import pytest
import torch
from conftest import sd_ddim_scheduler
from dag_trl.trainer.objectives.losses import relative_detailed_balance_residual
from dag_trl.trainer.objectives.rtb import relative_trajectory_balance_residual

from dag_trl.samplers import ddim_step_with_logprob
from dag_trl.testing.gaussian_toy import (
    GaussianData,
    GaussianToy,
    StepShiftPolicy,
    default_toy,
    kl_regularised_surrogate,
    train_objective,
)

Z = 5.0
BETA = 3.0


@pytest.fixture(scope="module")
def toy() -> GaussianToy:
    return default_toy()


def assert_within_standard_errors(estimate, expected, standard_error):
    """Every entry of ``estimate`` within ``Z`` standard errors of ``expected`` (float64 tensors)."""
    error = (estimate.double() - expected.double()).abs()
    bound = Z * torch.as_tensor(standard_error, dtype=torch.float64)
    assert (error <= bound).all(), f"estimate {estimate} differs from {expected} by {error} > {bound}"


def test_toy_step_is_the_trainers_ddim_step(toy):
    scheduler = sd_ddim_scheduler()
    scheduler.set_timesteps(toy.num_steps)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(8, 3, generator=generator)
    next_states = torch.randn(8, 3, generator=generator)
    shifts = torch.randn(toy.num_steps, 3, generator=generator)
    for n, timestep in enumerate(scheduler.timesteps):
        toy_step = toy.step(states, n, shifts, next_states)
        prediction = toy.guided_noise_prediction(states, torch.full((8,), n)) + shifts[n]
        trainer_step = ddim_step_with_logprob(
            scheduler, prediction, timestep, states, toy.eta, prev_sample=next_states, log_prob_reduction="sum"
        )
        torch.testing.assert_close(toy_step.log_probs, trainer_step.log_probs)
        torch.testing.assert_close(toy_step.backward_log_probs, trainer_step.backward_log_probs)


def test_toy_step_is_affine_with_the_closed_form_coefficients(toy):
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    shifts = torch.randn(toy.num_steps, 3, generator=generator, dtype=torch.float64)
    for n in range(toy.num_steps):
        step = toy.step(states.float(), n, shifts.float())
        expected = toy.step_scale[n] * states + toy.step_offset[n] + toy.noise_scale[n] * shifts[n]
        torch.testing.assert_close(step.mean.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.std.double().flatten(), toy.step_std[n].expand(8))
    # The step from t = 101 to t = 1 has the largest mean change per unit of noise prediction over its std.
    assert (toy.noise_scale.abs() / toy.step_std).argmax().item() == toy.num_steps - 2


def test_exact_noise_predictor_is_the_posterior_mean():
    data = GaussianData(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.3)
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    samples = 200_000
    clean = data.mean + math.sqrt(data.variance) * torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(samples, 2, generator=generator, dtype=torch.float64)
    noisy = alpha * clean + sigma * noise
    residual = noise - data.noise_prediction(noisy, alpha, sigma)
    # E[eps | x_t] is the predictor iff the residual has mean 0 and is uncorrelated with x_t (jointly Gaussian).
    residual_variance = 1 - sigma**2 / (alpha**2 * data.variance + sigma**2)
    assert_within_standard_errors(residual.mean(0), torch.zeros(2), (residual_variance / samples).sqrt())
    noisy_std = (alpha**2 * data.variance + sigma**2).sqrt()
    covariance = (residual * (noisy - noisy.mean(0))).mean(0)
    assert_within_standard_errors(covariance, torch.zeros(2), (residual_variance / samples).sqrt() * noisy_std)


def test_base_sampler_matches_its_closed_form(toy):
    samples = 100_000
    trajectories = toy.sample(samples, generator=torch.Generator().manual_seed(3)).double()
    start, final = trajectories[:, 0], trajectories[:, -1]
    variance = toy.base_variance
    assert_within_standard_errors(final.mean(0), toy.base_mean, (variance / samples).sqrt())
    assert_within_standard_errors(final.var(0), variance.expand(3), variance * math.sqrt(2 / (samples - 1)))
    # Cov(z_N, x_T) = A per coordinate; its estimate's variance is (A^2 + Var z_N) / samples.
    covariance = ((final - final.mean(0)) * start).mean(0)
    assert_within_standard_errors(
        covariance, toy.start_coefficient.expand(3), ((toy.start_coefficient**2 + variance) / samples).sqrt()
    )
    # The closed form is not the data's variance (guidance and 10 finite steps change it).
    assert abs(variance.item() - 0.5) > 0.2


def test_memory_matches_nested_monte_carlo(toy):
    starts, continuations = 4000, 8
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(starts, 3, generator=generator).repeat_interleave(continuations, dim=0)
    final = toy.sample(len(start), generator=generator, start=start)[:, -1].double()
    rewards = toy.reward(final).view(starts, continuations)
    weight_norm_sq = (toy.reward_weights**2).sum()
    within = rewards.var(1).mean()
    within_expected = weight_norm_sq * toy.conditional_variance
    assert_within_standard_errors(
        within, within_expected, within_expected * math.sqrt(2 / (starts * (continuations - 1)))
    )
    # Var E[R | x_T], unbiased: the variance of the start means minus the within-start variance / K.
    between = rewards.mean(1).var() - within / continuations
    between_expected = weight_norm_sq * toy.start_coefficient**2
    start_means_variance = between_expected + within_expected / continuations
    assert_within_standard_errors(between, between_expected, start_means_variance * math.sqrt(2 / (starts - 1)))
    assert toy.memory.item() == pytest.approx((between_expected / (between_expected + within_expected)).item())
    assert 0.35 < toy.memory.item() < 0.45


def test_marginal_tilt_is_the_base_samples_reweighted_by_exp_beta_reward(toy):
    samples = 200_000
    final = toy.sample(samples, generator=torch.Generator().manual_seed(5))[:, -1].double()
    weights = torch.softmax(BETA * toy.reward(final), dim=0)
    estimate = weights @ final
    expected = toy.base_mean + toy.marginal_tilt_shift(BETA)
    # Self-normalised importance sampling; delta-method standard error.
    standard_error = (weights[:, None] ** 2 * (final - expected) ** 2).sum(0).sqrt()
    assert_within_standard_errors(estimate, expected, standard_error)


def test_conditional_tilt_is_each_starts_continuations_reweighted(toy):
    starts, continuations = 200, 1000
    generator = torch.Generator().manual_seed(6)
    start = torch.randn(starts, 3, generator=generator)
    final = toy.sample(starts * continuations, generator=generator, start=start.repeat_interleave(continuations, 0))
    # Subtract E[z_N | x_T] = A x_T + base mean, so each start's weighted mean estimates the tilt's shift alone.
    deviation = (final[:, -1].double() - toy.start_coefficient * final[:, 0].double() - toy.base_mean).view(
        starts, continuations, 3
    )
    weights = torch.softmax(BETA * toy.reward(deviation), dim=1)
    per_start = (weights[..., None] * deviation).sum(1)
    estimate = per_start.mean(0)
    assert_within_standard_errors(estimate, toy.conditional_tilt_shift(BETA), per_start.std(0) / math.sqrt(starts))
    gap = (toy.marginal_tilt_shift(BETA) - estimate).abs()
    assert gap[0] > 0.25 and gap[1] > 0.12


def test_conditional_tilt_step_shifts_sample_the_conditional_tilt(toy):
    step_shifts = toy.conditional_tilt_step_shifts(BETA)
    torch.testing.assert_close(toy.sample_mean_shift(step_shifts), toy.conditional_tilt_shift(BETA))
    samples = 100_000
    final = toy.sample(samples, step_shifts.float(), torch.Generator().manual_seed(7))[:, -1].double()
    variance = toy.base_variance  # a shift of each step's mean leaves the variance alone
    expected = toy.base_mean + toy.conditional_tilt_shift(BETA)
    assert_within_standard_errors(final.mean(0), expected, (variance / samples).sqrt())
    assert_within_standard_errors(final.var(0), variance.expand(3), variance * math.sqrt(2 / (samples - 1)))


def test_relative_detailed_balance_holds_exactly_at_the_conditional_tilt_with_flow_h(toy):
    step_shifts = toy.conditional_tilt_step_shifts(BETA).float()
    trajectories = toy.sample(256, step_shifts, torch.Generator().manual_seed(9))
    terms = toy.transitions(trajectories, step_shifts)
    log_h = toy.log_conditional_partition(trajectories, BETA)
    torch.testing.assert_close(log_h[:, -1], BETA * toy.reward(trajectories[:, -1].double()))
    residual = relative_detailed_balance_residual(
        log_h[:, :-1], terms.log_prob.double(), log_h[:, 1:], terms.prior_log_prob.double()
    )
    assert residual.abs().max().item() < 1e-3  # float32 log-densities
    # The prior with b = 0 is not balanced against the same flow: the residual is the tilt's per-step log-ratio.
    prior_terms = toy.transitions(trajectories, torch.zeros_like(step_shifts))
    unbalanced = relative_detailed_balance_residual(
        log_h[:, :-1], prior_terms.log_prob.double(), log_h[:, 1:], prior_terms.prior_log_prob.double()
    )
    assert unbalanced.abs().mean().item() > 0.1


def test_relative_trajectory_balance_residual_at_the_conditional_tilt_is_minus_log_h_of_the_start(toy):
    step_shifts = toy.conditional_tilt_step_shifts(BETA).float()
    trajectories = toy.sample(20_000, step_shifts, torch.Generator().manual_seed(10))
    terms = toy.transitions(trajectories, step_shifts)
    rewards = toy.reward(trajectories[:, -1])
    residual = relative_trajectory_balance_residual(
        torch.zeros(()), terms.log_prob, terms.prior_log_prob, rewards, BETA
    ).double()
    log_h_start = toy.log_conditional_partition(trajectories, BETA)[:, 0]
    torch.testing.assert_close(residual, -log_h_start, rtol=0, atol=1e-3)  # float32 log-densities of 10 steps
    # So RTB's loss cannot fall below Var log h(x_T) = beta^2 A^2 |w|^2 with a start-independent log Z.
    floor = BETA**2 * toy.start_coefficient**2 * (toy.reward_weights**2).sum()
    assert_within_standard_errors(residual.var(), floor, floor * math.sqrt(2 / (len(residual) - 1)))


def test_kl_regularised_value_peaks_at_the_conditional_tilt_with_value_mean_log_h(toy):
    step_shifts = toy.conditional_tilt_step_shifts(BETA).requires_grad_()
    value = toy.kl_regularised_value(step_shifts, BETA)
    (gradient,) = torch.autograd.grad(value, step_shifts)
    assert gradient.abs().max().item() < 1e-12
    # max_pi J = E[log h(x_T)], log h(x_T) = beta w.(A x_T + base mean) + beta^2 |w|^2 sum B_n^2 / 2.
    mean_log_h = BETA * toy.mean_reward() + BETA**2 * (toy.reward_weights**2).sum() * toy.conditional_variance / 2
    torch.testing.assert_close(value.detach(), mean_log_h)


def test_kl_regularised_surrogate_gradient_is_unbiased_for_the_analytic_gradient(toy):
    policy = StepShiftPolicy(toy.num_steps, 3)
    with torch.no_grad():
        policy.shifts.copy_(0.5 * toy.conditional_tilt_step_shifts(BETA) + 0.1)
    shifts = policy.shifts.detach().double().requires_grad_()
    (analytic,) = torch.autograd.grad(-toy.kl_regularised_value(shifts, BETA), shifts)
    batches, batch_size = 400, 16
    trajectories = toy.sample(batches * batch_size, policy.shifts.detach(), torch.Generator().manual_seed(8))
    gradients = []
    for batch in trajectories.split(batch_size):
        policy.zero_grad()
        kl_regularised_surrogate(toy, policy, batch, BETA).backward()
        gradients.append(policy.shifts.grad.double().clone())
    gradients = torch.stack(gradients)
    standard_error = gradients.std(0) / math.sqrt(batches)
    assert_within_standard_errors(gradients.mean(0), analytic, standard_error)
    # The test can tell: the gradient's size is many standard errors on the steps that carry it.
    assert (analytic.abs() > 10 * standard_error).sum().item() >= 10


def test_train_objective_refuses_an_unknown_objective(toy):
    with pytest.raises(ValueError, match=r"objective='dag_db' is invalid: expected one of \('rtb', 'kl_pg', 'rdb'\)"):
        train_objective(toy, "dag_db", BETA)


def test_toy_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match=r"one shape \(d,\); got \(3,\), \(2,\) and \(3,\)"):
        GaussianToy(GaussianData(torch.zeros(3), 0.5), GaussianData(torch.zeros(2), 1.0), 1.5, torch.ones(3))


# Tolerance on the trained policy's x_0 mean shift (Euclidean norm): 12% of the conditional tilt's shift (0.48) and
# one eighth of its distance to the marginal tilt's (0.32). Measured errors over seeds 0-4
# (``python -m dag_trl.testing.gaussian_toy --seeds 5``): RTB <= 0.016, kl_pg <= 0.020, rdb <= 0.018.
SHIFT_TOLERANCE = 0.04
# Tolerance on the per-step shifts, relative (Euclidean norm over all steps): measured <= 0.085.
STEP_SHIFTS_TOLERANCE = 0.15


@pytest.mark.integration
@pytest.mark.parametrize("objective", ["rtb", "kl_pg", "rdb"])
def test_objective_converges_to_the_conditional_tilt_not_the_marginal_one(objective, toy):
    shifts = train_objective(toy, objective, BETA, seed=0)
    conditional, marginal = toy.conditional_tilt_shift(BETA), toy.marginal_tilt_shift(BETA)
    assert (marginal - conditional).norm().item() > 8 * SHIFT_TOLERANCE
    mean_shift = toy.sample_mean_shift(shifts)
    assert (mean_shift - conditional).norm().item() < SHIFT_TOLERANCE
    assert (mean_shift - marginal).norm().item() > 6 * SHIFT_TOLERANCE
    exact = toy.conditional_tilt_step_shifts(BETA)
    assert ((shifts - exact).norm() / exact.norm()).item() < STEP_SHIFTS_TOLERANCE
