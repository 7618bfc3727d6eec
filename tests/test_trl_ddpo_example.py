"""TRL v0.23's ``examples/scripts/ddpo.py`` set-up, ported by renaming its classes only, and the ``project_kwargs``
and ``resume_from`` conventions of ``DDPOTrainer`` that it relies on.

The port keeps the script's ``ScriptArguments`` (less the Hub ids of its aesthetic scorer), its command line (the
one in its docstring, on the tiny model, with one epoch of 4-step trajectories so that it runs in seconds),
``project_kwargs``, prompt function and image logger. The reward keeps the scorer's contract and its uint8
conversion but scores brightness, since the real scorer downloads CLIP. The script's ``.cuda()`` calls, Hub
downloads and final ``save_model`` are outside this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import make_resumable_trainer, tiny_config
from transformers import HfArgumentParser

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer


@dataclass
class ScriptArguments:
    pretrained_model: str = field(
        default="runwayml/stable-diffusion-v1-5", metadata={"help": "Pretrained model to use."}
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Pretrained model revision to use."})
    hf_hub_model_id: str = field(
        default="ddpo-finetuned-stable-diffusion", metadata={"help": "HuggingFace repo to save model weights to."}
    )
    use_lora: bool = field(default=True, metadata={"help": "Whether to use LoRA."})


def aesthetic_scorer():
    def _fn(images, prompts, metadata):
        images = (images * 255).round().clamp(0, 255).to(torch.uint8)
        scores = images.float().mean(dim=(1, 2, 3)) / 255  # the script scores these uint8 images with CLIP + MLP
        return scores, {}

    return _fn


# list of example prompts to feed stable diffusion
animals = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat"]


def prompt_fn():
    return np.random.choice(animals), {}


def image_outputs_logger(image_data, global_step, accelerate_logger):
    # For the sake of this example, we will only log the last batch of images
    # and associated data
    result = {}
    images, prompts, _, rewards, _ = image_data[-1]

    for i, image in enumerate(images):
        prompt = prompts[i]
        reward = rewards[i].item()
        result[f"{prompt:.25} | {reward:.2f}"] = image.unsqueeze(0).float()

    accelerate_logger.log_images(
        result,
        step=global_step,
    )


@pytest.mark.integration
def test_trl_ddpo_example_setup_runs_with_only_the_class_names_changed(tmp_path, tiny_sd_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the script's folders are relative to where it runs
    command_line = [
        f"--pretrained_model={tiny_sd_path}",
        "--num_epochs=1",
        "--train_gradient_accumulation_steps=1",
        "--sample_num_steps=4",
        "--sample_batch_size=6",
        "--train_batch_size=3",
        "--sample_num_batches_per_epoch=4",
        "--per_prompt_stat_tracking=True",
        "--per_prompt_stat_tracking_buffer_size=32",
        "--tracker_project_name=stable_diffusion_training",
        "--log_with=tensorboard",  # the script's wandb needs an account
    ]

    # The script's __main__, with DDPOConfig, DDPOTrainer and DefaultDDPOStableDiffusionPipeline renamed.
    parser = HfArgumentParser((ScriptArguments, GFlowNetConfig))
    with pytest.warns(UserWarning, match="per_prompt_stat_tracking=True is ignored with train_objective='dag_db'"):
        script_args, training_args = parser.parse_args_into_dataclasses(command_line)
    training_args.project_kwargs = {
        "logging_dir": "./logs",
        "automatic_checkpoint_naming": True,
        "total_limit": 5,
        "project_dir": "./save",
    }

    pipeline = DefaultGFlowNetStableDiffusionPipeline(
        script_args.pretrained_model,
        pretrained_model_revision=script_args.pretrained_revision,
        use_lora=script_args.use_lora,
    )

    trainer = GFlowNetDiffusionTrainer(
        training_args,
        aesthetic_scorer(),
        prompt_fn,
        pipeline,
        image_samples_hook=image_outputs_logger,
    )

    trainer.train()

    # DDPO's meaning of project_kwargs: checkpoints under project_dir, tracker files under logging_dir.
    assert trainer.global_step == 8  # 24 trajectories in windows of 3
    # run.lock stays as an empty file (a lock file deleted on release could be locked twice); its owner record goes.
    assert sorted(os.listdir("save")) == ["checkpoints", "run.lock"]
    assert os.path.getsize("save/run.lock") == 0
    assert sorted(os.listdir("save/checkpoints")) == ["checkpoint_0"]
    assert os.listdir("logs") == ["stable_diffusion_training"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir("logs/stable_diffusion_training"))
    # DDPO's resume_from: a folder of checkpoint_<N> folders resumes from the newest.
    trainer.accelerator.end_training()
    training_args.resume_from, training_args.num_epochs = "./save/checkpoints", 2
    resumed = GFlowNetDiffusionTrainer(training_args, aesthetic_scorer(), prompt_fn, pipeline)
    assert resumed.resume_path == os.path.join("save", "checkpoints", "checkpoint_0")
    assert (resumed.first_epoch, resumed.global_step) == (1, 8)


def test_total_limit_is_the_checkpoint_limit_and_project_dir_holds_the_checkpoints(tmp_path, tiny_sd_path):
    project_kwargs = {"project_dir": str(tmp_path / "save"), "total_limit": 2, "automatic_checkpoint_naming": True}
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_checkpoint_limit=5, project_kwargs=project_kwargs)
    for epoch in range(4):
        trainer.save_checkpoint(epoch)
    assert sorted(os.listdir(tmp_path / "save" / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]
    assert not (tmp_path / "logs" / "checkpoints").exists()
    # resume_from="latest" looks where the checkpoints are.
    resumed = make_resumable_trainer(
        tmp_path, tiny_sd_path, num_epochs=5, resume_from="latest", project_kwargs=project_kwargs
    )
    assert resumed.resume_path == str(tmp_path / "save" / "checkpoints" / "checkpoint_3")


def test_total_limit_none_keeps_every_checkpoint_as_in_accelerate(tmp_path, tiny_sd_path):
    trainer = make_resumable_trainer(
        tmp_path, tiny_sd_path, num_checkpoint_limit=1, project_kwargs={"total_limit": None}
    )
    for epoch in range(3):
        trainer.save_checkpoint(epoch)
    assert sorted(os.listdir(tmp_path / "logs" / "checkpoints")) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]


@pytest.mark.parametrize(
    "project_kwargs, message",
    [
        (
            {"project_dir": "./save", "total_limt": 5},
            "GFlowNetConfig.project_kwargs has unknown keys ['total_limt']: accelerate's ProjectConfiguration accepts "
            "project_dir, logging_dir, automatic_checkpoint_naming, total_limit, iteration, save_on_each_node.",
        ),
        (
            {"total_limit": 0},
            "GFlowNetConfig.project_kwargs['total_limit']=0 is invalid: expected an integer >= 1, or None to keep "
            "every checkpoint.",
        ),
        (
            {"automatic_checkpoint_naming": "yes"},
            "GFlowNetConfig.project_kwargs['automatic_checkpoint_naming']='yes' is invalid: expected True or False.",
        ),
    ],
    ids=["unknown-key", "total-limit-zero", "naming-not-bool"],
)
def test_bad_project_kwargs_are_named_at_construction(tmp_path, project_kwargs, message):
    with pytest.raises(ValueError) as caught:
        tiny_config(tmp_path, project_kwargs=project_kwargs)
    assert str(caught.value) == message
