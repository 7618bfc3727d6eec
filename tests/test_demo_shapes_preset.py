"""The shapes model's ``dag-trl train`` preset (:mod:`dag_trl.demo.shapes.preset`): the tilted targets in the
evaluations and the summary, and their printed lines."""

import math

import numpy as np
import pytest
import torch
from test_demo_shapes_target import hand_repeated_table, hand_table

from dag_trl.cli import format_summary, parse_arguments
from dag_trl.demo.shapes import ShapeSpec, render
from dag_trl.demo.shapes import preset as shapes_preset
from dag_trl.demo.shapes import target as shapes_target


def test_the_evaluations_and_the_summary_carry_both_tilted_targets_and_the_memory_figure(monkeypatch):
    for module in (shapes_preset, shapes_target):
        monkeypatch.setattr(module, "load_table", lambda *settings: hand_table())
        monkeypatch.setattr(module, "load_repeated_start_table", lambda *settings: hand_repeated_table())
    _, config = parse_arguments(["--train_objective", "rtb", "--train_reward_exp", str(math.log(3))])
    prompts = ["a circle"] * 3 + ["a square"]
    specs = [ShapeSpec("circle", "red", "white", 16.0, 16.0, 8.0)] * 3 + [
        ShapeSpec("square", "yellow", "white", 16.0, 16.0, 8.0)
    ]
    images = torch.from_numpy(np.stack([render(spec) for spec in specs])).permute(0, 3, 1, 2).float() / 255
    hook = shapes_preset.evaluation_hook(config)  # the trainer's evaluation hook, also run on before and after
    before = {"images": images, "rewards": torch.ones(4), **hook(images, prompts, [], torch.ones(4))}
    after = {**before}
    target = shapes_preset.target_summary(config, prompts)
    # The hand tables' figures (tests/test_demo_shapes_target.py): marginal 0.6875, conditional 0.5, memory 2/3;
    # the samples are 1/2 from the conditional tilt's colours, and 3/4 of them red.
    assert target["marginal"]["reward"] == pytest.approx(0.6875) and target["conditional"]["reward"] == pytest.approx(
        0.5
    )
    assert target["memory"]["base"] == pytest.approx(2 / 3) and "what this objective converges to" in target["note"]
    assert after["conditional_target_tv"]["shape_colour"] == pytest.approx(0.5) and "target_tv" in after
    assert after["colour"] == {"red": 0.75, "yellow": 0.25}
    summary = {
        "algorithm": "RTB", "pretrained_model": "builtin:shapes", "epochs": 2, "reward": "r", "prompts": "p",
        "target": target, "before": {**before, "reward_mean": 0.25, "reward_std": 0.1, "diversity": None},
        "after": {**after, "reward_mean": 0.75, "reward_std": 0.2, "diversity": None, "prior_kernel_distance": 0.0},
    }  # fmt: skip
    text = format_summary(summary)
    assert "reward of the tilted targets (beta 1.09861): marginal tilt 0.688 (+-" in text
    assert ", conditional tilt 0.500 (+-" in text
    assert (
        "memory (share of the reward's variance within a prompt that the start x_T explains), base sampler: 0.667"
        in text
    )
    assert "TV from the conditional tilt after: shape_colour 0.500 (noise " in text
    summary["before"]["memory"] = {"memory": 0.16, "memory_se": 0.02, "starts": 48, "continuations": 8}
    summary["after"]["memory"] = {"memory": 0.25, "memory_se": 0.03, "starts": 48, "continuations": 8}
    assert "the start x_T explains): 0.160 -> 0.250 (48 starts x 8)" in format_summary(summary)


def test_no_target_where_the_evaluation_prompts_are_not_the_tables(monkeypatch):
    monkeypatch.setattr(shapes_preset, "load_table", lambda *settings: hand_table())
    _, config = parse_arguments([])
    assert shapes_preset.target_summary(config, ["a circle", "a red circle on a blue background"]) is None
