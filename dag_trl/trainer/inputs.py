"""Checks of the trainer's arguments and of what user callables return (rewards and prompts), with errors that name
the problem."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

from ..config import GFlowNetConfig
from ..io.tracking import check_tracker_installed
from ..models.pipeline import GFlowNetStableDiffusionPipeline
from ..prompts import PromptCallable, get_prompt_fn
from ..rewards import RewardCallable, get_reward_fn
from ..rewards.base import FLOAT32_MAX, score_problem
from ..utils import callable_name

if TYPE_CHECKING:
    from ..objectives import Objective

# beta * (max R - min R) beyond which a batch's rewards swamp the log-space, in nats. The objectives compare beta * R
# with log-probability differences in float32, never exponentiating it (DAG's default beta = 100 on rewards in [0, 1]
# is routine); but at 1e4 nats float32 resolves only about 1e-3 nats, the size of the policy's per-step log-ratio
# changes, and the squared residuals reach 1e8: the reward scale, not the images, drives the loss.
LOG_SPACE_LIMIT_NATS = 1e4


def _scalars(values: Any) -> list[Any]:
    """The leaves of nested lists, tuples, arrays and tensors, flattened in order (other values are leaves)."""
    if isinstance(values, np.ndarray):
        return values.ravel().tolist()
    if torch.is_tensor(values):
        return values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, (list, tuple)):
        return [leaf for value in values for leaf in _scalars(value)]
    return [values]


def _shape(values: Any) -> tuple[int, ...]:
    """The shape of nested lists, tuples, arrays and tensors (on any device); ``ValueError`` if they are ragged."""
    if isinstance(values, np.ndarray) or torch.is_tensor(values):
        return tuple(values.shape)
    if not isinstance(values, (list, tuple)):
        return ()
    shapes = {_shape(value) for value in values}
    if len(shapes) > 1:
        raise ValueError(f"ragged nesting: items of shapes {sorted(shapes)}")
    return (len(values), *(shapes.pop() if shapes else ()))


def _listed(items: Sequence[Any]) -> str:
    """At most five items as a list literal, with `...` when there are more."""
    return f"{list(items[:5])!r}{' ...' if len(items) > 5 else ''}"


def validate_rewards(
    rewards: Any, prompts: list[str], epoch: int, device: torch.device, name: str = "reward_function"
) -> torch.Tensor:
    """Convert a reward function's output to a float32 tensor of shape ``(B,)``, or raise naming the bad prompts.

    Accepts a tensor, an array or a list of ``B`` numbers (``(B, 1)`` too). Raises ``ValueError`` starting with
    ``name`` for the wrong length, values that are not numbers (str, None, bool: numpy would silently parse "0.5"
    and turn None into NaN), NaN and inf, and values beyond float32's range (+-3.4e38), which would become inf in
    training.
    """
    count = len(prompts)
    if torch.is_tensor(rewards):
        if rewards.device.type == "meta":
            raise ValueError(
                f"{name} returned rewards on the 'meta' device at epoch {epoch}: a meta tensor has a shape but no "
                "values (typically from a reward model whose weights were never loaded, e.g. built under "
                "init_empty_weights or with a device_map that offloaded it); return rewards on the CPU or a GPU."
            )
        if rewards.dtype == torch.bool or not (
            rewards.is_floating_point() or rewards.dtype in (torch.int32, torch.int64)
        ):
            raise ValueError(f"{name} returned values of dtype {rewards.dtype} at epoch {epoch}: expected numbers.")
        shape = tuple(rewards.shape)
        scalars = _scalars(rewards)
    else:
        scalars = _scalars(rewards)
        wrong = [
            (index, value)
            for index, value in enumerate(scalars)
            if not isinstance(value, numbers.Real) or isinstance(value, bool)
        ]
        if wrong:
            by_type: dict[str, list[Any]] = {}
            for _, value in wrong:
                by_type.setdefault("None" if value is None else type(value).__name__, []).append(value)
            found = " and ".join(
                kind if kind == "None" else f"{kind} {_listed(values)}" for kind, values in by_type.items()
            )
            where = (
                f"for prompt(s) {_listed([prompts[index] for index, _ in wrong])}"
                if len(scalars) == count
                else f"at position(s) {_listed([index for index, _ in wrong])}"
            )
            raise ValueError(
                f"{name} returned {found} {where} at epoch {epoch}: expected a tensor, array or list of {count} "
                "numbers (one per prompt); return the rewards as floats."
            )
        try:
            shape = _shape(rewards)
        except ValueError as error:
            raise ValueError(
                f"{name} returned {type(rewards).__name__} {rewards!r:.200} at epoch {epoch}: expected a tensor, "
                f"array or list of {count} numbers (one per prompt)."
            ) from error
    if shape not in ((count,), (count, 1)):
        raise ValueError(
            f"{name} returned shape {shape} at epoch {epoch} for {count} prompts: expected ({count},), one reward per "
            "image."
        )
    problems = [(prompt, score_problem(value)) for prompt, value in zip(prompts, scalars, strict=True)]
    non_finite = [prompt for prompt, problem in problems if problem in ("NaN", "inf", "-inf")]
    if non_finite:
        raise ValueError(
            f"{name} returned NaN or inf at epoch {epoch} for prompt(s) {_listed(non_finite)}: rewards must be finite "
            "numbers."
        )
    overflow = [(prompt, problem) for prompt, problem in problems if problem is not None]
    if overflow:
        raise ValueError(
            f"{name} returned rewards that overflow float32 at epoch {epoch} for prompt(s) "
            f"{_listed([prompt for prompt, _ in overflow])}: {', '.join(problem for _, problem in overflow[:5])}; "
            f"rewards must be finite numbers within float32's range (|reward| <= {FLOAT32_MAX:.3g}), rescale them."
        )
    return torch.tensor(scalars, dtype=torch.float32, device=device)


def validate_reward_output(
    output: Any, reward_fn: Any, prompts: list[str], epoch: int, device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Split and check what ``reward_fn`` returned: a ``(rewards, metadata)`` pair, as in DDPO and TRL.

    Returning only the rewards is the most common mistake, and unpacking them would fail with Python's "too many
    values to unpack" (or, for two images, silently split the rewards): raises ``TypeError`` naming the function.
    Metadata ``None`` becomes ``{}``. The rewards are checked by :func:`validate_rewards`.
    """
    name = f"reward function {callable_name(reward_fn)!r}"
    contract = "rewards are returned as a (rewards, metadata) tuple, e.g. `return rewards, {}`"
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        if torch.is_tensor(output) or isinstance(output, np.ndarray):
            found = f"a {type(output).__name__} of shape {tuple(output.shape)}"
        elif isinstance(output, (tuple, list)):
            found = f"a {type(output).__name__} of {len(output)} items"
        else:
            found = f"a {type(output).__name__}"
        raise TypeError(f"{name} returned {found} at epoch {epoch}: {contract}.")
    rewards, metadata = output
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(
            f"{name} returned metadata of type {type(metadata).__name__} at epoch {epoch}: expected a dict; {contract} "
            "(did it return only the rewards, for two images?)."
        )
    return validate_rewards(rewards, prompts, epoch, device, name=name), metadata


def check_reward_scale(rewards: torch.Tensor, beta: float, epoch: int | None = None) -> int:
    """Warn, once per call, when ``beta * (max R - min R)`` of a batch exceeds :data:`LOG_SPACE_LIMIT_NATS`.

    ``rewards`` is one batch ``(B,)`` or an epoch's batches ``(num_batches, B)``. Huge finite rewards are valid
    numbers but with a large ``beta`` give losses of order ``(beta * spread) ** 2`` (1e11 was seen) without any other
    sign; the warning gives the count of such batches and the largest spread. Returns that count.
    """
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must have shape (B,) or (num_batches, B); got {tuple(rewards.shape)}")
    batches = rewards.detach().to("cpu", torch.float64).reshape(-1, rewards.shape[-1])
    ranges = batches.amax(dim=1) - batches.amin(dim=1)
    spreads = beta * ranges
    over = int((spreads > LOG_SPACE_LIMIT_NATS).sum())
    if over:
        worst = int(spreads.argmax())
        at_epoch = f" at epoch {epoch}" if epoch is not None else ""
        warnings.warn(
            f"{over} of {batches.shape[0]} reward batch(es){at_epoch} have beta * (max R - min R) above "
            f"{LOG_SPACE_LIMIT_NATS:g} nats (largest: {beta:g} * {float(ranges[worst]):.4g} = "
            f"{float(spreads[worst]):.4g}): float32 no longer resolves the policy's log-probability differences "
            "beside beta * R, and the loss is dominated by the reward scale; rescale the rewards or lower "
            "train_reward_exp.",
            stacklevel=2,
        )
    return over


def check_prompts(
    prompts: Sequence[str], token_counts: Sequence[int] | None = None, max_length: int | None = None
) -> tuple[int, int]:
    """Warn, once per call, about empty prompts and prompts longer than the text encoder takes; return both counts.

    ``token_counts[i]`` is the length of ``prompts[i]`` tokenized without truncation (special tokens included) and
    ``max_length`` the tokenizer's ``model_max_length`` (77 for CLIP): the pipeline truncates longer prompts, so the
    end of such a prompt never reaches the model. Both are accepted; a run on them is not what the user meant.
    """
    if (token_counts is None) != (max_length is None):
        raise ValueError("check_prompts needs both token_counts and max_length, or neither")
    if token_counts is not None and len(token_counts) != len(prompts):
        raise ValueError(f"check_prompts got {len(token_counts)} token counts for {len(prompts)} prompts")
    empty = [index for index, prompt in enumerate(prompts) if not prompt.strip()]
    too_long = [] if token_counts is None else [i for i, tokens in enumerate(token_counts) if tokens > max_length]
    problems = []
    if empty:
        problems.append(f"{len(empty)} of {len(prompts)} prompts are empty or whitespace only")
    if too_long:
        longest = max(token_counts[i] for i in too_long)
        examples = _listed([prompts[i][:60] for i in too_long])
        problems.append(
            f"{len(too_long)} of {len(prompts)} prompts are longer than the tokenizer's {max_length} tokens (longest "
            f"{longest}) and are truncated: {examples}"
        )
    if problems:
        warnings.warn("; ".join(problems) + ".", stacklevel=2)
    return len(empty), len(too_long)


def validate_prompt(output: Any) -> tuple[str, dict]:
    """Check a prompt function's output: a ``(prompt: str, metadata: dict)`` pair."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(
            f"prompt_function returned {type(output).__name__} {output!r:.200}: expected a (prompt, metadata) tuple."
        )
    prompt, metadata = output
    if not isinstance(prompt, str):
        raise TypeError(f"prompt_function returned a prompt of type {type(prompt).__name__}: expected str.")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"prompt_function returned metadata of type {type(metadata).__name__}: expected dict.")
    return prompt, metadata


def check_trainer_inputs(
    config: GFlowNetConfig,
    reward_function: Union[RewardCallable, str],
    prompt_function: Union[PromptCallable, str],
    sd_pipeline: GFlowNetStableDiffusionPipeline,
    image_features: Optional[Any] = None,
) -> tuple[RewardCallable, PromptCallable]:
    """The trainer's reward and prompt functions (names looked up in the registries), after refusing, before
    anything is set up, arguments it cannot train with: a config that is not a valid ``GFlowNetConfig``, functions
    that are not callable, a pipeline of another type, a sampler that the pipeline's scheduler cannot run, a
    ``lora_min_timestep`` without a LoRA or above the largest timestep, a tracker or bitsandbytes not installed,
    ``image_features`` given beside a ``config.eval_features`` choice."""
    if not isinstance(config, GFlowNetConfig):
        raise TypeError(f"config must be a GFlowNetConfig, got {type(config).__name__}.")
    config.validate()
    if isinstance(reward_function, str):
        reward_function = get_reward_fn(reward_function)
    if isinstance(prompt_function, str):
        prompt_function = get_prompt_fn(prompt_function)
    for name, value in (("reward_function", reward_function), ("prompt_function", prompt_function)):
        if not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}.")
    if not isinstance(sd_pipeline, GFlowNetStableDiffusionPipeline):
        raise TypeError(f"sd_pipeline must be a GFlowNetStableDiffusionPipeline, got {type(sd_pipeline).__name__}.")
    # Settings whose trouble shows only with the pipeline's scheduler (a step with zero variance, an eta whose
    # variance underflows), before anything is set up.
    sd_pipeline.check_sampler(config.sample_num_steps, config.sample_eta)
    if config.lora_min_timestep and not sd_pipeline.use_lora:
        raise ValueError(
            f"GFlowNetConfig.lora_min_timestep={config.lora_min_timestep} needs a pipeline with use_lora=True: the "
            "steps below it use the pretrained model, the LoRA switched off."
        )
    check_tracker_installed(config.log_with)
    if config.lora_min_timestep:
        largest = float(sd_pipeline.set_timesteps(config.sample_num_steps).max())
        if config.lora_min_timestep > largest:
            raise ValueError(
                f"GFlowNetConfig.lora_min_timestep={config.lora_min_timestep} is invalid for this scheduler and "
                f"sample_num_steps={config.sample_num_steps}: its largest timestep is {largest:g}, so no step would "
                f"use the LoRA and nothing would be trained; expected an integer in [0, {math.floor(largest)}] "
                "(0: the LoRA acts at every step)."
            )
    if config.train_use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "GFlowNetConfig.train_use_8bit_adam=True needs bitsandbytes: `pip install bitsandbytes`."
            ) from error
    if image_features is not None and config.eval_features != "pixels":
        raise ValueError(
            f"GFlowNetConfig.eval_features={config.eval_features!r} and the image_features argument both choose "
            "the evaluation's features: give one of them."
        )
    return reward_function, prompt_function


def inexact_training_warnings(
    objective: Objective,
    pipeline: GFlowNetStableDiffusionPipeline,
    prompt_function: PromptCallable,
    resume_path: Optional[str],
) -> list[str]:
    """What the trainer warns about before it sets anything up: a detailed-balance objective with a sampler for
    which detailed balance has no solution, and a resume whose prompt function cannot be reseeded (so that it is
    not exact)."""
    messages = []
    eta = objective.config.sample_eta
    if objective.uses_detailed_balance and not pipeline.detailed_balance_holds(eta):
        sampler = getattr(pipeline, "sampler", None)
        messages.append(
            f"{objective.display_name} trains detailed balance against the noising kernel, which has a solution only "
            f"for the Gaussian-posterior sampler (DDIM at eta=1); this pipeline samples with sample_eta={eta}"
            f"{f' and sampler={sampler!r}' if sampler else ''}, so the objective has no exact fixed point (RTB and "
            "DDPO need no backward kernel)."
        )
    if resume_path is not None and not callable(getattr(prompt_function, "reseed", None)):
        messages.append(
            f"The prompt function {callable_name(prompt_function)!r} has no reseed(seed) method, so the resumed run "
            "draws other prompts than the uninterrupted run would have: the resume is not exact. Give it one "
            "(dag_trl.prompts.PromptList has it)."
        )
    return messages
