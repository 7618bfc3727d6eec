"""Evaluation during training (``eval_freq``): when it runs, on which prompts and noise, what it reports and logs, and
the pretrained model's samples it compares with."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, brightness, record_logs, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
from dag_trl.evaluation import diversity, pixel_features, reward_statistics
from dag_trl.prompts import PromptList


def make_trainer(tmp_path, tiny_sd_path, evaluation_hook=None, **overrides):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    config = tiny_config(tmp_path, eval_num_samples=6, eval_seed=7, sample_num_batches_per_epoch=1, **overrides)
    return GFlowNetDiffusionTrainer(
        config, brightness, PromptList(PROMPTS, seed=0), pipeline, evaluation_hook=evaluation_hook
    )


def test_evaluation_prompts_are_the_prompt_sets_draws_after_reseeding_with_eval_seed(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path)
    expected = PromptList(PROMPTS, seed=7)
    prompts, _ = trainer.evaluation_prompts()
    assert prompts == [expected()[0] for _ in range(6)]
    trainer.prompt_fn()  # the training stream moves on; the evaluation prompts stay
    assert trainer.evaluation_prompts()[0] == prompts


def test_the_prior_images_are_the_pretrained_models_whatever_the_lora(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path)
    prompts = PROMPTS[:3]
    before = trainer.sample_images(prompts, seed=3)  # the LoRA starts as the identity (peft's B = 0)
    with torch.no_grad():
        for parameter in trainer.sd_pipeline.get_trainable_layers():
            parameter.add_(0.5)
    changed = trainer.sample_images(prompts, seed=3)
    assert (changed - before).abs().max() > 1e-3
    torch.testing.assert_close(trainer.sample_images(prompts, seed=3, prior=True), before, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_evaluations_run_before_training_every_eval_freq_epochs_and_after_the_last(tmp_path, tiny_sd_path):
    calls = []

    def hook(images, prompts, metadata, rewards):
        calls.append(len(prompts))
        return {"extra": {"brightest": rewards.max().item()}}

    trainer = make_trainer(tmp_path, tiny_sd_path, evaluation_hook=hook, num_epochs=3, eval_freq=2)
    logged = record_logs(trainer)
    trainer.train()
    assert [entry["epoch"] for entry in trainer.evaluation_history] == [0, 2, 3]
    assert calls == [6, 6, 6]

    # The last entry reports the final weights: recompute it from the images of the same prompts and noise.
    last = trainer.evaluation_history[-1]
    prompts, _ = trainer.evaluation_prompts()
    images = trainer.sample_images(prompts, seed=7)
    rewards = images.mean(dim=(1, 2, 3))
    for name, value in reward_statistics(rewards).items():
        assert last[f"reward_{name}"] == pytest.approx(value, abs=1e-6)
    assert last["diversity"] == pytest.approx(diversity(pixel_features(images), prompts), abs=1e-6)
    assert last["extra"]["brightest"] == pytest.approx(rewards.max().item(), abs=1e-6)
    first_kernel_distance = trainer.evaluation_history[0]["prior_kernel_distance"]
    assert last["prior_kernel_distance"] != first_kernel_distance

    # Logged flat, with the nested entries under their path.
    evaluation_logs = [values for _, values in logged if "eval/reward_mean" in values]
    assert len(evaluation_logs) == 3
    assert evaluation_logs[-1]["eval/extra/brightest"] == last["extra"]["brightest"]
    assert evaluation_logs[-1]["eval/reward_q95"] == last["reward_q95"]


def test_eval_freq_must_be_a_non_negative_integer(tmp_path):
    with pytest.raises(ValueError, match=r"eval_freq=-1 .*an integer >= 0"):
        tiny_config(tmp_path, eval_freq=-1)


def test_initial_latents_fix_the_starts_and_need_one_row_per_prompt(tmp_path, tiny_sd_path):
    trainer = make_trainer(tmp_path, tiny_sd_path)
    prompts = PROMPTS[:2]
    starts = trainer.sd_pipeline.initial_latents(2, torch.Generator().manual_seed(0), trainer.accelerator.device)
    # Given starts and seed fix the images; the starts replace the ones the seed would have drawn.
    torch.testing.assert_close(
        trainer.sample_images(prompts, seed=3, initial_latents=starts),
        trainer.sample_images(prompts, seed=3, initial_latents=starts.clone()),
        rtol=0,
        atol=0,
    )
    drawn = trainer.sample_images(prompts, seed=3)
    assert (trainer.sample_images(prompts, seed=3, initial_latents=starts) - drawn).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"initial_latents has 1 rows for 2 prompts: expected one per prompt"):
        trainer.sample_images(prompts, seed=3, initial_latents=starts[:1])


def test_evaluate_prompts_measures_the_given_prompts_and_records_nothing(tmp_path, tiny_sd_path):
    def hook(images, prompts, metadata, rewards):
        return {"brightest": rewards.max().item()}

    trainer = make_trainer(tmp_path, tiny_sd_path, evaluation_hook=hook)
    prompts = PROMPTS[:2] * 2
    measured = trainer.evaluate_prompts(prompts, [{}] * 4, seed=5)
    images = trainer.sample_images(prompts, seed=5)
    torch.testing.assert_close(measured["images"], images, rtol=0, atol=0)
    rewards = brightness(images, prompts, [{}] * 4)[0]
    torch.testing.assert_close(measured["rewards"], rewards.float(), rtol=0, atol=0)
    statistics = reward_statistics(rewards)
    assert measured["reward_mean"] == pytest.approx(statistics["mean"])
    assert measured["reward_q95"] == pytest.approx(statistics["q95"])
    assert measured["diversity"] == pytest.approx(diversity(pixel_features(images), prompts))
    assert measured["brightest"] == pytest.approx(rewards.max().item())
    assert "prior_kernel_distance" not in measured  # only with reference features
    trainer.denoiser.train()  # sampled in eval mode, then back to the mode it was in
    assert "brightest" not in trainer.evaluate_prompts(prompts, [{}] * 4, seed=5, use_evaluation_hook=False)
    assert trainer.evaluation_history == [] and trainer.denoiser.training
