"""Configuration of the GFlowNet diffusion trainer, in the shape of TRL's ``DDPOConfig``."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

MIXED_PRECISIONS = ("no", "fp16", "bf16")
REWARD_EXP_ANNEALS = ("linear", "none")
LOG_PROB_REDUCTIONS = ("mean", "sum")
LOG_Z_ESTIMATES = ("batch", "learned")
TRANSITION_ORDERS = ("by_timestep", "random")
# Accelerator arguments the trainer sets from the config; accelerator_kwargs must not repeat them.
ACCELERATOR_ARGUMENTS_SET_BY_TRAINER = frozenset(
    {"log_with", "mixed_precision", "project_config", "gradient_accumulation_steps", "gradient_accumulation_plugin"}
)
# accelerate's ProjectConfiguration arguments, with what each accepts (TRL's DDPO passed them all through);
# the trainer applies some itself (trainer/checkpointing.py).
PROJECT_KWARGS = {
    "project_dir": "a folder path",
    "logging_dir": "a folder path",
    "automatic_checkpoint_naming": "True or False",
    "total_limit": "an integer >= 1, or None to keep every checkpoint",
    "iteration": "an integer >= 0",
    "save_on_each_node": "True or False",
}
# The evaluation's image features (dag_trl.evaluation_features); those named in EVAL_FEATURES_WITH_MODEL also take a
# model id or local folder after a colon, e.g. "clip:openai/clip-vit-base-patch32".
EVAL_FEATURES = ("pixels", "clip", "dino", "dreamsim")
EVAL_FEATURES_WITH_MODEL = ("clip", "dino")
EVAL_FEATURES_ACCEPTED = (
    "one of "
    + ", ".join(repr(name) for name in EVAL_FEATURES)
    + ", or "
    + " or ".join(f"'{name}:<model id or folder>'" for name in EVAL_FEATURES_WITH_MODEL)
)
DREAMSIM_MISSING = (
    "eval_features='dreamsim' needs the dreamsim package, which dag_trl does not install: `pip install dreamsim`."
)
TRACKERS = ("wandb", "tensorboard", "trackio", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "all")


# The largest seed torch.manual_seed accepts (seeds also feed numpy's SeedSequence, which takes any int >= 0).
MAX_SEED = 2**64 - 1

# Why evaluations need two images: the kernel distance from the pretrained model's samples compares two sets of them.
EVAL_SIZE_NOTE = " (the distance from the pretrained model's samples compares sets of at least 2 images)"

# Above this classifier-free guidance scale GFlowNetConfig warns: models are sampled at about 1 to 15 (Stable
# Diffusion's default 7.5, FLUX's distilled 3.5), and far above it the guided noise prediction leaves the range any
# model was trained on.
MAX_USUAL_GUIDANCE_SCALE = 50.0

# A field's check: (does the value pass, what is accepted), the second for the error message.
FieldRule = tuple[Callable[[Any], bool], str]


def _is_integer(value: Any) -> bool:
    """An ``int`` but not a ``bool``: ``True`` is an ``int`` in Python, and never means a count or a seed."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A finite ``int`` or ``float``, not a ``bool`` or a string: a string makes a range check raise Python's
    ``'>' not supported`` (which names no field), and ``inf`` passes a lower bound and turns the loss into inf or
    NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _integer(minimum: int, maximum: Optional[int] = None, note: str = "") -> FieldRule:
    """An integer in ``[minimum, maximum]``."""
    if maximum is None:
        return (lambda v: _is_integer(v) and v >= minimum), f"an integer >= {minimum}{note}"
    return (lambda v: _is_integer(v) and minimum <= v <= maximum), f"an integer in [{minimum}, {maximum}]{note}"


def _number(
    low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, note: str = ""
) -> FieldRule:
    """A finite ``int`` or ``float`` between ``low`` and ``high``, each end open or closed."""

    def check(value: Any) -> bool:
        if not _is_finite_number(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    if math.isinf(low) and math.isinf(high):
        accepted = "a finite number"
    elif math.isinf(high):
        accepted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        accepted = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return check, accepted + note


def _optional(rule: FieldRule, none_means: str) -> FieldRule:
    """``rule``, or ``None`` (which means ``none_means``)."""
    check, accepted = rule
    return (lambda v: v is None or check(v)), f"{accepted}, or None {none_means}"


def _choice(options: tuple[Optional[str], ...]) -> FieldRule:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _string(non_empty: bool = False, path: bool = False) -> FieldRule:
    """A ``str`` (with ``path``, also an ``os.PathLike``, which ``__post_init__`` turns into a ``str``)."""
    types = (str, os.PathLike) if path else (str,)
    accepted = ("a non-empty " if non_empty else "a ") + ("folder path (str or os.PathLike)" if path else "string")
    return (lambda v: isinstance(v, types) and (not non_empty or bool(os.fspath(v)))), accepted


_BOOL: FieldRule = (lambda v: isinstance(v, bool), "True or False")


def split_eval_features(value: str) -> tuple[str, Optional[str]]:
    """``"clip:<model>"`` -> ``("clip", "<model>")``, ``"dino"`` -> ``("dino", None)``; raises ``ValueError`` naming
    what is accepted (:data:`EVAL_FEATURES_ACCEPTED`) for anything else."""
    name, colon, model = value.partition(":") if isinstance(value, str) else ("", "", "")
    if name not in EVAL_FEATURES or (colon and (name not in EVAL_FEATURES_WITH_MODEL or not model)):
        raise ValueError(f"eval_features={value!r} is invalid: expected {EVAL_FEATURES_ACCEPTED}.")
    return name, model or None


def _is_eval_features(value: Any) -> bool:
    try:
        split_eval_features(value)
    except ValueError:
        return False
    return True


def _dict(of_what: str) -> FieldRule:
    return (lambda v: isinstance(v, dict)), f"a dict of {of_what}"


def validate_project_kwargs(project_kwargs: Any) -> None:
    """Raise ``ValueError`` naming the key for ``GFlowNetConfig.project_kwargs`` that accelerate's
    ``ProjectConfiguration`` would refuse or the trainer cannot honour."""
    if not isinstance(project_kwargs, dict):
        raise ValueError(
            f"GFlowNetConfig.project_kwargs={project_kwargs!r} is invalid: expected a dict of "
            f"ProjectConfiguration arguments ({', '.join(PROJECT_KWARGS)})."
        )
    unknown = sorted(set(project_kwargs) - set(PROJECT_KWARGS))
    if unknown:
        raise ValueError(
            f"GFlowNetConfig.project_kwargs has unknown keys {unknown}: accelerate's ProjectConfiguration accepts "
            f"{', '.join(PROJECT_KWARGS)}."
        )
    for name, value in project_kwargs.items():
        if name in ("project_dir", "logging_dir"):
            valid = value is None or isinstance(value, (str, os.PathLike))
        elif name in ("automatic_checkpoint_naming", "save_on_each_node"):
            valid = isinstance(value, bool)
        elif name == "total_limit":
            valid = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        else:
            valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not valid:
            raise ValueError(
                f"GFlowNetConfig.project_kwargs[{name!r}]={value!r} is invalid: expected {PROJECT_KWARGS[name]}."
            )


# The type and range of every field of GFlowNetConfig, checked first on construction so that the cross-field checks
# after it (and the trainer) only see values of the right type; tests/test_config.py checks that every field has one.
FIELD_RULES: dict[str, FieldRule] = {
    "exp_name": _string(non_empty=True),
    "run_name": _string(),
    "seed": _integer(0, MAX_SEED),
    "log_with": _choice((None, *TRACKERS)),
    "tracker_kwargs": _dict("tracker init arguments by tracker name"),
    "accelerator_kwargs": _dict("Accelerator arguments"),
    "project_kwargs": _dict("ProjectConfiguration arguments"),
    "tracker_project_name": _string(non_empty=True),
    "logdir": _string(non_empty=True, path=True),
    "num_epochs": _integer(1),
    "save_freq": _integer(1),
    "num_checkpoint_limit": _integer(1),
    "eval_freq": _integer(0, note=" (0: never)"),
    "eval_num_samples": _integer(2, note=EVAL_SIZE_NOTE),
    "eval_seed": _integer(0, MAX_SEED),
    "eval_features": (_is_eval_features, EVAL_FEATURES_ACCEPTED),
    "mixed_precision": _choice(MIXED_PRECISIONS),
    "allow_tf32": _BOOL,
    "resume_from": _string(path=True),
    "push_to_hub": _BOOL,
    "hub_model_id": _optional(_string(non_empty=True), "to push to exp_name in the user's namespace"),
    "negative_prompts": _string(),
    "sample_num_steps": _integer(1),
    "sample_eta": _number(
        0,
        1,
        low_open=True,
        note=" (with eta = 0 DDIM is deterministic and has no log-probability; above 1 its mean is undefined at some "
        "steps)",
    ),
    "sample_guidance_scale": _number(),
    "sample_batch_size": _integer(1),
    "sample_num_batches_per_epoch": _integer(1),
    "async_reward_computation": _BOOL,
    "max_workers": _integer(1),
    "train_batch_size": _integer(1),
    "train_use_8bit_adam": _BOOL,
    "train_learning_rate": _number(0, low_open=True),
    "train_flow_learning_rate": _optional(_number(0, low_open=True), "to use train_learning_rate"),
    "train_adam_beta1": _number(0, 1, high_open=True),
    "train_adam_beta2": _number(0, 1, high_open=True),
    "train_adam_weight_decay": _number(0),
    "train_adam_epsilon": _number(0, low_open=True),
    "train_gradient_accumulation_steps": _integer(1),
    "train_max_grad_norm": _number(0, low_open=True),
    "train_num_inner_epochs": _integer(1),
    "train_cfg": _BOOL,
    "train_adv_clip_max": _number(0, low_open=True),
    "train_clip_range": _number(0, low_open=True),
    "train_timestep_fraction": _number(0, 1, low_open=True),
    "train_transition_order": _choice(TRANSITION_ORDERS),
    "train_reward_exp": _number(0),
    "train_reward_exp_anneal": _choice(REWARD_EXP_ANNEALS),
    "train_unet_reg": _number(0),
    "train_log_z_learning_rate": _number(0, low_open=True),
    "train_log_z_estimate": _choice(LOG_Z_ESTIMATES),
    "train_objective": _optional(_string(non_empty=True), "to pick by train_klpf"),
    "lora_min_timestep": _integer(0),
    "train_klpf": _number(note=" (<= 0: DAG-DB, > 0: DAG-KL)"),
    "train_log_prob_reduction": _choice(LOG_PROB_REDUCTIONS),
    "train_gradient_checkpointing": _BOOL,
    "train_decode_batch_size": _optional(_integer(1), "to use train_batch_size"),
    "flow_block_out_channels": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_integer(c) and c >= 1 for c in v),
        "a non-empty list of positive integers",
    ),
    "flow_layers_per_block": _integer(1),
    "flow_attention_heads": _integer(1),
    "flow_time_embedding_dim": _integer(1),
    "per_prompt_stat_tracking": _BOOL,
    "per_prompt_stat_tracking_buffer_size": _integer(1),
    "per_prompt_stat_tracking_min_count": _integer(1),
}


def _field_default(name: str) -> Any:
    """The default value of the ``GFlowNetConfig`` field ``name``."""
    default = GFlowNetConfig.__dataclass_fields__[name]
    return default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default


def _default_exp_name() -> str:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "dag_trl"
    return os.path.splitext(script)[0] or "dag_trl"


@dataclass
class GFlowNetConfig:
    r"""
    Configuration for [`GFlowNetDiffusionTrainer`]: DAG and DAG-KL (Zhang et al., "Improving GFlowNets for
    Text-to-Image Diffusion Alignment", arXiv 2406.00633).

    Fields that TRL's ``DDPOConfig`` also has keep its name and meaning, so a DDPO script ports by renaming classes.
    Defaults are the paper's settings for Stable Diffusion 1.5 (sample 4 x 16 trajectories of 50 DDIM steps per epoch
    and process, train batch 8, 4 accumulated batches per optimiser step, learning rate 3e-4, reward exponent 100
    annealed linearly over the first half of training). Usable with ``transformers.HfArgumentParser`` and
    ``trl.TrlParser`` (YAML config + command-line overrides).

    Parameters:
        > General

        exp_name (`str`, defaults to the running script's name):
            Name of the experiment: the default Hub repository name (`push_to_hub` without `hub_model_id`) and the
            tracker run name when `run_name` is empty.
        run_name (`str`, *optional*, defaults to `""`):
            Name of this run in wandb and trackio (`tracker_kwargs` can override it); empty: `exp_name`.
        seed (`int`, *optional*, defaults to `0`):
            Seed for parameter initialisation. Sampling noise and shuffling use seeds derived from `(seed, process
            index, epoch)`: every process draws different trajectories, and a resumed run repeats what the
            uninterrupted run would have drawn. An integer in `[0, 2**64 - 1]` (what `torch.manual_seed` takes).
        log_with (`str` or `None`, *optional*, defaults to `None`):
            Tracker for accelerate: one of `"wandb"`, `"tensorboard"`, `"trackio"`, `"comet_ml"`, `"mlflow"`,
            `"aim"`, `"clearml"`, `"dvclive"`, `"swanlab"`, `"all"`, or `None` for no tracker.
        tracker_kwargs (`dict`, *optional*, defaults to `{}`):
            Keyword arguments for the tracker's `init` (for example `{"wandb": {"entity": "me"}}`).
        accelerator_kwargs (`dict`, *optional*, defaults to `{}`):
            Extra keyword arguments for `accelerate.Accelerator` (for example `kwargs_handlers` or
            `deepspeed_plugin`); not `log_with`, `mixed_precision`, `project_config` or
            `gradient_accumulation_steps` (or `_plugin`), which come from the fields of this config.
        project_kwargs (`dict`, *optional*, defaults to `{}`):
            Extra keyword arguments for `accelerate.utils.ProjectConfiguration`, with TRL's `DDPOTrainer`'s meaning:
            checkpoints go to `<project_dir>/checkpoints` when `project_dir` is given (else `<logdir>/checkpoints`),
            tracker files to `logging_dir`, and `total_limit` replaces `num_checkpoint_limit` (`None` keeps every
            checkpoint). Checkpoints are always named `checkpoint_<epoch>`, so `automatic_checkpoint_naming` is
            accepted and changes nothing.
        tracker_project_name (`str`, *optional*, defaults to `"dag_trl"`):
            Project name in the tracker.
        logdir (`str`, *optional*, defaults to `"logs"`):
            Top-level folder for checkpoints and local tracker files.
        num_epochs (`int`, *optional*, defaults to `100`):
            Number of epochs (one epoch = sampling, then `train_num_inner_epochs` passes over the samples).
        save_freq (`int`, *optional*, defaults to `1`):
            Save an accelerate checkpoint every this many epochs.
        num_checkpoint_limit (`int`, *optional*, defaults to `5`):
            Keep at most this many checkpoints; the oldest are deleted.
        eval_freq (`int`, *optional*, defaults to `0`):
            Evaluate before training and every this many epochs (and after the last): `eval_num_samples` images for
            fixed prompts and noise, with the reward's mean and quantiles, the per-prompt diversity and the distance
            from the pretrained model's samples, logged to the trackers as `eval/...` and kept in the trainer's
            `evaluation_history`. `0`: never.
        eval_num_samples (`int`, *optional*, defaults to `64`):
            Images per evaluation (split over the processes), at least 2.
        eval_seed (`int`, *optional*, defaults to `1234`):
            Seed of the evaluation's prompts and noise.
        eval_features (`str`, *optional*, defaults to `"pixels"`):
            Image features of the evaluation's diversity and kernel distance (:mod:`dag_trl.evaluation_features`):
            `"pixels"` (8x8-pooled pixels, Euclidean distances: for the shapes model), `"clip"` (the reward's CLIP
            image tower when it has one, else `openai/clip-vit-large-patch14`), `"dino"` (DINOv2's CLS token,
            `facebook/dinov2-base`), `"dreamsim"` (needs `pip install dreamsim`); `"clip:<model>"` and
            `"dino:<model>"` name a Hub id or local folder. On embeddings, diversity is the mean pairwise cosine
            distance per prompt. The trainer's `image_features` argument replaces it (leave it `"pixels"` then).
        mixed_precision (`str`, *optional*, defaults to `"bf16"`):
            Precision of the frozen weights and the UNet forward: `"no"` (also `False`, which is how YAML reads an
            unquoted `no`), `"fp16"` or `"bf16"`. Trainable
            parameters (LoRA, flow network) stay in float32 (under DeepSpeed the LoRA or UNet as 16-bit copies with
            float32 masters in the optimiser; the flow network stays float32 under bf16), and the DDIM means and
            log-probabilities are always computed in float32.
        allow_tf32 (`bool`, *optional*, defaults to `True`):
            Allow TF32 matrix multiplications on Ampere and newer GPUs.
        resume_from (`str`, *optional*, defaults to `""`):
            Resume from this checkpoint folder, or `"latest"` for the newest checkpoint under `logdir`.
        push_to_hub (`bool`, *optional*, defaults to `False`):
            Push the final LoRA, flow network and model card to the Hub at the end of `train()`.
        hub_model_id (`str` or `None`, *optional*, defaults to `None`):
            Repository to push to; defaults to `exp_name` in the user's namespace.

        > Sampling

        negative_prompts (`str`, *optional*, defaults to `""`):
            Negative prompt used for the unconditional half of classifier-free guidance.
        sample_num_steps (`int`, *optional*, defaults to `50`):
            Number of DDIM steps per trajectory.
        sample_eta (`float`, *optional*, defaults to `1.0`):
            DDIM eta, in (0, 1]: with eta = 0 the policy is deterministic and has no log-probability, and above 1
            the DDIM mean is undefined at some steps. When the trainer is constructed it also refuses an eta so
            small that a step's standard deviation falls below float32's resolution of the latents (below 4.7e-5 with
            Stable Diffusion's schedule; the error gives the smallest eta for the scheduler and step count).
        sample_guidance_scale (`float`, *optional*, defaults to `5.0`):
            Classifier-free guidance scale; above 50 (far past the 1 to 15 models are sampled at) it warns.
        sample_batch_size (`int`, *optional*, defaults to `16`):
            Trajectories sampled per batch and process.
        sample_num_batches_per_epoch (`int`, *optional*, defaults to `4`):
            Sampling batches per epoch and process.
        async_reward_computation (`bool`, *optional*, defaults to `False`):
            Score the images in a thread pool while the next batch is sampled.
        max_workers (`int`, *optional*, defaults to `2`):
            Threads for asynchronous reward computation.

        > Training

        train_batch_size (`int`, *optional*, defaults to `8`):
            Trajectories per training batch and process.
        train_use_8bit_adam (`bool`, *optional*, defaults to `False`):
            Use bitsandbytes' 8-bit AdamW.
        train_learning_rate (`float`, *optional*, defaults to `3e-4`):
            Learning rate of the UNet (LoRA) parameters.
        train_flow_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the flow network; `None` uses `train_learning_rate`.
        train_adam_beta1 (`float`, *optional*, defaults to `0.9`):
            AdamW beta1.
        train_adam_beta2 (`float`, *optional*, defaults to `0.999`):
            AdamW beta2.
        train_adam_weight_decay (`float`, *optional*, defaults to `1e-4`):
            AdamW weight decay.
        train_adam_epsilon (`float`, *optional*, defaults to `1e-8`):
            AdamW epsilon.
        train_gradient_accumulation_steps (`int`, *optional*, defaults to `4`):
            Training batches (each with all kept timesteps) accumulated per optimiser step; accelerate accumulates
            `train_gradient_accumulation_steps * num_train_timesteps` backward passes.
        train_max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clip, applied to the UNet parameters and to the flow network separately (under
            DeepSpeed: once, to the norm of both together).
        train_num_inner_epochs (`int`, *optional*, defaults to `1`):
            Passes over each epoch's samples.
        train_cfg (`bool`, *optional*, defaults to `True`):
            Use classifier-free guidance when recomputing the policy's noise prediction during training. Off, with
            `sample_guidance_scale` != 1, transitions sampled by the guided policy are scored under the conditional
            one (as the reference code allows): the DAG-KL ratio then starts away from 1. At
            `sample_guidance_scale` = 1 there is nothing to guide: training makes the one conditional call that
            sampling made, whatever this says.
        train_adv_clip_max (`float`, *optional*, defaults to `5.0`):
            DAG-KL and DDPO: clip advantages to `[-train_adv_clip_max, train_adv_clip_max]`.
        train_clip_range (`float`, *optional*, defaults to `1e-4`):
            DAG-KL and DDPO: PPO clip range of the probability ratio.
        train_timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of each trajectory's transitions trained on, in `(0, 1]` (a random subset per trajectory).
        train_transition_order (`str`, *optional*, defaults to `"by_timestep"`):
            How a window's kept transitions form batches (each batch takes one transition from each of
            `train_batch_size` trajectories): `"by_timestep"` visits each trajectory's transitions from the last to
            the first, so at `train_timestep_fraction=1` every batch holds one timestep, and a state's reward is
            shared by the two transitions that use it; `"random"` (the reference implementation's) visits them in a
            random order, so batches mix timesteps (DAG-KL's leave-one-out baseline then compares transitions of
            different timesteps) and some state rewards need one more model call. DAG-DB, RTB and DDPO get the same
            gradient either way.
        train_reward_exp (`float`, *optional*, defaults to `100.0`):
            Reward exponent beta: the target distribution is proportional to `exp(beta * R(x_0))` (with
            `train_log_prob_reduction="mean"` the effective exponent is `beta * D`, see the docs).
        train_reward_exp_anneal (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: beta grows from 0 at epoch 0 to `train_reward_exp` at half of `num_epochs` (with
            `num_epochs=1` the only epoch trains at beta = 0, which warns); `"none"`: constant.
        train_unet_reg (`float`, *optional*, defaults to `1.0`):
            Weight of the proximal regulariser, the mean squared difference between the current and the sampled
            guided noise predictions.
        train_log_z_learning_rate (`float`, *optional*, defaults to `0.1`):
            RTB: learning rate of the log-partition estimate `log Z(c)`. Far above the LoRA's, because `log Z` must
            travel from 0 to its value (about `log E_prior[exp(beta R)]`, a few nats) within a short run.
        train_log_z_estimate (`str`, *optional*, defaults to `"batch"`):
            RTB: the `log Z(c)` in each trajectory's residual. `"batch"`: per prompt, minus the mean over the
            window's trajectories of that prompt of the residual without `log Z` (the gradient is then exactly the
            log-variance loss's, VarGrad, with the same target; a prompt drawn once in a window falls back to the
            learned value); `"learned"`: the learned `log Z(c)` everywhere. The learned estimate is trained in both
            cases (it is logged and saved).
        lora_min_timestep (`int`, *optional*, defaults to `0`):
            The denoising steps from timesteps below this one use the pretrained model (the LoRA switched off) when
            sampling and training, so they are never trained. `0`: the LoRA acts at every step. On the last,
            low-noise steps a change of the noise prediction costs the most KL from the pretrained model
            (log-probability ratios scale with the mean's shift over the step's small standard deviation) and
            changes the image least, so RTB, whose residual sums these ratios, spends its signal there; see the
            algorithm docs for the measurement. Needs a LoRA; a value above the sampler's largest timestep (no step
            would be trained) is refused when the trainer is built.
        train_objective (`str` or `None`, *optional*, defaults to `None`):
            The training objective: `"dag_db"` (DAG with detailed balance), `"dag_kl"` (DAG-KL), `"ddpo"` (DDPO,
            the reward-maximising baseline), `"rtb"` (relative trajectory balance towards the reward-tilted
            pretrained model), `"kl_pg"` (KL-regularised policy gradient with the closed-form per-step KL to the
            pretrained model), `"rdb"` (DAG's detailed balance against the pretrained model's step), or another name
            registered with `dag_trl.objectives.register_objective`. `None` picks by `train_klpf`: DAG-KL when it is
            positive, else DAG-DB.
        train_klpf (`float`, *optional*, defaults to `-1.0`):
            `<= 0`: DAG-DB (the UNet is trained through the detailed-balance loss). `> 0`: DAG-KL, the weight of the
            KL-based (REINFORCE with a leave-one-out baseline, PPO-clipped) policy gradient.
        train_log_prob_reduction (`str`, *optional*, defaults to `"mean"`):
            How per-element Gaussian log-densities are reduced over the latent: `"mean"` (the paper's choice, which
            the published hyper-parameters were tuned for) or `"sum"` (the true log-density).
        train_gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            Gradient checkpointing in the UNet (less memory: the training rise fell by 38-42% on CPU at SD1.5 size,
            docs/benchmarks.md; a slower backward, its cost not measured yet).
        train_decode_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Largest batch the VAE decodes (and the reward scores) at once when computing intermediate rewards;
            `None` uses `train_batch_size`, so that peak memory stays that of a training batch.

        > Flow network

        flow_block_out_channels (`list[int]`, *optional*, defaults to `[64, 128, 256, 256]`):
            Channel widths of the flow network's down blocks (all but the last use cross-attention).
        flow_layers_per_block (`int`, *optional*, defaults to `1`):
            Resnet layers per down block.
        flow_attention_heads (`int`, *optional*, defaults to `8`):
            Attention heads of the flow network's cross-attention.
        flow_time_embedding_dim (`int`, *optional*, defaults to `64`):
            Width of the sinusoidal timestep embedding; an MLP maps it to 4x this width (64 -> 256 -> 256).

        > DDPO compatibility

        per_prompt_stat_tracking (`bool`, *optional*, defaults to `False`):
            With `train_objective="ddpo"`: standardise each prompt's rewards by the statistics of its latest
            rewards (else by the whole epoch's). Other objectives have no per-prompt normalisation (DAG-DB trains on
            the rewards themselves, DAG-KL uses leave-one-out baselines): there `True` warns that it is ignored.
        per_prompt_stat_tracking_buffer_size (`int`, *optional*, defaults to `16`):
            DDPO: how many of a prompt's latest rewards its statistics use.
        per_prompt_stat_tracking_min_count (`int`, *optional*, defaults to `16`):
            DDPO: a prompt's rewards are standardised by the whole epoch's statistics until its buffer holds this
            many.
    """

    exp_name: str = field(default_factory=_default_exp_name, metadata={"help": "Name of the experiment."})
    run_name: str = field(default="", metadata={"help": "Name of this run for the trackers."})
    seed: int = field(default=0, metadata={"help": "Seed; each process and epoch derives its own sampling seed."})
    log_with: Optional[str] = field(default=None, metadata={"help": "Tracker: " + ", ".join(TRACKERS) + "."})
    tracker_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Keyword arguments for the tracker."}
    )
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra Accelerator arguments."})
    project_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra ProjectConfiguration arguments."}
    )
    tracker_project_name: str = field(default="dag_trl", metadata={"help": "Project name in the tracker."})
    logdir: str = field(default="logs", metadata={"help": "Folder for checkpoints and local tracker files."})
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs."})
    save_freq: int = field(default=1, metadata={"help": "Checkpoint every this many epochs."})
    num_checkpoint_limit: int = field(default=5, metadata={"help": "Keep at most this many checkpoints."})
    eval_freq: int = field(default=0, metadata={"help": "Evaluate every this many epochs; 0: never."})
    eval_num_samples: int = field(default=64, metadata={"help": "Images per evaluation."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation prompts and noise."})
    eval_features: str = field(
        default="pixels",
        metadata={
            "help": "Image features of the evaluation's diversity and kernel distance: 'pixels', 'clip', 'dino', "
            "'dreamsim', or 'clip:<model>' / 'dino:<model>'."
        },
    )
    mixed_precision: str = field(default="bf16", metadata={"help": "'no', 'fp16' or 'bf16'."})
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 on Ampere+ GPUs."})
    resume_from: str = field(default="", metadata={"help": "Checkpoint folder or 'latest'."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to the Hub at the end of training."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "Hub repository id to push to."})

    negative_prompts: str = field(default="", metadata={"help": "Negative prompt for classifier-free guidance."})
    sample_num_steps: int = field(default=50, metadata={"help": "DDIM steps per trajectory."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta, in (0, 1]."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale."})
    sample_batch_size: int = field(default=16, metadata={"help": "Trajectories per sampling batch and process."})
    sample_num_batches_per_epoch: int = field(default=4, metadata={"help": "Sampling batches per epoch and process."})
    async_reward_computation: bool = field(default=False, metadata={"help": "Score images in a thread pool."})
    max_workers: int = field(default=2, metadata={"help": "Threads for asynchronous rewards."})

    train_batch_size: int = field(default=8, metadata={"help": "Trajectories per training batch and process."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "Use bitsandbytes' 8-bit AdamW."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the UNet (LoRA)."})
    train_flow_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the flow network (default: train_learning_rate)."}
    )
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_gradient_accumulation_steps: int = field(default=4, metadata={"help": "Batches per optimiser step."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip (UNet and flow apart)."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples."})
    train_cfg: bool = field(default=True, metadata={"help": "Classifier-free guidance during training."})
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "DAG-KL and DDPO advantage clip."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "DAG-KL and DDPO PPO ratio clip range."})
    train_timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of transitions trained, (0, 1]."})
    train_transition_order: str = field(
        default="by_timestep", metadata={"help": "Batching of a window's transitions: by_timestep or random."}
    )
    train_reward_exp: float = field(default=100.0, metadata={"help": "Reward exponent beta, >= 0."})
    train_reward_exp_anneal: str = field(default="linear", metadata={"help": "'linear' or 'none'."})
    train_unet_reg: float = field(default=1.0, metadata={"help": "Weight of the proximal regulariser."})
    train_log_z_learning_rate: float = field(default=0.1, metadata={"help": "RTB: learning rate of log Z(c)."})
    train_log_z_estimate: str = field(
        default="batch", metadata={"help": "RTB: 'batch' (per-prompt batch mean) or 'learned' log Z(c)."}
    )
    train_objective: Optional[str] = field(
        default=None, metadata={"help": "'dag_db', 'dag_kl', 'rtb', 'kl_pg', 'rdb', 'ddpo'; None: by train_klpf."}
    )
    lora_min_timestep: int = field(
        default=0, metadata={"help": "Steps from timesteps below this use the pretrained model (LoRA off)."}
    )
    train_klpf: float = field(default=-1.0, metadata={"help": "<= 0: DAG-DB; > 0: DAG-KL weight."})
    train_log_prob_reduction: str = field(default="mean", metadata={"help": "'mean' (paper) or 'sum'."})
    train_gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing."})
    train_decode_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Largest VAE decode / reward batch (default: train_batch_size)."}
    )

    flow_block_out_channels: list[int] = field(
        default_factory=lambda: [64, 128, 256, 256], metadata={"help": "Flow network down-block widths."}
    )
    flow_layers_per_block: int = field(default=1, metadata={"help": "Resnet layers per flow down block."})
    flow_attention_heads: int = field(default=8, metadata={"help": "Flow network attention heads."})
    flow_time_embedding_dim: int = field(default=64, metadata={"help": "Flow network sinusoidal embedding width."})

    per_prompt_stat_tracking: bool = field(
        default=False, metadata={"help": "DDPO: per-prompt reward standardisation (other objectives: ignored)."}
    )
    per_prompt_stat_tracking_buffer_size: int = field(default=16, metadata={"help": "DDPO: rewards kept per prompt."})
    per_prompt_stat_tracking_min_count: int = field(default=16, metadata={"help": "DDPO: rewards before per-prompt."})

    def __post_init__(self) -> None:
        # YAML 1.1 reads `mixed_precision: no` as the boolean false; TRL's DDPO recipes write it unquoted.
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        # The command line cannot pass None: `--log_with none` turns the tracker (e.g. a recipe's) off.
        if isinstance(self.log_with, str) and self.log_with.lower() in ("none", ""):
            self.log_with = None
        if self.resume_from is None:  # "no resume", as the empty default
            self.resume_from = ""
        # Paths may be given as pathlib.Path; trackers and checkpoints record the config as JSON, which needs str.
        for name in ("logdir", "resume_from"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        self.validate()

    @property
    def objective_name(self) -> str:
        """The objective this config trains with: ``train_objective``, or by ``train_klpf`` when that is ``None``."""
        if self.train_objective is not None:
            return self.train_objective
        from .objectives import default_objective_name

        return default_objective_name(self.train_klpf)

    @property
    def flow_learning_rate(self) -> float:
        """The flow network's learning rate (``train_flow_learning_rate``, or ``train_learning_rate`` if unset)."""
        if self.train_flow_learning_rate is None:
            return self.train_learning_rate
        return self.train_flow_learning_rate

    @property
    def decode_batch_size(self) -> int:
        """The largest decode / intermediate-reward batch (``train_decode_batch_size`` or ``train_batch_size``)."""
        return self.train_decode_batch_size or self.train_batch_size

    @property
    def num_train_timesteps(self) -> int:
        """Transitions trained on per trajectory: ``max(1, int(sample_num_steps * train_timestep_fraction))``."""
        return max(1, int(self.sample_num_steps * self.train_timestep_fraction))

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes accumulated into one optimiser step: one per training batch and kept timestep,
        ``train_gradient_accumulation_steps * num_train_timesteps`` (accelerate's ``gradient_accumulation_steps``)."""
        return self.train_gradient_accumulation_steps * self.num_train_timesteps

    @property
    def samples_per_epoch(self) -> int:
        """Trajectories sampled per epoch and process."""
        return self.sample_batch_size * self.sample_num_batches_per_epoch

    @property
    def trajectories_per_step(self) -> int:
        """Trajectories per optimiser step (one window) and process: ``train_batch_size *
        train_gradient_accumulation_steps``."""
        return self.train_batch_size * self.train_gradient_accumulation_steps

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is accepted for any invalid setting.

        Runs on construction, before any model is loaded: first every field's type and range (:data:`FIELD_RULES`),
        so that the checks across fields after it compare values of the right type. Settings that need the
        scheduler (an eta whose step variance underflows) are checked by ``dag_trl.samplers.ddim.check_scheduler``.
        """

        def reject(name: str, accepted: str) -> None:
            raise ValueError(f"GFlowNetConfig.{name}={getattr(self, name)!r} is invalid: expected {accepted}.")

        for name, (check, accepted) in FIELD_RULES.items():
            if not check(getattr(self, name)):
                reject(name, accepted)
        self._validate_objective()
        # An optional package: its absence is a setting error, found before any model loads.
        if split_eval_features(self.eval_features)[0] == "dreamsim" and importlib.util.find_spec("dreamsim") is None:
            raise ImportError(DREAMSIM_MISSING)
        if self.push_to_hub:
            # Checked now, not when the push comes after training.
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            name = "hub_model_id" if self.hub_model_id else "exp_name"
            try:
                validate_repo_id(getattr(self, name))
            except HFValidationError as error:
                reject(name, f"a valid Hub repository id with push_to_hub=True ({error})")
        if any(c % self.flow_attention_heads for c in self.flow_block_out_channels[:-1]):
            reject("flow_block_out_channels", f"widths divisible by flow_attention_heads={self.flow_attention_heads}")
        validate_project_kwargs(self.project_kwargs)
        reserved = sorted(set(self.accelerator_kwargs) & ACCELERATOR_ARGUMENTS_SET_BY_TRAINER)
        if reserved:
            raise ValueError(
                f"GFlowNetConfig.accelerator_kwargs sets {reserved}, which the trainer derives from other fields: "
                "use log_with, mixed_precision, project_kwargs and train_gradient_accumulation_steps instead."
            )
        window = self.trajectories_per_step
        if self.samples_per_epoch % window:
            raise ValueError(
                f"GFlowNetConfig: sample_batch_size * sample_num_batches_per_epoch = {self.sample_batch_size} * "
                f"{self.sample_num_batches_per_epoch} = {self.samples_per_epoch} trajectories per epoch must be a "
                f"multiple of train_batch_size * train_gradient_accumulation_steps = {self.train_batch_size} * "
                f"{self.train_gradient_accumulation_steps} = {window}, so that every optimiser step sees whole batches."
            )
        if abs(self.sample_guidance_scale) > MAX_USUAL_GUIDANCE_SCALE:
            warnings.warn(
                f"GFlowNetConfig.sample_guidance_scale={self.sample_guidance_scale!r} is far outside the scales models "
                f"are sampled at (about 1 to 15; this warning starts above {MAX_USUAL_GUIDANCE_SCALE:g}): the guided "
                "noise prediction extrapolates far past the conditional one, and samples are typically saturated "
                "noise. Did you mean a value such as 7.5?",
                UserWarning,
                stacklevel=4,
            )
        # reward_exponent gives epoch e (from 0) beta * min(1, e / (num_epochs / 2)): 0 only at epoch 0, so every
        # epoch trains at beta = 0 exactly when epoch 0 is the only one. Objectives whose target beta does not define
        # (a reward maximiser) do not read it.
        if (
            self.train_reward_exp_anneal == "linear"
            and self.num_epochs == 1
            and self.train_reward_exp > 0
            and self._objective_reads_reward_exponent()
        ):
            warnings.warn(
                "GFlowNetConfig.train_reward_exp_anneal='linear' with num_epochs=1 trains the only epoch at beta = 0, "
                "ignoring the reward: the linear anneal gives epoch e (counted from 0) the exponent "
                f"train_reward_exp * min(1, e / (num_epochs / 2)), and train_reward_exp={self.train_reward_exp!r} is "
                "first reached at epoch num_epochs / 2. Set train_reward_exp_anneal='none' or num_epochs >= 2.",
                UserWarning,
                stacklevel=4,
            )

    def _objective_reads_reward_exponent(self) -> bool:
        """Whether the objective trains towards a target that ``train_reward_exp`` defines (its
        ``target_settings`` name it)."""
        from .objectives import get_objective_class

        return "train_reward_exp" in get_objective_class(self.objective_name).target_settings

    def _validate_objective(self) -> None:
        from .objectives import OBJECTIVES, get_objective_class

        objective = get_objective_class(self.objective_name)
        objective.validate_config(self)
        # Settings that only other objectives read (their `hyperparameters`), set away from their defaults.
        readers: dict[str, list[str]] = {}
        for other in OBJECTIVES.values():
            for name in other.hyperparameters:
                readers.setdefault(name, []).append(other.name)
        unread = [
            name
            for name in readers
            if name not in objective.hyperparameters
            and name != "per_prompt_stat_tracking"  # warned below, with what to do
            and getattr(self, name) != _field_default(name)
        ]
        if unread:
            warnings.warn(
                f"GFlowNetConfig sets {', '.join(f'{name}={getattr(self, name)!r}' for name in unread)}, which "
                f"train_objective={self.objective_name!r} does not read: "
                + "; ".join(f"{name} is read by {readers[name]}" for name in unread)
                + ". Remove them, or choose the objective that reads them.",
                UserWarning,
                stacklevel=4,
            )
        if self.per_prompt_stat_tracking and "per_prompt_stat_tracking" not in objective.hyperparameters:
            warnings.warn(
                f"GFlowNetConfig.per_prompt_stat_tracking=True is ignored with train_objective={self.objective_name!r}:"
                " only DDPO normalises rewards per prompt (DAG-DB trains on the rewards, DAG-KL uses leave-one-out "
                "baselines); set train_objective='ddpo' for DDPO.",
                stacklevel=4,
            )

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dictionary (for trackers and model cards)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
