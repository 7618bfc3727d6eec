"""Closed-form checks of the evaluation measures in ``dag_trl.evaluation``."""

import math

import numpy as np
import pytest
import torch

from dag_trl.evaluation import (
    distribution,
    diversity,
    effective_sample_size,
    kernel_distance,
    mean_pairwise_distance,
    pixel_features,
    reward_statistics,
    target_total_variation,
    tilted_weights,
    total_variation,
)


def test_reward_statistics_of_0_to_100():
    statistics = reward_statistics(torch.arange(101, dtype=torch.float32))
    assert statistics["mean"] == 50.0 and statistics["q05"] == 5.0 and statistics["q50"] == 50.0
    assert statistics["q95"] == 95.0 and statistics["std"] == pytest.approx(
        math.sqrt((101**2 - 1) / 12 * 101 / 100)
    )  # unbiased


def test_pixel_features_average_areas():
    images = torch.zeros(1, 3, 4, 4)
    images[0, 0, :2, :2] = 1.0  # the top-left quarter of the red channel
    features = pixel_features(images, size=2)
    assert features.shape == (1, 12) and features[0].tolist()[:4] == [1.0, 0.0, 0.0, 0.0] and features.sum() == 1


def test_pairwise_distance_and_per_prompt_diversity():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Pairs: 4 sides of length 1 and 2 diagonals of length sqrt 2.
    assert mean_pairwise_distance(square) == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    features = torch.tensor([[0.0], [2.0], [5.0], [5.0], [9.0]])
    # "a": |0 - 2| = 2; "b": identical samples, 0; "c" has one sample and is left out.
    assert diversity(features, ["a", "a", "b", "b", "c"]) == pytest.approx(1.0)
    assert diversity(features[:2], ["a", "b"]) is None  # no prompt was sampled twice


def test_kernel_distance_is_the_unbiased_mmd_of_the_cubic_kernel():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])

    def k(x, y):
        return (float(np.dot(x, y)) / 2 + 1) ** 3

    a_np, b_np = a.numpy(), b.numpy()
    within_a = (k(a_np[0], a_np[1]) + k(a_np[1], a_np[0])) / 2
    within_b = sum(k(b_np[i], b_np[j]) for i in range(3) for j in range(3) if i != j) / 6
    across = sum(k(x, y) for x in a_np for y in b_np) / 6
    assert kernel_distance(a, b) == pytest.approx(within_a + within_b - 2 * across)
    same = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    shifted = torch.randn(400, 4, generator=torch.Generator().manual_seed(1))
    assert abs(kernel_distance(same, shifted)) < 0.05 < kernel_distance(same, shifted + 1.0)


def test_distribution_and_total_variation():
    p = distribution(["red", "red", "blue", "green"], ["red", "blue", "green", "yellow"])
    assert p.tolist() == [0.5, 0.25, 0.25, 0.0]
    weighted = distribution(["red", "blue"], ["red", "blue"], np.array([3.0, 1.0]))
    assert weighted.tolist() == [0.75, 0.25]
    assert total_variation(p, np.array([0.0, 0.25, 0.25, 0.5])) == 0.5
    with pytest.raises(ValueError, match=r"labels \['pink'\] are not among the categories"):
        distribution(["pink"], ["red"])


def test_tilted_weights_normalise_per_prompt_and_keep_each_prompts_share():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    weights = tilted_weights(rewards, ["a", "a", "a", "b", "b"], beta=math.log(4))
    # Prompt "a": odds 4 : 1 : 1 over its 3 samples; prompt "b": equal rewards, equal weights.
    np.testing.assert_allclose(weights, [3 * 4 / 6, 3 / 6, 3 / 6, 1.0, 1.0])
    assert effective_sample_size(np.ones(10)) == 10 and effective_sample_size(np.array([1.0, 0.0])) == 1


def test_target_total_variation_of_a_model_that_matches_the_target_is_within_noise():
    rng = np.random.default_rng(0)
    colours = ["red", "yellow", "blue"]
    base = list(rng.choice(colours, size=2000, p=[0.25, 0.15, 0.6]))
    rewards = np.array([1.0 if colour in ("red", "yellow") else 0.0 for colour in base])
    weights = tilted_weights(rewards, ["p"] * len(base), beta=3.0)
    # The tilted target: red 0.25 e^3 / Z, yellow 0.15 e^3 / Z, blue 0.6 / Z.
    z = 0.4 * math.exp(3) + 0.6
    exact = np.array([0.25 * math.exp(3), 0.15 * math.exp(3), 0.6]) / z
    matching = list(rng.choice(colours, size=500, p=exact))
    result = target_total_variation(matching, base, weights, colours, num_bootstrap=100)
    assert result["tv"] < 2 * result["noise"] < 0.1
    collapsed = target_total_variation(["red"] * 500, base, weights, colours, num_bootstrap=20)
    assert collapsed["tv"] == pytest.approx(1 - distribution(base, colours, weights)[0])
    assert 0 < result["ess"] < len(base)
