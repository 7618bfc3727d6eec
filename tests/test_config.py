"""GFlowNetConfig: DDPO-compatible fields, paper defaults, and clear errors for bad values."""

import dataclasses
import math
import re
import warnings
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from dag_trl import GFlowNetConfig
from dag_trl.config import FIELD_RULES
from dag_trl.objectives.losses import reward_exponent

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
        ({"train_reward_exp": -1.0}, "train_reward_exp=-1.0 is invalid: expected a finite number >= 0"),
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


# ------------------------------------------------------------------------------------------------------------------
# Every field type- and range-checked at construction (issue 12, bad case 3)
# ------------------------------------------------------------------------------------------------------------------


def test_every_field_has_a_type_and_range_rule():
    assert list(FIELD_RULES) == list(ACCEPTED) == [f.name for f in dataclasses.fields(GFlowNetConfig)]


# What each field accepts, as its error message says it: written out here, not read from the config's own table.
BOOL = "True or False"
AT_LEAST_ONE = "an integer >= 1"
POSITIVE = "a finite number > 0"
NON_NEGATIVE = "a finite number >= 0"
NON_EMPTY = "a non-empty string"
SEED = "an integer in [0, 18446744073709551615]"  # 2**64 - 1, the largest seed torch.manual_seed takes
ACCEPTED = {
    "exp_name": NON_EMPTY,
    "run_name": "a string",
    "seed": SEED,
    "log_with": (
        "one of None, 'wandb', 'tensorboard', 'trackio', 'comet_ml', 'mlflow', 'aim', 'clearml', 'dvclive', "
        "'swanlab', 'all'"
    ),
    "tracker_kwargs": "a dict of tracker init arguments by tracker name",
    "accelerator_kwargs": "a dict of Accelerator arguments",
    "project_kwargs": "a dict of ProjectConfiguration arguments",
    "tracker_project_name": NON_EMPTY,
    "logdir": "a non-empty folder path (str or os.PathLike)",
    "num_epochs": AT_LEAST_ONE,
    "save_freq": AT_LEAST_ONE,
    "num_checkpoint_limit": AT_LEAST_ONE,
    "eval_freq": "an integer >= 0 (0: never)",
    "eval_num_samples": "an integer >= 2 (the distance from the pretrained model's samples compares sets of at least 2 "
    "images)",
    "eval_seed": SEED,
    "eval_features": "one of 'pixels', 'clip', 'dino', 'dreamsim', or 'clip:<model id or folder>' or "
    "'dino:<model id or folder>'",
    "mixed_precision": "one of 'no', 'fp16', 'bf16'",
    "allow_tf32": BOOL,
    "resume_from": "a folder path (str or os.PathLike)",
    "push_to_hub": BOOL,
    "hub_model_id": "a non-empty string, or None to push to exp_name in the user's namespace",
    "negative_prompts": "a string",
    "sample_num_steps": AT_LEAST_ONE,
    "sample_eta": (
        "a number in (0, 1] (with eta = 0 DDIM is deterministic and has no log-probability; above 1 its mean is "
        "undefined at some steps)"
    ),
    "sample_guidance_scale": "a finite number",
    "sample_batch_size": AT_LEAST_ONE,
    "sample_num_batches_per_epoch": AT_LEAST_ONE,
    "async_reward_computation": BOOL,
    "max_workers": AT_LEAST_ONE,
    "train_batch_size": AT_LEAST_ONE,
    "train_use_8bit_adam": BOOL,
    "train_learning_rate": POSITIVE,
    "train_flow_learning_rate": "a finite number > 0, or None to use train_learning_rate",
    "train_adam_beta1": "a number in [0, 1)",
    "train_adam_beta2": "a number in [0, 1)",
    "train_adam_weight_decay": NON_NEGATIVE,
    "train_adam_epsilon": POSITIVE,
    "train_gradient_accumulation_steps": AT_LEAST_ONE,
    "train_max_grad_norm": POSITIVE,
    "train_num_inner_epochs": AT_LEAST_ONE,
    "train_cfg": BOOL,
    "train_adv_clip_max": POSITIVE,
    "train_clip_range": POSITIVE,
    "train_timestep_fraction": "a number in (0, 1]",
    "train_transition_order": "one of 'by_timestep', 'random'",
    "train_reward_exp": NON_NEGATIVE,
    "train_reward_exp_anneal": "one of 'linear', 'none'",
    "train_unet_reg": NON_NEGATIVE,
    "train_log_z_learning_rate": POSITIVE,
    "train_log_z_estimate": "one of 'batch', 'learned'",
    "train_objective": "a non-empty string, or None to pick by train_klpf",
    "lora_min_timestep": "an integer >= 0",
    "train_klpf": "a finite number (<= 0: DAG-DB, > 0: DAG-KL)",
    "train_log_prob_reduction": "one of 'mean', 'sum'",
    "train_gradient_checkpointing": BOOL,
    "train_decode_batch_size": "an integer >= 1, or None to use train_batch_size",
    "flow_block_out_channels": "a non-empty list of positive integers",
    "flow_layers_per_block": AT_LEAST_ONE,
    "flow_attention_heads": AT_LEAST_ONE,
    "flow_time_embedding_dim": AT_LEAST_ONE,
    "per_prompt_stat_tracking": BOOL,
    "per_prompt_stat_tracking_buffer_size": AT_LEAST_ONE,
    "per_prompt_stat_tracking_min_count": AT_LEAST_ONE,
}

# Values of the wrong type for each annotation: a string or bool for a number, a float or bool for an integer, and
# so on; YAML's `flow_block_out_channels: 32` gives an int for the list.
WRONG_TYPES = {
    "float": ["3e-4", True, None, [1.0]],
    "Optional[float]": ["3e-4", True, [1.0]],
    "int": [True, 2.0, "4", None],
    "Optional[int]": [True, 2.0, "4"],
    "bool": ["yes", 1, None],
    "str": [1, None, ["a"]],
    "Optional[str]": [1, False, ["a"]],
    "dict[str, Any]": ["{}", None, []],
    "list[int]": [32, [], [True], [8, 16.0], "8 16"],
}
# resume_from=None means "no resume" (the empty default), as scripts pass it.
WRONG_TYPE_CASES = [
    (f.name, value)
    for f in dataclasses.fields(GFlowNetConfig)
    for value in WRONG_TYPES[f.type]
    if (f.name, value) != ("resume_from", None)
]


@pytest.mark.parametrize("name, value", WRONG_TYPE_CASES, ids=[f"{n}={v!r}" for n, v in WRONG_TYPE_CASES])
def test_a_value_of_the_wrong_type_names_the_field_and_what_is_accepted(name, value):
    with pytest.raises(ValueError) as caught:
        GFlowNetConfig(**{name: value})
    assert str(caught.value) == f"GFlowNetConfig.{name}={value!r} is invalid: expected {ACCEPTED[name]}."


FLOAT_FIELDS = [f.name for f in dataclasses.fields(GFlowNetConfig) if f.type in ("float", "Optional[float]")]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_must_be_finite(name, value):
    with pytest.raises(ValueError, match=rf"^GFlowNetConfig\.{name}={value!r} is invalid: expected a "):
        GFlowNetConfig(**{name: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_learning_rate": math.inf}, "train_learning_rate=inf is invalid: expected a finite number > 0."),
        ({"train_learning_rate": "3e-4"}, "train_learning_rate='3e-4' is invalid: expected a finite number > 0."),
        ({"train_reward_exp": math.inf}, "train_reward_exp=inf is invalid: expected a finite number >= 0."),
        ({"train_unet_reg": math.inf}, "train_unet_reg=inf is invalid: expected a finite number >= 0."),
        ({"train_klpf": math.inf},
         "train_klpf=inf is invalid: expected a finite number (<= 0: DAG-DB, > 0: DAG-KL)."),
        ({"train_klpf": math.nan},
         "train_klpf=nan is invalid: expected a finite number (<= 0: DAG-DB, > 0: DAG-KL)."),
        ({"train_adam_weight_decay": math.inf},
         "train_adam_weight_decay=inf is invalid: expected a finite number >= 0."),
        ({"train_adam_weight_decay": math.nan},
         "train_adam_weight_decay=nan is invalid: expected a finite number >= 0."),
        ({"train_adam_weight_decay": -0.1},
         "train_adam_weight_decay=-0.1 is invalid: expected a finite number >= 0."),
        ({"train_log_z_learning_rate": math.inf},
         "train_log_z_learning_rate=inf is invalid: expected a finite number > 0."),
        ({"train_flow_learning_rate": math.inf},
         "train_flow_learning_rate=inf is invalid: expected a finite number > 0, or None to use train_learning_rate."),
        ({"train_adam_beta1": math.nan}, "train_adam_beta1=nan is invalid: expected a number in [0, 1)."),
        ({"train_adam_beta2": 1.0}, "train_adam_beta2=1.0 is invalid: expected a number in [0, 1)."),
        ({"train_adam_epsilon": 0.0}, "train_adam_epsilon=0.0 is invalid: expected a finite number > 0."),
        ({"train_max_grad_norm": math.inf}, "train_max_grad_norm=inf is invalid: expected a finite number > 0."),
        ({"sample_guidance_scale": math.nan}, "sample_guidance_scale=nan is invalid: expected a finite number."),
        ({"sample_eta": math.nan}, "sample_eta=nan is invalid: expected a number in (0, 1] (with eta = 0 DDIM is "
         "deterministic and has no log-probability; above 1 its mean is undefined at some steps)."),
        ({"seed": -1}, "seed=-1 is invalid: expected an integer in [0, 18446744073709551615]."),
        ({"seed": math.nan}, "seed=nan is invalid: expected an integer in [0, 18446744073709551615]."),
        ({"seed": 2**64}, "seed=18446744073709551616 is invalid: expected an integer in [0, 18446744073709551615]."),
        ({"eval_seed": -1}, "eval_seed=-1 is invalid: expected an integer in [0, 18446744073709551615]."),
        ({"eval_freq": -1}, "eval_freq=-1 is invalid: expected an integer >= 0 (0: never)."),
        *[
            ({"eval_features": value}, f"eval_features={value!r} is invalid: expected one of 'pixels', 'clip', "
             "'dino', 'dreamsim', or 'clip:<model id or folder>' or 'dino:<model id or folder>'.")
            for value in ("CLIP", "pixels:8", "dreamsim:ensemble", "dino:", 1)
        ],
        ({"eval_num_samples": 1}, "eval_num_samples=1 is invalid: expected an integer >= 2 (the distance from the "
         "pretrained model's samples compares sets of at least 2 images)."),
        ({"num_epochs": True}, "num_epochs=True is invalid: expected an integer >= 1."),
        ({"train_decode_batch_size": 0},
         "train_decode_batch_size=0 is invalid: expected an integer >= 1, or None to use train_batch_size."),
        ({"flow_block_out_channels": 32}, "flow_block_out_channels=32 is invalid: expected a non-empty list of "
         "positive integers."),
        ({"train_cfg": "false"}, "train_cfg='false' is invalid: expected True or False."),
        ({"mixed_precision": True}, "mixed_precision=True is invalid: expected one of 'no', 'fp16', 'bf16'."),
        ({"logdir": ""}, "logdir='' is invalid: expected a non-empty folder path (str or os.PathLike)."),
        ({"hub_model_id": ""}, "hub_model_id='' is invalid: expected a non-empty string, or None to push to "
         "exp_name in the user's namespace."),
    ],
)  # fmt: skip
def test_values_that_led_to_nan_or_python_errors_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError) as caught:
        GFlowNetConfig(**overrides)
    assert str(caught.value) == "GFlowNetConfig." + message


def test_eval_features_takes_a_name_and_for_towers_a_model_after_a_colon():
    from dag_trl.config import split_eval_features

    assert split_eval_features("pixels") == ("pixels", None)
    assert split_eval_features("clip:openai/clip-vit-base-patch32") == ("clip", "openai/clip-vit-base-patch32")
    assert split_eval_features("dino:C:/models/dinov2") == ("dino", "C:/models/dinov2")  # a colon in the path too
    assert GFlowNetConfig().eval_features == "pixels"
    assert GFlowNetConfig(eval_features="dino:facebook/dinov2-small").eval_features == "dino:facebook/dinov2-small"


def test_integer_values_are_accepted_for_float_fields_and_paths_become_strings():
    config = GFlowNetConfig(train_learning_rate=1, sample_guidance_scale=-5, train_adam_weight_decay=0)
    assert (config.train_learning_rate, config.sample_guidance_scale) == (1, -5)
    config = GFlowNetConfig(logdir=Path("runs") / "a", resume_from=Path("runs") / "a" / "checkpoint_0")
    assert (config.logdir, config.resume_from) == (str(Path("runs/a")), str(Path("runs/a/checkpoint_0")))


def test_yaml_mixed_precision_no_read_as_false_means_no(tmp_path):
    from trl import TrlParser

    assert GFlowNetConfig(mixed_precision=False).mixed_precision == "no"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("mixed_precision: no\nnum_epochs: 2\n")
    (config,) = TrlParser((GFlowNetConfig,)).parse_args_and_config(["--config", str(recipe)])
    assert config.mixed_precision == "no" and config.num_epochs == 2


# ------------------------------------------------------------------------------------------------------------------
# The reward-exponent anneal (issue 12, weak case)
# ------------------------------------------------------------------------------------------------------------------


def config_warnings(**overrides) -> list[str]:
    """The messages of the warnings that ``GFlowNetConfig(**overrides)`` gives (at least one)."""
    with pytest.warns(UserWarning) as record:
        GFlowNetConfig(**overrides)
    return [str(w.message) for w in record]


def test_linear_anneal_over_a_single_epoch_warns_that_beta_stays_zero():
    # reward_exponent is 0 at epoch 0 only: with one epoch that is the whole run, with two the last is at full beta.
    assert reward_exponent(0, 1, 100.0, "linear") == 0.0
    assert reward_exponent(1, 2, 100.0, "linear") == 100.0
    assert config_warnings(num_epochs=1) == [
        "GFlowNetConfig.train_reward_exp_anneal='linear' with num_epochs=1 trains the only epoch at beta = 0, "
        "ignoring the reward: the linear anneal gives epoch e (counted from 0) the exponent "
        "train_reward_exp * min(1, e / (num_epochs / 2)), and train_reward_exp=100.0 is first reached at epoch "
        "num_epochs / 2. Set train_reward_exp_anneal='none' or num_epochs >= 2."
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_epochs": 2},
        {"num_epochs": 1, "train_reward_exp_anneal": "none"},
        {"num_epochs": 1, "train_reward_exp": 0.0},
        {"num_epochs": 1, "train_objective": "ddpo"},  # DDPO does not read beta
    ],
)
def test_anneal_is_silent_when_some_epoch_trains_at_the_set_beta(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GFlowNetConfig(**overrides)


def test_resume_from_none_means_no_resume():
    assert GFlowNetConfig(resume_from=None).resume_from == ""


# ------------------------------------------------------------------------------------------------------------------
# Settings that cannot work are refused, settings that do nothing are named (issue 20)
# ------------------------------------------------------------------------------------------------------------------


def test_settings_that_only_other_objectives_read_are_named_with_their_readers():
    assert config_warnings(train_log_z_learning_rate=0.5, train_log_z_estimate="learned", train_clip_range=0.2) == [
        "GFlowNetConfig sets train_clip_range=0.2, train_log_z_learning_rate=0.5, train_log_z_estimate='learned', "
        "which train_objective='dag_db' does not read: train_clip_range is read by ['dag_kl', 'ddpo']; "
        "train_log_z_learning_rate is read by ['rtb']; train_log_z_estimate is read by ['rtb']. Remove them, or "
        "choose the objective that reads them."
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each objective's own settings, and the defaults of the others', are silent
        GFlowNetConfig(train_objective="ddpo", train_clip_range=0.2, per_prompt_stat_tracking_min_count=8)
        GFlowNetConfig(train_klpf=0.5, train_clip_range=0.2, train_unet_reg=0.5)


def test_ddpo_statistics_that_could_never_start_are_refused():
    with pytest.raises(ValueError) as caught:
        GFlowNetConfig(
            train_objective="ddpo",
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=4,
            per_prompt_stat_tracking_min_count=32,
        )
    assert str(caught.value) == (
        "GFlowNetConfig.per_prompt_stat_tracking_min_count=32 is invalid with per_prompt_stat_tracking_buffer_size=4: "
        "a prompt's buffer never holds more than 4 rewards, so per-prompt statistics would never start; expected an "
        "integer in [1, 4]."
    )
    GFlowNetConfig(train_objective="ddpo", per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=16)


def test_guidance_far_above_any_models_use_warns_with_the_limit():
    assert config_warnings(sample_guidance_scale=1e6) == [
        "GFlowNetConfig.sample_guidance_scale=1000000.0 is far outside the scales models are sampled at (about 1 to "
        "15; this warning starts above 50): the guided noise prediction extrapolates far past the conditional one, "
        "and samples are typically saturated noise. Did you mean a value such as 7.5?"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GFlowNetConfig(sample_guidance_scale=50.0)
        GFlowNetConfig(sample_guidance_scale=-5)
