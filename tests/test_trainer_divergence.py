"""Divergence: a non-finite loss, gradient or weight stops training with an error that says where and what, before it
reaches the weights, a checkpoint or a saved model; under fp16 the scaler's skipped steps are counted until they
persist."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import files_under, make_resumable_trainer

from dag_trl import TrainingDivergedError
from dag_trl.trainer import list_checkpoints
from dag_trl.trainer.divergence import MAX_CONSECUTIVE_SKIPPED_STEPS, first_non_finite
from dag_trl.trainer.optimisation import PreparedModels


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


def resumed_trainer(tmp_path, tiny_sd_path, resume_from: str, learning_rate: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the changed learning rate's warning, tested in test_checkpointing.py
        return make_resumable_trainer(
            tmp_path, tiny_sd_path, num_epochs=3, resume_from=resume_from, train_learning_rate=learning_rate
        )


def test_a_huge_learning_rate_is_stopped_at_the_first_checkpoint_and_resumes_from_the_last_healthy_one(
    tmp_path, tiny_sd_path
):
    # Issue 20: at lr 1e12 the first step leaves finite LoRA weights of about 1e12, which used to be checkpointed.
    from dag_trl.trainer.divergence import MAX_LORA_UPDATE_RATIO, lora_update_ratios

    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=3)
    trainer.train(epochs=1)
    healthy = trainer.last_checkpoint()
    assert healthy.endswith("checkpoint_0")
    trainer = resumed_trainer(tmp_path, tiny_sd_path, healthy, 1e12)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e12, 1e12]  # the new rate, not the saved
    with pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    ratios = lora_update_ratios(trainer.denoiser)
    layer = max(ratios, key=ratios.get)
    assert (
        ratios[layer] > 1e9
        and torch.isfinite(torch.stack([p.abs().max() for p in trainer.trainable_parameters()])).all()
    )
    final = f"{tmp_path}/logs/checkpoints/checkpoint_1"
    assert str(error.value) == (
        f"Refusing to write {final!r}: the LoRA update of layer {layer!r} is {ratios[layer]:.3g} times the frozen "
        f"weight it adds to (||s B A||_F / ||W||_F; the health check allows at most {MAX_LORA_UPDATE_RATIO:g}); "
        f"training diverged by the end of epoch 1. Nothing was pruned. The last checkpoint, {healthy!r}, passed the "
        "weights health check: resume from it with a lower train_learning_rate, a smaller train_reward_exp or "
        "rescaled rewards, or a larger sample_eta."
    )
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0]
    with pytest.raises(TrainingDivergedError, match=r"^Refusing to write '.*model': the LoRA update of layer"):
        trainer.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()

    # The advice works: from the named checkpoint at a sane learning rate, training goes on and checkpoints.
    trainer = resumed_trainer(tmp_path, tiny_sd_path, healthy, 3e-4)
    trainer.train()
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0, 1, 2]
    assert trainer.weights_health_problem() is None
    assert max(lora_update_ratios(trainer.denoiser).values()) < 1e-2


def test_a_huge_learning_rate_from_the_start_says_that_no_checkpoint_was_written(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=2, train_learning_rate=1e12)
    with pytest.raises(TrainingDivergedError) as error:
        trainer.train()
    assert " times the frozen weight it adds to " in str(error.value)
    assert str(error.value).endswith(
        "training diverged by the end of epoch 0. Nothing was pruned. No checkpoint was written yet: restart with a "
        "lower train_learning_rate, a smaller train_reward_exp or rescaled rewards, or a larger sample_eta."
    )
    assert list_checkpoints(trainer.checkpoint_dir) == []


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
    trainer.optimiser_step.uses_loss_scaling = True  # as with mixed_precision="fp16", which the CPU cannot run
    skipped = iter([True, True, False] + [True] * (MAX_CONSECUTIVE_SKIPPED_STEPS + 1))
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda _: next(skipped)))
    calls = []
    for step in range(3 + MAX_CONSECUTIVE_SKIPPED_STEPS + 1):
        models = PreparedModels(
            trainer.denoiser, trainer.objective_model, trainer.optimizer, None, trainer.prepared_models
        )
        metrics = trainer.optimiser_step(models, calls.append)
        expected_calls = 1 if step == 3 + MAX_CONSECUTIVE_SKIPPED_STEPS else 0
        assert len(calls) == expected_calls, step
    assert metrics["optimizer_steps_skipped"] == 2 + MAX_CONSECUTIVE_SKIPPED_STEPS + 1
    assert calls[0].startswith(f"the fp16 gradient scaler skipped {MAX_CONSECUTIVE_SKIPPED_STEPS + 1} optimiser steps")


def test_lora_update_ratio_is_the_frobenius_norm_of_the_scaled_update_over_the_frozen_weight():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["0", "1"]), model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    from dag_trl.trainer.divergence import lora_update_ratios

    ratios = lora_update_ratios(model)
    linear, conv = model[0], model[1]
    update = 1.5 * linear.lora_B["default"].weight @ linear.lora_A["default"].weight  # scaling = alpha / r = 1.5
    assert ratios["0"] == pytest.approx((update.norm() / linear.base_layer.weight.norm()).item(), rel=1e-6)
    a = conv.lora_A["default"].weight.flatten(1)  # (2, 3 * 3 * 3)
    update = 1.5 * conv.lora_B["default"].weight.flatten(1) @ a
    assert ratios["1"] == pytest.approx((update.norm() / conv.base_layer.weight.norm()).item(), rel=1e-6)
    with torch.no_grad():
        linear.lora_B["default"].weight.zero_()  # B starts at zero: no update
    assert lora_update_ratios(model)["0"] == 0.0


def test_finite_weights_whose_probe_overflows_are_not_written(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=2)
    assert trainer.weights_health_problem() is None
    with torch.no_grad():
        for parameter in trainer.unwrapped_objective_model.parameters():
            parameter.mul_(1e30)  # finite flow-network weights whose products overflow float32
    assert first_non_finite(trainer.trainable_parameters()) is None
    assert trainer.weights_health_problem() == "the fixed probe's flow outputs hold NaN or infinite values"
    with pytest.raises(TrainingDivergedError, match=r"^Refusing to write '.*checkpoint_0': the fixed probe's flow"):
        trainer.save_checkpoint(0)
    assert list_checkpoints(trainer.checkpoint_dir) == []
