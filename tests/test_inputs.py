"""Tests of dag_trl.trainer.inputs: what user reward and prompt functions return is checked, and every error or
warning names the function, the prompts, the epoch and what is accepted (issue #12's input cases)."""

from __future__ import annotations

import functools
import types
import warnings

import numpy as np
import pytest
import torch

from dag_trl.trainer.inputs import (
    LOG_SPACE_LIMIT_NATS,
    callable_name,
    check_prompts,
    check_reward_scale,
    validate_reward_output,
    validate_rewards,
)
from dag_trl.trainer.trainer import GFlowNetDiffusionTrainer, WorkCounters

CPU = torch.device("cpu")
PROMPTS = ["p0", "p1", "p2", "p3"]


def aesthetic(images, prompts, metadata):
    """A reward function with DDPO's most common mistake: it returns only the rewards."""
    return torch.ones(len(prompts))


# ------------------------------------------------------------------------------------------------------------------
# The (rewards, metadata) contract
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "found"),
    [
        (torch.ones(4), r"a Tensor of shape \(4,\)"),
        (np.ones(4), r"a ndarray of shape \(4,\)"),
        ([0.1, 0.2, 0.3, 0.4], "a list of 4 items"),
        (0.5, "a float"),
    ],
)
def test_rewards_without_metadata_name_the_function_and_the_contract(output, found):
    with pytest.raises(TypeError) as raised:
        validate_reward_output(output, aesthetic, PROMPTS, epoch=2, device=CPU)
    assert raised.match(
        f"^reward function 'aesthetic' returned {found} at epoch 2: rewards are returned as a \\(rewards, metadata\\) "
        r"tuple, e.g. `return rewards, \{\}`\.$"
    )


def test_two_bare_rewards_are_not_taken_for_a_pair():
    # With two images, `rewards, info = reward_fn(...)` would silently split a bare reward list in two.
    with pytest.raises(TypeError, match=r"'aesthetic' returned metadata of type float at epoch 0: expected a dict"):
        validate_reward_output([0.1, 0.2], aesthetic, ["a", "b"], epoch=0, device=CPU)


def test_a_pair_is_validated_and_none_metadata_becomes_a_dict():
    rewards, info = validate_reward_output(([1, 2.5], None), aesthetic, ["a", "b"], epoch=0, device=CPU)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 2.5] and info == {}
    _, info = validate_reward_output((torch.zeros(2), {"k": 1}), aesthetic, ["a", "b"], epoch=0, device=CPU)
    assert info == {"k": 1}


def test_callable_names_for_functions_partials_and_reward_objects():
    class Scorer:
        def __call__(self, images, prompts, metadata):
            return torch.zeros(len(prompts)), {}

    assert callable_name(aesthetic) == "aesthetic"
    assert callable_name(functools.partial(aesthetic, metadata=None)) == "aesthetic"
    assert callable_name(Scorer()) == "Scorer"


def test_trainer_compute_rewards_reports_a_bare_tensor_by_function_name():
    # The trainer's own unpacking goes through the check (no "too many values to unpack"); only the attributes
    # compute_rewards uses are set, so no pipeline is built.
    trainer = types.SimpleNamespace(
        counters=WorkCounters(), reward_fn=aesthetic, accelerator=types.SimpleNamespace(device=CPU)
    )
    images = torch.rand(3, 3, 4, 4)
    with pytest.raises(TypeError, match=r"^reward function 'aesthetic' returned a Tensor of shape \(3,\) at epoch 5"):
        GFlowNetDiffusionTrainer.compute_rewards(trainer, images, ["a", "b", "c"], [{}, {}, {}], 5)
    trainer.reward_fn = lambda images, prompts, metadata: (torch.arange(3.0), {"n": 3})
    rewards, info = GFlowNetDiffusionTrainer.compute_rewards(trainer, images, ["a", "b", "c"], [{}, {}, {}], 5)
    assert rewards.tolist() == [0.0, 1.0, 2.0] and info == {"n": 3}


# ------------------------------------------------------------------------------------------------------------------
# Reward values
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "found"),
    [
        # numpy would parse these strings as numbers.
        (["0.5", "1", "2", "3"], r"str \['0.5', '1', '2', '3'\] for prompt\(s\) \['p0', 'p1', 'p2', 'p3'\]"),
        (np.array(["0.5", "1", "2", "3"]), r"str \['0.5', '1', '2', '3'\] for prompt\(s\) \['p0', 'p1', 'p2', 'p3'\]"),
        # numpy would turn None into NaN, and bools into 0 and 1.
        ([1.0, None, 2.0, None], r"None for prompt\(s\) \['p1', 'p3'\]"),
        ([True, 1.0, 2.0, 3.0], r"bool \[True\] for prompt\(s\) \['p0'\]"),
        ([None, "x", 1.0, 2.0], r"None and str \['x'\] for prompt\(s\) \['p0', 'p1'\]"),
    ],
)
def test_non_numbers_are_rejected_naming_their_type_and_prompts(rewards, found):
    with pytest.raises(ValueError) as raised:
        validate_rewards(rewards, PROMPTS, epoch=1, device=CPU, name="reward function 'score'")
    assert raised.match(
        f"^reward function 'score' returned {found} at epoch 1: "
        r"expected a tensor, array or list of 4 numbers \(one per prompt\); return the rewards as floats\.$"
    )
    assert "NaN" not in str(raised.value)


@pytest.mark.parametrize(
    ("rewards", "shown"),
    [
        ([0.0, 1e308, 1.0, 2.0], r"1e\+308"),
        (torch.tensor([0.0, 1e308, 1.0, 2.0], dtype=torch.float64), r"1e\+308"),
        (np.array([0.0, -1e39, 1.0, 2.0]), r"-1e\+39"),
        # Beyond float64 too: numpy would raise a bare OverflowError.
        ([0, 10**400, 1, 2], "~1e400"),
    ],
)
def test_rewards_beyond_float32_get_a_named_error_like_nan(rewards, shown):
    with pytest.raises(ValueError) as raised:
        validate_rewards(rewards, PROMPTS, epoch=1, device=CPU, name="reward function 'score'")
    assert raised.match(
        rf"^reward function 'score' returned rewards that overflow float32 at epoch 1 for prompt\(s\) \['p1'\]: "
        rf"{shown} \(float32 overflow\); rewards must be finite numbers within float32's range \(\|reward\| <= "
        r"3.4e\+38\), rescale them\.$"
    )
    with pytest.raises(ValueError, match=r"^reward function 'score' returned NaN or inf at epoch 1 for prompt\(s\)"):
        validate_rewards([0.0, float("nan"), 1.0, 2.0], PROMPTS, epoch=1, device=CPU, name="reward function 'score'")


def test_large_rewards_within_float32_are_kept_exactly():
    values = validate_rewards([3e38, -3e38, 10**30, 0], PROMPTS, epoch=0, device=CPU)
    expected = torch.tensor([3e38, -3e38, 1e30, 0.0], dtype=torch.float32)
    assert values.dtype == torch.float32 and torch.equal(values, expected)


def test_lists_of_scalar_tensors_are_rewards_and_ragged_lists_are_not():
    values = validate_rewards([torch.tensor(1.5), torch.tensor(2)], ["a", "b"], epoch=0, device=CPU)
    assert values.tolist() == [1.5, 2.0]
    with pytest.raises(
        ValueError, match=r"^reward_function returned list \[\[1.0\], \[2.0, 3.0\]\] at epoch 0: expected"
    ):
        validate_rewards([[1.0], [2.0, 3.0]], ["a", "b"], epoch=0, device=CPU)


# ------------------------------------------------------------------------------------------------------------------
# Reward scale against beta
# ------------------------------------------------------------------------------------------------------------------


def test_reward_scale_warns_once_with_the_count_of_batches_past_the_log_space():
    # Spreads per batch: 1, 10 and 9; with beta 10: 10, 100 and 90 nats, two of them above the 80 nat limit.
    rewards = torch.tensor([[0.0, 1.0], [-5.0, 5.0], [2.0, 11.0]])
    with pytest.warns(UserWarning) as record:
        assert check_reward_scale(rewards, beta=2000.0, epoch=3) == 2
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "2 of 3 reward batch(es) at epoch 3 have beta * (max R - min R) above 10000 nats (largest: 2000 * 10 = 2e+04)"
    )


def test_reward_scale_at_the_limit_or_with_beta_zero_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LOG_SPACE_LIMIT_NATS == 1e4
        assert check_reward_scale(torch.tensor([0.0, 10.0]), beta=1000.0) == 0  # exactly 1e4 nats
        assert check_reward_scale(torch.tensor([0.0, 1.0]), beta=100.0) == 0  # DAG's default on a [0, 1] reward
        assert check_reward_scale(torch.tensor([0.0, 1e30]), beta=0.0) == 0  # the annealed first epoch
    with pytest.warns(UserWarning, match=r"^1 of 1 reward batch\(es\) have .*\(largest: 100 \* 1e\+30 = 1e\+32\)"):
        assert check_reward_scale(torch.tensor([0.0, 1e30]), beta=100.0) == 1


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------


def test_empty_and_overlong_prompts_warn_once_with_their_counts():
    prompts = ["a cat", "", "   ", "a very long prompt", "a dog"]
    with pytest.warns(UserWarning) as record:
        assert check_prompts(prompts, token_counts=[4, 2, 2, 90, 77], max_length=77) == (2, 1)
    assert len(record) == 1
    assert str(record[0].message) == (
        "2 of 5 prompts are empty or whitespace only; 1 of 5 prompts are longer than the tokenizer's 77 tokens "
        "(longest 90) and are truncated: ['a very long prompt']."
    )


def test_prompt_checks_are_silent_on_good_prompts_and_need_both_token_arguments():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_prompts(["a cat", "a dog"], token_counts=[4, 77], max_length=77) == (0, 0)
        assert check_prompts(["a cat"]) == (0, 0)
    with pytest.warns(UserWarning, match=r"^1 of 2 prompts are empty or whitespace only\.$"):
        assert check_prompts(["a cat", ""]) == (1, 0)
    with pytest.raises(ValueError, match="needs both token_counts and max_length, or neither"):
        check_prompts(["a cat"], token_counts=[3])
    with pytest.raises(ValueError, match="got 1 token counts for 2 prompts"):
        check_prompts(["a", "b"], token_counts=[3], max_length=77)


def test_rewards_on_the_meta_device_are_named_as_such():
    # torch's own error was "Cannot copy out of meta tensor; no data!", naming neither the function nor the device.
    def meta_reward(images, prompts, metadata):
        return torch.empty(len(prompts), device="meta"), {}

    with pytest.raises(ValueError) as raised:
        validate_reward_output(meta_reward(None, ["a", "b"], None), meta_reward, ["a", "b"], 3, torch.device("cpu"))
    assert str(raised.value) == (
        "reward function 'meta_reward' returned rewards on the 'meta' device at epoch 3: a meta tensor has a shape "
        "but no values (typically from a reward model whose weights were never loaded, e.g. built under "
        "init_empty_weights or with a device_map that offloaded it); return rewards on the CPU or a GPU."
    )
