"""Closed-form checks of the DDIM policy step in ``dag_trl.samplers.ddim``."""

import math

import pytest
import torch
from conftest import sd_ddim_scheduler

from dag_trl.samplers.ddim import (
    alphas_cumprod_at,
    backward_log_prob,
    ddim_step_with_logprob,
    ddim_variance,
    gaussian_log_prob,
    original_sample_and_noise,
    previous_timestep,
)


def make_scheduler(prediction_type: str = "epsilon", steps: int = 10):
    scheduler = sd_ddim_scheduler(prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


def normal_log_prob(value, mean, std, reduction):
    per_element = torch.distributions.Normal(mean.double(), std.double()).log_prob(value.double())
    per_element = per_element.flatten(1)
    return per_element.mean(1) if reduction == "mean" else per_element.sum(1)


def test_timesteps_are_sd_leading_spacing_and_last_step_uses_alphas_cumprod_0():
    scheduler = make_scheduler(steps=50)
    assert scheduler.timesteps[:3].tolist() == [981, 961, 941]
    assert scheduler.timesteps[-1].item() == 1
    previous = previous_timestep(scheduler, torch.tensor([981, 1]))
    assert previous.tolist() == [961, -19]
    alphas = alphas_cumprod_at(scheduler, previous)
    assert alphas[0].item() == pytest.approx(scheduler.alphas_cumprod[961].item())
    assert alphas[1].item() == pytest.approx(scheduler.alphas_cumprod[0].item())


def test_last_step_is_stochastic_even_if_the_scheduler_sets_alpha_to_one():
    # A DDIM config converted from another scheduler may say set_alpha_to_one=True (abar = 1 after the last step),
    # which would make the last step deterministic; the policy keeps abar[0], as Stable Diffusion's config does.
    from diffusers import DDIMScheduler

    stable_diffusion = make_scheduler()
    to_one = DDIMScheduler.from_config(stable_diffusion.config, set_alpha_to_one=True)
    to_one.set_timesteps(10)
    assert to_one.final_alpha_cumprod.item() == 1.0
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    last = stable_diffusion.timesteps[-1]
    steps = [ddim_step_with_logprob(s, output, last, sample, generator=torch.Generator().manual_seed(1))
             for s in (stable_diffusion, to_one)]  # fmt: skip
    assert torch.isfinite(steps[1].log_probs).all()
    torch.testing.assert_close(steps[1].log_probs, steps[0].log_probs)
    torch.testing.assert_close(steps[1].latents, steps[0].latents)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_torch_distributions(reduction):
    torch.manual_seed(0)
    value, mean = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    expected = normal_log_prob(value, mean, std.expand_as(value), reduction)
    torch.testing.assert_close(gaussian_log_prob(value, mean, std, reduction).double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ddim_step_log_prob_is_the_gaussian_density_of_the_ddim_posterior(reduction):
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[3]
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    eta = 0.7
    out = ddim_step_with_logprob(
        scheduler, eps, t, sample, eta=eta, generator=torch.Generator().manual_seed(1), log_prob_reduction=reduction
    )
    a_t = scheduler.alphas_cumprod[t]
    a_s = scheduler.alphas_cumprod[t - 100]
    x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
    mean = a_s.sqrt() * x0 + (1 - a_s - std**2).sqrt() * eps
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-5, atol=1e-5)
    expected = normal_log_prob(out.latents, mean, std.expand_as(mean), reduction)
    torch.testing.assert_close(out.log_probs.double(), expected, rtol=1e-5, atol=1e-4)
    # The sampled step is distributed around the DDIM mean with the DDIM std.
    assert ((out.latents - mean) / std).std().item() == pytest.approx(1.0, abs=0.15)
    assert out.latents.dtype == out.log_probs.dtype == torch.float32


def test_ddim_step_matches_diffusers_ddim_scheduler_for_the_same_noise():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[2]
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(eps, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    ours = ddim_step_with_logprob(scheduler, eps, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.latents, expected, rtol=1e-5, atol=1e-5)


def test_backward_log_prob_is_the_noising_kernel():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[4]
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = ddim_step_with_logprob(scheduler, eps, t, sample, log_prob_reduction="sum")
    ratio = scheduler.alphas_cumprod[t] / scheduler.alphas_cumprod[t - 100]
    expected = normal_log_prob(sample, ratio.sqrt() * out.latents, (1 - ratio).sqrt().expand_as(sample), "sum")
    torch.testing.assert_close(out.backward_log_probs.double(), expected, rtol=1e-5, atol=1e-3)
    direct = backward_log_prob(
        sample, out.latents, scheduler.alphas_cumprod[t].repeat(2), scheduler.alphas_cumprod[t - 100].repeat(2), "sum"
    )
    torch.testing.assert_close(direct, out.backward_log_probs)


def test_given_prev_sample_is_scored_not_resampled_and_gradient_flows_through_the_mean_only():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[1]
    sample = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = ddim_step_with_logprob(scheduler, eps, t, sample, prev_sample=prev)
    assert torch.equal(out.latents, prev.detach())
    out.log_probs.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert prev.grad is None


def test_per_sample_timesteps_equal_separate_steps():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    timesteps = torch.tensor([scheduler.timesteps[0].item(), scheduler.timesteps[-1].item()])
    sample, eps, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    joint = ddim_step_with_logprob(scheduler, eps, timesteps, sample, prev_sample=prev)
    for i in range(2):
        alone = ddim_step_with_logprob(
            scheduler, eps[i : i + 1], timesteps[i], sample[i : i + 1], prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(joint.log_probs[i : i + 1], alone.log_probs)
        torch.testing.assert_close(joint.backward_log_probs[i : i + 1], alone.backward_log_probs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_hat_inverts_the_noising_for_each_prediction_type(prediction_type):
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    alpha = torch.tensor([0.9, 0.5, 0.05])
    a = alpha.reshape(3, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    output = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    original, recovered_noise = original_sample_and_noise(output, noisy, alpha, prediction_type)
    torch.testing.assert_close(original, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recovered_noise, noise, rtol=1e-4, atol=1e-4)


def test_v_prediction_step_matches_diffusers():
    torch.manual_seed(0)
    scheduler = make_scheduler("v_prediction")
    t = scheduler.timesteps[5]
    sample, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = scheduler.step(v, t, sample, eta=1.0, generator=torch.Generator().manual_seed(3))
    ours = ddim_step_with_logprob(scheduler, v, t, sample, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.latents, expected.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pred_original_sample, expected.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_results_equal_to_float32_math():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    t = scheduler.timesteps[3]
    sample, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8).bfloat16()
    prev = torch.randn(2, 4, 8, 8)
    low = ddim_step_with_logprob(scheduler, eps, t, sample, prev_sample=prev)
    high = ddim_step_with_logprob(scheduler, eps.float(), t, sample, prev_sample=prev)
    assert low.log_probs.dtype == torch.float32
    torch.testing.assert_close(low.log_probs, high.log_probs)


def test_eta_zero_and_unknown_names_are_rejected():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match=r"eta=0.0 is invalid: expected a number in \(0, 1\]"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 2, 2), 981, torch.zeros(1, 4, 2, 2), eta=0.0)
    with pytest.raises(ValueError, match=r"eta=1.5 is invalid: expected a number in \(0, 1\]"):
        ddim_step_with_logprob(scheduler, torch.zeros(1, 4, 2, 2), 981, torch.zeros(1, 4, 2, 2), eta=1.5)
    with pytest.raises(ValueError, match="log_prob_reduction='max' is invalid"):
        ddim_step_with_logprob(
            scheduler, torch.zeros(1, 4, 2, 2), 981, torch.zeros(1, 4, 2, 2), log_prob_reduction="max"
        )
    with pytest.raises(ValueError, match="prediction_type='flow' is not supported"):
        original_sample_and_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1) * 0.5, "flow")


def test_ddim_variance_closed_form():
    a_t, a_s = torch.tensor(0.3), torch.tensor(0.6)
    assert ddim_variance(a_t, a_s).item() == pytest.approx((0.4 / 0.7) * (1 - 0.5))


def test_log_prob_reduction_sum_is_d_times_mean():
    torch.manual_seed(0)
    scheduler = make_scheduler()
    sample, eps, prev = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mean = ddim_step_with_logprob(scheduler, eps, 981, sample, prev_sample=prev, log_prob_reduction="mean")
    total = ddim_step_with_logprob(scheduler, eps, 981, sample, prev_sample=prev, log_prob_reduction="sum")
    assert total.log_probs.item() == pytest.approx(mean.log_probs.item() * 256, rel=1e-5)
    assert math.isfinite(total.backward_log_probs.item())
