"""The shapes model's tilted target: weights, prompt mix and distances on a table built by hand."""

import json
import math

import numpy as np
import pytest
import torch

from dag_trl.demo.shapes import ShapeSpec, render
from dag_trl.demo.shapes.target import (
    ATTRIBUTES,
    REPEATED_START_BLOCK,
    conditional_target_distance,
    decode_repeated_start_table,
    encode_repeated_start_table,
    image_attributes,
    repeated_start_prompts,
    target_distance,
    target_figures,
)


def hand_table() -> dict:
    # "a circle": 2 red (reward 1), 2 blue (reward 0); "a square": 1 yellow (1), 3 green (0).
    return {
        "prompts": ["a circle"] * 4 + ["a square"] * 4,
        "reward": [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        "shape_colour": ["red", "red", "blue", "blue", "yellow", "green", "green", "green"],
        "background": ["white"] * 8,
        "shape_kind": ["circle"] * 4 + ["square"] * 4,
    }


def test_target_distance_uses_the_tilted_weights_and_the_evaluated_prompt_mix():
    beta = math.log(3)  # reward 1 is 3 times as likely as reward 0 under the target
    # Target per prompt: circle -> red 3/4, blue 1/4; square -> yellow 3/6, green 3/6. Evaluated mix: 3 circles, 1 square.
    target = {"red": 0.75 * 0.75, "blue": 0.75 * 0.25, "yellow": 0.25 * 0.5, "green": 0.25 * 0.5}
    prompts = ["a circle"] * 3 + ["a square"]
    samples = {"shape_colour": ["red", "red", "red", "yellow"], "background": ["white"] * 4,
               "shape_kind": ["circle", "circle", "circle", "square"]}  # fmt: skip
    observed = {"red": 0.75, "yellow": 0.25}
    colours = ATTRIBUTES["shape_colour"]
    expected = 0.5 * sum(abs(observed.get(c, 0.0) - target.get(c, 0.0)) for c in colours)
    result = target_distance(samples, prompts, hand_table(), beta)
    assert result["shape_colour"]["tv"] == pytest.approx(expected)
    assert result["background"]["tv"] == pytest.approx(0.0) and result["shape_kind"]["tv"] == pytest.approx(0.0)
    assert 0 < result["shape_colour"]["ess"] < 8


def test_prompts_without_base_samples_are_refused():
    with pytest.raises(ValueError, match=r"prompts \['a triangle'\] have no base samples"):
        target_distance({name: ["none"] for name in ATTRIBUTES}, ["a triangle"], hand_table(), 1.0)


def test_image_attributes_of_rendered_shapes():
    specs = [
        ShapeSpec("triangle", "red", "blue", 16.0, 16.0, 9.0),
        ShapeSpec("circle", "yellow", "white", 15.0, 17.0, 8.0),
    ]
    images = torch.from_numpy(np.stack([render(spec) for spec in specs])).permute(0, 3, 1, 2).float() / 255
    assert image_attributes(images) == {
        "shape_colour": ["red", "yellow"],
        "background": ["blue", "white"],
        "shape_kind": ["triangle", "circle"],
    }


# ------------------------------------------------------------------------------------------------------------------
# A damaged base-sample table fails when it is read, before training (issue 20, bad case 2)
# ------------------------------------------------------------------------------------------------------------------


def write_table(folder, content: str):
    from dag_trl.demo.shapes.target import table_path

    path = table_path(20, 1.0, 5.0, folder)
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda table: table.pop("reward"), "it has no list under ['reward']"),
        (lambda table: table["shape_colour"].pop(),
         "its lists differ in length (prompts: 8, reward: 8, shape_colour: 7, background: 8, shape_kind: 8)"),
        (lambda table: table["reward"].__setitem__(2, "high"), "its rewards are not all finite numbers"),
        (lambda table: table["background"].__setitem__(0, "mauve"),
         "its background values ['mauve'] are not among ['red', 'yellow', 'green', 'cyan', 'blue', 'magenta', "
         "'white']"),
    ],
)  # fmt: skip
def test_a_damaged_base_sample_table_is_refused_naming_the_file_and_the_problem(tmp_path, damage, problem):
    import json

    from dag_trl.demo.shapes.target import TABLE_ADVICE, load_table

    table = hand_table()
    damage(table)
    path = write_table(tmp_path, json.dumps(table))
    with pytest.raises(ValueError) as caught:
        load_table(20, 1.0, 5.0, tmp_path)
    assert str(caught.value) == f"The shapes base-sample table {str(path)!r} is damaged: {problem}. {TABLE_ADVICE}"


def test_a_truncated_base_sample_table_names_the_file(tmp_path):
    from dag_trl.demo.shapes.target import TABLE_ADVICE, load_table

    path = write_table(tmp_path, '{"prompts": ["a circle", ')  # cut off after 25 characters
    with pytest.raises(ValueError) as caught:
        load_table(20, 1.0, 5.0, tmp_path)
    assert str(caught.value) == (
        f"The shapes base-sample table {str(path)!r} cannot be read (Expecting value: line 1 column 26 (char 25)). "
        f"{TABLE_ADVICE}"
    )


def test_the_trainers_evaluation_hook_reads_and_checks_the_table_when_it_is_built(tmp_path, monkeypatch):
    # The CLI builds this hook with the trainer, before training; the report after training reads the same table.
    import json

    from dag_trl.demo.shapes import target

    assert target.tilted_target_hook(20, 1.0, 5.0, 1.0) is not None  # the shipped table passes the checks
    table = hand_table()
    table["prompts"].pop()
    write_table(tmp_path, json.dumps(table))
    monkeypatch.setattr(target, "TABLE_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"is damaged: its lists differ in length \(prompts: 7, reward: 8"):
        target.tilted_target_hook(20, 1.0, 5.0, 1.0)
    good = write_table(tmp_path, json.dumps(hand_table()))
    assert target.load_table(20, 1.0, 5.0) == json.loads(good.read_text())


def hand_repeated_table() -> dict:
    # Two starts per prompt, K = 2 continuations each; reward 1: red circle / yellow square, reward 0: blue / green.
    rewards = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    colours = np.array([["red", "blue"], ["blue", "blue"], ["yellow", "yellow"], ["green", "green"]], dtype=object)
    return {
        "settings": {"num_continuations": 2},
        "prompts": ["a circle", "a circle", "a square", "a square"],
        "reward": rewards,
        "shape_colour": colours,
        "background": np.full((4, 2), "white", dtype=object),
        "shape_kind": np.array([["circle"] * 2] * 2 + [["square"] * 2] * 2, dtype=object),
    }


def test_conditional_target_distance_and_the_target_figures_of_hand_tables():
    beta = math.log(3)
    # Jackknife per start at K = 2: (1, 0) rewards weigh (1, 0) (see tests/test_evaluation.py), equal rewards
    # (1/2, 1/2). Circle: red 1/2, blue 1/2; square: yellow 1/2, green 1/2; with 3 circles to 1 square the target is
    # red 3/8, blue 3/8, yellow 1/8, green 1/8, and the samples (red 3/4, yellow 1/4) are 1/2 away in TV.
    prompts = ["a circle"] * 3 + ["a square"]
    samples = {"shape_colour": ["red", "red", "red", "yellow"], "background": ["white"] * 4,
               "shape_kind": ["circle", "circle", "circle", "square"]}  # fmt: skip
    result = conditional_target_distance(samples, prompts, hand_repeated_table(), beta)
    assert result["shape_colour"]["tv"] == pytest.approx(0.5) and result["background"]["tv"] == pytest.approx(0.0)
    assert result["shape_kind"]["tv"] == pytest.approx(0.0) and result["shape_colour"]["noise"] > 0
    figures = target_figures(hand_table(), hand_repeated_table(), prompts, beta)
    # Marginal (hand_table): circle 2 x 3 / (2 x 3 + 2) = 3/4, square 3 / (3 + 3) = 1/2, mixed 3 : 1.
    assert figures["marginal"]["reward"] == pytest.approx(0.75 * 0.75 + 0.25 * 0.5)
    assert figures["conditional"]["reward"] == pytest.approx(0.5) and figures["conditional"]["continuations"] == 2
    # Memory: circle between 1/8 - (1/4) / 2 = 0, within 1/4; square between 1/2, within 0: (0 + 1/2) / (1/4 + 1/2).
    assert figures["memory"]["base"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"prompts \['a triangle'\] have no base samples"):
        conditional_target_distance(samples, ["a triangle"] * 4, hand_repeated_table(), beta)


def test_the_repeated_start_table_round_trips_through_its_compact_form():
    rng = np.random.default_rng(0)
    count = REPEATED_START_BLOCK * 2
    block = {"block": 0, "reward": rng.random(count).tolist()}
    block.update({name: list(rng.choice(values, size=count)) for name, values in ATTRIBUTES.items()})
    stored = json.loads(json.dumps(encode_repeated_start_table({"num_continuations": 2, "seed": 0}, [block])))
    table = decode_repeated_start_table(stored)
    assert table["prompts"] == repeated_start_prompts(0, REPEATED_START_BLOCK) and table["reward"].shape == (16, 2)
    np.testing.assert_allclose(table["reward"].reshape(-1), block["reward"], atol=5e-7)
    for name in ATTRIBUTES:
        assert table[name].reshape(-1).tolist() == block[name]
    stored["reward"] = stored["reward"][:-1]
    with pytest.raises(ValueError, match=r"'reward' has 31 entries: expected 16 starts x 2 continuations = 32"):
        decode_repeated_start_table(stored)
    stored["start"][1] = 1
    with pytest.raises(ValueError, match=r"'start' is not 2 consecutive samples per start for its 16 prompts"):
        decode_repeated_start_table(stored)
