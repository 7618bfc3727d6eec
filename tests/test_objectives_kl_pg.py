"""The KL-regularised policy gradient (``train_objective="kl_pg"``): the trainer's transition-by-transition gradient
equals the gradient of the whole objective computed independently (diffusers' own DDIM step for the means, explicit
loops for the returns and the leave-one-out baselines), with and without guidance; what sampling records for it;
its refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, brightness, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.prompts import PromptList

KL_PG_SETTINGS = dict(
    train_objective="kl_pg",
    train_log_prob_reduction="sum",
    train_reward_exp_anneal="none",
    train_max_grad_norm=1e9,
    num_epochs=1,
)


def make_kl_pg_trainer(tmp_path, tiny_sd_path, **overrides) -> GFlowNetDiffusionTrainer:
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))
    prompts = PromptList(PROMPTS, name="letters", seed=0)
    trainer = GFlowNetDiffusionTrainer(
        tiny_config(tmp_path, **{**KL_PG_SETTINGS, **overrides}), brightness, prompts, pipeline
    )
    # A LoRA away from zero: at zero the policy is the prior and every KL and its gradient vanish.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.sd_pipeline.get_trainable_layers():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return trainer


def diffusers_mean_and_std(scheduler, model_output, timestep: int, sample, eta: float):
    """The DDIM step's mean and std from diffusers' own scheduler: its step with zero noise is the mean."""
    zero = torch.zeros_like(sample)
    mean = scheduler.step(model_output, timestep, sample, eta=eta, variance_noise=zero).prev_sample
    previous = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return mean, eta * scheduler._get_variance(timestep, previous) ** 0.5


def oracle_gradients(trainer, samples, window, tiny_sd_path) -> list[torch.Tensor]:
    r"""The gradient of :math:`\frac{1}{B}\sum_i \sum_n [k_n^i(\theta) - A_n^i \log\pi_\theta(z^i_{n+1} | z^i_n)]`
    over the window's trajectories, with :math:`A_n^i = \beta R_i - \sum_{m>n} k_m^i - b_n^i` from the epoch's
    trajectories (no gradient; :math:`b_n^i` the mean over the other trajectories of the prompt, or of the epoch for
    a prompt drawn once), on a copy of the trainer's LoRA."""
    config = trainer.config
    oracle = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))
    oracle.set_timesteps(config.sample_num_steps)
    for target, source in zip(oracle.get_trainable_layers(), trainer.sd_pipeline.get_trainable_layers(), strict=True):
        target.data.copy_(source.data)
    guidance = config.sample_guidance_scale
    negative = oracle.encode_prompt([config.negative_prompts]) if guidance != 1.0 else None
    num_steps = config.sample_num_steps

    def step_terms(row: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_n with gradient, log pi_n with gradient) of the epoch's trajectory ``row`` at step ``step``."""
        latents, timestep = samples.latents[row : row + 1, step], int(samples.timesteps[row, step])
        embeds = oracle.encode_prompt([samples.prompts[row]])
        guided, _ = oracle.predict(latents, timestep, embeds, negative, guidance)
        with torch.no_grad(), oracle.adapter_disabled():
            prior_guided, _ = oracle.predict(latents, timestep, embeds, negative, guidance)
        mean, std = diffusers_mean_and_std(oracle.scheduler, guided, timestep, latents, config.sample_eta)
        prior_mean, _ = diffusers_mean_and_std(oracle.scheduler, prior_guided, timestep, latents, config.sample_eta)
        kl = ((mean - prior_mean) ** 2).sum() / (2 * std**2)
        log_prob = torch.distributions.Normal(mean, std).log_prob(samples.latents[row : row + 1, step + 1]).sum()
        return kl, log_prob

    total = len(samples.prompts)
    with torch.no_grad():
        kls = torch.tensor([[step_terms(row, step)[0].item() for step in range(num_steps)] for row in range(total)])
    returns = torch.empty(total, num_steps)
    for row in range(total):
        for step in range(num_steps):
            returns[row, step] = config.train_reward_exp * samples.rewards[row] - kls[row, step + 1 :].sum()
    advantages = returns.clone()
    for row in range(total):
        others = [o for o in range(total) if o != row and samples.prompts[o] == samples.prompts[row]]
        # A prompt drawn once is compared with every other trajectory of the epoch.
        others = others or [o for o in range(total) if o != row]
        advantages[row] -= returns[others].mean(dim=0)

    loss = 0.0
    for window_row in range(len(window.prompts)):
        row = next(r for r in range(total) if torch.equal(samples.latents[r], window.latents[window_row]))
        for step in range(num_steps):
            kl, log_prob = step_terms(row, step)
            loss = loss + kl - advantages[row, step] * log_prob
    (loss / len(window.prompts)).backward()
    return [p.grad for p in oracle.get_trainable_layers()]


@pytest.mark.integration
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "noguidance"])
def test_kl_pg_gradient_equals_the_whole_objective_oracle(tmp_path, tiny_sd_path, guidance):
    # The tiny model's brightness rewards differ by about 0.01: a large beta gives the reward term a weight
    # comparable to the KL terms'.
    trainer = make_kl_pg_trainer(tmp_path, tiny_sd_path, train_reward_exp=300.0, sample_guidance_scale=guidance)
    samples, _ = trainer.generate_samples(epoch=0)
    trainer.objective.prepare_samples(samples, trainer.accelerator)
    window, kept = trainer.windows(samples, torch.Generator().manual_seed(0))[0]
    # The baseline is exercised on prompts drawn more than once and on a prompt drawn once (the epoch's other
    # trajectories are its baseline).
    counts = [samples.prompts.count(prompt) for prompt in samples.prompts]
    assert max(counts) > 1 and min(counts) == 1
    expected = oracle_gradients(trainer, samples, window, tiny_sd_path)
    trainer.denoiser.train()
    trainer.train_window(window, kept, beta=trainer.config.train_reward_exp, epoch=0)
    trained = trainer.sd_pipeline.get_trainable_layers()
    beta1 = trainer.config.train_adam_beta1
    for parameter, gradient in zip(trained, expected, strict=True):
        # Adam's first moment after one step is (1 - beta1) * gradient; round-off relative to the largest entry.
        moment = trainer.optimizer.state[parameter]["exp_avg"]
        torch.testing.assert_close(moment / (1 - beta1), gradient, rtol=1e-3, atol=1e-3 * gradient.abs().max().item())


def test_sampling_records_the_prior_step_means_and_their_closed_form_kls(tmp_path, tiny_sd_path):
    trainer = make_kl_pg_trainer(tmp_path, tiny_sd_path, lora_min_timestep=500)
    samples, _ = trainer.generate_samples(epoch=0)
    config = trainer.config
    plain = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=False)
    plain.set_timesteps(config.sample_num_steps)
    negative = plain.encode_prompt([config.negative_prompts])
    row = 1
    embeds = plain.encode_prompt([samples.prompts[row]])
    for step in range(config.sample_num_steps):
        latents, timestep = samples.latents[row : row + 1, step], int(samples.timesteps[row, step])
        guided, _ = plain.predict(latents, timestep, embeds, negative, config.sample_guidance_scale)
        prior_mean, std = diffusers_mean_and_std(plain.scheduler, guided, timestep, latents, config.sample_eta)
        torch.testing.assert_close(samples.prior_means[row, step], prior_mean[0], rtol=1e-4, atol=1e-5)
        if timestep < config.lora_min_timestep:  # a frozen step is the prior's own: no KL
            assert samples.prior_kls[row, step] == 0
        else:
            # The sampled step's mean from its recorded guided prediction, through diffusers' step.
            policy_mean, _ = diffusers_mean_and_std(
                plain.scheduler, samples.model_outputs[row : row + 1, step], timestep, latents, config.sample_eta
            )
            expected = ((policy_mean - prior_mean) ** 2).sum() / (2 * std**2)
            assert expected > 0.1
            torch.testing.assert_close(samples.prior_kls[row, step], expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_log_prob_reduction": "mean"}, r"train_log_prob_reduction='mean' is invalid with train_objective='kl_pg'"),
        ({"train_cfg": False}, r"train_cfg=False is invalid with train_objective='kl_pg': expected True"),
        ({"train_reward_exp_anneal": "linear"}, r"train_reward_exp_anneal='linear' is invalid with train_objective="),
    ],
)  # fmt: skip
def test_kl_pg_refuses_settings_that_change_its_objective(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **{**KL_PG_SETTINGS, **overrides})


def test_kl_pg_refuses_a_full_fine_tune(tmp_path, tiny_sd_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=False)
    config = GFlowNetConfig(**{**KL_PG_SETTINGS, "logdir": str(tmp_path / "logs")})
    with pytest.raises(ValueError, match=r"train_objective='kl_pg' needs a pipeline with use_lora=True"):
        GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="letters", seed=0), pipeline)


@pytest.mark.integration
def test_kl_pg_trains_through_windows_of_frozen_steps_only(tmp_path, tiny_sd_path):
    # By timestep, a batch of frozen steps (below lora_min_timestep) has no gradient at all: its backward still runs
    # (zero gradients), and the other steps train the LoRA.
    trainer = make_kl_pg_trainer(
        tmp_path, tiny_sd_path, train_reward_exp=3.0, lora_min_timestep=500, train_timestep_fraction=1.0
    )
    samples, _ = trainer.generate_samples(epoch=0)
    trainer.objective.prepare_samples(samples, trainer.accelerator)
    window, kept = trainer.windows(samples, torch.Generator().manual_seed(0))[0]
    frozen = samples.timesteps[0] < 500
    assert frozen.any() and not frozen.all()
    before = [p.detach().clone() for p in trainer.sd_pipeline.get_trainable_layers()]
    trainer.denoiser.train()
    trainer.train_window(window, kept, beta=3.0, epoch=0)
    changed = [not torch.equal(a, p) for a, p in zip(before, trainer.sd_pipeline.get_trainable_layers(), strict=True)]
    assert any(changed)


def test_kl_pg_warns_when_an_epoch_makes_more_than_one_optimiser_step(tmp_path):
    with pytest.warns(UserWarning, match=r"with 2 optimiser step\(s\) per epoch and train_num_inner_epochs=1"):
        tiny_config(tmp_path, **KL_PG_SETTINGS)  # 8 trajectories, windows of 2 x 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_config(tmp_path, **KL_PG_SETTINGS, train_gradient_accumulation_steps=4)
