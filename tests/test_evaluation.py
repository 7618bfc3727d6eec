"""Closed-form checks of the evaluation measures in ``dag_trl.evaluation``."""

import math

import numpy as np
import pytest
import torch

from dag_trl.evaluation import (
    bootstrap_starts,
    conditional_tilt_weights,
    distribution,
    diversity,
    effective_sample_size,
    kernel_distance,
    mean_pairwise_cosine_distance,
    mean_pairwise_distance,
    pixel_features,
    reward_statistics,
    sample_repeated_starts,
    start_memory,
    start_target_total_variation,
    start_tilt_estimate,
    start_tilt_weights,
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


def test_kernel_distance_of_hand_computed_sets():
    # d = 1, k(x, y) = (x y + 1)^3. a = {0, 1}: k(0, 1) = 1. b = {0, 2}: k(0, 2) = 1. Across: k(0, 0) = k(0, 2) =
    # k(1, 0) = 1 and k(1, 2) = 27, mean 7.5. MMD^2 = 1 + 1 - 2 * 7.5.
    assert kernel_distance(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])) == -13.0
    # d = 2, k(x, y) = (x.y / 2 + 1)^3. a = {e1, e2}: k = 1. b = {2 e1, 0}: k = 1. Across: k(e1, 2 e1) = 8, the
    # other three 1, mean 11 / 4. MMD^2 = 1 + 1 - 2 * 2.75.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert kernel_distance(a, torch.tensor([[2.0, 0.0], [0.0, 0.0]])) == -3.5
    # b = {e1, e1}: within b (3/2)^3 = 3.375, across (3.375 + 1 + 3.375 + 1) / 4 = 2.1875: MMD^2 = 0.
    assert kernel_distance(a, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == 0.0


def test_cosine_distance_of_orthogonal_identical_opposite_and_known_angles():
    assert mean_pairwise_cosine_distance(torch.eye(3)) == pytest.approx(1.0, abs=1e-15)  # orthogonal unit vectors
    same_direction = torch.tensor([[1.0, 2.0, 2.0], [2.0, 4.0, 4.0], [0.5, 1.0, 1.0]])
    assert mean_pairwise_cosine_distance(same_direction) == pytest.approx(0.0, abs=1e-15)  # the norm does not count
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(2.0, abs=1e-15)
    # Unit vectors at 0, 60 and 120 degrees: pairs at 60 (1 - 1/2), 60 and 120 (1 + 1/2) degrees.
    angles = torch.tensor([0.0, math.pi / 3, 2 * math.pi / 3], dtype=torch.float64)
    at_angles = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert mean_pairwise_cosine_distance(at_angles) == pytest.approx((0.5 + 0.5 + 1.5) / 3, abs=1e-15)
    with pytest.raises(ValueError, match=r"^mean_pairwise_cosine_distance got zero feature rows \[1\]: the cosine "):
        mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"^mean_pairwise_cosine_distance needs at least 2 samples, got 1\.$"):
        mean_pairwise_cosine_distance(torch.ones(1, 2))


def test_cosine_diversity_averages_the_prompts_mean_cosine_distances():
    features = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0], [2.0, 2.0], [3.0, 0.0]])
    # "a": orthogonal, 1; "b": one direction, 0; "c" has one sample and is left out.
    assert diversity(features, ["a", "a", "b", "b", "c"], distance="cosine") == pytest.approx(0.5, abs=1e-15)
    # Euclidean on the same rows: |(1, -5)| = sqrt 26 and |(1, 1)| = sqrt 2.
    assert diversity(features, ["a", "a", "b", "b", "c"]) == pytest.approx((math.sqrt(26) + math.sqrt(2)) / 2)
    with pytest.raises(ValueError, match=r"^distance='l1' is invalid: expected one of \['cosine', 'euclidean'\]\.$"):
        diversity(features, ["a"] * 5, distance="l1")


def test_pixel_diversity_is_the_mean_euclidean_pdist_bit_for_bit():
    # The published shapes figures: diversity on pixel features is the mean of torch.pdist in float64, unchanged.
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    features, prompts = pixel_features(images), ["a", "b", "a", "b", "a", "b"]
    expected = [torch.pdist(features[rows].double()).mean().item() for rows in ([0, 2, 4], [1, 3, 5])]
    assert diversity(features, prompts) == float(np.mean(expected))


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


# Repeated starts: the memory figure and the conditional tilt.


def test_start_memory_of_a_hand_table_and_prompt_offsets_do_not_count():
    # Starts with rewards (0, 2) and (4, 6): within-start variance 2 each; start means 1 and 5 vary by 8, of which
    # 2 / K = 1 is the continuations' noise: between = 7, memory = 7 / 9. A second prompt 100 higher: the same.
    table = np.array([[0.0, 2.0], [4.0, 6.0], [100.0, 102.0], [104.0, 106.0]])
    result = start_memory(table, ["a", "a", "b", "b"], num_bootstrap=0)
    assert result["within"] == pytest.approx(2.0) and result["between"] == pytest.approx(7.0)
    assert result["memory"] == pytest.approx(7 / 9) and result["memory_se"] == 0.0
    with pytest.raises(ValueError, match=r"at least 2 starts per prompt; got \{'b': 1\}"):
        start_memory(table[:3], ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"rewards has shape \(4,\): expected \(M, K\)"):
        start_memory(table[:, 0], ["a", "a", "b", "b"])


def test_start_memory_is_unbiased_for_few_continuations():
    # R = a_m + e_mk, Var a = 1, Var e = 4, K = 2: Var E[R | x_T] = 1 while the start means vary by 1 + 4 / 2 = 3.
    rng = np.random.default_rng(0)
    between, within = [], []
    for _ in range(400):
        table = rng.normal(0, 1, size=(40, 1)) + rng.normal(0, 2, size=(40, 2))
        result = start_memory(table, ["p"] * 40, num_bootstrap=0)
        between.append(result["between"])
        within.append(result["within"])
    # Standard errors of these means: about 0.04 and 0.05.
    assert np.mean(between) == pytest.approx(1.0, abs=0.15) and np.mean(within) == pytest.approx(4.0, abs=0.2)


def test_start_memory_bootstrap_error_matches_the_spread_over_tables():
    rng = np.random.default_rng(1)

    def table():
        return rng.normal(0, 1, size=(60, 1)) + rng.normal(0, 1, size=(60, 4))

    spread = np.std([start_memory(table(), ["p"] * 60, num_bootstrap=0)["memory"] for _ in range(300)])
    errors = [start_memory(table(), ["p"] * 60, num_bootstrap=200, seed=i)["memory_se"] for i in range(8)]
    assert np.mean(errors) == pytest.approx(spread, rel=0.3)


def test_bootstrap_starts_keep_each_prompts_count():
    groups = ["a", "b", "a", "b", "b"]
    for rows in bootstrap_starts(groups, 20, seed=3):
        assert sorted(np.asarray(groups)[rows].tolist()) == sorted(groups)


def test_conditional_tilt_weights_of_two_continuations():
    # beta = log 3: a reward-1 sample is 3 times as likely. Plain (3/4, 1/4); without either continuation the other
    # takes all the weight, so the jackknife gives 2 (3/4, 1/4) - 1/2 ((1, 0) + (0, 1)) = (1, 0).
    rewards = np.array([[1.0, 0.0]])
    np.testing.assert_allclose(conditional_tilt_weights(rewards, math.log(3), jackknife=False), [[0.75, 0.25]])
    np.testing.assert_allclose(conditional_tilt_weights(rewards, math.log(3)), [[1.0, 0.0]], atol=1e-12)


def test_jackknife_weights_are_the_jackknife_of_the_self_normalised_estimate():
    rng = np.random.default_rng(2)
    rewards, values, beta = rng.random((5, 7)), rng.normal(size=(5, 7)), 2.5

    def estimate(r, f):
        w = np.exp(beta * r)
        return (w * f).sum() / w.sum()

    for m in range(5):
        keep = [np.arange(7) != j for j in range(7)]
        jackknife = 7 * estimate(rewards[m], values[m]) - 6 / 7 * sum(
            estimate(rewards[m][k], values[m][k]) for k in keep
        )
        weights = conditional_tilt_weights(rewards, beta)[m]
        assert (weights * values[m]).sum() == pytest.approx(jackknife) and weights.sum() == pytest.approx(1.0)
    # Any beta: reward gaps of 500 nats are computed in log space, not as inf / inf. Plain (1, 0, 0); without the
    # first sample the third takes it all: 3 (1, 0, 0) - 2/3 ((0, 0, 1) + 2 (1, 0, 0)) = (5/3, 0, -2/3).
    extreme = conditional_tilt_weights(np.array([[1.0, 0.0, 0.5]]), 1000.0)
    np.testing.assert_allclose(extreme, [[5 / 3, 0.0, -2 / 3]], atol=1e-12)


def test_jackknife_removes_the_first_order_self_normalisation_bias():
    # One start, K continuations with Bernoulli(q) rewards: the conditional tilt's P(R = 1) is
    # q e^beta / (q e^beta + 1 - q); the expected estimates are exact sums over the number n of reward-1 samples.
    # The plain estimate's bias falls as 1/K, the jackknife's as 1/K^2 (faster than 4x from K = 16 to 32).
    q, beta = 0.4, 3.0
    exact = q * math.exp(beta) / (q * math.exp(beta) + 1 - q)

    def bias(count: int, jackknife: bool) -> float:
        total = 0.0
        for n in range(count + 1):
            rewards = np.array([[1.0] * n + [0.0] * (count - n)])
            share = (conditional_tilt_weights(rewards, beta, jackknife) * rewards).sum()
            total += math.comb(count, n) * q**n * (1 - q) ** (count - n) * share
        return total - exact

    plain, corrected = {k: bias(k, False) for k in (16, 32)}, {k: bias(k, True) for k in (16, 32)}
    assert plain[16] < -0.01 and 1.8 < plain[16] / plain[32] < 2.5
    assert abs(corrected[16]) < abs(plain[16]) / 2 and abs(corrected[16] / corrected[32]) > 4


def two_kinds_of_start(starts_per_kind: int = 10):
    # Prompt "a": starts whose 4 continuations have rewards (1, 1, 1, 0) (q = 3/4) and (1, 0, 0, 0) (q = 1/4),
    # labelled red for reward 1 and blue for 0; prompt "b": rewards 0.
    rewards = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]] * starts_per_kind + [[0.0] * 4] * 4)
    groups = ["a"] * (2 * starts_per_kind) + ["b"] * 4
    labels = np.where(rewards == 1.0, "red", "blue")
    return rewards, groups, labels


def test_conditional_and_marginal_tilts_of_two_kinds_of_start():
    rewards, groups, labels = two_kinds_of_start()
    beta, shares = math.log(2), {"a": 1.0}
    # Conditional: each start tilted on its own, 3 e / (3 e + 1) and e / (e + 3) with e = 2, averaged.
    conditional = 0.5 * (6 / 7) + 0.5 * (2 / 5)
    # Marginal: the prompt's samples tilted together, q = 1/2: e / (e + 1).
    marginal = 2 / 3
    result = start_tilt_estimate(
        rewards, groups, beta, "conditional", {"colour": labels}, {"colour": ["red", "blue"]}, shares,
        jackknife=False, num_bootstrap=400,
    )  # fmt: skip
    assert result["reward"] == pytest.approx(conditional) and result["distribution"]["colour"]["red"] == pytest.approx(
        conditional
    )
    # The estimate averages 20 per-start values, half 6/7 and half 2/5: standard error sqrt(0.2286^2 / 20).
    assert result["reward_se"] == pytest.approx(0.2286 / math.sqrt(20), rel=0.2)
    marginal_result = start_tilt_estimate(rewards, groups, beta, "marginal", group_shares=shares, num_bootstrap=0)
    assert marginal_result["reward"] == pytest.approx(marginal) and marginal_result["reward_se"] == 0.0
    # Prompt "b" (reward 0) with three times the share of "a" quarters both.
    mixed = start_tilt_weights(rewards, groups, beta, "conditional", jackknife=False, group_shares={"a": 1, "b": 3})
    assert (mixed * rewards).sum() == pytest.approx(conditional / 4) and mixed.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"target='joint' is invalid: expected one of \('conditional', 'marginal'\)"):
        start_tilt_weights(rewards, groups, beta, "joint")
    with pytest.raises(ValueError, match=r"group_shares names prompts \['c'\] that have no starts"):
        start_tilt_weights(rewards, groups, beta, group_shares={"c": 1.0})


def test_start_target_total_variation_against_the_conditional_tilt():
    rewards, groups, labels = two_kinds_of_start(starts_per_kind=50)
    beta, shares = math.log(2), {"a": 1.0}
    red = 0.5 * (6 / 7) + 0.5 * (2 / 5)
    result = start_target_total_variation(
        ["red"] * 5 + ["blue"] * 5, labels, rewards, groups, beta, ["red", "blue"], group_shares=shares,
        jackknife=False,
    )  # fmt: skip
    assert result["tv"] == pytest.approx(abs(0.5 - red)) and 0 < result["noise"] < 0.5
    rng = np.random.default_rng(4)
    perfect = list(rng.choice(["red", "blue"], size=2000, p=[red, 1 - red]))
    matching = start_target_total_variation(
        perfect, labels, rewards, groups, beta, ["red", "blue"], group_shares=shares, jackknife=False
    )
    assert matching["tv"] < 3 * matching["noise"] < 0.1


@pytest.mark.filterwarnings("ignore:DAG-DB trains detailed balance")  # the sampler, not the objective, is tested
def test_sample_repeated_starts_share_the_start_and_not_the_later_noise(tmp_path, tiny_sd_path):
    from conftest import PROMPTS, brightness, tiny_config

    from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
    from dag_trl.prompts import PromptList

    def trainer(eta):
        pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
        config = tiny_config(tmp_path, sample_eta=eta)
        return GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, seed=0), pipeline)

    prompts = PROMPTS[:3]
    samples = sample_repeated_starts(trainer(1.0), prompts, num_continuations=4, seed=5)
    assert samples.images.shape[0] == 12 and samples.rewards.shape == (3, 4) and samples.prompts == prompts
    np.testing.assert_allclose(
        samples.rewards.reshape(-1), brightness(samples.images, None, None)[0].numpy(), rtol=1e-6
    )
    per_start = samples.images.reshape(3, 4, -1)
    assert (per_start[:, 1:] - per_start[:, :1]).abs().amax() > 1e-3  # fresh noise after the start
    # With almost no noise after the start, the continuations of a start coincide and the starts still differ.
    quiet = sample_repeated_starts(trainer(1e-3), prompts, num_continuations=4, seed=5).images.reshape(3, 4, -1)
    within = (quiet[:, 1:] - quiet[:, :1]).abs().amax()
    across = (quiet[1:, 0] - quiet[:1, 0]).abs().amax()
    assert within < 0.01 * across
    again = sample_repeated_starts(trainer(1.0), prompts, num_continuations=4, seed=5)
    torch.testing.assert_close(again.images, samples.images, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"num_continuations=1 is invalid: expected an integer >= 2"):
        sample_repeated_starts(trainer(1.0), prompts, num_continuations=1, seed=5)
