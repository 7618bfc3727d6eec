"""The exact reward-tilted target on the shapes model, and how far a fine-tuned model's samples are from it.

The tilted prior ``p_base(x | c) exp(beta R(x))`` cannot be sampled directly, but it can be reweighted: sample the base
model with the training sampler, weight each sample by ``exp(beta R)`` normalised per prompt
(:func:`dag_trl.evaluation.tilted_weights`), and read off the weighted distribution of each attribute (shape colour,
background colour, shape kind). The base samples' attributes and rewards depend only on the model, the sampler
settings and the seed, so they are computed once per setting (:func:`base_sample_table`) and any ``beta`` then costs
nothing. :func:`target_distance` reports the total-variation distance of a model's samples from that target, with
the sampling noise beside it.

Objectives that keep the start ``x_T ~ N(0, I)`` fixed (RTB, KL-regularised policy gradient) converge to the
*conditional* tilt ``p(x_0 | x_T) exp(beta R) / E[exp(beta R) | x_T]`` instead, which differs from the tilted prior
as far as the start decides the reward. A second table, ``K`` continuations of each of ``M`` starts
(:func:`repeated_start_block`, ``python -m dag_trl.demo.shapes repeated-starts``), estimates it
(:func:`conditional_target_distance`), and the share of the reward's variance the start explains
(:func:`target_figures`' ``memory``).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...evaluation import (
    bootstrap_starts,
    sample_repeated_starts,
    start_memory,
    start_target_total_variation,
    start_tilt_estimate,
    target_total_variation,
    tilted_weights,
)
from .analysis import analyse_images
from .data import COLOUR_NAMES, SHAPES

# The attributes a shapes image has, and the values each can take ("none": no shape was found).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape_colour": (*COLOUR_NAMES, "none"),
    "background": tuple(COLOUR_NAMES),
    "shape_kind": (*SHAPES, "none"),
}
TABLE_DIR = Path(__file__).resolve().parents[1] / "assets"
# What to do with a damaged base-sample table (a run builds its trainer, and so reads the table, before rebuilding one).
TABLE_ADVICE = (
    "Delete it (runs then report no distance from the tilted target), then rebuild it if needed with "
    "`python -m dag_trl.demo.shapes base-samples`."
)
# The "shape" prompt set's prompts: colours and backgrounds are left to the model.
TARGET_PROMPTS = tuple(f"a {shape}" for shape in SHAPES)


def image_attributes(images: torch.Tensor) -> dict[str, list[str]]:
    """Shape colour, background colour and shape kind of each image (``"none"`` where no shape is found)."""
    analyses = analyse_images(images)
    return {
        "shape_colour": [a.colour or "none" for a in analyses],
        "background": [a.background for a in analyses],
        "shape_kind": [a.shape or "none" for a in analyses],
    }


def sampler_key(num_steps: int, eta: float, guidance_scale: float) -> str:
    """The name of a base-sample table: the sampler settings it was drawn with."""
    return f"steps{num_steps}-eta{eta:g}-guidance{guidance_scale:g}"


def table_path(num_steps: int, eta: float, guidance_scale: float, directory: Path = TABLE_DIR) -> Path:
    return directory / f"shapes-seed0-base-samples-{sampler_key(num_steps, eta, guidance_scale)}.json"


def base_sample_table(trainer: Any, prompts: Sequence[str], seed: int) -> dict[str, Any]:
    """Sample the trainer's current (untrained) policy with its training sampler for ``prompts`` and record each
    sample's prompt, reward and attributes, with the settings they depend on."""
    config = trainer.config
    images = trainer.sample_images(list(prompts), seed)
    rewards, _ = trainer.reward_fn(images, tuple(prompts), tuple({} for _ in prompts))
    return {
        "settings": {
            "num_steps": config.sample_num_steps,
            "eta": config.sample_eta,
            "guidance_scale": config.sample_guidance_scale,
            "negative_prompt": config.negative_prompts,
            "seed": seed,
        },
        "prompts": list(prompts),
        "reward": torch.as_tensor(rewards, dtype=torch.float64).tolist(),
        **image_attributes(images),
    }


def repeated_start_table_path(num_steps: int, eta: float, guidance_scale: float, directory: Path = TABLE_DIR) -> Path:
    return directory / f"shapes-seed0-repeated-starts-{sampler_key(num_steps, eta, guidance_scale)}.json"


# Starts per block of the repeated-start table: each block is sampled, and saved, on its own (resumable).
REPEATED_START_BLOCK = 16


def repeated_start_prompts(first_start: int, num_starts: int) -> list[str]:
    """The prompts of starts ``first_start`` to ``first_start + num_starts - 1``: the ``"shape"`` prompts in turn."""
    return [TARGET_PROMPTS[m % len(TARGET_PROMPTS)] for m in range(first_start, first_start + num_starts)]


def repeated_start_block(trainer: Any, block: int, num_continuations: int, seed: int) -> dict[str, Any]:
    """Block ``block`` of the repeated-start table: starts ``block * REPEATED_START_BLOCK`` onwards, ``K =
    num_continuations`` continuations of each (:func:`dag_trl.evaluation.sample_repeated_starts` with the trainer's
    sampler, seeded by ``seed`` and ``block``), as rewards and attributes in start-major order."""
    prompts = repeated_start_prompts(block * REPEATED_START_BLOCK, REPEATED_START_BLOCK)
    block_seed = int(np.random.SeedSequence([seed, block]).generate_state(1)[0])
    samples = sample_repeated_starts(trainer, prompts, num_continuations, block_seed)
    return {"block": block, "reward": samples.rewards.reshape(-1).tolist(), **image_attributes(samples.images)}


def encode_repeated_start_table(settings: dict[str, Any], blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The stored table of :func:`repeated_start_block` results (in block order): per start its prompt, per sample
    its start, reward (6 decimals) and each attribute as one character, the index of its value in
    ``categories[name]``."""
    num_continuations = settings["num_continuations"]
    num_starts = len(blocks) * REPEATED_START_BLOCK
    rewards = [round(value, 6) for block in blocks for value in block["reward"]]
    table: dict[str, Any] = {
        "settings": {**settings, "num_starts": num_starts, "block_starts": REPEATED_START_BLOCK},
        "prompts": repeated_start_prompts(0, num_starts),
        "start": [m for m in range(num_starts) for _ in range(num_continuations)],
        "reward": rewards,
        "categories": {name: list(values) for name, values in ATTRIBUTES.items()},
    }
    for name, values in ATTRIBUTES.items():
        index = {value: str(i) for i, value in enumerate(values)}
        table[name] = "".join(index[label] for block in blocks for label in block[name])
    return table


def decode_repeated_start_table(table: dict[str, Any]) -> dict[str, Any]:
    """The stored repeated-start table as arrays: ``reward`` and each attribute ``(M, K)`` (start ``m``'s samples in
    row ``m``), ``prompts`` one per start, ``settings`` as stored. Inconsistent lengths are a ``ValueError`` naming
    the field."""
    num_starts, num_continuations = len(table["prompts"]), table["settings"]["num_continuations"]
    size = num_starts * num_continuations
    expected_start = [m for m in range(num_starts) for _ in range(num_continuations)]
    if table["start"] != expected_start:
        raise ValueError(
            f"the repeated-start table's 'start' is not {num_continuations} consecutive samples per start for its "
            f"{num_starts} prompts."
        )
    decoded: dict[str, Any] = {"settings": table["settings"], "prompts": list(table["prompts"])}
    for name in ("reward", *ATTRIBUTES):
        if len(table[name]) != size:
            raise ValueError(
                f"the repeated-start table's {name!r} has {len(table[name])} entries: expected {num_starts} starts x "
                f"{num_continuations} continuations = {size}."
            )
    decoded["reward"] = np.asarray(table["reward"], dtype=np.float64).reshape(num_starts, num_continuations)
    for name in ATTRIBUTES:
        values = np.asarray(table["categories"][name], dtype=object)
        codes = np.frombuffer(table[name].encode("ascii"), dtype=np.uint8) - ord("0")
        decoded[name] = values[codes].reshape(num_starts, num_continuations)
    return decoded


def load_repeated_start_table(
    num_steps: int, eta: float, guidance_scale: float, directory: Path = TABLE_DIR
) -> dict[str, Any] | None:
    """The shipped repeated-start table for these sampler settings, decoded (:func:`decode_repeated_start_table`),
    or ``None`` if none was computed. Read once per process; treat it as read-only."""
    path = repeated_start_table_path(num_steps, eta, guidance_scale, directory)
    return _read_repeated_start_table(path) if path.exists() else None


def load_table(num_steps: int, eta: float, guidance_scale: float, directory: Path | None = None) -> dict | None:
    """The shipped base-sample table for these sampler settings (``directory``: default :data:`TABLE_DIR`), or
    ``None`` if none was computed. Read once per process (the CLI's evaluation hook and its before/after report share
    it) and checked when read (:func:`check_table`), so that a damaged table fails before training rather than in
    the report after it; treat it as read-only."""
    path = table_path(num_steps, eta, guidance_scale, TABLE_DIR if directory is None else directory)
    return _read_table(path) if path.exists() else None


def _read_json(path: Path) -> Any:
    """A shipped table's JSON; a parse error names the file."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The shapes base-sample table {str(path)!r} cannot be read ({error}). {TABLE_ADVICE}"
        ) from error


@functools.lru_cache(maxsize=8)
def _read_table(path: Path) -> dict[str, Any]:
    """The base-sample table, read and checked once per process (a damaged one raises and is not cached)."""
    table = _read_json(path)
    check_table(table, str(path))
    return table


@functools.lru_cache(maxsize=8)
def _read_repeated_start_table(path: Path) -> dict[str, Any]:
    """The repeated-start table, read and decoded once per process."""
    return decode_repeated_start_table(_read_json(path))


def check_table(table: Any, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` (the file) unless ``table`` is a base-sample table that
    :func:`target_distance` can use: a dict with the lists ``prompts``, ``reward`` (finite numbers) and every
    attribute of :data:`ATTRIBUTES` (values among its categories), all of one length."""
    keys = ("prompts", "reward", *ATTRIBUTES)
    problem = ""
    if not isinstance(table, dict):
        problem = f"it holds a {type(table).__name__}, not a JSON object"
    elif any(not isinstance(table.get(key), list) for key in keys):
        problem = f"it has no list under {[key for key in keys if not isinstance(table.get(key), list)]}"
    elif len({len(table[key]) for key in keys}) != 1:
        problem = "its lists differ in length (" + ", ".join(f"{key}: {len(table[key])}" for key in keys) + ")"
    elif not table["prompts"]:
        problem = "its lists are empty"
    elif not all(isinstance(r, (int, float)) and not isinstance(r, bool) and np.isfinite(r) for r in table["reward"]):
        problem = "its rewards are not all finite numbers"
    else:
        for attribute, categories in ATTRIBUTES.items():
            unknown = sorted(set(table[attribute]) - set(categories), key=str)
            if unknown:
                problem = f"its {attribute} values {unknown[:5]} are not among {list(categories)}"
                break
    if problem:
        raise ValueError(f"The shapes base-sample table {name!r} is damaged: {problem}. {TABLE_ADVICE}")


def target_distance(
    attributes: dict[str, Sequence[str]], prompts: Sequence[str], table: dict[str, Any], beta: float
) -> dict[str, dict[str, float]]:
    """Per attribute, the TV distance between ``attributes`` of a model's samples (drawn for ``prompts``) and the
    tilted target at ``beta``, with its bootstrap noise and the weights' effective sample size (see
    :func:`dag_trl.evaluation.target_total_variation`). Each prompt counts in the target as often as in ``prompts``."""
    base_prompts = np.asarray(table["prompts"], dtype=object)
    weights = tilted_weights(np.asarray(table["reward"]), table["prompts"], beta)
    # Match the evaluation's prompt mix: scale each prompt's weights to its share among the evaluated samples.
    evaluated = {prompt: count / len(prompts) for prompt, count in Counter(prompts).items()}
    missing = sorted(set(evaluated) - set(table["prompts"]))
    if missing:
        raise ValueError(
            f"prompts {missing} have no base samples in the table (it covers {sorted(set(base_prompts))})."
        )
    for prompt in set(table["prompts"]):
        mask = base_prompts == prompt
        weights[mask] *= evaluated.get(prompt, 0.0) / weights[mask].sum()
    return {
        name: target_total_variation(attributes[name], table[name], weights, categories)
        for name, categories in ATTRIBUTES.items()
    }


def _prompt_shares(prompts: Sequence[str], covered: Sequence[str]) -> dict[str, float]:
    """Each prompt's share of ``prompts``; a prompt that ``covered`` (a table's prompts) lacks is a ValueError."""
    missing = sorted(set(prompts) - set(covered))
    if missing:
        raise ValueError(f"prompts {missing} have no base samples in the table (it covers {sorted(set(covered))}).")
    return {prompt: count / len(prompts) for prompt, count in Counter(prompts).items()}


def conditional_target_distance(
    attributes: dict[str, Sequence[str]], prompts: Sequence[str], repeated: dict[str, Any], beta: float
) -> dict[str, dict[str, float]]:
    """Per attribute, the TV distance between ``attributes`` of a model's samples (drawn for ``prompts``) and the
    conditional tilt at ``beta`` (jackknife-corrected weights within each start of the decoded repeated-start table
    ``repeated``), with its bootstrap noise over the starts (see
    :func:`dag_trl.evaluation.start_target_total_variation`). Each prompt counts as often as in ``prompts``."""
    shares = _prompt_shares(prompts, repeated["prompts"])
    return {
        name: start_target_total_variation(
            attributes[name],
            repeated[name],
            repeated["reward"],
            repeated["prompts"],
            beta,
            categories,
            group_shares=shares,
        )  # fmt: skip
        for name, categories in ATTRIBUTES.items()
    }


def target_figures(
    table: dict[str, Any] | None, repeated: dict[str, Any] | None, prompts: Sequence[str], beta: float
) -> dict[str, Any]:
    """The tilted targets' expected rewards at ``beta`` for the prompt mix of ``prompts``, with bootstrap standard
    errors, and the base model's memory figure: ``marginal`` (the independent base samples of ``table``, resampled
    within each prompt), ``conditional`` (the repeated-start table, jackknife-corrected, resampled over starts)
    and ``memory`` (:func:`dag_trl.evaluation.start_memory` of the repeated-start table); a missing table leaves
    its entries out."""
    figures: dict[str, Any] = {}
    if table is not None:
        rewards = np.asarray(table["reward"], dtype=np.float64)
        groups = np.asarray(table["prompts"], dtype=object)
        shares = _prompt_shares(prompts, table["prompts"])

        def marginal_reward(rows: np.ndarray) -> float:
            weights = tilted_weights(rewards[rows], groups[rows].tolist(), beta)
            for prompt in set(table["prompts"]):
                mask = groups[rows] == prompt
                weights[mask] *= shares.get(prompt, 0.0) / weights[mask].sum()
            return float((weights * rewards[rows]).sum())

        draws = [marginal_reward(rows) for rows in bootstrap_starts(groups, 200)]
        figures["marginal"] = {
            "reward": marginal_reward(np.arange(len(rewards))),
            "reward_se": float(np.std(draws, ddof=1)),
            "base_samples": len(rewards),
        }
    if repeated is not None:
        estimate = start_tilt_estimate(
            repeated["reward"], repeated["prompts"], beta, group_shares=_prompt_shares(prompts, repeated["prompts"])
        )
        num_starts, num_continuations = repeated["reward"].shape
        figures["conditional"] = {
            "reward": estimate["reward"],
            "reward_se": estimate["reward_se"],
            "base_starts": num_starts,
            "continuations": num_continuations,
        }
        memory = start_memory(repeated["reward"], repeated["prompts"])
        figures["memory"] = {"base": memory["memory"], "base_se": memory["memory_se"]}
    return figures


def tilted_target_hook(
    num_steps: int, eta: float, guidance_scale: float, beta: float
) -> Callable[[torch.Tensor, list, list, torch.Tensor], dict[str, Any]] | None:
    """An ``evaluation_hook`` for :class:`~dag_trl.GFlowNetDiffusionTrainer` that adds, for the shapes model, the
    share of each shape colour and ``target_tv`` / ``target_tv_noise`` per attribute against the tilted target at
    ``beta`` (true units), and ``conditional_target_tv`` / ``conditional_target_tv_noise`` against the conditional
    tilt where a repeated-start table exists; ``None`` when no base-sample table was computed for these sampler
    settings. Evaluation prompts outside the table get the colour shares only."""
    table = load_table(num_steps, eta, guidance_scale)
    if table is None:
        return None
    repeated = load_repeated_start_table(num_steps, eta, guidance_scale)

    def hook(images: torch.Tensor, prompts: list, metadata: list, rewards: torch.Tensor) -> dict[str, Any]:
        attributes = image_attributes(images)
        result: dict[str, Any] = {
            "colour": {name: share / len(prompts) for name, share in Counter(attributes["shape_colour"]).items()}
        }
        if set(prompts) <= set(table["prompts"]):
            distances = target_distance(attributes, prompts, table, beta)
            result["target_tv"] = {name: value["tv"] for name, value in distances.items()}
            result["target_tv_noise"] = {name: value["noise"] for name, value in distances.items()}
        if repeated is not None and set(prompts) <= set(repeated["prompts"]):
            distances = conditional_target_distance(attributes, prompts, repeated, beta)
            result["conditional_target_tv"] = {name: value["tv"] for name, value in distances.items()}
            result["conditional_target_tv_noise"] = {name: value["noise"] for name, value in distances.items()}
        return result

    return hook
