"""Closed-form checks of the Gaussian samplers in ``dag_trl.samplers.gaussian`` (issue 13, "The math")."""

import math

import pytest
import torch
from conftest import sd_ddim_scheduler

from dag_trl.samplers import (
    FLOW_SIGMA_MIN,
    ddim_coefficients,
    ddim_step_with_logprob,
    flow_grpo_coefficients,
    flow_matching_alpha_sigma,
    gaussian_step_with_logprob,
    shift_time,
    vp_alpha_sigma,
    vp_ddim_coefficients,
    x0_and_eps_from_prediction,
)
from dag_trl.samplers.ddim import alphas_cumprod_at, original_sample_and_noise, previous_timestep

SHAPE = (3, 4, 8, 8)


def make_scheduler(prediction_type: str = "epsilon", steps: int = 10):
    scheduler = sd_ddim_scheduler(prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


def normal_log_prob(value, mean, std, reduction):
    """Independent reference: torch.distributions in float64, reduced per sample."""
    per_element = torch.distributions.Normal(mean.double(), std.double()).log_prob(value.double()).flatten(1)
    return per_element.mean(1) if reduction == "mean" else per_element.sum(1)


def per_sample(values):
    """(3,) -> (3, 1, 1, 1), to broadcast against SHAPE."""
    return values.reshape(3, 1, 1, 1)


def flow_schedule(t):
    """Rectified flow, float64: alpha = 1 - t, sigma = t."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return 1 - t, t


def posterior(alpha_t, sigma_t, alpha_s, sigma_s, x0, x_t):
    """q(x_s | x_t, x0) by the standard formula, float64: (mean, std)."""
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = (alpha_s * var_ts / sigma_t**2) * x0.double() + (alpha_ts * sigma_s**2 / sigma_t**2) * x_t.double()
    return mean, (var_ts * sigma_s**2 / sigma_t**2).sqrt()


def vp_step_inputs(scheduler, timestep, model_output, sample):
    """abar_t, abar_s (per sample) and (x0_hat, eps_hat) exactly as ddim.py computes them."""
    t = torch.full((sample.shape[0],), int(timestep))
    alpha_prod_t = alphas_cumprod_at(scheduler, t)
    alpha_prod_s = alphas_cumprod_at(scheduler, previous_timestep(scheduler, t))
    x0, eps = original_sample_and_noise(model_output, sample, alpha_prod_t, scheduler.config.prediction_type)
    return alpha_prod_t, alpha_prod_s, x0, eps


# ------------------------------------------------------------------------------------------------------------------
# The VP schedule: today's DDIM step, exactly (abar form) and within round-off (generic form)
# ------------------------------------------------------------------------------------------------------------------


def test_generic_coefficients_on_the_vp_schedule_agree_with_the_ddim_step_within_float32_round_off():
    # alpha = sqrt(abar), sigma = sqrt(1 - abar): the generic sigma_t^2 - alpha_{t|s}^2 sigma_s^2 rounds differently
    # from 1 - abar_t / abar_s (relative differences up to ~7e-6 in the step's std), nothing more.
    scheduler = make_scheduler(steps=50)
    generator = torch.Generator().manual_seed(0)
    worst = {"mean": 0.0, "sum": 0.0}
    for timestep in scheduler.timesteps:
        sample, output = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
        alpha_prod_t, alpha_prod_s, x0, eps = vp_step_inputs(scheduler, timestep, output, sample)
        coefficients = ddim_coefficients(*vp_alpha_sigma(alpha_prod_t), *vp_alpha_sigma(alpha_prod_s))
        for reduction in worst:
            ddim = ddim_step_with_logprob(
                scheduler, output, timestep, sample, generator=generator, log_prob_reduction=reduction
            )
            ours = gaussian_step_with_logprob(
                sample, x0, eps, coefficients, prev_sample=ddim.latents, log_prob_reduction=reduction
            )
            for name in ("log_probs", "backward_log_probs"):
                diff = (getattr(ours, name) - getattr(ddim, name)).abs().max().item()
                worst[reduction] = max(worst[reduction], diff)
    assert worst["mean"] < 5e-6  # nats per latent element; measured 1.7e-6
    assert worst["sum"] < 1e-3  # over 256 elements, measured 3e-4; log-densities ~ -1e3 (float32 spacing 6e-5)


def test_vp_coefficients_stay_finite_where_zero_terminal_snr_rounds_the_mean_coefficient_below_zero():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(
        sd_ddim_scheduler("v_prediction").config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    alphas_cumprod = scheduler.alphas_cumprod.float()
    alpha_prod_s = alphas_cumprod[:999]
    alpha_prod_t = alphas_cumprod[999].expand_as(alpha_prod_s)
    coefficients = vp_ddim_coefficients(alpha_prod_t, alpha_prod_s)
    # At abar_t = 0 and eta = 1, 1 - abar_s - std^2 is 0 exactly but rounds below 0 for some s (ddim.py: NaN).
    assert alphas_cumprod[999].item() == 0.0 and ((1 - alpha_prod_s - coefficients.std**2) < 0).any()
    assert all(torch.isfinite(c).all() for c in coefficients)
    assert coefficients.mean_eps.max().item() < 3e-4  # sqrt of round-off: the posterior ignores x_t at zero SNR


# ------------------------------------------------------------------------------------------------------------------
# Closed forms: the step's densities, the posterior at eta = 1, DDIM's marginals, detailed balance
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sampler", ["ddim", "flow_grpo"])
def test_log_p_f_and_log_p_b_are_the_gaussian_densities_of_the_step(reduction, sampler):
    generator = torch.Generator().manual_seed(0)
    x_t, x0, eps = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    t, s = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.7, 0.45, 0.05], dtype=torch.float64)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = flow_schedule(t), flow_schedule(s)
    eta = 0.6
    if sampler == "ddim":
        coefficients = ddim_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, eta)
        var_ts = sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2
        std = eta * (var_ts * sigma_s**2 / sigma_t**2).sqrt()
        mean = per_sample(alpha_s) * x0.double() + per_sample((sigma_s**2 - std**2).sqrt()) * eps.double()
    else:
        coefficients = flow_grpo_coefficients(t, s, t_max=0.95)
        level = 0.7 * (t / (1 - t)).sqrt()
        std = level * (t - s).sqrt()
        mean = per_sample(1 - s) * x0.double() + per_sample(s - (t - s) * level**2 / (2 * t)) * eps.double()
    out = gaussian_step_with_logprob(x_t, x0, eps, coefficients, generator=generator, log_prob_reduction=reduction)
    std = per_sample(std).expand(SHAPE)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.expand(SHAPE).double(), std, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out.log_probs.double(), normal_log_prob(out.latents, mean, std, reduction), rtol=1e-5, atol=1e-4
    )
    backward_mean = per_sample(alpha_t / alpha_s) * out.latents.double()
    backward_std = per_sample((sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2).sqrt()).expand(SHAPE)
    torch.testing.assert_close(
        out.backward_log_probs.double(),
        normal_log_prob(x_t, backward_mean, backward_std, reduction),
        rtol=1e-5,
        atol=1e-4,
    )
    # The sample is drawn around the mean with the step's std.
    assert ((out.latents.double() - mean) / std).std().item() == pytest.approx(1.0, abs=0.1)


SCHEDULES = {
    # (alpha_t, sigma_t, alpha_s, sigma_s), float64, per sample
    "rectified_flow": (*flow_schedule([1.0, 0.6, 0.3]), *flow_schedule([0.8, 0.5, 0.01])),
    "vp": (
        *vp_alpha_sigma(torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)),
        *vp_alpha_sigma(torch.tensor([0.2, 0.6, 0.999], dtype=torch.float64)),
    ),
    "variance_exploding": tuple(
        torch.tensor(v, dtype=torch.float64) for v in ([1.0] * 3, [80.0, 5.0, 1.0], [1.0] * 3, [20.0, 2.0, 0.002])
    ),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_eta_one_step_is_the_gaussian_posterior_of_the_forward_process(schedule):
    alpha_t, sigma_t, alpha_s, sigma_s = SCHEDULES[schedule]
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    x_t = per_sample(alpha_t) * x0 + per_sample(sigma_t) * eps
    # The model's predictions are any pair consistent with x_t (here a wrong x0_hat: the posterior is in x0_hat).
    x0_hat = x0 + 0.3 * torch.randn(SHAPE, generator=generator)
    eps_hat = (x_t - per_sample(alpha_t) * x0_hat) / per_sample(sigma_t)
    out = gaussian_step_with_logprob(x_t.float(), x0_hat, eps_hat, ddim_coefficients(*SCHEDULES[schedule]))
    mean, std = posterior(*(per_sample(v) for v in SCHEDULES[schedule]), x0_hat, x_t)
    scale = x_t.abs().max().item()
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out.std.double(), std, rtol=1e-6, atol=0)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.01])
def test_ddim_keeps_the_forward_marginals_for_any_eta(eta):
    # Song et al. 2021, Lemma 1: with an exact model, x_t ~ q(x_t | x0) gives x_s ~ q(x_s | x0) =
    # N(alpha_s x0, sigma_s^2): the noise coefficient and the step's variance add up to sigma_s^2.
    for schedule in SCHEDULES.values():
        coefficients = ddim_coefficients(*schedule, eta)
        sigma_s = schedule[3]
        torch.testing.assert_close(
            (coefficients.mean_eps.double() ** 2 + coefficients.std.double() ** 2), sigma_s**2, rtol=1e-5, atol=1e-9
        )
        torch.testing.assert_close(coefficients.mean_x0.double(), schedule[2], rtol=1e-7, atol=0)


def noising_log_prob(x, x0, alpha, sigma):
    """log q(x | x0) = log N(x; alpha x0, sigma^2 I), summed, float64."""
    return normal_log_prob(
        x, alpha.reshape(-1, 1, 1, 1) * x0.double(), sigma.reshape(-1, 1, 1, 1).expand(x.shape), "sum"
    )


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_detailed_balance_holds_exactly_for_a_point_mass_at_eta_one_and_fails_below(schedule):
    # Data = a point mass at x0 and a model that predicts it: q(x_s|x_t,x0) q(x_t|x0) = q(x_t|x_s) q(x_s|x0).
    alpha_t, sigma_t, alpha_s, sigma_s = SCHEDULES[schedule]
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=generator)
    x_t = per_sample(alpha_t) * x0 + per_sample(sigma_t) * torch.randn(SHAPE, generator=generator)
    eps_hat = (x_t - per_sample(alpha_t) * x0) / per_sample(sigma_t)
    gaps = {}
    for eta in (1.0, 0.5):
        out = gaussian_step_with_logprob(
            x_t.float(),
            x0,
            eps_hat,
            ddim_coefficients(*SCHEDULES[schedule], eta),
            generator=generator,
            log_prob_reduction="sum",
        )
        forward = out.log_probs.double() + noising_log_prob(x_t, x0, alpha_t, sigma_t)
        backward = out.backward_log_probs.double() + noising_log_prob(out.latents, x0, alpha_s, sigma_s)
        gaps[eta] = (forward - backward).abs().max().item()
    assert gaps[1.0] < 2e-3  # measured <= 1.5e-4 nats on log-densities of order 1e3 (256 float32 terms)
    assert gaps[0.5] > 10


# ------------------------------------------------------------------------------------------------------------------
# Conversions between model outputs and (x0_hat, eps_hat)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction_type, schedule",
    [("flow_prediction", "rectified_flow")]
    + [(kind, schedule) for kind in ("epsilon", "v_prediction", "sample") for schedule in ("rectified_flow", "vp")],
)
def test_predictions_convert_back_to_the_x0_and_noise_that_made_x_t(prediction_type, schedule):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.tensor([0.999 if prediction_type == "epsilon" else 1.0, 0.5, 0.002])
    if schedule == "rectified_flow":
        alpha, sigma = 1 - t, t
    else:
        alpha, sigma = vp_alpha_sigma(1 - t)
    a, s = per_sample(alpha), per_sample(sigma)
    x_t = a * x0 + s * eps
    output = {
        "flow_prediction": eps - x0,
        "epsilon": eps,
        "v_prediction": a * eps - s * x0,
        "sample": x0,
    }[prediction_type]
    x0_hat, eps_hat = x0_and_eps_from_prediction(output, x_t, alpha, sigma, prediction_type)
    # epsilon divides by alpha (0.001 at t = 0.999), sample by sigma: errors scale by their inverse.
    tolerance = {"epsilon": 1e-3, "sample": 1e-3}.get(prediction_type, 1e-5)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=tolerance)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=tolerance)


def test_flow_conversion_is_the_rectified_flow_identity_and_vp_conversions_match_ddim():
    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.tensor([1.0, 0.5, 0.1])
    x0_hat, eps_hat = x0_and_eps_from_prediction(v, x_t, *flow_schedule(t), "flow_prediction")
    torch.testing.assert_close(x0_hat, x_t - per_sample(t) * v)
    torch.testing.assert_close(eps_hat, x_t + (1 - per_sample(t)) * v)
    abar = torch.tensor([0.05, 0.5, 0.99])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        ours = x0_and_eps_from_prediction(v, x_t, *vp_alpha_sigma(abar), prediction_type)
        theirs = original_sample_and_noise(v, x_t, abar, prediction_type)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type='flow' is not supported"):
        x0_and_eps_from_prediction(v, x_t, 0.5, 0.5, "flow")


# ------------------------------------------------------------------------------------------------------------------
# Flow-GRPO's SDE step
# ------------------------------------------------------------------------------------------------------------------


def test_flow_grpo_step_is_the_papers_euler_maruyama_step_in_velocity_form():
    # Liu et al. 2025, eq. 9, with dt = s - t < 0: x_s = x_t + [v + a_t^2/(2t) (x_t + (1 - t) v)] dt + a_t sqrt(-dt) z.
    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t, s = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.3, 0.0])
    tt, dt = per_sample(t).double(), per_sample(s - t).double()
    level = 0.5 * (tt / (1 - tt)).sqrt()
    mean = x_t.double() + (v.double() + level**2 / (2 * tt) * (x_t.double() + (1 - tt) * v.double())) * dt
    x0_hat, eps_hat = x0_and_eps_from_prediction(v, x_t, *flow_schedule(t), "flow_prediction")
    out = gaussian_step_with_logprob(
        x_t,
        x0_hat,
        eps_hat,
        flow_grpo_coefficients(t, s, t_max=0.95, noise_level=0.5),
        generator=generator,
        log_prob_reduction="sum",
    )
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), level * (-dt).sqrt(), rtol=1e-6, atol=0)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.backward_log_probs).all()  # s = 0 included
    with pytest.raises(ValueError, match="noise_level=0 is invalid"):
        flow_grpo_coefficients(t, s, t_max=0.95, noise_level=0)


def test_flow_grpo_approaches_ddim_with_eta_a_over_sqrt_2_as_steps_shrink():
    # Small steps: DDIM's eta = 1 variance is 2ht/(1-t) + O(h^2), Flow-GRPO's a^2 t/(1-t) h, so their stds agree to
    # O(h) relative and their means (noise coefficients) to O(h^2). At finite steps they differ: at t = 0.6 a step of
    # h = 0.1 gives Flow-GRPO a 47% larger std than DDIM with eta = a / sqrt(2).
    a, t = 0.7, torch.tensor(0.6, dtype=torch.float64)
    std_mismatch, mean_mismatch = {}, {}
    for h in (1e-1, 1e-2, 1e-3, 1e-4):
        s = t - h
        grpo = flow_grpo_coefficients(t, s, t_max=0.99, noise_level=a)
        ddim = ddim_coefficients(*flow_schedule(t), *flow_schedule(s), eta=a / math.sqrt(2))
        assert grpo.mean_x0.item() == ddim.mean_x0.item()
        std_mismatch[h] = grpo.std.item() / ddim.std.item() - 1
        mean_mismatch[h] = abs(grpo.mean_eps.item() - ddim.mean_eps.item())
    assert std_mismatch[1e-1] == pytest.approx(0.47, abs=0.01)
    assert std_mismatch[1e-4] < 1e-3
    assert std_mismatch[1e-2] / std_mismatch[1e-3] == pytest.approx(10, rel=0.05)
    assert std_mismatch[1e-3] / std_mismatch[1e-4] == pytest.approx(10, rel=0.05)
    assert mean_mismatch[1e-2] / mean_mismatch[1e-3] == pytest.approx(100, rel=0.1)


# ------------------------------------------------------------------------------------------------------------------
# Endpoints and timestep shifting
# ------------------------------------------------------------------------------------------------------------------


def test_flow_endpoints_give_finite_log_probs_with_the_documented_clamps():
    generator = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)

    def step(t, coefficients):
        x0_hat, eps_hat = x0_and_eps_from_prediction(v, x_t, 1 - t, t, "flow_prediction")
        return gaussian_step_with_logprob(x_t, x0_hat, eps_hat, coefficients, generator=generator)

    # Last step to the clean sample: zero variance unless s is clamped to sigma_min. diffusers' SD3 (shift 3) and
    # unshifted flow samplers step last from t = 0.0089 and t = 0.001.
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (3.0, 1.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(10)
        t, s = scheduler.sigmas[-2].expand(3), scheduler.sigmas[-1].expand(3)
        assert s.tolist() == [0.0] * 3 and t[0].item() == pytest.approx(0.0089 if shift == 3 else 0.001, rel=0.01)
        unclamped = step(t, ddim_coefficients(*flow_schedule(t), *flow_schedule(s)))
        assert (unclamped.std == 0).all() and not torch.isfinite(unclamped.log_probs).any()
        clamped = ddim_coefficients(*flow_matching_alpha_sigma(t), *flow_matching_alpha_sigma(s))
        assert flow_matching_alpha_sigma(s)[1].tolist() == pytest.approx([FLOW_SIGMA_MIN] * 3, rel=1e-6)
        assert (clamped.std > 1e-5).all()  # eta * ~1e-4: above MIN_STEP_STD for eta >= 0.01
        last = step(t, clamped)
        assert torch.isfinite(last.log_probs).all() and torch.isfinite(last.backward_log_probs).all()
    # First step from t = 1 (alpha_t = 0): DDIM is finite as is, P_B = N(0, I), and at eta = 1 x_s ignores x_t.
    t, s = torch.ones(3), torch.full((3,), 0.96)
    first = step(t, ddim_coefficients(*flow_schedule(t), *flow_schedule(s)))
    assert torch.isfinite(first.log_probs).all()
    torch.testing.assert_close(
        first.backward_log_probs.double(), normal_log_prob(x_t, torch.zeros(SHAPE), torch.ones(SHAPE), "mean")
    )
    # Flow-GRPO's noise level a sqrt(t / (1 - t)) is infinite at t = 1; t_max = s (Flow-GRPO's sigmas[1]) makes
    # the first step's std exactly the noise level.
    assert not torch.isfinite(flow_grpo_coefficients(t, s, t_max=1.0).std).any()
    grpo = flow_grpo_coefficients(t, s, t_max=s)
    torch.testing.assert_close(grpo.std, torch.full((3,), 0.7))
    assert torch.isfinite(step(t, grpo).log_probs).all()


def test_shift_time_fixes_the_ends_increases_and_matches_diffusers_flow_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        shifted = shift_time(t, shift)
        assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
        assert (shifted.diff() > 0).all()
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert (shift_time(t[1:-1], 3.0) > t[1:-1]).all()
    # diffusers' SD3 sampler: times evenly spaced from 1 to the shifted 1/1000 (its sigma_min), shifted again.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    assert scheduler.sigma_min == pytest.approx(shift_time(1e-3, 3.0).item())
    evenly = torch.linspace(1, scheduler.sigma_min, 10)
    torch.testing.assert_close(shift_time(evenly, 3.0), scheduler.sigmas[:-1])
    # FLUX's exponential shift exp(mu) / (exp(mu) + 1/t - 1) is the same map with shift = exp(mu).
    mu, inner = 1.15, t[1:]
    torch.testing.assert_close(shift_time(inner, math.exp(mu)), math.exp(mu) / (math.exp(mu) + 1 / inner - 1))
    with pytest.raises(ValueError, match="shift=0 is invalid"):
        shift_time(t, 0)


# ------------------------------------------------------------------------------------------------------------------
# Step mechanics
# ------------------------------------------------------------------------------------------------------------------


def test_given_prev_sample_is_scored_not_resampled_and_gradient_flows_through_the_mean_only():
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(SHAPE, generator=generator)
    v = torch.randn(SHAPE, generator=generator, requires_grad=True)
    prev = torch.randn(SHAPE, generator=generator, requires_grad=True)
    t, s = torch.tensor(0.5), torch.tensor(0.4)
    x0_hat, eps_hat = x0_and_eps_from_prediction(v, x_t, 1 - t, t, "flow_prediction")
    out = gaussian_step_with_logprob(x_t, x0_hat, eps_hat, ddim_coefficients(1 - t, t, 1 - s, s), prev_sample=prev)
    assert torch.equal(out.latents, prev.detach())
    assert not out.backward_log_probs.requires_grad
    out.log_probs.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert prev.grad is None


def test_float64_schedules_give_float32_coefficients_and_bad_arguments_are_refused():
    coefficients = ddim_coefficients(*flow_schedule(0.5), *flow_schedule(0.4))
    assert all(c.dtype == torch.float32 for c in coefficients)
    assert all(c.dtype == torch.float32 for c in flow_grpo_coefficients(0.5, 0.4, t_max=0.9))
    with pytest.raises(ValueError, match=r"eta=0.0 is invalid: expected a number in \(0, 1\]"):
        ddim_coefficients(0.5, 0.5, 0.6, 0.4, eta=0.0)
    with pytest.raises(ValueError, match="log_prob_reduction='max' is invalid"):
        gaussian_step_with_logprob(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), coefficients, log_prob_reduction="max"
        )
