"""``dag-trl train``: the main job. Aligns a diffusion model with DAG (or another objective) and reports what changed.

Without arguments it runs offline on CPU: it loads the small built-in shapes model (the preset ``builtin:shapes``,
:mod:`dag_trl.demo.shapes.preset`: shipped in the package, rebuilt if unusable), trains a LoRA on it with DAG towards
the shapes colour-preference reward with the preset's packaged recipe, and writes into ``--output_dir``:
``before.png`` / ``after.png`` (same prompts and noise, each image captioned with its prompt and reward),
``reward_curve.png``, ``summary.json``, the LoRA and flow network under ``model/`` and tensorboard logs.
With ``--pretrained_model`` (a Hub id or local folder of an SD 1.x / 2.x, SDXL, SD3 / SD3.5 or FLUX.1 model),
``--reward`` and ``--prompts`` the same command fine-tunes real models; ``--config recipe.yaml`` reads every option from
YAML (TRL's ``TrlParser``), and command-line flags override it. A model id registered as a preset
(:mod:`dag_trl.presets`) brings its own recipe and report figures; this module has no code for any one model.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import EVAL_SIZE_NOTE, GFlowNetConfig
from .evaluation import kernel_distance, sample_repeated_starts, start_memory
from .io.hub import HubPushError
from .io.tracking import check_tracker_installed, tracker_install_command, tracker_installed
from .presets import ModelPreset, get_preset
from .trainer.checkpointing import (
    checkpoint_dir,
    read_trainer_state,
    run_lock_holder,
    run_lock_message,
    tracker_logging_dir,
)

logger = logging.getLogger(__name__)

# The default --pretrained_model: the preset of the offline shapes model (dag_trl.demo.shapes.preset), found through
# the preset registry by this id.
DEFAULT_MODEL = "builtin:shapes"
BUILTIN_MODEL = DEFAULT_MODEL  # its former name
# What the job writes into output_dir beside the logs; --overwrite removes an earlier run's.
REPORT_OUTPUTS = ("before.png", "after.png", "reward_curve.png", "summary.json", "model")


# The dict-valued options of ScriptArguments and GFlowNetConfig: each takes a JSON object on the command line.
JSON_OBJECT_OPTIONS = (
    "pipeline_kwargs",
    "reward_kwargs",
    "prompt_kwargs",
    "tracker_kwargs",
    "accelerator_kwargs",
    "project_kwargs",
)


def json_object(name: str, value: Any) -> dict[str, Any]:
    """``value`` of the option ``name`` as a dict: a dict as it is, a string parsed as a JSON object (an empty string
    is ``{}``); anything else is a ``ValueError`` naming the option, its value and what is accepted."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}={value!r} is not valid JSON: {error}.") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"{name}={value!r} is invalid: expected a JSON object (a dict of keyword arguments).")
    return parsed


def accept_json_objects(parser: argparse.ArgumentParser) -> None:
    """Make each of :data:`JSON_OBJECT_OPTIONS` of ``parser`` read a JSON object, e.g.
    ``--pipeline_kwargs '{"torch_dtype": "bfloat16"}'``: ``HfArgumentParser`` gives dict fields the type ``dict``
    (and ``Any`` fields the type ``Any``), which refuses every string. Invalid JSON or a JSON value that is not an
    object makes argparse exit with ``argument --<name>/...: <name>=... is ...``."""

    def reader(name: str) -> Callable[[str], dict[str, Any]]:
        def read(text: str) -> dict[str, Any]:
            try:
                return json_object(name, text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from error

        return read

    for action in parser._actions:  # argparse has no public way to change an option's type
        if action.dest in JSON_OBJECT_OPTIONS:
            action.type = reader(action.dest)


@dataclass
class ScriptArguments:
    """Options of ``dag-trl train`` beside the [`GFlowNetConfig`] fields.

    Parameters:
        pretrained_model (`str`, defaults to `"builtin:shapes"`):
            Hub id or local folder of a diffusers model (SD 1.x / 2.x, SDXL, SD3 / SD3.5 or FLUX.1: the family is
            read from its `model_index.json`), or a preset's id (`dag_trl.presets.PRESETS`), such as
            `"builtin:shapes"` for the small offline model built by :mod:`dag_trl.demo.shapes`.
        pretrained_revision (`str`, defaults to `"main"`):
            Hub revision of `pretrained_model`.
        use_lora (`bool`, defaults to `True`):
            Train a LoRA (else the whole denoiser: UNet or transformer).
        lora_rank (`int`, defaults to `4`):
            LoRA rank.
        pipeline_kwargs (`dict` or JSON `str`, defaults to `{}`):
            Further keyword arguments of the family's pipeline class, e.g. `{"sampler": "flow_grpo"}`,
            `{"resolution": 512}` or `{"torch_dtype": "bfloat16"}` for SD3 / FLUX (see docs/models.md).
        reward (`str`, defaults to `"shapes_colour_preference"`):
            Reward name, see `dag_trl.rewards.available_rewards()`.
        reward_kwargs (`dict` or JSON `str`, defaults to `{}`):
            Keyword arguments of the reward factory.
        prompts (`str`, defaults to `"shapes"`):
            Prompt set name, see `dag_trl.prompts.available_prompt_fns()`.
        prompt_kwargs (`dict` or JSON `str`, defaults to `{}`):
            Keyword arguments of the prompt-set factory.
        output_dir (`str`, defaults to `"runs/dag"`):
            Folder for pictures, summary, model and logs; it must be absent or empty unless `overwrite` is set or
            the run resumes (`resume_from`).
        overwrite (`bool`, defaults to `False`):
            Allow writing into an existing, non-empty `output_dir`.
        eval_num_images (`int`, defaults to `16`):
            Images in the before / after grids (the same prompts and noise before and after training), at least 2.
        eval_memory_starts (`int`, defaults to `0`):
            Starting noises for the memory figure of the pretrained and the trained sampler (the share of the
            reward's variance within a prompt that the start `x_T` explains, `dag_trl.evaluation.start_memory`),
            the evaluation prompts' distinct values in turn, at least 2 per prompt; 0 leaves it out.
        eval_memory_continuations (`int`, defaults to `8`):
            Continuations of each start for the memory figure (the same `x_T`, fresh noise in every later step).
        cache_dir (`str`, *optional*):
            Where a preset's model is cached (the shapes model: default `~/.cache/dag_trl` or `$DAG_TRL_CACHE`).
    """

    pretrained_model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id, local folder or preset id."})
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA (else the whole denoiser)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    pipeline_kwargs: Any = field(
        default_factory=dict, metadata={"help": "JSON keyword arguments of the model family's pipeline."}
    )
    reward: str = field(default="shapes_colour_preference", metadata={"help": "Reward name."})
    reward_kwargs: Any = field(default_factory=dict, metadata={"help": "JSON keyword arguments of the reward."})
    prompts: str = field(default="shapes", metadata={"help": "Prompt set name."})
    prompt_kwargs: Any = field(default_factory=dict, metadata={"help": "JSON keyword arguments of the prompt set."})
    output_dir: str = field(default="runs/dag", metadata={"help": "Output folder."})
    overwrite: bool = field(default=False, metadata={"help": "Write into an existing output folder."})
    eval_num_images: int = field(default=16, metadata={"help": "Images in the before/after grids."})
    eval_memory_starts: int = field(default=0, metadata={"help": "Starts for the memory figure (0: none)."})
    eval_memory_continuations: int = field(default=8, metadata={"help": "Continuations per start (memory)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder of a preset's model."})

    def __post_init__(self) -> None:
        for name in ("reward_kwargs", "prompt_kwargs", "pipeline_kwargs"):
            setattr(self, name, json_object(name, getattr(self, name)))
        if self.eval_num_images < 2:
            raise ValueError(
                f"eval_num_images={self.eval_num_images} is invalid: expected an integer >= 2{EVAL_SIZE_NOTE}."
            )
        if self.eval_memory_starts < 0:
            raise ValueError(f"eval_memory_starts={self.eval_memory_starts} is invalid: expected an integer >= 0.")
        if self.eval_memory_continuations < 2:
            raise ValueError(
                f"eval_memory_continuations={self.eval_memory_continuations} is invalid: expected an integer >= 2."
            )


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The value of ``--name value`` or ``--name=value`` in ``argv`` (the last one), else ``None``."""
    value = None
    for index, argument in enumerate(argv):
        if argument == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif argument.startswith(f"--{name}="):
            value = argument.split("=", 1)[1]
    return value


def with_objective_settings(argv: list[str], file_settings: dict[str, Any]) -> list[str]:
    """``argv`` plus the settings that the chosen objective requires (e.g. RTB's summed log-probabilities), for each
    that neither the command line nor the ``--config`` file (``file_settings``) sets; they override a recipe's values.
    The objective is ``--train_objective``, else the config file's ``train_objective``."""
    from .objectives import OBJECTIVES

    objective = OBJECTIVES.get(flag_value(argv, "train_objective") or file_settings.get("train_objective") or "")
    if objective is None:
        return argv
    for name, (value, _) in objective.required_settings.items():
        if flag_value(argv, name) is None and name not in file_settings:
            argv = [*argv, f"--{name}", str(value)]
    return argv


def parse_arguments(argv: Optional[Sequence[str]] = None) -> tuple[ScriptArguments, GFlowNetConfig]:
    """Parse ``argv`` with TRL's ``TrlParser`` (``--config file.yaml`` plus overrides).

    With a preset's model (the default, the built-in shapes model), the preset's packaged recipe supplies the defaults
    (for the shapes model a CPU-sized schedule), and a ``--config`` file's settings override it; with any other model
    the [`GFlowNetConfig`] defaults are the paper's settings.
    """
    import yaml
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = flag_value(argv, "config")
    file_settings: dict[str, Any] = {}
    if config_file is not None and os.path.isfile(config_file):
        with open(config_file) as handle:
            file_settings = yaml.safe_load(handle) or {}
    argv = with_objective_settings(argv, file_settings)
    parser = TrlParser((ScriptArguments, GFlowNetConfig))
    accept_json_objects(parser)
    model = flag_value(argv, "pretrained_model") or file_settings.get("pretrained_model", DEFAULT_MODEL)
    preset = get_preset(model)
    if preset is None:
        return parser.parse_args_and_config(argv)
    # A preset's model trains with its packaged recipe, then the chosen objective's settings for it (if it has any:
    # <recipe>_<objective>.yaml); a --config file's settings go on top.
    recipe = preset.recipe_settings(flag_value(argv, "train_objective") or file_settings.get("train_objective"))
    tracker = recipe.get("log_with")
    user_named_a_tracker = flag_value(argv, "log_with") is not None or "log_with" in file_settings
    if tracker and not user_named_a_tracker and not tracker_installed(tracker):
        # Plain `pip install dag_trl` has no tracker; the packaged recipe still runs (a tracker the user names is an
        # error instead, before the model loads).
        logger.warning(
            "The built-in recipe logs to %s, which is not installed: this run reports on the console and in "
            "--output_dir only (`%s` for %s logs).",
            tracker,
            tracker_install_command(tracker),
            tracker,
        )
        recipe["log_with"] = None
    with tempfile.TemporaryDirectory() as folder:
        merged = os.path.join(folder, "recipe.yaml")
        with open(merged, "w") as handle:
            yaml.safe_dump({**recipe, **file_settings}, handle)
        argv = [argument for argument in argv if not argument.startswith("--config=")]
        if "--config" in argv:
            index = argv.index("--config")
            argv = argv[:index] + argv[index + 2 :]
        return parser.parse_args_and_config(["--config", merged, *argv])


def run_logdir(script_args: ScriptArguments, config: GFlowNetConfig) -> str:
    """The run's logdir: ``--logdir`` when given, else ``<output_dir>/logs``."""
    if config.logdir == GFlowNetConfig.__dataclass_fields__["logdir"].default:
        return os.path.join(script_args.output_dir, "logs")
    return config.logdir


def check_output_dir(script_args: ScriptArguments, config: GFlowNetConfig) -> None:
    """Refuse to write into an existing, non-empty output folder unless ``--overwrite`` is given or the run resumes
    (``--resume_from``), which continues in its own folder, and refuse a folder that another live run is writing.

    ``--overwrite`` (without a resume) removes the earlier run's report, checkpoints and tracker logs first: its
    checkpoints of higher epochs would outlive this run's when the oldest are pruned, and ``--resume_from latest``
    would resume it. Other files in ``output_dir`` stay.
    """
    path = script_args.output_dir
    resuming = bool(config.resume_from)
    if os.path.isdir(path) and os.listdir(path) and not (script_args.overwrite or resuming):
        raise SystemExit(
            f"output_dir={path!r} exists and is not empty: pass --overwrite to write into it, or choose another "
            "--output_dir."
        )
    run_config = copy.copy(config)  # not a new GFlowNetConfig: that would validate (and warn) again
    run_config.logdir = run_logdir(script_args, config)
    holder = run_lock_holder(run_config)
    if holder is not None:
        raise SystemExit(run_lock_message(run_config, holder))
    if not script_args.overwrite or resuming:
        return
    earlier = [os.path.join(path, name) for name in REPORT_OUTPUTS]
    earlier += [checkpoint_dir(run_config), tracker_logging_dir(run_config)]
    removed = [output for output in earlier if os.path.lexists(output)]
    for output in removed:
        if os.path.isdir(output) and not os.path.islink(output):
            shutil.rmtree(output)
        else:
            os.remove(output)
    if removed:
        print(f"--overwrite: removed the earlier run's {', '.join(removed)}")


def check_writable(folder: str) -> None:
    """Create ``folder`` and write a file in it, so that a folder the run cannot write fails now, not after
    training."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"--output_dir {folder!r} is not writable ({error}): choose another --output_dir.") from error


def check_epochs_left(config: GFlowNetConfig, checkpoint: str) -> None:
    """Refuse a resume with no epoch left to train, which would only rewrite ``model/`` and ``summary.json``."""
    epoch = read_trainer_state(checkpoint)["epoch"]
    if epoch + 1 >= config.num_epochs:
        raise SystemExit(
            f"--resume_from {config.resume_from} is {checkpoint!r}, saved after epoch {epoch}, and --num_epochs "
            f"{config.num_epochs} ends there: there is no epoch left to train. Pass --num_epochs above {epoch + 1} "
            "to train further."
        )


def resolve_model(script_args: ScriptArguments) -> str:
    """The folder or Hub id to load; for a preset, its model's folder (the shapes model: the shipped copy, or a
    cached rebuild)."""
    preset = get_preset(script_args.pretrained_model)
    if preset is None:
        return script_args.pretrained_model
    return preset.resolve(script_args.cache_dir)


def report_part(name: str, compute: Callable[[], Any], failures: dict[str, str]) -> Any:
    """``compute()``, or ``None`` when it raises: a figure of the report that fails must not lose the rest of the
    report (or, after training, the run). The failure is recorded under ``name`` in ``failures`` (the summary's
    ``failed_parts``) and warned about."""
    try:
        return compute()
    except Exception as error:  # whatever breaks an optional figure, the report is written without it
        failures[name] = f"{type(error).__name__}: {error}"
        warnings.warn(f"The report leaves out {name}: it failed with {failures[name]}", UserWarning, stacklevel=2)
        return None


def save_evaluation_grid(result: dict[str, Any], prompts: list[str], path: str) -> None:
    """The evaluation's images captioned with their prompts and rewards, as one PNG."""
    from .io.reporting import captioned_image_grid

    captions = [f"{p} | {r:.3f}" for p, r in zip(prompts, result["rewards"].tolist(), strict=True)]
    captioned_image_grid(result["images"], captions, columns=min(8, len(captions))).save(path)


def evaluate(
    trainer: Any,
    prompts: list[str],
    metadata: list[dict],
    seed: int,
    preset: Optional[ModelPreset],
    failures: Optional[dict[str, str]] = None,
    name: str = "",
) -> dict[str, Any]:
    """The trainer's measurement (:meth:`~dag_trl.GFlowNetDiffusionTrainer.evaluate_prompts`: rewards, their
    statistics and diversity, and what its ``evaluation_hook`` adds) of a fixed evaluation set, with the preset's
    figures (for the shapes model: colour distribution and prompt adherence). With ``failures``, the hook's entries
    and the preset's figures are optional parts of the report (:func:`report_part`, named ``<name>.<key>``)."""
    measured = trainer.evaluate_prompts(prompts, metadata, seed, use_evaluation_hook=False)
    images, rewards = measured["images"], measured["rewards"]
    result: dict[str, Any] = {
        "images": images,
        "rewards": rewards,
        "reward_mean": measured["reward_mean"],
        "reward_std": measured["reward_std"],
        "reward_quantiles": {
            key[len("reward_") :]: value for key, value in measured.items() if key.startswith("reward_q")
        },
        "diversity": measured["diversity"],
    }
    parts: dict[str, Callable[[], Any]] = {}
    if trainer.evaluation_hook is not None:
        parts["evaluation_hook"] = lambda: trainer.evaluation_hook(images, prompts, metadata, rewards)
    if preset is not None and preset.evaluation_figures is not None:
        parts.update(preset.evaluation_figures(trainer, images, prompts, seed))
    for key, compute in parts.items():
        value = compute() if failures is None else report_part(f"{name}.{key}", compute, failures)
        if key == "evaluation_hook" and value is not None:
            result.update(value)
        elif value is not None:
            result[key] = value
    return result


def check_memory_starts(starts: int, prompts: list[str]) -> None:
    """Refuse fewer than 2 memory-figure starts per distinct evaluation prompt (checked before training)."""
    distinct = len(set(prompts))
    if starts < 2 * distinct:
        raise ValueError(
            f"eval_memory_starts={starts} is invalid for {distinct} distinct evaluation prompts: the memory "
            f"figure needs at least 2 starts per prompt, so at least {2 * distinct}."
        )


def memory_figure(trainer: Any, prompts: list[str], script_args: ScriptArguments, seed: int) -> dict[str, Any]:
    """The memory figure (:func:`~dag_trl.evaluation.start_memory`) of the trainer's current sampler from
    ``eval_memory_starts`` starts, the distinct ``prompts`` in turn, with ``eval_memory_continuations``
    continuations each."""
    distinct = list(dict.fromkeys(prompts))
    starts = script_args.eval_memory_starts
    check_memory_starts(starts, prompts)
    start_prompts = [distinct[i % len(distinct)] for i in range(starts)]
    samples = sample_repeated_starts(trainer, start_prompts, script_args.eval_memory_continuations, seed)
    memory = start_memory(samples.rewards, samples.prompts)
    return {"memory": memory["memory"], "memory_se": memory["memory_se"], "starts": starts,
            "continuations": script_args.eval_memory_continuations}  # fmt: skip


# Constructor arguments that the script's own options set.
SCRIPT_PIPELINE_ARGUMENTS = {
    "pretrained_model_name": "pretrained_model",
    "pretrained_model_revision": "pretrained_revision",
    "use_lora": "use_lora",
    "lora_rank": "lora_rank",
    "lora_init_seed": "seed",
}


def pipeline_keyword_arguments(pipeline_kwargs: dict[str, Any], family: Optional[type] = None) -> dict[str, Any]:
    """``pipeline_kwargs`` checked against ``family``'s constructor (an unknown name, or one the script's own options
    set, is a ``ValueError`` naming the accepted ones), with a ``torch_dtype`` name (``"bfloat16"``, as YAML gives it)
    made a ``torch.dtype``."""
    result = dict(pipeline_kwargs)
    if family is not None:
        accepted = set(inspect.signature(family.__init__).parameters) - {"self"}
        for name in result:
            if name in SCRIPT_PIPELINE_ARGUMENTS:
                raise ValueError(
                    f"pipeline_kwargs.{name} is set by the script's own --{SCRIPT_PIPELINE_ARGUMENTS[name]}: set that "
                    "instead."
                )
            if name not in accepted:
                raise ValueError(
                    f"pipeline_kwargs.{name} is not an argument of {family.__name__}: expected one of "
                    f"{sorted(accepted - set(SCRIPT_PIPELINE_ARGUMENTS))}."
                )
    name = result.get("torch_dtype")
    if name is not None and not isinstance(name, torch.dtype):
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"pipeline_kwargs.torch_dtype={name!r} is invalid: expected a torch dtype name such as 'bfloat16', "
                "'float16' or 'float32'."
            )
        result["torch_dtype"] = dtype
    return result


def build_trainer(script_args: ScriptArguments, config: GFlowNetConfig, reward_fn: Any, prompt_fn: Any) -> Any:
    """The pipeline the script arguments name (with a LoRA seeded by ``config.seed``) and a trainer on it, with the
    preset's evaluation hook when the model is a preset's."""
    from .models import pipeline_family
    from .trainer import GFlowNetDiffusionTrainer

    model = resolve_model(script_args)
    family = pipeline_family(model, script_args.pretrained_revision)
    pipeline = family(
        model,
        pretrained_model_revision=script_args.pretrained_revision,
        use_lora=script_args.use_lora,
        lora_rank=script_args.lora_rank,
        lora_init_seed=config.seed,
        **pipeline_keyword_arguments(script_args.pipeline_kwargs, family),
    )
    preset = get_preset(script_args.pretrained_model)
    evaluation_hook = None
    if preset is not None and preset.evaluation_hook is not None:
        evaluation_hook = preset.evaluation_hook(config)
    return GFlowNetDiffusionTrainer(config, reward_fn, prompt_fn, pipeline, evaluation_hook=evaluation_hook)


def run(script_args: ScriptArguments, config: GFlowNetConfig) -> dict[str, Any]:
    """Build, evaluate, train, evaluate again, and write the report. Returns the summary."""
    from .io.reporting import plot_reward_curve
    from .prompts import get_prompt_fn
    from .rewards import get_reward_fn
    from .trainer import resolve_resume_from

    show_progress_on_the_console()
    config.logdir = run_logdir(script_args, config)
    check_output_dir(script_args, config)
    # The preset of the model, if any; looking it up registers the presets' rewards and prompt sets too.
    preset = get_preset(script_args.pretrained_model)
    # Resolve names before any model is loaded, so a typo fails in a second.
    reward_fn = get_reward_fn(script_args.reward, **script_args.reward_kwargs)
    prompt_fn = get_prompt_fn(script_args.prompts, **script_args.prompt_kwargs)
    evaluation_prompt_fn = get_prompt_fn(
        script_args.prompts, **{**script_args.prompt_kwargs, "seed": config.eval_seed}
    )
    if config.resume_from:
        # A wrong folder, or one with nothing left to train, fails here, not after loading the model.
        check_epochs_left(config, resolve_resume_from(config))

    check_tracker_installed(config.log_with)
    check_writable(script_args.output_dir)  # last of the checks that need no model; it creates the folder
    trainer = build_trainer(script_args, config, reward_fn, prompt_fn)
    main = trainer.accelerator.is_main_process
    # The report and the model are written before the push, so that a failed push loses nothing.
    push, config.push_to_hub = config.push_to_hub, False
    pairs = [evaluation_prompt_fn() for _ in range(script_args.eval_num_images)]
    prompts, metadata = [p for p, _ in pairs], [m for _, m in pairs]

    # Parts of the report that fail are named in the summary and warned about; the rest is written.
    failures: dict[str, str] = {}
    before = evaluate(trainer, prompts, metadata, config.eval_seed, preset, failures, "before")
    if script_args.eval_memory_starts:
        check_memory_starts(script_args.eval_memory_starts, prompts)  # a setting error, before training
        memory = report_part(
            "before.memory", lambda: memory_figure(trainer, prompts, script_args, config.eval_seed), failures
        )
        if memory is not None:
            before["memory"] = memory
    start, earlier_evaluations = time.perf_counter(), len(trainer.evaluation_history)
    trainer.train()
    # Training time alone: the evaluations during training (eval_freq) are reported on their own.
    evaluation_seconds = sum(entry["seconds"] for entry in trainer.evaluation_history[earlier_evaluations:])
    train_seconds = time.perf_counter() - start - evaluation_seconds
    if main:
        # The trained model first: nothing the report computes after training can lose it.
        trainer.save_pretrained(os.path.join(script_args.output_dir, "model"))
    after = evaluate(trainer, prompts, metadata, config.eval_seed, preset, failures, "after")
    # How far the fine-tuned samples moved from the pretrained model's, on the same prompts and noise.
    distance = report_part(
        "after.prior_kernel_distance",
        lambda: kernel_distance(trainer.image_features(before["images"]), trainer.image_features(after["images"])),
        failures,
    )
    if distance is not None:
        after["prior_kernel_distance"] = distance
    if script_args.eval_memory_starts:
        memory = report_part(
            "after.memory", lambda: memory_figure(trainer, prompts, script_args, config.eval_seed), failures
        )
        if memory is not None:
            after["memory"] = memory
    target = None
    if preset is not None and preset.target_summary is not None:
        target = report_part("target", lambda: preset.target_summary(config, prompts), failures)

    summary = {
        "pretrained_model": script_args.pretrained_model,
        "reward": script_args.reward,
        "prompts": script_args.prompts,
        "algorithm": trainer.objective.display_name,
        "epochs": config.num_epochs,
        "eval_features": config.eval_features,
        "train_seconds": train_seconds,
        "reward_history": trainer.reward_history,
        "evaluation_history": trainer.evaluation_history,
    }
    if target is not None:
        summary["target"] = target
    for name, result in (("before", before), ("after", after)):
        summary[name] = {key: value for key, value in result.items() if key not in ("images", "rewards")}
    if main:
        os.makedirs(script_args.output_dir, exist_ok=True)
        for name, result in (("before", before), ("after", after)):
            grid = os.path.join(script_args.output_dir, f"{name}.png")
            report_part(f"{name}.png", lambda: save_evaluation_grid(result, prompts, grid), failures)  # noqa: B023 (called at once)
        curve = os.path.join(script_args.output_dir, "reward_curve.png")
        report_part(
            "reward_curve.png",
            lambda: plot_reward_curve(trainer.reward_history, curve, evaluations=trainer.evaluation_history),
            failures,
        )
        if failures:
            summary["failed_parts"] = failures
        with open(os.path.join(script_args.output_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2)
        print(format_summary(summary))
    trainer.accelerator.end_training()
    if push:
        try:
            trainer.push_to_hub()
        except HubPushError as error:
            message = f"The run finished and its report and model are in {script_args.output_dir!r}. {error}"
            raise SystemExit(message) from error
    return summary


def diversity_label(eval_features: str) -> str:
    """What the diversity figure averages for ``eval_features`` (see docs/evaluation.md)."""
    if eval_features == "pixels":
        return "pixel distance"
    return f"cosine distance of {eval_features} embeddings"


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run."""
    lines = [
        f"{summary['algorithm']} on {summary['pretrained_model']} ({summary['epochs']} epochs, "
        f"{summary.get('train_seconds', 0) / 60:.1f} min of training), reward "
        f"{summary['reward']}, prompts {summary['prompts']}",
        f"mean reward before: {summary['before']['reward_mean']:.4f} (std {summary['before']['reward_std']:.4f})",
        f"mean reward after:  {summary['after']['reward_mean']:.4f} (std {summary['after']['reward_std']:.4f})",
    ]
    if "prior_kernel_distance" in summary["after"]:
        lines.append(
            f"kernel distance of the samples after vs before: {summary['after']['prior_kernel_distance']:.4f}"
        )
    if summary["before"]["diversity"] is not None:
        lines.append(
            f"diversity (mean pairwise {diversity_label(summary.get('eval_features', 'pixels'))} per prompt): "
            f"{summary['before']['diversity']:.3f} -> "
            f"{summary['after']['diversity']:.3f}"
        )
    if "memory" in summary["before"] and "memory" in summary["after"]:
        lines.append(
            "memory (share of the reward's variance within a prompt that the start x_T explains): "
            + " -> ".join(f"{summary[name]['memory']['memory']:.3f}" for name in ("before", "after"))
            + f" ({summary['after']['memory']['starts']} starts x {summary['after']['memory']['continuations']})"
        )
    preset = get_preset(summary["pretrained_model"])
    if preset is not None and preset.summary_lines is not None:
        lines.extend(preset.summary_lines(summary))
    for name, error in summary.get("failed_parts", {}).items():
        lines.append(f"left out of the report: {name} ({error})")
    return "\n".join(lines)


def show_progress_on_the_console() -> None:
    """Print dag_trl's log messages from INFO up (the trainer's line per epoch) on stderr, unless the program has set
    up logging itself (a handler on the root or the ``dag_trl`` logger)."""
    package_logger = logging.getLogger("dag_trl")
    if package_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``dag-trl`` (and ``python -m dag_trl.cli``): ``dag-trl train [--config recipe.yaml]
    [--field value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: dag-trl train [--config recipe.yaml] [--pretrained_model ID] [--reward NAME] [--prompts NAME] "
            "[--output_dir DIR] [--overwrite] [--<GFlowNetConfig field> VALUE ...]\n\n" + __doc__
        )
        return
    if argv[0] != "train":
        raise SystemExit(f"unknown command {argv[0]!r}: expected 'train' (see dag-trl --help).")
    show_progress_on_the_console()
    script_args, config = parse_arguments(argv[1:])
    run(script_args, config)


if __name__ == "__main__":
    main()
