"""Divergence: a non-finite loss, gradient or weight stops training with an error that says where and what, before it
reaches the weights, a checkpoint or a saved model; under fp16 the scaler's skipped steps are counted until they
persist."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import files_under, make_resumable_trainer
from safetensors.torch import load_file

from dag_trl import TrainingDivergedError
from dag_trl.trainer import list_checkpoints
from dag_trl.trainer.divergence import MAX_CONSECUTIVE_SKIPPED_STEPS


def trained_copy(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.trainable_parameters()]


def assert_unchanged(trainer, before: list[torch.Tensor]) -> None:
    for parameter, saved in zip(trainer.trainable_parameters(), before, strict=True):
        assert torch.equal(parameter.detach(), saved)


def test_a_non_finite_loss_stops_before_its_backward_naming_epoch_window_and_beta(tmp_path, tiny_sd_path):
    def huge(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)) * 1e30, {}

    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, train_reward_exp=100.0, train_reward_exp_anneal="none")
    trainer.reward_fn = huge
    before = trained_copy(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reward-scale warning, tested in test_inputs.py
        with pytest.raises(TrainingDivergedError) as error:
            trainer.train()
    message = str(error.value)
    assert message.startswith("Training diverged at epoch 0, optimiser window 0: the loss is ")
    assert "beta=100" in message and "e+29" in message  # the window's rewards, about 0.5e30
    assert "No checkpoint was written yet: restart with a lower train_learning_rate" in message
    assert_unchanged(trainer, before)
    assert list_checkpoints(trainer.checkpoint_dir) == []


def test_a_non_finite_gradient_is_not_applied(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=2)
    trainer.train(epochs=1)  # a good checkpoint first
    before = trained_copy(trainer)
    trainer.trainable_parameters()[0].register_hook(lambda gradient: gradient * float("nan"))
    with pytest.raises(
        TrainingDivergedError, match=r"at epoch 1, optimiser window 0: grad_norm_unet is nan \(the step"
    ):
        trainer.train()
    assert_unchanged(trainer, before)
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0]


def test_a_huge_learning_rate_stops_before_any_non_finite_checkpoint_or_model(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=4, train_learning_rate=1e30)
    # The first step's weights are finite but huge; the next epoch's samples are not.
    with pytest.raises(
        TrainingDivergedError, match=r"^Training diverged before epoch 1: the policy's sampled latents "
    ):
        trainer.train()
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0]
    for _, folder in list_checkpoints(trainer.checkpoint_dir):
        for name in files_under(folder):
            if name.endswith(".safetensors"):
                assert all(torch.isfinite(t).all() for t in load_file(f"{folder}/{name}").values()), name


def test_non_finite_weights_are_never_written(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=1)
    trainer.train()
    with torch.no_grad():
        trainer.trainable_parameters()[1].fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match=r"Refusing to write '.*model': trainable parameter 1 holds NaN"):
        trainer.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists() or files_under(tmp_path / "model") == set()
    with pytest.raises(TrainingDivergedError, match=r"Refusing to write '.*checkpoint_5'"):
        trainer.save_checkpoint(5)
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0]


def test_fp16_skipped_steps_are_counted_and_stop_training_only_when_they_persist(tmp_path, tiny_sd_path, monkeypatch):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path)
    trainer.uses_loss_scaling = True  # as with mixed_precision="fp16", which the CPU cannot run
    skipped = iter([True, True, False] + [True] * (MAX_CONSECUTIVE_SKIPPED_STEPS + 1))
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda _: next(skipped)))
    calls = []
    for step in range(3 + MAX_CONSECUTIVE_SKIPPED_STEPS + 1):
        metrics = trainer._optimiser_step(calls.append)
        expected_calls = 1 if step == 3 + MAX_CONSECUTIVE_SKIPPED_STEPS else 0
        assert len(calls) == expected_calls, step
    assert metrics["optimizer_steps_skipped"] == 2 + MAX_CONSECUTIVE_SKIPPED_STEPS + 1
    assert calls[0].startswith(f"the fp16 gradient scaler skipped {MAX_CONSECUTIVE_SKIPPED_STEPS + 1} optimiser steps")
