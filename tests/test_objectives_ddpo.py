"""DDPO (``train_objective="ddpo"``): per-prompt statistics by hand, and the window's gradient against a
straightforward transition-by-transition oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPTS, brightness, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
from dag_trl.objectives.ddpo import PerPromptStatTracker
from dag_trl.prompts import PromptList
from dag_trl.samplers.ddim import ddim_step_with_logprob


def test_per_prompt_stat_tracking_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    # First call: "a" has 2 rewards (>= min_count: its own statistics), "b" has 1 (the batch's statistics).
    advantages = tracker.advantages(["a", "b", "a"], np.array([1.0, 5.0, 3.0]))
    batch_mean, batch_std = 3.0, np.std([1.0, 5.0, 3.0])
    np.testing.assert_allclose(
        advantages, [(1 - 2) / (1 + 1e-6), (5 - batch_mean) / (batch_std + 1e-6), 1 / (1 + 1e-6)]
    )
    # Second call: "a"'s buffer keeps its 3 latest rewards [3, 7, 9]... after adding 7 and 9: [3, 7, 9].
    advantages = tracker.advantages(["a", "a", "b"], np.array([7.0, 9.0, 4.0]))
    a_buffer = np.array([3.0, 7.0, 9.0])
    b_buffer = np.array([5.0, 4.0])
    np.testing.assert_allclose(
        advantages,
        [(7 - a_buffer.mean()) / (a_buffer.std() + 1e-6), (9 - a_buffer.mean()) / (a_buffer.std() + 1e-6),
         (4 - b_buffer.mean()) / (b_buffer.std() + 1e-6)],
    )  # fmt: skip
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == {"a": [3.0, 7.0, 9.0], "b": [5.0, 4.0]}


def make_ddpo_trainer(tmp_path, tiny_sd_path, **overrides):
    settings = dict(train_objective="ddpo", train_max_grad_norm=1e9, train_clip_range=0.2, num_epochs=1)
    settings.update(overrides)
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    prompts = PromptList(PROMPTS, name="shapes", seed=0)
    return GFlowNetDiffusionTrainer(tiny_config(tmp_path, **settings), brightness, prompts, pipeline)


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [{}, {"train_cfg": False, "sample_guidance_scale": 1.0}, {"train_timestep_fraction": 0.5},
     {"per_prompt_stat_tracking": True, "per_prompt_stat_tracking_min_count": 2}],
    ids=["cfg", "nocfg", "half", "per-prompt"],
)  # fmt: skip
def test_ddpo_window_gradient_equals_the_straightforward_oracle(tmp_path, tiny_sd_path, overrides):
    trainer = make_ddpo_trainer(tmp_path, tiny_sd_path, **overrides)
    config = trainer.config
    assert trainer.objective_model is None and trainer.objective.display_name == "DDPO"
    samples, _ = trainer.generate_samples(epoch=0)
    trainer.objective.prepare_samples(samples, trainer.accelerator)

    # Advantages by hand, from the epoch's rewards (one process).
    rewards = samples.rewards.double().numpy()
    if config.per_prompt_stat_tracking:
        prompts = np.array(samples.prompts, dtype=object)
        expected = np.empty_like(rewards)
        for prompt in set(samples.prompts):
            mine = rewards[prompts == prompt]
            reference = mine if len(mine) >= 2 else rewards
            expected[prompts == prompt] = (mine - reference.mean()) / (reference.std() + 1e-6)
    else:
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    torch.testing.assert_close(samples.extras["advantages"], torch.tensor(expected, dtype=torch.float32))

    window, kept = trainer.windows(samples, torch.Generator().manual_seed(0))[0]
    trainer.denoiser.train()
    trainer.train_window(window, kept, beta=0.0, epoch=0)
    assert trainer.counters.flow_forwards == 0 and trainer.counters.vae_decodes == len(rewards)

    # The oracle: a fresh copy of the initial weights, each kept transition scored on its own.
    oracle = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    oracle.set_timesteps(config.sample_num_steps)
    negative = oracle.encode_prompt([config.negative_prompts]) if config.train_cfg else None
    total = 0.0
    for row in range(kept.shape[0]):
        embeds = oracle.encode_prompt([window.prompts[row]])
        for step in kept[row].tolist():
            latents, timestep = window.latents[row : row + 1, step], window.timesteps[row, step]
            guided, _ = oracle.predict(latents, timestep, embeds, negative, config.sample_guidance_scale)
            log_prob = ddim_step_with_logprob(
                oracle.scheduler, guided, timestep, latents, prev_sample=window.latents[row : row + 1, step + 1]
            ).log_probs
            ratio = torch.exp(log_prob - window.log_probs[row, step])
            advantage = window.extras["advantages"][row].clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
            clipped = torch.clamp(ratio, 1 - config.train_clip_range, 1 + config.train_clip_range)
            loss = torch.maximum(-advantage * ratio, -advantage * clipped)
            # Each backward pass is a mean over train_batch_size rows; accelerate averages the passes.
            total = total + loss.sum() / config.train_batch_size / config.backward_passes_per_step
    total.backward()
    beta1 = config.train_adam_beta1
    for parameter, expected_parameter in zip(
        trainer.sd_pipeline.get_trainable_layers(), oracle.get_trainable_layers(), strict=True
    ):
        # Round-off only: relative to the parameter's largest gradient entry (a wrong advantage, ratio or scale
        # would be off by a factor, not by float32 noise in near-zero entries).
        expected_grad = expected_parameter.grad
        torch.testing.assert_close(
            trainer.optimizer.state[parameter]["exp_avg"] / (1 - beta1),
            expected_grad,
            rtol=1e-4,
            atol=1e-4 * expected_grad.abs().max().item(),
        )


def test_per_prompt_statistics_survive_a_resume(tmp_path, tiny_sd_path):
    settings = dict(num_epochs=2, save_freq=1, per_prompt_stat_tracking=True, sample_num_batches_per_epoch=1)
    straight = make_ddpo_trainer(tmp_path / "straight", tiny_sd_path, **settings)
    straight.train(epochs=1)
    stats_after_epoch_0 = straight.objective.state_dict()
    assert sum(len(values) for values in stats_after_epoch_0["per_prompt_stats"].values()) == 4
    checkpoint = straight.save_checkpoint(0)
    resumed = make_ddpo_trainer(tmp_path / "resumed", tiny_sd_path, resume_from=checkpoint, **settings)
    assert resumed.objective.state_dict() == stats_after_epoch_0
