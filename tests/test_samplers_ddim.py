"""Closed-form checks of the DDIM policy step in ``dag_trl.samplers.ddim``."""

import math

import pytest
import torch
from conftest import sd_ddim_scheduler

from dag_trl.samplers.ddim import (
    MIN_STEP_STD,
    DDIMStepOutput,
    alphas_cumprod_at,
    backward_log_prob,
    check_scheduler,
    ddim_step_with_logprob,
    ddim_variance,
    gaussian_log_prob,
    original_sample_and_noise,
    previous_timestep,
)
from dag_trl.samplers.gaussian import StepOutput


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


def ddim_step_written_out(scheduler, output, t, sample, eta, prev_sample, noise, reduction):
    """The DDIM step in its abar form (Song et al., 2021, eq. 12 and 16) as plain float32 tensor arithmetic, one
    timestep for the batch: (x_s, log P_F, log P_B, x0_hat)."""
    a_t = scheduler.alphas_cumprod[t].float()
    a_s = scheduler.alphas_cumprod[max(int(t) - 1000 // scheduler.num_inference_steps, 0)].float()
    output, sample = output.float(), sample.float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        eps, x0 = output, (sample - (1 - a_t).sqrt() * output) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0, eps = a_t.sqrt() * sample - (1 - a_t).sqrt() * output, a_t.sqrt() * output + (1 - a_t).sqrt() * sample
    else:
        x0, eps = output, (sample - a_t.sqrt() * output) / (1 - a_t).sqrt()
    std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
    mean = a_s.sqrt() * x0 + (1 - a_s - std**2).clamp(min=0).sqrt() * eps
    x_s = mean + std * noise if prev_sample is None else prev_sample

    def log_density(value, mu, sigma):
        elementwise = -((value - mu) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
        return elementwise.mean(dim=(1, 2, 3)) if reduction == "mean" else elementwise.sum(dim=(1, 2, 3))

    ratio = a_t / a_s
    return x_s, log_density(x_s, mean, std), log_density(sample, ratio.sqrt() * x_s, (1 - ratio).sqrt()), x0


@pytest.mark.parametrize("given_prev_sample", [False, True], ids=["sampled", "given"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eta", [1.0, 0.3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_is_the_written_out_abar_step_bit_for_bit(prediction_type, eta, reduction, given_prev_sample):
    # ddim_step_with_logprob is the general Gaussian step with VP coefficients; the abar form written out here is what
    # it computed before the two were one, operation for operation, so the results must not move by a single bit.
    scheduler = make_scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    for timestep in scheduler.timesteps:  # includes the last step, t = 1 -> abar[0]
        sample, output = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        prev = torch.randn(3, 4, 8, 8, generator=generator) if given_prev_sample else None
        out = ddim_step_with_logprob(
            scheduler,
            output,
            timestep,
            sample,
            eta=eta,
            prev_sample=prev,
            generator=torch.Generator().manual_seed(1),
            log_prob_reduction=reduction,
        )
        expected = ddim_step_written_out(scheduler, output, timestep, sample, eta, prev, noise, reduction)
        assert type(out) is StepOutput and DDIMStepOutput is StepOutput  # one step output type
        for name, value in zip(
            ("latents", "log_probs", "backward_log_probs", "pred_original_sample"), expected, strict=True
        ):
            assert torch.equal(getattr(out, name), value), (int(timestep), name)


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


# ------------------------------------------------------------------------------------------------------------------
# check_scheduler: settings the policy step cannot honour, refused before training (issue 12)
# ------------------------------------------------------------------------------------------------------------------


def scheduler_with(**changes):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(sd_ddim_scheduler().config, **changes)


@pytest.mark.parametrize("steps", [1, 4, 50, 999])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_check_scheduler_accepts_stable_diffusion_settings_and_leaves_the_scheduler_alone(steps, prediction_type):
    scheduler = make_scheduler(prediction_type, steps=10)
    check_scheduler(scheduler, steps, 1.0)
    check_scheduler(dict(scheduler.config), steps, 4.7e-5)
    assert len(scheduler.timesteps) == 10
    if steps <= 50:
        check_scheduler(scheduler_with(timestep_spacing="trailing"), steps, 1.0)


@pytest.mark.parametrize(
    "setting, what",
    [("clip_sample", "clips x0_hat to clip_sample_range"), ("thresholding", "applies dynamic thresholding to x0_hat")],
)
def test_check_scheduler_refuses_x0_clipping_and_thresholding_that_the_step_ignores(setting, what):
    with pytest.raises(ValueError) as caught:
        check_scheduler(scheduler_with(**{setting: True}), 4, 1.0)
    assert str(caught.value) == (
        f"scheduler {setting}=True is not supported: diffusers' DDIM step then {what}, which the policy's step "
        f"(ddim_step_with_logprob) does not do, so sampling would differ from the scheduler. Set {setting}=False "
        f"(Stable Diffusion's configs do), e.g. DDIMScheduler.from_config(config, {setting}=False)."
    )


@pytest.mark.parametrize(
    "changes, steps",
    [({"steps_offset": 0}, 4), ({"timestep_spacing": "linspace"}, 4), ({"timestep_spacing": "trailing"}, 999)],
)
def test_timesteps_ending_at_zero_give_nan_log_probs_and_are_refused(changes, steps):
    scheduler = scheduler_with(**changes)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps[-1].item() == 0
    # The step from t=0 goes to alphas_cumprod[0] again: zero variance, NaN log-probabilities.
    sample, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    step = ddim_step_with_logprob(scheduler, eps, 0, sample, generator=torch.Generator().manual_seed(0))
    assert step.log_probs.isnan().all() and step.backward_log_probs.isnan().all()
    with pytest.raises(ValueError) as caught:
        check_scheduler(scheduler, steps, 1.0)
    assert str(caught.value) == (
        f"scheduler timestep_spacing={scheduler.config.timestep_spacing!r} with "
        f"steps_offset={scheduler.config.steps_offset} is not supported: its {steps} timesteps end at t=0, where no "
        "less noisy level than alphas_cumprod[0] is left, so the last step has zero variance and NaN "
        "log-probabilities. Use timestep_spacing='leading' with steps_offset=1 (Stable Diffusion's config), whose "
        "last timestep is 1."
    )


def test_eta_whose_step_noise_is_lost_in_float32_names_the_smallest_eta_that_works():
    with pytest.raises(ValueError) as caught:
        check_scheduler(sd_ddim_scheduler(), 50, 1e-20)
    assert str(caught.value) == (
        "GFlowNetConfig.sample_eta=1e-20 is invalid for this scheduler and sample_num_steps=50: the step from t=1 "
        "would have standard deviation eta * 0.0206 = 2.06e-22, below the float32 floor 9.5e-07 under which the "
        "sampled noise is lost in rounding and log P_F becomes inf or NaN; expected a number in [4.7e-05, 1]."
    )
    check_scheduler(sd_ddim_scheduler(), 50, 4.7e-5)
    with pytest.raises(ValueError, match=r"sample_eta=4.6e-05 is invalid .* expected a number in \[4.7e-05, 1\]"):
        check_scheduler(sd_ddim_scheduler(), 50, 4.6e-5)
    with pytest.raises(ValueError, match=r"^eta=0.0 is invalid: expected a number in \(0, 1\]"):
        check_scheduler(sd_ddim_scheduler(), 50, 0.0)


def test_below_the_floor_log_p_f_is_rounding_noise_and_at_the_floor_it_is_stable():
    # What the floor protects: the same transition rescored with a model output 1e-6 (relative) away, as training
    # recomputes it. At eta = 1e-20 the sampled noise vanished into the mean and the rescored log P_F is ~ -1e28
    # (its square, the loss, overflows float32); at the smallest accepted eta it moves by under 0.01.
    scheduler = make_scheduler(steps=50)
    generator = torch.Generator().manual_seed(0)
    sample, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    last = scheduler.timesteps[-1]
    shifts = {}
    for eta in (1e-20, 4.7e-5):
        step = ddim_step_with_logprob(scheduler, eps, last, sample, eta=eta, generator=generator)
        rescored = ddim_step_with_logprob(scheduler, eps * (1 + 1e-6), last, sample, eta=eta, prev_sample=step.latents)
        shifts[eta] = (rescored.log_probs - step.log_probs).abs().max().item()
    assert shifts[1e-20] > 1e20 and not math.isfinite(torch.tensor(shifts[1e-20]).square().item())
    assert shifts[4.7e-5] < 0.01
    assert MIN_STEP_STD == 2.0**-20


def test_more_steps_than_the_scheduler_has_timesteps_names_sample_num_steps():
    with pytest.raises(ValueError) as caught:
        check_scheduler(sd_ddim_scheduler(), 1001, 1.0)
    assert str(caught.value) == (
        "GFlowNetConfig.sample_num_steps=1001 is invalid for this scheduler: expected an integer in [1, 1000] (its "
        "num_train_timesteps)."
    )
    with pytest.raises(ValueError) as caught:
        check_scheduler(sd_ddim_scheduler(), 1000, 1.0)
    assert str(caught.value) == (
        "GFlowNetConfig.sample_num_steps=1000 is invalid for this scheduler: with timestep_spacing='leading' and "
        "steps_offset=1 its first timestep is t=1000, past the last trained one (999); expected fewer steps."
    )


def test_zero_terminal_snr_needs_v_prediction():
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError) as caught:
        check_scheduler(scheduler_with(**zero_snr), 4, 1.0)
    assert str(caught.value) == (
        "scheduler prediction_type='epsilon' is not supported with alphas_cumprod[t]=0 at t=999 "
        "(rescale_betas_zero_snr=True): x0_hat divides by sqrt(alphas_cumprod[t]). Use "
        "prediction_type='v_prediction', as zero-terminal-SNR models do."
    )
    check_scheduler(scheduler_with(**zero_snr, prediction_type="v_prediction"), 4, 1.0)


@pytest.mark.parametrize("num_steps", [3, 16, 28, 50])
def test_the_first_step_of_a_zero_terminal_snr_model_is_finite(num_steps):
    # At abar_t = 0 and eta = 1 the mean's sqrt(1 - abar_s - sigma^2) has an argument of 0 that rounds below 0.
    scheduler = scheduler_with(
        rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    )
    scheduler.set_timesteps(num_steps)
    first = scheduler.timesteps[0]
    assert scheduler.alphas_cumprod[first].item() == 0.0
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step = ddim_step_with_logprob(scheduler, model_output, first, sample, eta=1.0, generator=torch.Generator())
    assert torch.isfinite(step.latents).all() and torch.isfinite(step.log_probs).all()


def test_betas_that_leave_a_step_without_variance_are_refused():
    from diffusers import DDIMScheduler

    betas = [0.1] * 10
    betas[5] = 0.0  # alphas_cumprod[5] == alphas_cumprod[4]: the step 5 -> 4 is deterministic
    scheduler = DDIMScheduler(num_train_timesteps=10, trained_betas=betas, clip_sample=False, steps_offset=1)
    with pytest.raises(ValueError) as caught:
        check_scheduler(scheduler, 9, 1.0)
    assert str(caught.value) == (
        "scheduler betas give the DDIM step from t=5 the standard deviation 0: its log-probability needs a positive "
        "one (alphas_cumprod must decrease strictly between the sampled timesteps and stay below 1)."
    )
