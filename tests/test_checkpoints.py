"""Saving, checkpoints and resume of GFlowNetDiffusionTrainer: round trips through plain diffusers, resume equals the
uninterrupted run, interrupted saves, the checkpoint limit, and bad ``resume_from`` folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, files_under, make_resumable_trainer

from dag_trl import FlowNetwork
from dag_trl.trainer import list_checkpoints

FLOW_FILES = {"flow/config.json", "flow/diffusion_pytorch_model.safetensors"}


def plain_pipeline(tiny_sd_path, **components):
    """The base model as any diffusers user loads it, with the DDIM scheduler the trainer samples with."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(tiny_sd_path), safety_checker=None, requires_safety_checker=False, **components
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline) -> torch.Tensor:
    """DDIM samples (eta = 1, guidance 5) of fixed prompts and noise."""
    pipeline.unet.eval()
    output = pipeline(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=5.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    return output.images


def parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_same_parameters(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.integration
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_saved_weights_give_the_trained_images_in_plain_diffusers(tmp_path, tiny_sd_path, use_lora):
    from diffusers import UNet2DConditionModel

    # A large learning rate so that one step moves the images well beyond the comparison tolerance.
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, use_lora=use_lora, num_epochs=1, train_learning_rate=3e-2)
    trainer.train()
    trainer.save_pretrained(tmp_path / "saved")

    weights = {"pytorch_lora_weights.safetensors"} if use_lora else {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}  # fmt: skip
    assert files_under(tmp_path / "saved") == weights | FLOW_FILES | {"README.md"}
    trained_images = sample(trainer.sd_pipeline.sd_pipeline)
    if use_lora:
        loaded = plain_pipeline(tiny_sd_path)
        loaded.load_lora_weights(str(tmp_path / "saved"))
    else:
        loaded = plain_pipeline(tiny_sd_path, unet=UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet"))
    loaded_images = sample(loaded)
    base_images = sample(plain_pipeline(tiny_sd_path))

    torch.testing.assert_close(loaded_images, trained_images, rtol=0, atol=1e-5)
    assert (base_images - trained_images).abs().max() > 1e-2  # training changed what the saved weights reproduce

    flow = FlowNetwork.from_pretrained(tmp_path / "saved" / "flow")
    assert_same_parameters(parameters(flow), parameters(trainer.unwrapped_objective_model))


@pytest.mark.integration
def test_resume_after_one_epoch_reproduces_the_uninterrupted_run(tmp_path, tiny_sd_path):
    straight = make_resumable_trainer(tmp_path / "straight", tiny_sd_path)
    straight.train()

    interrupted = make_resumable_trainer(tmp_path / "resumed", tiny_sd_path)
    interrupted.train(epochs=1)
    after_first_epoch = parameters(interrupted.unet)
    del interrupted
    resumed = make_resumable_trainer(tmp_path / "resumed", tiny_sd_path, resume_from="latest")
    assert resumed.resume_path == os.path.join(str(tmp_path / "resumed" / "logs"), "checkpoints", "checkpoint_0")
    assert (resumed.first_epoch, resumed.global_step) == (1, 1)
    assert_same_parameters(parameters(resumed.unet), after_first_epoch)  # the checkpoint loaded exactly
    resumed.train()

    trainable = {n: p for n, p in parameters(resumed.unet).items() if "lora_" in n}
    assert any(not torch.equal(p, after_first_epoch[n]) for n, p in trainable.items())  # epoch 1 trained
    assert_same_parameters(parameters(resumed.unet), parameters(straight.unet))
    assert_same_parameters(
        parameters(resumed.unwrapped_objective_model), parameters(straight.unwrapped_objective_model)
    )
    assert resumed.global_step == straight.global_step == 2
    assert resumed.reward_history == straight.reward_history


@pytest.mark.integration
def test_interrupted_save_keeps_the_previous_checkpoint_usable(tmp_path, tiny_sd_path, monkeypatch):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path)
    trainer.train(epochs=1)
    saved = parameters(trainer.unwrapped_objective_model)
    checkpoints = tmp_path / "logs" / "checkpoints"
    real_save_state = trainer.accelerator.save_state

    def save_state_then_die(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # weights written, trainer_state.json and the rename not yet
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state_then_die)
    with torch.no_grad():
        for parameter in trainer.unwrapped_objective_model.parameters():
            parameter.add_(1.0)  # what the dying save wrote differs from checkpoint_0
    with pytest.raises(RuntimeError, match="killed while saving"):
        trainer.save_checkpoint(1)
    (checkpoints / "checkpoint_7.tmp").mkdir()  # debris of another interrupted save
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1.tmp", "checkpoint_7.tmp"]

    resumed = make_resumable_trainer(tmp_path, tiny_sd_path, resume_from="latest")
    assert resumed.resume_path.endswith("checkpoint_0") and resumed.first_epoch == 1
    assert_same_parameters(parameters(resumed.unwrapped_objective_model), saved)
    with pytest.raises(ValueError, match=r"is not a complete dag_trl checkpoint: missing \['trainer_state.json'\]"):
        make_resumable_trainer(tmp_path, tiny_sd_path, resume_from=str(checkpoints / "checkpoint_1.tmp"))

    # The next save of that epoch replaces the debris.
    monkeypatch.undo()
    trainer.save_checkpoint(1)
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1", "checkpoint_7.tmp"]


def test_checkpoint_limit_deletes_the_oldest(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_checkpoint_limit=2)
    for epoch in range(4):
        trainer.save_checkpoint(epoch)
    assert sorted(os.listdir(tmp_path / "logs" / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [2, 3]


def test_checkpoint_folder_holds_the_whole_training_state(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path)
    path = trainer.save_checkpoint(0)
    files = files_under(path)
    # LoRA (diffusers format), flow network, optimiser, RNG states, our epoch / step counters.
    assert {"pytorch_lora_weights.safetensors", "trainer_state.json", "optimizer.bin"} | FLOW_FILES <= files
    assert any(name.startswith("random_states") for name in files)
    assert not any(name.startswith("model") for name in files)  # no pickled duplicate of the UNet or flow


@pytest.mark.parametrize(
    "resume_from, message",
    [
        ("{tmp}/nowhere", r"resume_from='.*nowhere': no such folder"),
        ("latest", r"resume_from='latest' found no checkpoint under '.*checkpoints'"),
        ("{sd}", r"is not a complete dag_trl checkpoint: missing \['trainer_state.json', 'flow'\]"),
    ],
    ids=["missing", "latest-without-checkpoints", "foreign"],
)
def test_bad_resume_from_fails_before_training(tmp_path, tiny_sd_path, resume_from, message):
    resume_from = resume_from.format(tmp=tmp_path, sd=tiny_sd_path)
    with pytest.raises(ValueError, match=message):
        make_resumable_trainer(tmp_path, tiny_sd_path, resume_from=resume_from)
    assert not (tmp_path / "logs").exists()  # nothing was set up, let alone trained


@pytest.mark.integration
@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_lora": False}, r"was written with use_lora=False, but this run has use_lora=True"),
        ({"num_processes": 2}, r"was written with num_processes=2, but this run has num_processes=1"),
        ({"deepspeed": True}, r"was written with deepspeed=True, but this run has deepspeed=False"),
        ({}, r"has no 'optimizer.bin': it is not a complete checkpoint of a non-DeepSpeed run"),
    ],
    ids=["full-unet-checkpoint", "other-process-count", "deepspeed-checkpoint", "no-optimiser-state"],
)
def test_checkpoint_of_another_kind_of_run_is_refused_before_training(tmp_path, tiny_sd_path, change, message):
    checkpoint = Path(make_resumable_trainer(tmp_path / "first", tiny_sd_path).save_checkpoint(0))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert {key: state[key] for key in ("deepspeed", "num_processes", "use_lora")} == {
        "deepspeed": False, "num_processes": 1, "use_lora": True
    }  # fmt: skip
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, **change}))
    if not change:
        (checkpoint / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match=message):
        make_resumable_trainer(tmp_path / "second", tiny_sd_path, resume_from=str(checkpoint))
    assert not (tmp_path / "second" / "logs").exists()
