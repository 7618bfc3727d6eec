"""RTB (``train_objective="rtb"``): the transition-by-transition gradient equals the whole-trajectory loss's, over two
optimiser steps (a stale residual would fail the second), with and without guidance; and its refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, brightness, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
from dag_trl.models import LogPartitionHead
from dag_trl.prompts import PromptList
from dag_trl.samplers.ddim import ddim_step_with_logprob

RTB_SETTINGS = dict(
    train_objective="rtb",
    train_log_prob_reduction="sum",
    train_reward_exp_anneal="none",
    train_reward_exp=3.0,
    train_max_grad_norm=1e9,
    num_epochs=1,
)


def make_rtb_trainer(tmp_path, tiny_sd_path, use_lora=True, **overrides):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=use_lora)
    prompts = PromptList(PROMPTS, name="shapes", seed=0)
    return GFlowNetDiffusionTrainer(
        tiny_config(tmp_path, **{**RTB_SETTINGS, **overrides}), brightness, prompts, pipeline
    )


def oracle_gradients(trainer, window, tiny_sd_path) -> list[torch.Tensor]:
    """Gradients of the window's RTB loss, each trajectory's sum over all of its steps differentiated at once, on
    copies of the trainer's current LoRA and log Z. With the learned estimate: ``mean_i delta_i^2``. With the batch
    estimate, a prompt's trajectories contribute their log-variance ``sum_i (r_i - mean r)^2`` (``r`` = the residual
    without log Z, differentiated through the mean too) and train the learned log Z on ``(log Z + r_i)^2`` with
    ``r_i`` held fixed; a prompt with one trajectory keeps the learned estimate."""
    config = trainer.config
    oracle = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    oracle.set_timesteps(config.sample_num_steps)
    for target, source in zip(oracle.get_trainable_layers(), trainer.sd_pipeline.get_trainable_layers(), strict=True):
        target.data.copy_(source.data)
    log_partition = LogPartitionHead(oracle.prompt_embedding_dim)
    log_partition.load_state_dict(trainer.unwrapped_objective_model.state_dict())
    negative = oracle.encode_prompt([config.negative_prompts]) if config.train_cfg else None

    def trajectory_log_prob(row: int, embeds) -> torch.Tensor:
        total = 0.0
        for step in range(config.sample_num_steps):
            latents, timestep = window.latents[row : row + 1, step], window.timesteps[row, step]
            guided, _ = oracle.predict(latents, timestep, embeds, negative, config.sample_guidance_scale)
            total = total + ddim_step_with_logprob(
                oracle.scheduler, guided, timestep, latents, prev_sample=window.latents[row : row + 1, step + 1],
                log_prob_reduction="sum",
            ).log_probs  # fmt: skip
        return total

    prompts = window.prompts
    residuals, learned = [], []
    for row in range(len(prompts)):
        embeds = oracle.encode_prompt([prompts[row]])
        with torch.no_grad(), oracle.adapter_disabled():
            prior = trajectory_log_prob(row, embeds)
        residuals.append(trajectory_log_prob(row, embeds) - prior - config.train_reward_exp * window.rewards[row])
        learned.append(log_partition(embeds.hidden_states))
    loss = 0.0
    for prompt in set(prompts):
        rows = [row for row in range(len(prompts)) if prompts[row] == prompt]
        if config.train_log_z_estimate == "learned" or len(rows) == 1:
            loss = loss + sum((learned[row] + residuals[row]) ** 2 for row in rows)
        else:
            group = torch.stack([residuals[row] for row in rows])
            loss = loss + ((group - group.mean()) ** 2).sum()
            loss = loss + sum((learned[row] + residuals[row].detach()) ** 2 for row in rows)
    (loss / len(prompts)).sum().backward()
    return [p.grad for p in oracle.get_trainable_layers()] + [p.grad for p in log_partition.parameters()]


@pytest.mark.integration
@pytest.mark.parametrize("log_z_estimate", ["batch", "learned"])
@pytest.mark.parametrize(
    "overrides", [{}, {"train_cfg": False, "sample_guidance_scale": 1.0}], ids=["cfg", "nocfg"]
)  # fmt: skip
def test_rtb_gradient_equals_the_whole_trajectory_oracle_over_two_optimiser_steps(
    tmp_path, tiny_sd_path, overrides, log_z_estimate
):
    # The brightness rewards of the tiny model differ by about 0.01: a large beta keeps the residuals' deviations from
    # their prompt's mean well above the float32 round-off of the summed log-probabilities (about 1e-4 nats).
    trainer = make_rtb_trainer(
        tmp_path, tiny_sd_path, train_log_z_estimate=log_z_estimate, train_reward_exp=300.0, **overrides
    )
    samples, _ = trainer.generate_samples(epoch=0)
    windows = trainer.windows(samples, torch.Generator().manual_seed(0))
    trained = trainer.sd_pipeline.get_trainable_layers() + list(trainer.unwrapped_objective_model.parameters())
    beta1 = trainer.config.train_adam_beta1
    previous_moments = [torch.zeros_like(p) for p in trained]
    trainer.denoiser.train()
    for window, kept in windows[:2]:
        # The batch estimate is exercised on a prompt drawn more than once, the learned one on a single draw.
        counts = [window.prompts.count(prompt) for prompt in window.prompts]
        assert max(counts) > 1 and min(counts) == 1
        expected = oracle_gradients(trainer, window, tiny_sd_path)
        trainer.train_window(window, kept, beta=trainer.config.train_reward_exp, epoch=0)
        moments = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trained]
        for moment, previous, gradient in zip(moments, previous_moments, expected, strict=True):
            # Round-off only: relative to the tensor's largest entry.
            torch.testing.assert_close(
                (moment - beta1 * previous) / (1 - beta1), gradient, rtol=1e-3, atol=1e-3 * gradient.abs().max().item()
            )
        previous_moments = moments
    assert trainer.weights_version == 2


def test_rtb_records_the_prior_with_the_adapter_switched_off(tmp_path, tiny_sd_path):
    trainer = make_rtb_trainer(tmp_path, tiny_sd_path)
    # A LoRA that is not zero, so that policy and prior differ.
    with torch.no_grad():
        for parameter in trainer.sd_pipeline.get_trainable_layers():
            parameter.add_(0.05 * torch.randn_like(parameter))
    samples, _ = trainer.generate_samples(epoch=0)
    assert not torch.allclose(samples.prior_log_probs, samples.log_probs)
    plain = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=False)
    plain.set_timesteps(trainer.config.sample_num_steps)
    negative = plain.encode_prompt([trainer.config.negative_prompts])
    row, step = 1, 2
    latents = samples.latents[row : row + 1, step]
    guided, _ = plain.predict(
        latents, samples.timesteps[row, step], plain.encode_prompt([samples.prompts[row]]), negative, 5.0
    )
    prior = ddim_step_with_logprob(
        plain.scheduler, guided, samples.timesteps[row, step], latents,
        prev_sample=samples.latents[row : row + 1, step + 1], log_prob_reduction="sum",
    ).log_probs  # fmt: skip
    torch.testing.assert_close(samples.prior_log_probs[row, step], prior[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"train_log_prob_reduction": "mean"},
            r"train_log_prob_reduction='mean' is invalid with train_objective='rtb'",
        ),
        ({"train_timestep_fraction": 0.5}, r"train_timestep_fraction=0.5 is invalid with train_objective='rtb'"),
        ({"train_reward_exp_anneal": "linear"}, r"train_reward_exp_anneal='linear' is invalid with train_objective"),
        (
            {"train_cfg": False},
            r"train_cfg=False with sample_guidance_scale=5.0 is invalid with train_objective='rtb'",
        ),
    ],
)
def test_rtb_refuses_settings_it_cannot_train_with_naming_the_fields(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **{**RTB_SETTINGS, **overrides})


def test_rtb_refuses_a_full_finetune_before_training(tmp_path, tiny_sd_path):
    with pytest.raises(ValueError, match=r"train_objective='rtb' needs a pipeline with use_lora=True"):
        make_rtb_trainer(tmp_path, tiny_sd_path, use_lora=False)
