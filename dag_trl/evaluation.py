"""What training reached, in numbers: reward statistics, diversity, the distance from the pretrained model's samples,
and the distance of attribute distributions from a reweighted (tilted) target.

Every function is pure (tensors or arrays in, numbers out) so that the CLI, the study script and any user's evaluation
compute the same figures. Image features are pluggable: :func:`pixel_features` (downsampled pixels) needs no model; a CLIP or
DINO image tower gives features closer to perception (pass any ``images -> (B, F)`` callable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def reward_statistics(rewards: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation and the 5/25/50/75/95 % quantiles of a batch of rewards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    statistics = {"mean": rewards.mean().item(), "std": rewards.std().item() if rewards.numel() > 1 else 0.0}
    values = torch.quantile(rewards, torch.tensor(QUANTILES, dtype=torch.float64))
    statistics.update({f"q{round(q * 100):02d}": value.item() for q, value in zip(QUANTILES, values, strict=True)})
    return statistics


def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1], area-averaged to ``size x size`` and flattened: ``(B, 3 * size^2)``."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), size)
    return pooled.reshape(images.shape[0], -1)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of the rows of ``features``."""
    if features.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples, got {features.shape[0]}.")
    distances = torch.pdist(features.double())
    return distances.mean().item()


def diversity(features: torch.Tensor, prompts: Sequence[str]) -> Optional[float]:
    """Per-prompt diversity: the mean pairwise feature distance among each prompt's samples, averaged over the prompts
    that have at least two samples (weighted equally); ``None`` when no prompt has two samples."""
    by_prompt: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(index)
    values = [mean_pairwise_distance(features[rows]) for rows in by_prompt.values() if len(rows) >= 2]
    return float(np.mean(values)) if values else None


def kernel_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    r"""Kernel distance (KID; Bińkowski et al., 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared
    maximum mean discrepancy with the cubic polynomial kernel :math:`k(x, y) = (x^\top y / d + 1)^3`,

    .. math:: \frac{1}{m(m-1)}\sum_{i \ne j} k(a_i, a_j) + \frac{1}{n(n-1)}\sum_{i \ne j} k(b_i, b_j)
              - \frac{2}{mn}\sum_{i, j} k(a_i, b_j).

    Zero in expectation when both sets come from one distribution (it can then be slightly negative); unlike a
    Fréchet distance it is unbiased and well conditioned at a few hundred samples.
    """
    a, b = features_a.double(), features_b.double()
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"kernel_distance needs at least 2 samples per set, got {m} and {n}.")

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / d + 1) ** 3

    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
    return (within_a + within_b - 2 * k_ab.mean()).item()


def distribution(labels: Sequence[str], categories: Sequence[str], weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) frequency of each of ``categories`` among ``labels``, as an array that sums to 1."""
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    index = {category: i for i, category in enumerate(categories)}
    unknown = sorted({label for label in labels} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the categories {list(categories)}.")
    totals = np.zeros(len(categories))
    np.add.at(totals, [index[label] for label in labels], weights)
    return totals / totals.sum()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    r"""Total-variation distance :math:`\frac12 \sum_k |p_k - q_k|` of two distributions over the same categories."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def tilted_weights(rewards: np.ndarray, groups: Sequence[str], beta: float) -> np.ndarray:
    r"""Self-normalised importance weights of base-model samples for the tilted target
    :math:`p_{\text{base}}(x \mid c)\, e^{\beta R(x)}`: :math:`w_i = e^{\beta R_i} / \sum_{j \in c(i)} e^{\beta R_j}`
    within each prompt ``c`` (``groups``), scaled so that each prompt keeps its share of the samples."""
    rewards = np.asarray(rewards, dtype=np.float64)
    groups_array = np.asarray(groups, dtype=object)
    weights = np.empty_like(rewards)
    for group in dict.fromkeys(groups):
        mask = groups_array == group
        logits = beta * rewards[mask]
        unnormalised = np.exp(logits - logits.max())
        weights[mask] = mask.sum() * unnormalised / unnormalised.sum()
    return weights


def effective_sample_size(weights: np.ndarray) -> float:
    r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2` of importance weights."""
    weights = np.asarray(weights, dtype=np.float64)
    return float(weights.sum() ** 2 / (weights**2).sum())


def target_total_variation(
    labels: Sequence[str],
    base_labels: Sequence[str],
    base_weights: np.ndarray,
    categories: Sequence[str],
    num_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """TV distance between the attribute distribution of ``labels`` (the fine-tuned model's samples) and the
    ``base_weights``-weighted distribution of ``base_labels`` (the target), with the sampling noise beside it.

    ``noise`` is the TV a perfect model would show at these sample sizes: the mean, over weighted bootstrap rounds,
    of the TV between a sample of ``len(labels)`` drawn from the target and the target re-estimated from the base
    samples resampled with replacement (the weights' effective sample size ``ess`` is often well under the number
    of base samples, so the target is itself uncertain). Returns ``{"tv", "noise", "ess"}``.
    """
    base_weights = np.asarray(base_weights, dtype=np.float64)
    base_array = np.asarray(base_labels, dtype=object)
    target = distribution(base_labels, categories, base_weights)
    rng = np.random.default_rng(seed)
    noise = []
    for _ in range(num_bootstrap):
        resampled = rng.integers(0, len(base_array), size=len(base_array))
        bootstrap_target = distribution(base_array[resampled], categories, base_weights[resampled])
        perfect_model = rng.choice(len(base_array), size=len(labels), p=base_weights / base_weights.sum())
        noise.append(total_variation(distribution(base_array[perfect_model], categories), bootstrap_target))
    return {
        "tv": total_variation(distribution(labels, categories), target),
        "noise": float(np.mean(noise)),
        "ess": effective_sample_size(base_weights),
    }
