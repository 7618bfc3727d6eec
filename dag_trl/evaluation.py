"""What training reached, in numbers: reward statistics, diversity, the distance from the pretrained model's samples,
and the distance of attribute distributions from a reweighted (tilted) target.

Two tilted targets can be estimated from base-model samples. The *marginal tilt* ``p(x_0 | c) exp(beta R(x_0)) / Z``
reweights independent samples per prompt (:func:`tilted_weights`). The *conditional tilt*
``p(x_0 | x_T, c) exp(beta R(x_0)) / h(x_T)``, ``h(x_T) = E[exp(beta R) | x_T]``, is what objectives that keep the
start ``x_T ~ N(0, I)`` fixed converge to; it needs several continuations of each start
(:func:`sample_repeated_starts`) and reweights within each start (:func:`conditional_tilt_weights`). The two coincide
when the start does not influence the reward; :func:`start_memory` measures how much it does.

Every function is pure (tensors or arrays in, numbers out) so that the CLI, the study script and any user's evaluation
compute the same figures. Image features are pluggable: :func:`pixel_features` (downsampled pixels) needs no model; a CLIP,
DINOv2 or DreamSim image tower gives features closer to perception (:func:`dag_trl.evaluation_features.feature_extractor`
builds them by name; any ``images -> (B, F)`` callable works). Diversity compares pixels by Euclidean distance and
embeddings by cosine distance (:data:`DIVERSITY_DISTANCES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

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


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float:
    r"""Mean cosine distance over all pairs ``i < j`` of the rows of ``features``,
    :math:`\frac{2}{n(n-1)} \sum_{i<j} \left(1 - \frac{f_i^\top f_j}{\lVert f_i \rVert \lVert f_j \rVert}\right)`:
    0 for identical directions, 1 for orthogonal ones, 2 for opposite ones."""
    count = features.shape[0]
    if count < 2:
        raise ValueError(f"mean_pairwise_cosine_distance needs at least 2 samples, got {count}.")
    features = features.double()
    norms = features.norm(dim=1)
    if (norms == 0).any():
        raise ValueError(
            f"mean_pairwise_cosine_distance got zero feature rows {torch.nonzero(norms == 0).flatten().tolist()}: "
            "the cosine distance of a zero vector is undefined."
        )
    unit = features / norms[:, None]
    upper = torch.triu_indices(count, count, offset=1)
    return (1 - (unit @ unit.T)[upper[0], upper[1]]).mean().item()


# How diversity compares two samples' features: pixels by Euclidean distance (the published shapes figures),
# embeddings (CLIP, DINOv2, DreamSim) by cosine distance, the geometry they are trained in.
DIVERSITY_DISTANCES: dict[str, Callable[[torch.Tensor], float]] = {
    "euclidean": mean_pairwise_distance,
    "cosine": mean_pairwise_cosine_distance,
}


def diversity(features: torch.Tensor, prompts: Sequence[str], distance: str = "euclidean") -> Optional[float]:
    """Per-prompt diversity: the mean pairwise feature distance among each prompt's samples, averaged over the prompts
    that have at least two samples (weighted equally); ``None`` when no prompt has two samples. ``distance`` is
    ``"euclidean"`` (:func:`mean_pairwise_distance`, for pixels) or ``"cosine"`` (:func:`mean_pairwise_cosine_distance`,
    for embeddings)."""
    if distance not in DIVERSITY_DISTANCES:
        raise ValueError(f"distance={distance!r} is invalid: expected one of {sorted(DIVERSITY_DISTANCES)}.")
    pairwise = DIVERSITY_DISTANCES[distance]
    by_prompt: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(index)
    values = [pairwise(features[rows]) for rows in by_prompt.values() if len(rows) >= 2]
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


# ---------------------------------------------------------------------------------------------------------------------
# Repeated starts: M starting noises x K continuations, the memory figure and the conditional tilt.


@dataclass(frozen=True)
class RepeatedStartSamples:
    """``K`` continuations of each of ``M`` starting noises: start ``m``'s samples are rows ``m * K`` to
    ``m * K + K - 1`` of ``images``, its rewards row ``m`` of ``rewards``, its prompt ``prompts[m]``."""

    images: torch.Tensor
    rewards: np.ndarray
    prompts: list[str]


def sample_repeated_starts(
    trainer: Any,
    prompts: Sequence[str],
    num_continuations: int,
    seed: int,
    prior: bool = False,
    reward_fn: Optional[Callable] = None,
    metadata: Optional[Sequence[dict]] = None,
) -> RepeatedStartSamples:
    """Draw one starting noise ``x_T ~ N(0, I)`` per prompt in ``prompts`` (``M`` starts) and ``num_continuations``
    (``K``) trajectories from each: the same ``x_T``, fresh noise in every later step, with the trainer's sampler
    (steps, eta, guidance, negative prompt; ``prior=True``: the pretrained model, the adapter switched off). The
    rewards come from ``reward_fn`` (default the trainer's) with ``metadata`` (one dict per start, default empty).

    ``trainer`` is a :class:`~dag_trl.GFlowNetDiffusionTrainer` or any object with its ``sample_images(prompts,
    seed, prior, initial_latents)``, ``sd_pipeline.initial_latents(batch_size, generator, device)``,
    ``accelerator.device`` and ``reward_fn(images, prompts, metadata) -> (rewards, _)``. The starts and the later
    noise come from two generators seeded from ``seed`` (``numpy.random.SeedSequence``), so the draws depend only on
    ``seed``, ``prompts`` and ``K``. Pass the result to :func:`start_memory` or :func:`start_tilt_estimate`.
    """
    if num_continuations < 2:
        raise ValueError(f"num_continuations={num_continuations} is invalid: expected an integer >= 2.")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: expected one prompt per starting noise.")
    if metadata is not None and len(metadata) != len(prompts):
        raise ValueError(f"metadata has {len(metadata)} entries for {len(prompts)} prompts: expected one per start.")
    start_seed, noise_seed = (int(value) for value in np.random.SeedSequence(seed).generate_state(2))
    generator = torch.Generator().manual_seed(start_seed)
    starts = trainer.sd_pipeline.initial_latents(len(prompts), generator, trainer.accelerator.device)
    repeated = [prompt for prompt in prompts for _ in range(num_continuations)]
    repeated_metadata = [entry for entry in (metadata or [{}] * len(prompts)) for _ in range(num_continuations)]
    images = trainer.sample_images(
        repeated, noise_seed, prior=prior, initial_latents=starts.repeat_interleave(num_continuations, dim=0)
    )
    rewards, _ = (reward_fn or trainer.reward_fn)(images, tuple(repeated), tuple(repeated_metadata))
    rewards = torch.as_tensor(rewards, dtype=torch.float64).cpu().numpy().reshape(len(prompts), num_continuations)
    return RepeatedStartSamples(images=images, rewards=rewards, prompts=list(prompts))


def _start_table(rewards: Any, groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``rewards`` as a float64 ``(M, K)`` array and ``groups`` (one prompt per start) as an object array, checked."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards has shape {rewards.shape}: expected (M, K), M starts by K >= 2 continuations of each."
        )
    if len(groups) != rewards.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {rewards.shape[0]} starts: expected one per start.")
    return rewards, np.asarray(groups, dtype=object)


def _rows_by_group(groups: np.ndarray) -> dict[Any, np.ndarray]:
    return {group: np.flatnonzero(groups == group) for group in dict.fromkeys(groups.tolist())}


def start_memory(rewards: Any, groups: Sequence[str], num_bootstrap: int = 200, seed: int = 0) -> dict[str, float]:
    r"""The share of the reward's variance within a prompt that the starting noise explains,
    :math:`\operatorname{Var} E[R \mid x_T] / \operatorname{Var} R`, from the rewards ``R[m, k]`` of ``K``
    continuations of each of ``M`` starts (``groups[m]``: start ``m``'s prompt).

    One-way random-effects analysis of variance (e.g. Searle, Casella & McCulloch 1992, "Variance Components",
    ch. 3), per prompt ``c`` with :math:`M_c \ge 2` starts, start means :math:`\bar R_m` and prompt mean
    :math:`\bar R_c`:

    .. math:: \hat V^{w}_c = \frac{1}{M_c} \sum_{m \in c} \frac{1}{K - 1} \sum_k (R_{mk} - \bar R_m)^2, \qquad
              \hat V^{b}_c = \frac{1}{M_c - 1} \sum_{m \in c} (\bar R_m - \bar R_c)^2 - \frac{\hat V^{w}_c}{K},

    unbiased for :math:`E[\operatorname{Var}(R \mid x_T)]` and :math:`\operatorname{Var} E[R \mid x_T]` (a start's
    mean of ``K`` continuations carries :math:`\operatorname{Var}(R \mid x_T) / K` of noise, which the second term
    removes). The components are pooled over prompts with weights :math:`M_c`:

    .. math:: \text{memory} = \frac{\sum_c M_c \hat V^{b}_c}{\sum_c M_c (\hat V^{b}_c + \hat V^{w}_c)}.

    Differences between the prompts' mean rewards do not count. ``memory`` can be slightly negative by chance when
    the start explains nothing. Returns ``memory``, ``between`` and ``within`` (the pooled components) and
    ``memory_se``, the standard deviation of ``memory`` over ``num_bootstrap`` resamplings of the starts within
    each prompt (0 for none).
    """
    rewards, groups = _start_table(rewards, groups)
    rows = _rows_by_group(groups)
    small = {group: len(members) for group, members in rows.items() if len(members) < 2}
    if small:
        raise ValueError(f"start_memory needs at least 2 starts per prompt; got {small}.")

    def components(table: np.ndarray) -> tuple[float, float]:
        between = within = 0.0
        for members in rows.values():
            part = table[members]
            within_c = part.var(axis=1, ddof=1).mean()
            between += len(members) * (part.mean(axis=1).var(ddof=1) - within_c / part.shape[1])
            within += len(members) * within_c
        return between / len(rewards), within / len(rewards)

    between, within = components(rewards)
    total = between + within
    if total <= 0:
        raise ValueError("the rewards do not vary within any prompt: the memory figure is undefined.")
    memory_draws = [
        _ratio(*components(rewards[resampled])) for resampled in bootstrap_starts(groups, num_bootstrap, seed)
    ]
    return {
        "memory": float(between / total),
        "between": float(between),
        "within": float(within),
        "memory_se": float(np.std(memory_draws, ddof=1)) if len(memory_draws) > 1 else 0.0,
    }


def _ratio(between: float, within: float) -> float:
    return between / (between + within) if between + within > 0 else 0.0


def bootstrap_starts(groups: Sequence[Any], num_bootstrap: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``num_bootstrap`` resamplings of the starts (row indices), each drawing as many starts of each prompt as
    ``groups`` has, with replacement, so that every resampled table keeps the prompts' counts."""
    for rows in _resampled_rows(_rows_by_group(np.asarray(groups, dtype=object)), num_bootstrap, seed):
        yield np.concatenate(list(rows.values()))


def _resampled_rows(rows: Mapping[Any, np.ndarray], num_bootstrap: int, seed: int) -> Iterator[dict[Any, np.ndarray]]:
    """Per prompt, ``num_bootstrap`` draws with replacement of as many of its ``rows`` as it has."""
    rng = np.random.default_rng(seed)
    for _ in range(num_bootstrap):
        yield {group: members[rng.integers(0, len(members), size=len(members))] for group, members in rows.items()}


def conditional_tilt_weights(rewards: Any, beta: float, jackknife: bool = True) -> np.ndarray:
    r"""Weights of the ``K`` continuations of each start for the conditional tilt
    :math:`p(x_0 \mid x_T)\, e^{\beta R(x_0)} / h(x_T)`, :math:`h(x_T) = E[e^{\beta R} \mid x_T]`: for start ``m``,
    :math:`\sum_k w_{mk} f(x_{0,mk})` estimates the tilt's :math:`E[f \mid x_T]`; averaged over starts drawn from
    :math:`N(0, I)` it estimates the conditional tilt's :math:`E[f]`. ``rewards``: ``(M, K)``.

    Plain self-normalised weights :math:`w_{mk} = e^{\beta R_{mk}} / \sum_j e^{\beta R_{mj}}` give a ratio
    estimate biased by :math:`O(1/K)`. The jackknife (Quenouille 1956, "Notes on bias in estimation"; Efron &
    Tibshirani 1993, "An Introduction to the Bootstrap", ch. 10) removes that term: with :math:`\hat\theta_{(-j)}`
    the estimate without continuation ``j``, :math:`\tilde\theta = K \hat\theta - \frac{K-1}{K} \sum_j
    \hat\theta_{(-j)}`, biased by :math:`O(1/K^2)`. It is linear in ``f``, so it is a set of weights:

    .. math:: \tilde w_{mk} = K w_{mk} - \frac{K - 1}{K} \sum_{j \ne k}
              \frac{e^{\beta R_{mk}}}{\sum_{i \ne j} e^{\beta R_{mi}}}.

    Each start's weights sum to 1 (the corrected ones can be slightly negative). Computed in log space, so any
    ``beta`` is safe. Returns an ``(M, K)`` array.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards has shape {rewards.shape}: expected (M, K) with K >= 2 continuations per start.")
    logits = beta * rewards
    plain = np.exp(logits - _logsumexp(logits, axis=1, keepdims=True))
    if not jackknife:
        return plain
    count = rewards.shape[1]
    # log sum_{i != j} exp(logit_i) for each left-out j: the logits with j's set to -inf.
    left_out = np.where(np.eye(count, dtype=bool)[None], -np.inf, logits[:, None, :])
    log_sums = _logsumexp(left_out, axis=2)  # (M, K) over j
    # w^{(-j)}_k = exp(logit_k - log_sums_j) for k != j; summed over j != k.
    leave_one_out = np.exp(logits[:, None, :] - log_sums[:, :, None])  # (M, j, k)
    leave_one_out[:, np.arange(count), np.arange(count)] = 0.0
    return count * plain - (count - 1) / count * leave_one_out.sum(axis=1)


def _logsumexp(values: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    peak = np.max(values, axis=axis, keepdims=True)
    result = peak + np.log(np.exp(values - peak).sum(axis=axis, keepdims=True))
    return result if keepdims else np.squeeze(result, axis=axis)


TILT_TARGETS = ("conditional", "marginal")


@dataclass(frozen=True)
class _StartTilt:
    r"""A tilted target on a repeated-start table, per start: ``masses[m, k]`` (unnormalised weights) and
    ``totals[m]``; for the rows ``rows[c]`` of each prompt ``c`` kept at share ``shares[c]``, the target's
    expectation of ``f`` is :math:`\sum_c s_c \sum_{m \in c, k} \text{masses}_{mk} f_{mk} / \sum_{m \in c}
    \text{totals}_m`. Bootstrap rounds only re-index the per-start sums."""

    masses: np.ndarray
    totals: np.ndarray
    shares: dict[Any, float]
    rows: dict[Any, np.ndarray]

    def mean(self, sums: np.ndarray, rows: Optional[Mapping[Any, np.ndarray]] = None) -> np.ndarray:
        """The target's expectation from per-start sums ``sums[m] = sum_k masses[m, k] f[m, k]`` over ``rows``
        (default all) of each prompt."""
        rows = self.rows if rows is None else rows
        parts = [
            self.shares[group] * sums[members].sum(axis=0) / self.totals[members].sum()
            for group, members in rows.items()
        ]
        return np.sum(parts, axis=0)


def _start_tilt(
    rewards: np.ndarray,
    groups: np.ndarray,
    beta: float,
    target: str,
    jackknife: bool,
    group_shares: Optional[Mapping[str, float]],
) -> _StartTilt:
    if target not in TILT_TARGETS:
        raise ValueError(f"target={target!r} is invalid: expected one of {TILT_TARGETS}.")
    rows = _rows_by_group(groups)
    shares = {group: len(members) / len(groups) for group, members in rows.items()}
    if group_shares is not None:
        missing = sorted(set(group_shares) - set(rows))
        if missing:
            raise ValueError(f"group_shares names prompts {missing} that have no starts (it has {sorted(rows)}).")
        shares = {group: float(group_shares.get(group, 0.0)) for group in rows}
    total = sum(shares.values())
    shares = {group: share / total for group, share in shares.items()}
    if target == "conditional":
        masses = conditional_tilt_weights(rewards, beta, jackknife)
    else:
        # exp(beta R) shifted by each prompt's largest logit, which cancels within the prompt.
        masses = np.empty_like(rewards)
        for members in rows.values():
            logits = beta * rewards[members]
            masses[members] = np.exp(logits - logits.max())
    return _StartTilt(masses=masses, totals=masses.sum(axis=1), shares=shares, rows=rows)


def start_tilt_weights(
    rewards: Any,
    groups: Sequence[str],
    beta: float,
    target: str = "conditional",
    jackknife: bool = True,
    group_shares: Optional[Mapping[str, float]] = None,
) -> np.ndarray:
    r"""Weights ``(M, K)`` of a repeated-start table (``groups[m]``: start ``m``'s prompt) for a tilted target; they
    sum to 1 over the table, each prompt ``c`` to its share :math:`s_c` (``group_shares``, default its share of the
    starts; prompts it leaves out get 0).

    ``"conditional"``: :math:`s_c / M_c` times each start's :func:`conditional_tilt_weights` (with the jackknife
    unless ``jackknife=False``). ``"marginal"``: :math:`s_c\, e^{\beta R_{mk}} / \sum_{m' \in c, k'} e^{\beta
    R_{m'k'}}`, the tilted prior :math:`p(x_0 \mid c)\, e^{\beta R} / Z_c` from all of the prompt's samples (its
    bias is :math:`O(1 / (M_c K))`, negligible at the table's sizes).
    """
    rewards, groups = _start_table(rewards, groups)
    tilt = _start_tilt(rewards, groups, beta, target, jackknife, group_shares)
    weights = np.empty_like(rewards)
    for group, members in tilt.rows.items():
        weights[members] = tilt.shares[group] * tilt.masses[members] / tilt.totals[members].sum()
    return weights


def _category_sums(masses: np.ndarray, labels: np.ndarray, categories: Sequence[str]) -> np.ndarray:
    """Per start, the masses of its samples in each category: ``(M, len(categories))``."""
    index = {category: i for i, category in enumerate(categories)}
    unknown = sorted(set(labels.reshape(-1).tolist()) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the categories {list(categories)}.")
    codes = np.vectorize(index.__getitem__, otypes=[np.int64])(labels)
    return (masses[:, :, None] * (codes[:, :, None] == np.arange(len(categories)))).sum(axis=1)


def start_tilt_estimate(
    rewards: Any,
    groups: Sequence[str],
    beta: float,
    target: str = "conditional",
    labels: Optional[Mapping[str, Any]] = None,
    categories: Optional[Mapping[str, Sequence[str]]] = None,
    group_shares: Optional[Mapping[str, float]] = None,
    jackknife: bool = True,
    num_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """A tilted target's expected reward and attribute distributions from a repeated-start table, with bootstrap
    standard errors over the starts (resampled within each prompt as :func:`bootstrap_starts` does).

    ``labels[name]`` is an ``(M, K)`` array of the samples' values of attribute ``name``, ``categories[name]`` the
    values it can take. Returns ``reward`` and ``reward_se``, and per attribute ``distribution[name]`` and
    ``distribution_se[name]`` (dicts category -> share); the weights are :func:`start_tilt_weights`'.
    """
    rewards, groups = _start_table(rewards, groups)
    labels = {name: np.asarray(values, dtype=object) for name, values in (labels or {}).items()}
    categories = categories or {}
    for name, values in labels.items():
        if values.shape != rewards.shape:
            raise ValueError(f"labels[{name!r}] has shape {values.shape}: expected the rewards' {rewards.shape}.")
        if name not in categories:
            raise ValueError(f"labels[{name!r}] has no categories: pass categories[{name!r}].")
    tilt = _start_tilt(rewards, groups, beta, target, jackknife, group_shares)
    # One column block per statistic: the reward, then each attribute's categories.
    sums = np.concatenate(
        [(tilt.masses * rewards).sum(axis=1, keepdims=True)]
        + [_category_sums(tilt.masses, values, categories[name]) for name, values in labels.items()],
        axis=1,
    )
    estimate = tilt.mean(sums)
    draws = np.array([tilt.mean(sums, rows) for rows in _resampled_rows(tilt.rows, num_bootstrap, seed)])
    errors = draws.std(axis=0, ddof=1) if len(draws) > 1 else np.zeros_like(estimate)
    result: dict[str, Any] = {
        "reward": float(estimate[0]),
        "reward_se": float(errors[0]),
        "distribution": {},
        "distribution_se": {},
    }
    column = 1
    for name in labels:
        names, width = list(categories[name]), len(categories[name])
        result["distribution"][name] = dict(zip(names, estimate[column : column + width].tolist(), strict=True))
        result["distribution_se"][name] = dict(zip(names, errors[column : column + width].tolist(), strict=True))
        column += width
    return result


def start_target_total_variation(
    labels: Sequence[str],
    base_labels: Any,
    rewards: Any,
    groups: Sequence[str],
    beta: float,
    categories: Sequence[str],
    target: str = "conditional",
    group_shares: Optional[Mapping[str, float]] = None,
    jackknife: bool = True,
    num_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """TV distance between the distribution of ``labels`` (a model's samples) and a tilted target estimated from a
    repeated-start table (``base_labels`` and ``rewards``: ``(M, K)``; weights :func:`start_tilt_weights`), with the
    sampling noise beside it, as :func:`target_total_variation` has it for independent base samples.

    ``noise`` is the TV a perfect model would show: the mean, over ``num_bootstrap`` resamplings of the starts
    within each prompt, of the TV between ``len(labels)`` draws from the target (its negative jackknife shares, if
    any, set to 0) and the target re-estimated from the resampled starts. Returns ``{"tv", "noise"}``.
    """
    rewards, groups = _start_table(rewards, groups)
    base_labels = np.asarray(base_labels, dtype=object)
    if base_labels.shape != rewards.shape:
        raise ValueError(f"base_labels has shape {base_labels.shape}: expected the rewards' {rewards.shape}.")
    tilt = _start_tilt(rewards, groups, beta, target, jackknife, group_shares)
    sums = _category_sums(tilt.masses, base_labels, categories)
    exact = tilt.mean(sums)
    drawable = np.clip(exact, 0.0, None) / np.clip(exact, 0.0, None).sum()
    rng = np.random.default_rng(seed)
    noise = [
        total_variation(rng.multinomial(len(labels), drawable) / len(labels), tilt.mean(sums, rows))
        for rows in _resampled_rows(tilt.rows, num_bootstrap, seed + 1)
    ]
    return {
        "tv": total_variation(distribution(labels, categories), exact),
        "noise": float(np.mean(noise)) if noise else 0.0,
    }
