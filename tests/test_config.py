"""GFlowNetConfig: DDPO-compatible fields, paper defaults, and clear errors for bad values."""

import dataclasses
import re

import pytest
from transformers import HfArgumentParser

from dag_trl import GFlowNetConfig

DDPO_FIELDS = [
    "sample_num_steps", "sample_eta", "sample_guidance_scale", "sample_batch_size", "sample_num_batches_per_epoch",
    "train_batch_size", "train_learning_rate", "train_gradient_accumulation_steps", "train_max_grad_norm",
    "train_num_inner_epochs", "train_cfg", "train_adv_clip_max", "train_clip_range", "train_timestep_fraction",
    "mixed_precision", "allow_tf32", "seed", "num_epochs", "log_with", "tracker_kwargs", "tracker_project_name",
    "logdir", "save_freq", "num_checkpoint_limit", "resume_from", "async_reward_computation", "max_workers",
    "negative_prompts", "push_to_hub", "accelerator_kwargs", "project_kwargs", "train_use_8bit_adam",
    "train_adam_beta1", "train_adam_beta2", "train_adam_weight_decay", "train_adam_epsilon", "exp_name", "run_name",
    "per_prompt_stat_tracking", "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count",
]  # fmt: skip


def test_keeps_ddpo_field_names_and_documents_every_field():
    names = {f.name for f in dataclasses.fields(GFlowNetConfig)}
    assert set(DDPO_FIELDS) <= names
    doc = GFlowNetConfig.__doc__
    undocumented = [name for name in names if not re.search(rf"^\s+{name} \(", doc, re.MULTILINE)]
    assert undocumented == []


def test_ddpo_settings_a_ported_script_passes_are_accepted_and_the_unused_one_says_so():
    # TRL's example DDPO script turns per-prompt statistics on; DAG has no use for them.
    with pytest.warns(
        UserWarning, match=r"per_prompt_stat_tracking=True is ignored with train_objective='dag_db': only DDPO"
    ):
        config = GFlowNetConfig(per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=32)
    assert config.per_prompt_stat_tracking_buffer_size == 32
    with pytest.raises(ValueError, match=r"per_prompt_stat_tracking_min_count=0 is invalid: expected an integer >= 1"):
        GFlowNetConfig(per_prompt_stat_tracking_min_count=0)


def test_defaults_are_the_papers_settings():
    config = GFlowNetConfig()
    assert (config.sample_batch_size, config.sample_num_batches_per_epoch, config.sample_num_steps) == (16, 4, 50)
    assert (config.train_batch_size, config.train_gradient_accumulation_steps) == (8, 4)
    assert config.train_learning_rate == 3e-4 and config.flow_learning_rate == 3e-4
    assert config.train_reward_exp == 100.0 and config.train_reward_exp_anneal == "linear"
    assert config.train_unet_reg == 1.0 and config.objective_name == "dag_db"
    assert config.sample_eta == 1.0 and config.sample_guidance_scale == 5.0
    assert config.train_log_prob_reduction == "mean" and config.mixed_precision == "bf16"
    assert GFlowNetConfig(train_flow_learning_rate=1e-3).flow_learning_rate == 1e-3


def test_hf_argument_parser_reads_command_line():
    (config,) = HfArgumentParser(GFlowNetConfig).parse_args_into_dataclasses(
        ["--train_klpf", "0.5", "--flow_block_out_channels", "32", "64", "--train_cfg", "false", "--num_epochs", "3"]
    )
    assert config.objective_name == "dag_kl" and config.train_klpf == 0.5
    assert config.flow_block_out_channels == [32, 64]
    assert config.train_cfg is False and config.num_epochs == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sample_eta": 0.0}, r"GFlowNetConfig.sample_eta=0.0 is invalid: expected a number in \(0, 1\]"),
        ({"sample_eta": 1.5}, r"GFlowNetConfig.sample_eta=1.5 is invalid: expected a number in \(0, 1\]"),
        ({"train_timestep_fraction": 0.0}, r"train_timestep_fraction=0.0 is invalid: expected a number in \(0, 1\]"),
        ({"train_timestep_fraction": 1.5}, r"train_timestep_fraction=1.5 is invalid: expected a number in \(0, 1\]"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8' is invalid: expected one of 'no', 'fp16', 'bf16'"),
        ({"train_reward_exp_anneal": "cosine"}, "train_reward_exp_anneal='cosine' is invalid: expected one of"),
        ({"train_log_prob_reduction": "max"}, "train_log_prob_reduction='max' is invalid: expected one of 'mean'"),
        ({"train_reward_exp": -1.0}, "train_reward_exp=-1.0 is invalid: expected a number >= 0"),
        ({"train_klpf": 1.0, "train_batch_size": 1, "sample_batch_size": 4, "train_gradient_accumulation_steps": 1},
         "train_batch_size=1 is invalid: expected at least 2 with DAG-KL"),
        ({"sample_batch_size": 3, "sample_num_batches_per_epoch": 2},
         r"3 \* 2 = 6 trajectories per epoch must be a multiple of train_batch_size \* "
         r"train_gradient_accumulation_steps = 8 \* 4 = 32"),
        ({"log_with": "neptune"}, "log_with='neptune' is invalid"),
        ({"sample_num_steps": 0}, "sample_num_steps=0 is invalid: expected an integer >= 1"),
        ({"flow_block_out_channels": [60, 64], "flow_attention_heads": 8}, "divisible by flow_attention_heads=8"),
        ({"accelerator_kwargs": {"gradient_accumulation_steps": 2, "cpu": True}},
         r"accelerator_kwargs sets \['gradient_accumulation_steps'\], which the trainer derives from other fields"),
    ],
)  # fmt: skip
def test_invalid_values_name_field_value_and_accepted(overrides, message):
    with pytest.raises(ValueError, match=message):
        GFlowNetConfig(**overrides)


def test_backward_passes_per_step_counts_batches_times_kept_timesteps():
    config = GFlowNetConfig(sample_num_steps=50, train_timestep_fraction=0.5, train_gradient_accumulation_steps=4)
    assert config.num_train_timesteps == 25
    assert config.backward_passes_per_step == 100
    # A fraction that keeps less than one timestep still trains on one.
    assert GFlowNetConfig(sample_num_steps=4, train_timestep_fraction=0.1).num_train_timesteps == 1


def test_docs_config_reference_lists_every_field():
    from pathlib import Path

    reference = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = [f.name for f in dataclasses.fields(GFlowNetConfig) if f"| `{f.name}` |" not in reference]
    assert missing == []


@pytest.mark.parametrize(
    "objective, klpf, message",
    [
        ("dag_kl", -1.0, r"train_objective='dag_kl' conflicts with train_klpf=-1.0: DAG-KL needs a positive"),
        ("dag_db", 0.5, r"train_objective='dag_db' conflicts with train_klpf=0.5: a positive train_klpf is DAG-KL"),
    ],
)
def test_an_explicit_objective_that_conflicts_with_train_klpf_names_both_fields(objective, klpf, message):
    with pytest.raises(ValueError, match=message):
        GFlowNetConfig(train_objective=objective, train_klpf=klpf)


def test_train_objective_defaults_to_the_train_klpf_rule():
    assert GFlowNetConfig(train_klpf=0.5).objective_name == "dag_kl"
    assert GFlowNetConfig(train_klpf=0.0).objective_name == "dag_db"
    assert GFlowNetConfig(train_objective="dag_kl", train_klpf=0.5).objective_name == "dag_kl"
    assert GFlowNetConfig(train_objective="ddpo").objective_name == "ddpo"
