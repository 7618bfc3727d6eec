"""The shapes model as a ``dag-trl train`` preset, ``--pretrained_model builtin:shapes`` (the default).

Registers the model id :data:`SHAPES_MODEL` in :data:`dag_trl.presets.PRESETS`, with the shipped model (or a verified
cached build), the packaged CPU-sized recipe ``shapes_recipe.yaml`` (and ``shapes_recipe_<objective>.yaml`` over it
for the objectives that have one), the trainer's evaluation hook (the distances from the tilted targets,
:func:`~dag_trl.demo.shapes.target.tilted_target_hook`), the report's colour distribution and prompt adherence, the
summary's ``"target"`` entry and their printed lines; and the reward ``shapes_colour_preference`` and the prompt set
``shapes`` that the recipe names.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any, Optional

from ...objectives import get_objective_class
from ...presets import PRESETS, ModelPreset
from ...prompts import PROMPTS
from ...rewards import REWARDS
from .analysis import colour_distribution, prompt_adherence
from .data import all_full_prompts
from .model import get_shapes_model
from .prompts import ShapePrompts
from .reward import ShapesColourPreference
from .target import load_repeated_start_table, load_table, target_figures, tilted_target_hook

if TYPE_CHECKING:
    from ...config import GFlowNetConfig
    from ...trainer.evaluating import EvaluationHook

SHAPES_MODEL = "builtin:shapes"
# Full prompts whose samples the report's prompt adherence checks: about 42, spread over all of them.
ADHERENCE_PROMPTS = 42

REWARDS.register(ShapesColourPreference.name, ShapesColourPreference)
PROMPTS.register(ShapePrompts.name, ShapePrompts)


def evaluation_hook(config: GFlowNetConfig) -> Optional[EvaluationHook]:
    """The distances from the tilted targets at ``beta = train_reward_exp`` for the config's sampler, or ``None``
    where no base-sample table was computed for it."""
    return tilted_target_hook(
        config.sample_num_steps, config.sample_eta, config.sample_guidance_scale, config.train_reward_exp
    )


def evaluation_figures(trainer: Any, images: Any, prompts: list[str], seed: int) -> dict[str, Any]:
    """The report's shapes figures of one evaluation: the colour distribution of ``images`` and the prompt adherence
    of samples for the full prompts (from the noise of ``seed + 1``)."""
    every_full_prompt = all_full_prompts()
    full = every_full_prompt[:: max(1, len(every_full_prompt) // ADHERENCE_PROMPTS)]
    return {
        "colour_distribution": lambda: colour_distribution(images),
        "adherence_full_prompts": lambda: prompt_adherence(trainer.sample_images(full, seed + 1), full),
    }


def target_summary(config: GFlowNetConfig, prompts: list[str]) -> Optional[dict[str, Any]]:
    """The summary's ``"target"`` entry: both tilted targets' expected rewards and the base sampler's memory figure
    at ``beta = train_reward_exp`` (true units, :func:`~dag_trl.demo.shapes.target.target_figures`), with a note on
    which of them the objective converges to; ``None`` when no base-sample table was computed for this sampler or
    the evaluation prompts are not the table's. (The evaluations' distances from the targets come from
    :func:`evaluation_hook`.)"""
    settings = (config.sample_num_steps, config.sample_eta, config.sample_guidance_scale)
    table = load_table(*settings)
    if table is None or not set(prompts) <= set(table["prompts"]):
        return None
    objective = get_objective_class(config.objective_name)
    if objective.uses_prior_log_probs:
        note = (
            "beta in true units; conditional: the prior tilted within each start x_T, what this objective converges "
            "to with its start fixed; marginal: the prior tilted by exp(beta R), which it reaches only where the "
            "start does not decide the reward (memory 0)"
        )
    else:
        note = (
            "beta in true units; the prior tilted by exp(beta R) (marginal) and within each start x_T "
            f"(conditional): references, not {objective.display_name}'s own target (see docs/algorithm.md)"
        )
    repeated = load_repeated_start_table(*settings)
    if repeated is not None and not set(prompts) <= set(repeated["prompts"]):
        repeated = None
    beta = config.train_reward_exp
    figures = target_figures(table, repeated, prompts, beta)
    return {"beta": beta, "base_samples": len(table["prompts"]), "note": note, **figures}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The printed report's lines on the tilted targets, the colour distribution and the prompt adherence (none
    where the summary lacks them)."""
    lines = []
    if "target" in summary:
        for name in ("before", "after"):
            if "target_tv" not in summary[name]:
                continue
            distances, noise = summary[name]["target_tv"], summary[name]["target_tv_noise"]
            lines.append(
                f"TV from the tilted target (beta {summary['target']['beta']:g}) {name}: "
                + ", ".join(f"{k} {v:.3f} (noise {noise[k]:.3f})" for k, v in distances.items())
            )
        lines.extend(conditional_target_lines(summary))
    if all("colour_distribution" in summary[name] for name in ("before", "after")):
        before, after = summary["before"]["colour_distribution"], summary["after"]["colour_distribution"]
        lines.append(
            "colour distribution (before -> after): "
            + ", ".join(f"{colour} {before[colour]:.2f}->{after[colour]:.2f}" for colour in before)
        )
    for name in ("before", "after"):
        adherence = summary[name].get("adherence_full_prompts")
        if adherence is not None:
            lines.append(
                f"prompt adherence {name} (full prompts): "
                + ", ".join(f"{k} {v:.2f}" for k, v in adherence.items() if isinstance(v, float))
            )
    return lines


def conditional_target_lines(summary: dict[str, Any]) -> list[str]:
    """The report's lines on the two tilted targets' rewards, the memory figure and the distances from the
    conditional tilt (none where the summary lacks them)."""
    target, lines = summary["target"], []
    rewards = [
        f"{name} tilt {target[name]['reward']:.3f} (+-{target[name]['reward_se']:.3f})"
        for name in ("marginal", "conditional")
        if name in target
    ]
    if rewards:
        lines.append(f"reward of the tilted targets (beta {target['beta']:g}): " + ", ".join(rewards))
    if "memory" in target:
        lines.append(
            f"memory (share of the reward's variance within a prompt that the start x_T explains), base sampler: "
            f"{target['memory']['base']:.3f} (+-{target['memory']['base_se']:.3f})"
        )
    for name in ("before", "after"):
        if "conditional_target_tv" in summary[name]:
            distances, noise = summary[name]["conditional_target_tv"], summary[name]["conditional_target_tv_noise"]
            lines.append(
                f"TV from the conditional tilt {name}: "
                + ", ".join(f"{k} {v:.3f} (noise {noise[k]:.3f})" for k, v in distances.items())
            )
    return lines


@PRESETS.register(SHAPES_MODEL)
def shapes_preset() -> ModelPreset:
    """The ``builtin:shapes`` preset."""
    return ModelPreset(
        model=SHAPES_MODEL,
        resolve=lambda cache_dir: str(get_shapes_model(cache_dir=cache_dir)),
        recipes=resources.files("dag_trl.demo") / "assets",
        recipe="shapes_recipe.yaml",
        evaluation_hook=evaluation_hook,
        evaluation_figures=evaluation_figures,
        target_summary=target_summary,
        summary_lines=summary_lines,
    )
