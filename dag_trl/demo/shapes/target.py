"""The exact reward-tilted target on the shapes model, and how far a fine-tuned model's samples are from it.

The tilted prior ``p_base(x | c) exp(beta R(x))`` cannot be sampled directly, but it can be reweighted: sample the base
model with the training sampler, weight each sample by ``exp(beta R)`` normalised per prompt
(:func:`dag_trl.evaluation.tilted_weights`), and read off the weighted distribution of each attribute (shape colour,
background colour, shape kind). The base samples' attributes and rewards depend only on the model, the sampler
settings and the seed, so they are computed once per setting (:func:`base_sample_table`) and any ``beta`` then costs
nothing. :func:`target_distance` reports the total-variation distance of a model's samples from that target, with
the sampling noise beside it.
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

from ...evaluation import target_total_variation, tilted_weights
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


def load_table(num_steps: int, eta: float, guidance_scale: float, directory: Path | None = None) -> dict | None:
    """The shipped base-sample table for these sampler settings (``directory``: default :data:`TABLE_DIR`), or
    ``None`` if none was computed. Read once per process (the CLI's evaluation hook and its before/after report share
    it) and checked when read (:func:`check_table`), so that a damaged table fails before training rather than in
    the report after it; treat it as read-only."""
    path = table_path(num_steps, eta, guidance_scale, TABLE_DIR if directory is None else directory)
    return _read_table(path) if path.exists() else None


@functools.lru_cache(maxsize=8)
def _read_table(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The shapes base-sample table {str(path)!r} cannot be read ({error}). {TABLE_ADVICE}"
        ) from error
    check_table(table, str(path))
    return table


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


def tilted_target_hook(
    num_steps: int, eta: float, guidance_scale: float, beta: float
) -> Callable[[torch.Tensor, list, list, torch.Tensor], dict[str, Any]] | None:
    """An ``evaluation_hook`` for :class:`~dag_trl.GFlowNetDiffusionTrainer` that adds, for the shapes model, the
    share of each shape colour and ``target_tv`` / ``target_tv_noise`` per attribute against the tilted target at
    ``beta`` (true units); ``None`` when no base-sample table was computed for these sampler settings. Evaluation
    prompts outside the table get the colour shares only."""
    table = load_table(num_steps, eta, guidance_scale)
    if table is None:
        return None

    def hook(images: torch.Tensor, prompts: list, metadata: list, rewards: torch.Tensor) -> dict[str, Any]:
        attributes = image_attributes(images)
        result: dict[str, Any] = {
            "colour": {name: share / len(prompts) for name, share in Counter(attributes["shape_colour"]).items()}
        }
        if set(prompts) <= set(table["prompts"]):
            distances = target_distance(attributes, prompts, table, beta)
            result["target_tv"] = {name: value["tv"] for name, value in distances.items()}
            result["target_tv_noise"] = {name: value["noise"] for name, value in distances.items()}
        return result

    return hook
