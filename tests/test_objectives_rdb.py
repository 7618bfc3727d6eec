"""Relative detailed balance (``train_objective="rdb"``): its refusals and what it does not read. Its gradient is
tested against the straightforward loop in ``tests/test_trainer.py`` (``test_optimised_window_equals_the_...``) and
its target in the closed-form toy (``tests/test_gaussian_toy.py``)."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, brightness, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.prompts import PromptList

RDB_SETTINGS = dict(train_objective="rdb", train_log_prob_reduction="sum", train_reward_exp_anneal="none")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_log_prob_reduction": "mean"}, r"train_log_prob_reduction='mean' is invalid with train_objective='rdb'"),
        ({"train_reward_exp_anneal": "linear"}, r"train_reward_exp_anneal='linear' is invalid with train_objective="),
        ({"train_cfg": False}, r"train_cfg=False with sample_guidance_scale=5.0 is invalid with train_objective='rdb'"),
    ],
)  # fmt: skip
def test_rdb_refuses_settings_that_change_its_target(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **{**RDB_SETTINGS, **overrides})


def test_rdb_does_not_read_train_klpf_and_says_so_instead_of_refusing_it(tmp_path):
    # DAG-DB refuses a positive train_klpf (it would mean DAG-KL); relative DB reads none.
    with pytest.warns(UserWarning, match=r"train_klpf=1.0, which train_objective='rdb' does not read"):
        config = tiny_config(tmp_path, **RDB_SETTINGS, train_klpf=1.0)
    assert config.objective_name == "rdb"


def test_rdb_refuses_a_full_fine_tune(tmp_path, tiny_sd_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=False)
    config = GFlowNetConfig(**{**RDB_SETTINGS, "logdir": str(tmp_path / "logs")})
    with pytest.raises(ValueError, match=r"train_objective='rdb' needs a pipeline with use_lora=True"):
        GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="letters", seed=0), pipeline)
