"""Saving, checkpoints and resume of GFlowNetDiffusionTrainer: round trips through plain diffusers, resume equals the
uninterrupted run, interrupted saves, the checkpoint limit, and bad ``resume_from`` folders; checkpoints that cannot
be resumed are named before anything loads (damaged files, another configuration), a full disk during a save says so
and leaves no partial folder, and two runs never share a checkpoint folder."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PROMPTS,
    another_run_holding,
    brightness,
    files_under,
    make_resumable_trainer,
    run_lock_is_free,
    tiny_config,
)

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, FlowNetwork, GFlowNetDiffusionTrainer
from dag_trl.prompts import PromptList
from dag_trl.trainer import list_checkpoints
from dag_trl.trainer.checkpointing import RUN_LOCK_NAME, RUN_OWNER_NAME

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
    after_first_epoch = parameters(interrupted.denoiser)
    del interrupted
    resumed = make_resumable_trainer(tmp_path / "resumed", tiny_sd_path, resume_from="latest")
    assert resumed.resume_path == os.path.join(str(tmp_path / "resumed" / "logs"), "checkpoints", "checkpoint_0")
    assert (resumed.first_epoch, resumed.global_step) == (1, 1)
    assert_same_parameters(parameters(resumed.denoiser), after_first_epoch)  # the checkpoint loaded exactly
    resumed.train()

    trainable = {n: p for n, p in parameters(resumed.denoiser).items() if "lora_" in n}
    assert any(not torch.equal(p, after_first_epoch[n]) for n, p in trainable.items())  # epoch 1 trained
    assert_same_parameters(parameters(resumed.denoiser), parameters(straight.denoiser))
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


# ------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints, another configuration, full disks, two runs in one folder
# ------------------------------------------------------------------------------------------------------------------


def two_checkpoints(tmp_path, tiny_sd_path) -> tuple[Path, Path]:
    """``checkpoint_0`` and ``checkpoint_1`` of one run under ``tmp_path / "logs"``."""
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path)
    return Path(trainer.save_checkpoint(0)), Path(trainer.save_checkpoint(1))


def saved_size(checkpoint: Path, name: str) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["files"][name]


def remove_key(checkpoint: Path, key: str) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state[key]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


DAMAGE = {
    "missing-lora": (
        lambda ck: (ck / "pytorch_lora_weights.safetensors").unlink(),
        lambda ck: "pytorch_lora_weights.safetensors (missing)",
    ),
    "empty-optimizer": (
        lambda ck: (ck / "optimizer.bin").write_bytes(b""),
        lambda ck: f"optimizer.bin (0 bytes, saved with {saved_size(ck, 'optimizer.bin')})",
    ),
    "truncated-flow": (
        lambda ck: (ck / "flow/diffusion_pytorch_model.safetensors").write_bytes(
            (ck / "flow/diffusion_pytorch_model.safetensors").read_bytes()[:100]
        ),
        lambda ck: (
            "flow/diffusion_pytorch_model.safetensors (100 bytes, saved with "
            f"{saved_size(ck, 'flow/diffusion_pytorch_model.safetensors')})"
        ),
    ),
    "state-without-epoch": (
        lambda ck: remove_key(ck, "epoch"),
        lambda ck: "trainer_state.json has no integer ['epoch']",
    ),
    "state-not-json": (
        lambda ck: (ck / "trainer_state.json").write_text("{"),
        lambda ck: (
            "trainer_state.json cannot be read (Expecting property name enclosed in double quotes: line 1 "
            "column 2 (char 1))"
        ),
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_names_the_file_and_offers_the_previous_checkpoint(tmp_path, tiny_sd_path, damage):
    first, second = two_checkpoints(tmp_path, tiny_sd_path)
    mutate, problem = DAMAGE[damage]
    expected_problem = problem(second)  # sizes as saved, read before the damage
    mutate(second)
    with pytest.raises(ValueError) as caught:
        make_resumable_trainer(tmp_path, tiny_sd_path, resume_from="latest", num_epochs=3)
    assert str(caught.value) == (
        f"Checkpoint '{second}' is damaged: {expected_problem}. Resume from the previous checkpoint instead: "
        f"resume_from='{first}' (or delete '{second}', after which resume_from='latest' picks that one)."
    )
    # The advice works.
    resumed = make_resumable_trainer(tmp_path, tiny_sd_path, resume_from=str(first), num_epochs=3)
    assert resumed.resume_path == str(first) and resumed.first_epoch == 1


def test_damaged_only_checkpoint_says_that_none_is_left(tmp_path, tiny_sd_path):
    checkpoint = Path(make_resumable_trainer(tmp_path, tiny_sd_path).save_checkpoint(0))
    (checkpoint / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ValueError) as caught:
        make_resumable_trainer(tmp_path, tiny_sd_path, resume_from=str(checkpoint))
    assert str(caught.value) == (
        f"Checkpoint '{checkpoint}' is damaged: optimizer.bin (0 bytes, saved with "
        f"{saved_size(checkpoint, 'optimizer.bin')}). No earlier checkpoint is left in '{checkpoint.parent}': "
        "restore the file, or start a new run (resume_from='')."
    )


def test_file_damaged_without_changing_its_size_fails_at_load_naming_the_checkpoint(tmp_path, tiny_sd_path):
    first, second = two_checkpoints(tmp_path, tiny_sd_path)
    optimizer = second / "optimizer.bin"
    optimizer.write_bytes(bytes(optimizer.stat().st_size))
    with pytest.raises(ValueError) as caught:
        make_resumable_trainer(tmp_path, tiny_sd_path, resume_from="latest", num_epochs=3)
    message = str(caught.value)
    assert message.startswith(f"Checkpoint '{second}' could not be loaded (")
    assert message.endswith(
        f"). If one of its files is damaged: Resume from the previous checkpoint instead: resume_from='{first}' (or "
        f"delete '{second}', after which resume_from='latest' picks that one)."
    )
    assert isinstance(caught.value.__cause__, RuntimeError)  # torch's zip reader, kept as the cause


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1664 vs 1558"),
    ],
    ids=["enospc", "torch-unexpected-pos"],
)
def test_disk_full_during_a_save_says_so_and_removes_the_partial_folder(tmp_path, tiny_sd_path, monkeypatch, failure):
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path)
    previous = trainer.save_checkpoint(0)
    checkpoints = tmp_path / "logs" / "checkpoints"

    def save_part_then_fail(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04")  # what a writer leaves when the disk fills up
        raise failure

    monkeypatch.setattr(torch, "save", save_part_then_fail)
    with pytest.raises(OSError) as caught:
        trainer.save_checkpoint(1)
    final, temporary = checkpoints / "checkpoint_1", checkpoints / "checkpoint_1.tmp"
    assert caught.value.errno == errno.ENOSPC and caught.value.__cause__ is failure
    assert re.fullmatch(
        re.escape(
            f"[Errno {errno.ENOSPC}] Saving checkpoint '{final}' failed: the disk holding '{checkpoints}' is full or "
            f"over its quota ({failure}). The partial folder '{temporary}' was removed ("
        )
        + r"\d+"
        + re.escape(
            f" MiB free now); the newest complete checkpoint, '{previous}', is intact. Free some space (or lower "
            "num_checkpoint_limit, or move logdir to a larger disk), then resume with resume_from='latest'."
        ),
        str(caught.value),
    )
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0"]
    monkeypatch.undo()
    resumed = make_resumable_trainer(tmp_path, tiny_sd_path, resume_from="latest")
    assert resumed.resume_path == previous and resumed.first_epoch == 1


def lora_trainer(folder, model_path, lora_rank=4, **overrides):
    """A resumable trainer on ``model_path`` with a LoRA of ``lora_rank``."""
    settings = dict(num_epochs=2, sample_num_batches_per_epoch=1, save_freq=1)
    settings.update(overrides)
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(model_path), lora_rank=lora_rank)
    prompts = PromptList(PROMPTS, name="shapes", seed=0)
    return GFlowNetDiffusionTrainer(tiny_config(folder, **settings), brightness, prompts, pipeline)


def test_checkpoint_of_another_lora_rank_and_flow_width_names_every_difference_before_loading(tmp_path, tiny_sd_path):
    checkpoint = lora_trainer(tmp_path / "first", tiny_sd_path, lora_rank=8, flow_block_out_channels=[16, 32])
    checkpoint = checkpoint.save_checkpoint(0)
    with pytest.raises(ValueError) as caught:
        lora_trainer(tmp_path / "second", tiny_sd_path, lora_rank=4, resume_from=checkpoint)
    assert str(caught.value) == (
        f"GFlowNetConfig.resume_from='{checkpoint}' ('{checkpoint}') was written with lora_rank=8, lora_alpha=8, "
        "flow_block_out_channels=[16, 32], but this run has lora_rank=4, lora_alpha=4, flow_block_out_channels=[8, "
        "16]: resume with the launch settings, config and pipeline of that run."
    )
    assert not (tmp_path / "second" / "logs").exists()  # refused before the run started writing


def test_checkpoint_of_another_base_model_is_refused(tmp_path, tiny_sd_path):
    other_model = shutil.copytree(tiny_sd_path, tmp_path / "other-model")  # same weights, another model
    checkpoint = lora_trainer(tmp_path / "first", other_model).save_checkpoint(0)
    with pytest.raises(ValueError) as caught:
        lora_trainer(tmp_path / "second", tiny_sd_path, resume_from=checkpoint)
    assert str(caught.value) == (
        f"GFlowNetConfig.resume_from='{checkpoint}' ('{checkpoint}') was written with "
        f"pretrained_model_name='{os.path.realpath(other_model)}', but this run has "
        f"pretrained_model_name='{os.path.realpath(tiny_sd_path)}': resume with the launch settings, config and "
        "pipeline of that run."
    )


RTB = dict(train_objective="rtb", train_log_prob_reduction="sum", train_reward_exp_anneal="none")


@pytest.mark.parametrize(
    "first, second, saved, here",
    [
        ({}, {"train_objective": "ddpo", "train_clip_range": 0.2}, "dag_db", "ddpo"),
        (RTB, {"train_log_prob_reduction": "sum"}, "rtb", "dag_db"),  # used to say "missing ['log_partition']"
        ({"train_log_prob_reduction": "sum"}, RTB, "dag_db", "rtb"),  # used to say "missing ['flow']"
    ],
    ids=["dag_db-as-ddpo", "rtb-as-dag_db", "dag_db-as-rtb"],
)
def test_checkpoint_of_another_objective_is_named_as_such(tmp_path, tiny_sd_path, first, second, saved, here):
    checkpoint = lora_trainer(tmp_path / "first", tiny_sd_path, **first).save_checkpoint(0)
    with pytest.raises(ValueError) as caught:
        lora_trainer(tmp_path / "second", tiny_sd_path, resume_from=checkpoint, **second)
    assert str(caught.value) == (
        f"GFlowNetConfig.resume_from='{checkpoint}' ('{checkpoint}') is a checkpoint of train_objective='{saved}', "
        f"but this run trains train_objective='{here}': a checkpoint resumes only the objective that wrote it. Set "
        f"train_objective='{saved}' to continue that run, or start a new one (resume_from='')."
    )
    assert not (tmp_path / "second").exists()


@pytest.mark.parametrize(
    "first, change, named",
    [
        ({}, {"train_log_prob_reduction": "sum"}, "train_log_prob_reduction='mean'"),
        ({}, {"lora_min_timestep": 500}, "lora_min_timestep=0"),
        ({}, {"train_reward_exp": 20.0, "train_reward_exp_anneal": "none"},
         "train_reward_exp=10.0, train_reward_exp_anneal='linear'"),
        (RTB, {"train_log_z_estimate": "learned"}, "train_log_z_estimate='batch'"),
    ],
    ids=["log-prob-reduction", "lora-min-timestep", "reward-exponent", "rtb-log-z-estimate"],
)  # fmt: skip
def test_a_resume_that_changes_the_target_is_refused_naming_the_settings(tmp_path, tiny_sd_path, first, change, named):
    checkpoint = lora_trainer(tmp_path / "first", tiny_sd_path, **first).save_checkpoint(0)
    with pytest.raises(ValueError) as caught:
        lora_trainer(tmp_path / "second", tiny_sd_path, resume_from=checkpoint, **first, **change)
    here = ", ".join(f"{name}={value!r}" for name, value in change.items())
    display = "RTB" if first else "DAG-DB"
    assert str(caught.value) == (
        f"GFlowNetConfig.resume_from='{checkpoint}' ('{checkpoint}') was trained with {named}, but this run has "
        f"{here}: these settings define what {display} trains towards, so a resume must keep them. Resume with the "
        "saved values, or start a new run (resume_from='')."
    )


def test_a_resume_with_another_seed_or_learning_rate_warns_and_trains_at_the_new_rate(tmp_path, tiny_sd_path):
    checkpoint = lora_trainer(tmp_path, tiny_sd_path).save_checkpoint(0)
    with pytest.warns(UserWarning) as record:
        trainer = lora_trainer(
            tmp_path,
            tiny_sd_path,
            resume_from="latest",
            seed=5,
            train_learning_rate=1e-4,
            train_flow_learning_rate=2e-3,
        )
    messages = [str(w.message) for w in record if "no longer repeats" in str(w.message)]
    assert messages == [
        f"GFlowNetConfig.resume_from='latest': '{checkpoint}' was trained with seed=0, train_learning_rate=0.0003, "
        "train_flow_learning_rate=None; this run goes on with seed=5, train_learning_rate=0.0001, "
        "train_flow_learning_rate=0.002, so it no longer repeats the uninterrupted run."
    ]
    # The optimiser's saved state held the old rates; the resumed run trains at the new ones.
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-4, 2e-3]
    trainer.train()
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [0, 1]


def test_latest_names_a_newest_checkpoint_without_its_state_instead_of_skipping_it(tmp_path, tiny_sd_path):
    trainer = lora_trainer(tmp_path, tiny_sd_path, num_epochs=3)
    older = trainer.save_checkpoint(0)
    newest = Path(trainer.save_checkpoint(1))
    (newest / "trainer_state.json").unlink()
    for resume_from in ("latest", str(newest.parent)):
        with pytest.raises(ValueError) as caught:
            lora_trainer(tmp_path, tiny_sd_path, num_epochs=3, resume_from=resume_from)
        assert str(caught.value) == (
            f"GFlowNetConfig.resume_from={resume_from!r}: the newest checkpoint, '{newest}', has no trainer_state.json "
            f"(it was damaged or is not one this library wrote); resume from the newest complete one, "
            f"resume_from='{older}', or delete '{newest}'."
        )
    resumed = lora_trainer(tmp_path, tiny_sd_path, num_epochs=3, resume_from=older)
    assert resumed.first_epoch == 1


def finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_folder_that_a_live_run_writes_is_refused_naming_its_process_until_it_ends(tmp_path, tiny_sd_path):
    owner = tmp_path / "logs" / RUN_OWNER_NAME
    with another_run_holding(tmp_path / "logs") as other:
        with pytest.raises(RuntimeError) as caught:
            make_resumable_trainer(tmp_path, tiny_sd_path)
        assert str(caught.value) == (
            f"Another run (pid {other.pid} on '{socket.gethostname()}') is writing to '{tmp_path / 'logs'}': two runs "
            "in one folder prune and resume each other's checkpoints. Wait for it to end (its lock ends with its "
            "process), or use another logdir (project_dir)."
        )
        assert json.loads(owner.read_text()) == {"pid": other.pid, "host": socket.gethostname()}
    # The other process was killed, leaving its owner file: the operating system ended its lock.
    make_resumable_trainer(tmp_path, tiny_sd_path)
    assert json.loads(owner.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}


def test_a_lock_left_by_a_finished_run_is_taken_over_and_released_when_training_ends(tmp_path, tiny_sd_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / RUN_LOCK_NAME).write_text("")
    owner = tmp_path / "logs" / RUN_OWNER_NAME
    owner.write_text(json.dumps({"pid": finished_process_id(), "host": socket.gethostname()}))
    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=1)
    assert json.loads(owner.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert not run_lock_is_free(tmp_path / "logs" / RUN_LOCK_NAME)
    trainer.train()
    assert run_lock_is_free(tmp_path / "logs" / RUN_LOCK_NAME) and not owner.exists()
    assert sorted(os.listdir(tmp_path / "logs" / "checkpoints")) == ["checkpoint_0"]


def test_resume_with_no_epoch_left_warns_with_the_epochs(tmp_path, tiny_sd_path):
    first, second = two_checkpoints(tmp_path, tiny_sd_path)
    with pytest.warns(UserWarning) as warned:
        resumed = make_resumable_trainer(tmp_path, tiny_sd_path, resume_from="latest", num_epochs=2)
    messages = [str(w.message) for w in warned if "no epoch left" in str(w.message)]
    assert messages == [
        f"GFlowNetConfig.resume_from='latest': '{second}' was saved after epoch 1, and num_epochs=2 ends there, so "
        "train() has no epoch left to run. Set num_epochs above 2 to train further."
    ]
    resumed.train()
    assert (resumed.first_epoch, resumed.global_step) == (2, 0)  # nothing trained (the checkpoints were empty runs)


def test_new_run_in_a_folder_with_another_runs_checkpoints_warns(tmp_path, tiny_sd_path):
    two_checkpoints(tmp_path, tiny_sd_path)
    folder = tmp_path / "logs" / "checkpoints"
    with pytest.warns(UserWarning) as warned:
        make_resumable_trainer(tmp_path, tiny_sd_path)
    messages = [str(w.message) for w in warned if "already holds checkpoints" in str(w.message)]
    assert messages == [
        f"'{folder}' already holds checkpoints of epochs [0, 1] from an earlier run, and this run does not resume: "
        "pruning keeps the highest epochs of both runs and resume_from='latest' picks the newest of either. Resume "
        "that run (resume_from='latest'), delete its checkpoints, or use another logdir."
    ]


class LinearPipeline:
    """The part of a model family the Checkpointer uses: a denoiser (one linear layer) that the save and load hooks
    write to and read from ``denoiser.pt``, as a family writes its own format."""

    use_lora = False

    def __init__(self):
        self.denoiser = torch.nn.Linear(3, 2)

    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        index = next(i for i, model in enumerate(models) if model is self.denoiser)
        torch.save(models[index].state_dict(), os.path.join(output_dir, "denoiser.pt"))
        weights.pop(index)

    def load_checkpoint(self, models: list, input_dir: str) -> None:
        denoiser = models.pop(next(i for i, model in enumerate(models) if model is self.denoiser))
        denoiser.load_state_dict(torch.load(os.path.join(input_dir, "denoiser.pt")))


def make_checkpointer(tmp_path, **overrides):
    """A Checkpointer of a DDPO run (no objective model) over a linear denoiser trained by AdamW, as accelerate
    prepared them."""
    from accelerate import Accelerator

    from dag_trl.objectives import get_objective_class
    from dag_trl.trainer.checkpointing import Checkpointer

    config = tiny_config(tmp_path, train_objective="ddpo", num_epochs=10, **overrides)
    pipeline = LinearPipeline()
    accelerator = Accelerator(cpu=True)
    denoiser, optimizer = accelerator.prepare(
        pipeline.denoiser, torch.optim.AdamW(pipeline.denoiser.parameters(), lr=0.1)
    )
    checkpointer = Checkpointer(config, accelerator, pipeline, get_objective_class("ddpo")(config), False)
    checkpointer.register_hooks(None, save_weights=lambda folder: None)
    return checkpointer, denoiser, optimizer


def adam_step(denoiser, optimizer) -> None:
    denoiser(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpointer_save_and_load_restore_the_weights_the_optimiser_and_the_progress(tmp_path):
    checkpointer, denoiser, optimizer = make_checkpointer(tmp_path)
    adam_step(denoiser, optimizer)
    progress = {"global_step": 5, "weights_version": 3, "reward_history": [{"reward_mean": 0.25}]}
    path = checkpointer.save(2, progress)
    assert path == checkpointer.path(2) == os.path.join(tmp_path, "logs", "checkpoints", "checkpoint_2")
    saved_weights, saved_moments = parameters(denoiser), optimizer.state_dict()["state"][0]["exp_avg"].clone()

    adam_step(denoiser, optimizer)  # the run goes on, and a resume at a lower learning rate follows
    optimizer.param_groups[0]["lr"] = 0.01
    state = checkpointer.load(path, [optimizer])
    assert_same_parameters(parameters(denoiser), saved_weights)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_moments)
    assert optimizer.param_groups[0]["lr"] == 0.01  # this run's learning rate, not the saved one
    assert {key: state[key] for key in ("epoch", *progress)} == {"epoch": 2, **progress}
    assert state["objective"] == "ddpo" and checkpointer.last_checkpoint() == path


@pytest.mark.parametrize(
    "limit, kept",
    [({"num_checkpoint_limit": 2}, [3, 4]), ({"project_kwargs": {"total_limit": 3}}, [2, 3, 4])],
    ids=["num_checkpoint_limit", "total_limit"],
)
def test_checkpointer_keeps_the_newest_checkpoints_up_to_the_limit(tmp_path, limit, kept):
    checkpointer, _, _ = make_checkpointer(tmp_path, **limit)
    for epoch in (0, 1, 2, 3, 4):
        checkpointer.save(epoch, {"global_step": epoch, "weights_version": epoch})
        newest = list(range(epoch + 1))[-len(kept) :]
        assert [number for number, _ in list_checkpoints(checkpointer.folder)] == newest
    assert newest == kept
