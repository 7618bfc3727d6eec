"""``GFlowNetDiffusionTrainer``: reward alignment of a diffusion model with a training objective (DAG-DB, DAG-KL, RTB,
DDPO), shaped like TRL's ``DDPOTrainer``.

Zhang et al., "Improving GFlowNets for Text-to-Image Diffusion Alignment" (arXiv 2406.00633). One epoch samples
trajectories with the current policy, scores their final images, then trains the denoiser (through its LoRA) and the
objective's own model (DAG's flow network) on every kept transition. The trainer orchestrates: the loss is the
objective's (:mod:`dag_trl.objectives`), everything model-family specific is the pipeline's
(:mod:`dag_trl.models`), and the math of both is small pure functions.

How a training window (one optimiser step; the weights are fixed inside it) avoids the reference's repeated work,
with the same losses and gradients:

- the one-step prediction ``x0_hat`` of a state, its decode and its reward are computed once per window and shared by
  the two transitions that need them (:class:`~dag_trl.trainer.state_rewards.StateRewardCache`);
- right after sampling, ``x0_hat`` comes from the conditional model outputs recorded while sampling; later, from the
  conditional half of the classifier-free-guidance forward that the loss needs anyway, because each trajectory's
  kept transitions are processed from the last (least noisy) to the first;
- ``log P_B`` is recorded while sampling; with several processes, gradients synchronise once per window.

Under DeepSpeed (ZeRO stages 0-2) the denoiser and the objective's model are handed to accelerate as one module
(:class:`~dag_trl.trainer.distributed.TrainableModules`), since DeepSpeed's engine takes one model, and the engine
runs the clipping and the optimiser step at the end of each window.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import GFlowNetConfig
from ..evaluation import reward_statistics
from ..io.tracking import init_trackers, log_image_samples
from ..models.pipeline import GFlowNetStableDiffusionPipeline
from ..objectives import Objective, Trajectories, TransitionBatch, get_objective_class
from ..objectives.losses import reward_exponent
from ..prompts import PromptCallable
from ..rewards import RewardCallable
from .checkpointing import (
    Checkpointer,
    list_checkpoints,
    resolve_resume_from,
)
from .distributed import check_deepspeed_precision, configure_deepspeed
from .divergence import (
    TrainingDivergedError,
    divergence_message,
    first_non_finite,
    how_to_go_on,
)
from .evaluating import EvaluationHook, EvaluationMixin, evaluation_image_features
from .inputs import check_reward_scale, check_trainer_inputs, inexact_training_warnings, validate_reward_output
from .optimisation import OptimiserStep, PreparedModels, create_accelerator, forward_autocast, prepare_models
from .policy import TrainingPolicy
from .sampling import SamplingMixin
from .saving import SavingMixin
from .state_rewards import StateRewardCache

logger = logging.getLogger(__name__)

# derive_seed stream of the prompt order; streams 0 (sampling noise) and 1.. (inner-epoch shuffles) are taken.
PROMPT_SEED_STREAM = 1 << 20


def derive_seed(seed: int, process_index: int, epoch: int, stream: int) -> int:
    """A 32-bit seed per (run seed, process, epoch, stream): every process samples different noise and prompts
    orders, and a resumed run draws what the uninterrupted one would have (no RNG state needs restoring)."""
    return int(np.random.SeedSequence([seed, process_index, epoch, stream]).generate_state(1)[0])


@dataclass
class WorkCounters:
    """How much work an epoch did, counted in samples (the benchmark's measure of the redundancy-free loop)."""

    unet_forward_grad: int = 0
    unet_forward_no_grad: int = 0
    vae_decodes: int = 0
    reward_calls: int = 0
    reward_samples: int = 0
    flow_forwards: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {f"counters/{name}": value for name, value in self.__dict__.items()}

    def count_denoiser_forward(self, output: Any) -> None:
        """Count a denoiser call in samples (a guided call on ``[unconditional; conditional]`` is two per sample),
        with or without gradient. ``output`` is a tensor, a diffusers output or a tuple whose first entry is one."""
        rows = (output if torch.is_tensor(output) else output[0]).shape[0]
        if torch.is_grad_enabled():
            self.unet_forward_grad += rows
        else:
            self.unet_forward_no_grad += rows

    def count_flow_forward(self, output: torch.Tensor) -> None:
        """Count a call of the objective's model (DAG's flow network), in samples."""
        self.flow_forwards += output.shape[0]


def count_model_calls(
    counters: Callable[[], WorkCounters], denoiser: torch.nn.Module, objective_model: Optional[torch.nn.Module]
) -> None:
    """Count every call of the denoiser and of the objective's model in ``counters()`` (the epoch's, read at each
    call) by forward hooks, where the calls happen, whoever makes them (sampling, training, the state-reward cache,
    evaluation, the reference loop)."""
    denoiser.register_forward_hook(lambda module, inputs, output: counters().count_denoiser_forward(output))
    if objective_model is not None:
        objective_model.register_forward_hook(lambda module, inputs, output: counters().count_flow_forward(output))


def create_objective_model(
    objective: Objective, pipeline: GFlowNetStableDiffusionPipeline
) -> Optional[torch.nn.Module]:
    """The objective's own model for ``pipeline`` (``None`` if it has none), refused unless the objective declares a
    ``model_folder`` exactly when it has one (the checkpoints save the model there)."""
    model = objective.create_model(pipeline)
    if (model is None) != (objective.model_folder is None):
        raise TypeError(
            f"{type(objective).__name__}: model_folder={objective.model_folder!r} but create_model returned "
            f"{type(model).__name__}; set model_folder exactly when the objective has a model."
        )
    return model


def draw_windows(
    samples: Trajectories, generator: torch.Generator, num_kept: int, trajectories_per_window: int
) -> list[tuple[Trajectories, torch.Tensor]]:
    """Shuffle the trajectories with ``generator``, then draw each one's ``num_kept`` kept transitions (the first of
    a random permutation of its steps), and cut into windows of ``trajectories_per_window`` trajectories: a list of
    ``(window, kept)``, ``kept`` of shape ``(trajectories in the window, num_kept)``."""
    total, num_steps = len(samples), samples.num_steps
    order = torch.randperm(total, generator=generator)
    kept = torch.stack([torch.randperm(num_steps, generator=generator)[:num_kept] for _ in range(total)])
    size = trajectories_per_window
    return [(samples.take(order[start : start + size]), kept[start : start + size]) for start in range(0, total, size)]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message names the checkpoint to resume from."""


class StopRequest:
    """Whether Ctrl-C or SIGTERM asked training to stop: ``signal_name`` is ``"SIGINT"`` or ``"SIGTERM"`` once one
    arrived (inside :func:`stop_at_epoch_end`), else ``None``."""

    signal_name: Optional[str] = None


@contextlib.contextmanager
def stop_at_epoch_end() -> Iterator[StopRequest]:
    """Within the context, the first SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption) only records a stop request
    (the training loop finishes the epoch, checkpoints it and stops); a second one raises ``KeyboardInterrupt`` with
    the signal's name at once. The previous handlers are restored on exit. Outside the main thread, where handlers
    cannot be set, the signals keep their handlers and nothing is recorded."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if request.signal_name is not None:
            raise KeyboardInterrupt(name)
        request.signal_name = name
        print(
            f"{name} received: finishing this epoch and writing its checkpoint, then stopping. {name} or Ctrl-C again "
            "stops at once (losing the epoch).",
            file=sys.stderr,
            flush=True,
        )

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def agreed_stop(accelerator: Any, signal_name: Optional[str]) -> Optional[str]:
    """The stop request every process acts on at an epoch's end: with several processes, any one's (a signal may
    reach only some of them, and the checkpoint needs all)."""
    if accelerator.num_processes == 1:
        return signal_name
    flag = torch.tensor([float(signal_name is not None)], device=accelerator.device)
    if accelerator.reduce(flag, "sum").item() == 0:
        return None
    return signal_name or "a signal to another process"


def abandon_reward_calls(executor: futures.Executor, reward_fn: Callable) -> None:
    """Stop waiting for the rewards of an abandoned epoch: ``executor``'s queued calls are dropped (it takes no more),
    and a reward function that can end its calls in flight (:meth:`RemoteReward.cancel`) is asked to."""
    executor.shutdown(wait=False, cancel_futures=True)
    cancel = getattr(reward_fn, "cancel", None)
    if callable(cancel):
        cancel()


def interruption_message(interrupt: KeyboardInterrupt, epoch: int, folder: str) -> str:
    """What Ctrl-C or SIGTERM (a cluster's pre-emption) during ``epoch`` leaves: resume needs a whole epoch, so the
    message names the last checkpoint in ``folder``."""
    checkpoints = list_checkpoints(folder)
    last = (
        f"the last checkpoint is {checkpoints[-1][1]!r} (epoch {checkpoints[-1][0]}): resume from it with "
        "resume_from='latest'"
        if checkpoints
        else "no checkpoint was written yet"
    )
    return f"Training was interrupted ({str(interrupt) or 'SIGINT'}) during epoch {epoch}; {last}."


def default_objective_message(config: GFlowNetConfig) -> str:
    """What a config without ``train_objective`` trains, for users who port a DDPO script: the objective ``train_klpf``
    picks, its target, and the reward evaluations its state rewards add (per trajectory and inner epoch: the ``k``
    kept transitions need the states they start from and, when not final, the ones they end in, between ``k`` and
    ``min(N, 2k)`` of the ``N`` steps' states, besides the final image)."""
    objective = get_objective_class(config.objective_name)
    steps, kept = config.sample_num_steps, config.num_train_timesteps
    message = (
        f"train_objective is not set, so train_klpf={config.train_klpf:g} picks {objective.display_name} "
        f"({objective.description}): its target is images with density proportional to exp(beta * R), not DDPO's "
        "reward maximum (docs/algorithm.md)"
    )
    if objective.uses_state_rewards:
        states = f"{kept}" if min(steps, 2 * kept) == kept else f"{kept} to {min(steps, 2 * kept)}"
        message += (
            f"; it also decodes and scores the one-step predictions of {states} intermediate states of every "
            f"trajectory, so a reward function is called on up to {1 + min(steps, 2 * kept)} images per trajectory "
            "where DDPO calls it on 1 (a slow or remote reward costs that much more)"
        )
    return (
        message + f". Set train_objective='ddpo' for TRL's DDPO, or train_objective='{objective.name}' to keep "
        f"{objective.display_name} without this message."
    )


def epoch_metric(name: str, window_metrics: list[dict[str, float]]) -> Optional[tuple[str, float]]:
    """``(name, mean over the epoch's optimiser steps)`` of the metric ``name``, ``None`` if no step logged it."""
    values = [metrics[name] for metrics in window_metrics if name in metrics]
    return (name, sum(values) / len(values)) if values else None


def epoch_line(
    epoch: int,
    num_epochs: int,
    rewards: dict[str, float],
    metric: Optional[tuple[str, float]],
    elapsed: float,
    remaining: float,
) -> str:
    """The console line of a finished epoch (``epoch`` counted from 0): the epoch's reward mean and 5 / 50 / 95 %
    quantiles (``rewards`` with :func:`~dag_trl.evaluation.reward_statistics`' keys prefixed ``reward_``), the
    objective's main metric ``(name, epoch mean)`` if any, and the elapsed and remaining wall time in seconds."""
    quantiles = ", ".join(f"{name} {rewards[f'reward_{name}']:.3f}" for name in ("q05", "q50", "q95"))
    parts = [f"epoch {epoch + 1}/{num_epochs}: reward {rewards['reward_mean']:.3f} ({quantiles})"]
    if metric is not None:
        parts.append(f"{metric[0]} {metric[1]:.4g}")
    clock = [str(datetime.timedelta(seconds=round(seconds))) for seconds in (elapsed, remaining)]
    parts.append(f"elapsed {clock[0]}, ETA {clock[1]}")
    return ", ".join(parts)


class GFlowNetDiffusionTrainer(SamplingMixin, EvaluationMixin, SavingMixin):
    """Train a diffusion policy with a GFlowNet objective, the way TRL's ``DDPOTrainer`` is used.

    Each epoch (:meth:`step`) samples trajectories with their rewards (:meth:`generate_samples`, a
    :class:`~dag_trl.objectives.Trajectories`), cuts them into windows (:meth:`windows`), and for each window
    (:meth:`train_window`) hands every kept transition (:class:`~dag_trl.trainer.policy.TrainingPolicy`) to the
    objective's loss, backpropagates and steps (:class:`~dag_trl.trainer.optimisation.OptimiserStep`); then it
    evaluates and checkpoints (:class:`~dag_trl.trainer.checkpointing.Checkpointer`).
    ``dag_trl/testing/reference_loop.py`` is the straightforward version of the same window, transition by
    transition, without the shared work.

    Args:
        config: the [`GFlowNetConfig`]; ``config.train_objective`` picks the objective.
        reward_function: ``(images, prompts, metadata) -> (rewards, info)``, or a name for
            :func:`dag_trl.rewards.get_reward_fn`; images are float tensors in [0, 1],
            rewards a tensor, array or list of one number per image. Objectives that use state rewards (DAG) also
            call it on the decoded one-step predictions of intermediate states.
        prompt_function: ``() -> (prompt, metadata)``, or a name for :func:`dag_trl.prompts.get_prompt_fn`.
        sd_pipeline: a [`GFlowNetStableDiffusionPipeline`] (the model family), usually
            [`DefaultGFlowNetStableDiffusionPipeline`].
        image_samples_hook: ``(prompt_image_data, global_step, tracker)`` called once per epoch on the main process
            with ``[[images, prompts, metadata, rewards, reward_info]]`` of the first sampling batch and the first
            tracker (or ``None``). Defaults to [`~dag_trl.io.tracking.log_image_samples`], which logs a grid of the
            samples with their prompts and rewards to wandb, TensorBoard or trackio; pass ``lambda *args: None``
            to log no images.
        evaluation_hook: ``(images, prompts, metadata, rewards) -> dict`` called at every evaluation (``eval_freq``)
            on every process; its entries join the evaluation's (e.g. the shapes model's distance from the tilted
            target, :func:`dag_trl.demo.shapes.target.target_distance`).
        image_features: ``images -> (B, F) features`` for the evaluation's diversity and prior distance; defaults
            to the features ``config.eval_features`` names (:func:`dag_trl.evaluation_features.feature_extractor`:
            downsampled pixels, or a CLIP, DINOv2 or DreamSim tower on the accelerator's device). Give one or the
            other.

    Prompt functions with a ``reseed(seed)`` method (all of :mod:`dag_trl.prompts`) are reseeded at every epoch
    from ``config.seed``, the process index and the epoch, so that processes draw different prompts and a resumed
    run draws the prompts of the uninterrupted one.
    """

    def __init__(
        self,
        config: GFlowNetConfig,
        reward_function: Union[RewardCallable, str],
        prompt_function: Union[PromptCallable, str],
        sd_pipeline: GFlowNetStableDiffusionPipeline,
        image_samples_hook: Optional[Callable] = None,
        evaluation_hook: Optional[EvaluationHook] = None,
        image_features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        from accelerate.utils import DistributedType

        reward_function, prompt_function = check_trainer_inputs(
            config, reward_function, prompt_function, sd_pipeline, image_features
        )
        self.config = config
        self.objective = get_objective_class(config.objective_name)(config)
        self.reward_fn = reward_function
        self.prompt_fn = prompt_function
        self.sd_pipeline = sd_pipeline
        self.image_samples_hook = image_samples_hook if image_samples_hook is not None else log_image_samples
        self.evaluation_hook = evaluation_hook
        self.resume_path = resolve_resume_from(config) if config.resume_from else None
        for message in inexact_training_warnings(self.objective, sd_pipeline, prompt_function, self.resume_path):
            warnings.warn(message, stacklevel=2)
        self.accelerator = create_accelerator(config)
        self.uses_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.image_features = evaluation_image_features(
            config, image_features, reward_function, self.accelerator.device
        )
        if config.train_objective is None and self.accelerator.is_main_process:
            logger.warning(default_objective_message(config))
        if self.uses_deepspeed:
            check_deepspeed_precision(config, self.objective)
            configure_deepspeed(self.accelerator.state.deepspeed_plugin, config)
        self.checkpointer = Checkpointer(config, self.accelerator, sd_pipeline, self.objective, self.uses_deepspeed)

        torch.manual_seed(config.seed)
        objective_model = create_objective_model(self.objective, sd_pipeline)
        # Refuse a checkpoint of another run, and a folder another run is writing, before anything is written.
        if self.resume_path is not None:
            self.checkpointer.check_resumable(self.resume_path, objective_model)
        else:
            self.checkpointer.warn_about_other_checkpoints()
        self.checkpointer.acquire_run_lock()
        init_trackers(self.accelerator, config)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        sd_pipeline.prepare_for_training(device, self.weight_dtype, config.train_gradient_checkpointing)
        # Training recomputes steps on stored trajectories, which needs the sampling timestep spacing.
        sd_pipeline.set_timesteps(config.sample_num_steps, device=device)

        if objective_model is not None:
            objective_model.to(device)
        with torch.no_grad():
            self.negative_prompt_embeds = sd_pipeline.encode_negative_prompt(config.negative_prompts)
        # Training recomputes guided outputs only where sampling guided them: at guidance 1 the sampler makes one
        # conditional call, and an [unconditional; conditional] batch would double the cost for a guided output
        # equal to the conditional one up to rounding (so it would not reproduce the sampled log-probabilities).
        self.trains_with_guidance = config.train_cfg and config.sample_guidance_scale != 1.0
        self.checkpointer.register_hooks(objective_model, self._save_trained_weights)
        prepared = prepare_models(
            self.accelerator,
            config,
            sd_pipeline.denoiser,
            sd_pipeline.get_trainable_layers(),
            objective_model,
            self.objective.learning_rate(),
            self.uses_deepspeed,
        )
        self.denoiser, self.objective_model, self.prepared_models = (
            prepared.denoiser,
            prepared.objective_model,
            prepared.prepared,
        )
        self.optimizer, self.objective_optimizer = prepared.optimizer, prepared.objective_optimizer
        self.unwrapped_objective_model = objective_model
        self.policy = TrainingPolicy(
            sd_pipeline,
            self.denoiser,
            self.negative_prompt_embeds if self.trains_with_guidance else None,
            config.sample_guidance_scale,
            config.sample_eta,
            config.train_log_prob_reduction,
            config.lora_min_timestep,
            self.autocast,
        )
        self.counters = WorkCounters()
        count_model_calls(lambda: self.counters, sd_pipeline.denoiser, objective_model)
        self.executor = futures.ThreadPoolExecutor(max_workers=config.max_workers)
        self.first_epoch = 0
        self.global_step = 0
        # Incremented by every optimiser step; generate_samples records the one its trajectories were sampled with.
        self.weights_version = self.sampled_weights_version = 0
        self.reward_history: list[dict[str, float]] = []
        self.epoch_window_metrics: list[dict[str, float]] = []  # the metrics of each optimiser step of the epoch
        self.evaluation_history: list[dict[str, Any]] = []
        self._reward_scale_warned = False
        # fp16 scales the loss (accelerate's gradient scaler, DeepSpeed's dynamic loss scale): a step whose gradients
        # overflow is skipped, not an error.
        self.optimiser_step = OptimiserStep(
            self.accelerator,
            config.train_max_grad_norm,
            self.uses_deepspeed,
            uses_loss_scaling=config.mixed_precision == "fp16",
            objective_model_folder=self.objective.model_folder,
        )
        if self.resume_path is not None:
            optimizers = [opt for opt in (self.optimizer, self.objective_optimizer) if opt is not None]
            self._restore_progress(self.checkpointer.load(self.resume_path, optimizers))

    # ------------------------------------------------------------------ public API

    def train(self, epochs: Optional[int] = None) -> None:
        """Train for ``epochs`` (default ``config.num_epochs``) epochs, resuming where a checkpoint left off."""
        last_epoch = self.config.num_epochs if epochs is None else epochs
        self.checkpointer.acquire_run_lock()  # again: an earlier train() released it
        epoch = self.first_epoch
        main = self.accelerator.is_local_main_process
        progress = tqdm(total=last_epoch, initial=self.first_epoch, desc="Training", unit="epoch", disable=not main)
        start = time.perf_counter()
        try:
            # Log lines (the per-epoch one) are printed above the progress bars instead of through them.
            with stop_at_epoch_end() as stop, logging_redirect_tqdm(loggers=[logging.getLogger("dag_trl")]):
                if self.config.eval_freq and self.first_epoch == 0 and not self.evaluation_history:
                    self.evaluate(0)
                for epoch in range(self.first_epoch, last_epoch):
                    self.global_step = self.step(epoch, self.global_step)
                    progress.update(1)
                    elapsed = time.perf_counter() - start
                    remaining = elapsed / (epoch + 1 - self.first_epoch) * (last_epoch - epoch - 1)
                    if self.accelerator.is_main_process:
                        logger.info(
                            epoch_line(
                                epoch,
                                last_epoch,
                                self.reward_history[-1],
                                epoch_metric(self.objective.main_metric, self.epoch_window_metrics),
                                elapsed,
                                remaining,
                            )
                        )
                    signal_name = agreed_stop(self.accelerator, stop.signal_name)
                    if signal_name is not None and epoch + 1 < last_epoch:
                        # The finished epoch is kept whatever save_freq says (step saved it if it was due).
                        checkpoint = self.last_checkpoint()
                        if (epoch + 1) % self.config.save_freq:
                            checkpoint = self.save_checkpoint(epoch)
                        raise TrainingInterrupted(
                            f"Training was stopped by {signal_name} after epoch {epoch}, which it finished and "
                            f"checkpointed in {checkpoint!r}: resume from it with resume_from='latest'."
                        )
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt as interrupt:
            abandon_reward_calls(self.executor, self.reward_fn)
            self.executor = futures.ThreadPoolExecutor(max_workers=self.config.max_workers)
            raise TrainingInterrupted(interruption_message(interrupt, epoch, self.checkpoint_dir)) from None
        finally:
            progress.close()
            self.checkpointer.release_run_lock()
        self.first_epoch = max(self.first_epoch, last_epoch)
        if self.config.push_to_hub:
            self.push_to_hub()

    def step(self, epoch: int, global_step: int) -> int:
        """Run one epoch: sample, score, log, train; checkpoint every ``save_freq`` epochs. Returns the global step."""
        config = self.config
        beta = reward_exponent(epoch, config.num_epochs, config.train_reward_exp, config.train_reward_exp_anneal)
        self.counters = WorkCounters()
        self.epoch_window_metrics = []
        self.denoiser.eval()
        reseed = getattr(self.prompt_fn, "reseed", None)
        if callable(reseed):
            reseed(self._seed_for(epoch, PROMPT_SEED_STREAM))
        samples, prompt_image_data = self.generate_samples(epoch)
        self.objective.prepare_samples(samples, self.accelerator)

        rewards = self.accelerator.gather(samples.rewards).cpu()
        if self.accelerator.is_main_process and not self._reward_scale_warned:
            self._reward_scale_warned = bool(
                check_reward_scale(rewards.reshape(-1, config.sample_batch_size), beta, epoch)
            )
        epoch_metrics = {"epoch": epoch, "beta": beta}
        epoch_metrics.update({f"reward_{name}": value for name, value in reward_statistics(rewards).items()})
        self.reward_history.append(epoch_metrics)
        self.accelerator.log(epoch_metrics, step=global_step)
        if self.image_samples_hook is not None and self.accelerator.is_main_process:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(prompt_image_data, global_step, tracker)

        self.denoiser.train()
        if self.objective_model is not None:
            self.objective_model.train()
        for inner_epoch in range(config.train_num_inner_epochs):
            generator = torch.Generator().manual_seed(self._seed_for(epoch, 1 + inner_epoch))
            global_step = self._train_on_samples(samples, beta, epoch, global_step, generator)
        self.accelerator.log(self.counters.as_metrics(), step=global_step)
        self.global_step = global_step
        if config.eval_freq and ((epoch + 1) % config.eval_freq == 0 or epoch + 1 == config.num_epochs):
            self.evaluate(epoch + 1)  # before the checkpoint, which keeps the evaluation history
        if (epoch + 1) % config.save_freq == 0:
            self.save_checkpoint(epoch)
        return global_step

    @property
    def unet(self) -> torch.nn.Module:
        """:attr:`denoiser`, the trained denoiser as accelerate prepared it, under the name TRL's pipelines use."""
        return self.denoiser

    @property
    def checkpoint_dir(self) -> str:
        """The folder of this run's checkpoints (:func:`~dag_trl.trainer.checkpointing.checkpoint_dir`)."""
        return self.checkpointer.folder

    def last_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint of this run's folder, or ``None``."""
        return self.checkpointer.last_checkpoint()

    def save_checkpoint(self, epoch: int) -> str:
        """Write the training state after ``epoch`` (:meth:`Checkpointer.save`); weights that fail the health check
        (:meth:`weights_health_problem`) raise ``TrainingDivergedError`` before anything is written or pruned,
        naming the last checkpoint (which passed it)."""
        problem = self.weights_health_problem()
        if problem is not None:
            raise TrainingDivergedError(
                f"Refusing to write {self.checkpointer.path(epoch)!r}: {problem}; training diverged by the end of "
                f"epoch {epoch}. Nothing was pruned. {how_to_go_on(self.last_checkpoint())}"
            )
        progress = {
            "global_step": self.global_step,
            "weights_version": self.weights_version,
            "reward_history": self.reward_history,
            "evaluation_history": self.evaluation_history,
            "objective_state": self.objective.state_dict(),
        }
        return self.checkpointer.save(epoch, progress)

    def _restore_progress(self, state: dict[str, Any]) -> None:
        """Continue after the epoch whose checkpoint's ``trainer_state.json`` is ``state``."""
        self.first_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.weights_version = state["weights_version"]
        self.reward_history = state.get("reward_history", [])
        self.evaluation_history = state.get("evaluation_history", [])
        self.objective.load_state_dict(state.get("objective_state", {}))

    def compute_rewards(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], epoch: int):
        """Call the reward function on a batch and validate its output; returns ``(rewards, info)``."""
        self.counters.reward_calls += 1
        self.counters.reward_samples += len(prompts)
        output = self.reward_fn(images, tuple(prompts), tuple(metadata))
        return validate_reward_output(output, self.reward_fn, prompts, epoch, self.accelerator.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for model forwards (:func:`~dag_trl.trainer.optimisation.forward_autocast`)."""
        return forward_autocast(self.sd_pipeline, self.accelerator, self.uses_deepspeed, self.weight_dtype)

    def _seed_for(self, epoch: int, stream: int) -> int:
        return derive_seed(self.config.seed, self.accelerator.process_index, epoch, stream)

    # ------------------------------------------------------------------ training

    def _train_on_samples(
        self, samples: Trajectories, beta: float, epoch: int, global_step: int, generator: torch.Generator
    ) -> int:
        """One pass over the epoch's samples, one optimiser step per window."""
        windows = self.windows(samples, generator)
        first_step = global_step
        for window, kept in tqdm(
            windows, desc=f"Epoch {epoch}: training", disable=not self.accelerator.is_local_main_process, leave=False
        ):
            metrics = self.train_window(window, kept, beta, epoch, window_index=global_step - first_step)
            self.epoch_window_metrics.append(metrics)
            metrics = {**metrics, "epoch": epoch, "beta": beta}
            self.accelerator.log(metrics, step=global_step)
            global_step += 1
        return global_step

    def windows(self, samples: Trajectories, generator: torch.Generator) -> list[tuple[Trajectories, torch.Tensor]]:
        """Shuffle the trajectories, draw each one's kept transitions (the first ``train_timestep_fraction`` of a
        random permutation), and cut into windows of ``train_batch_size * train_gradient_accumulation_steps``."""
        return draw_windows(samples, generator, self.config.num_train_timesteps, self.config.trajectories_per_step)

    def train_window(
        self, window: Trajectories, kept: torch.Tensor, beta: float, epoch: int, window_index: int = 0
    ) -> dict[str, float]:
        """One optimiser step on a window of whole trajectories (``train_gradient_accumulation_steps`` batches).

        ``kept`` holds, per trajectory, the indices of the transitions trained on. Returns the step's metrics. A
        non-finite loss (checked before its backward pass, also under DeepSpeed), gradient norm or updated weight
        raises :class:`TrainingDivergedError` naming ``epoch`` and ``window_index``; under fp16 the gradient scaler
        skips overflowing steps instead, and training stops only when they persist.
        """
        config = self.config
        device = self.accelerator.device
        if config.train_transition_order == "by_timestep":
            kept = torch.sort(kept, dim=1, descending=True).values
        self.objective.prepare_window(window, beta, lambda: self.policy_log_probs(window), self.objective_model)
        state_rewards = None
        if self.objective.uses_state_rewards:
            state_rewards = StateRewardCache(
                window,
                self.policy.conditional_output,
                self.sd_pipeline.predict_original_sample,
                lambda predictions, prompts, metadata: self._score_predictions(predictions, prompts, metadata, epoch),
                config.train_batch_size,
                config.decode_batch_size,
            )
            state_rewards.prefill(kept, weights_unchanged=self.sampled_weights_version == self.weights_version)

        sums: dict[str, float] = defaultdict(float)
        num_kept = kept.shape[1]
        batches = range(0, kept.shape[0], config.train_batch_size)
        num_backwards = len(batches) * num_kept
        if num_backwards != config.backward_passes_per_step:
            raise ValueError(
                f"train_window got {len(batches)} batches x {num_kept} kept timesteps = {num_backwards} backward "
                f"passes; the config accumulates {config.backward_passes_per_step} per optimiser step "
                "(train_gradient_accumulation_steps * num_train_timesteps)."
            )
        # The window is one accumulation cycle: start accelerate's counter at its first backward pass, whatever an
        # earlier cycle (or a checkpoint of a run with other window sizes) left there.
        self.accelerator.step = 0
        for start in batches:
            rows = torch.arange(start, min(start + config.train_batch_size, kept.shape[0]))
            for column in range(num_kept):
                # accelerate divides each loss by the number of backward passes and synchronises on the last.
                with self.accelerator.accumulate(*self.prepared_models):
                    batch = self.transition_batch(window, rows, kept[rows, column], state_rewards, beta)
                    loss, parts = self.objective.loss(batch, self.objective_model)
                    if not self.optimiser_step.uses_loss_scaling and not bool(torch.isfinite(loss.detach())):
                        self._diverged(f"the loss is {loss.item()}", epoch, window_index, parts, window, beta)
                    if not loss.requires_grad:
                        # A batch of frozen steps (lora_min_timestep) gives an objective without a model of its own
                        # (kl_pg, DDPO) nothing to differentiate; the backward still runs, with zero gradients, so
                        # that accumulation and the processes' gradient synchronisation see every pass.
                        loss = loss + sum(0.0 * p.sum() for p in self.trainable_parameters())
                    self.accelerator.backward(loss)
                for name, value in parts.items():
                    sums[name] += value / num_backwards

        metrics = {
            name: self.accelerator.reduce(torch.tensor(value, device=device), "mean").item()
            for name, value in sums.items()
        }
        metrics.update(
            self.optimiser_step(
                PreparedModels(
                    self.denoiser, self.objective_model, self.optimizer, self.objective_optimizer, self.prepared_models
                ),
                lambda what: self._diverged(what, epoch, window_index, metrics, window, beta),
            )
        )
        bad = first_non_finite(self.trainable_parameters())
        if bad is not None:
            self._diverged(f"trainable parameter {bad} became non-finite", epoch, window_index, metrics, window, beta)
        self.weights_version += 1
        return metrics

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The denoiser's trained parameters (LoRA or all) and the objective's model's."""
        parameters = [p for p in self.denoiser.parameters() if p.requires_grad]
        if self.objective_model is not None:
            parameters += list(self.objective_model.parameters())
        return parameters

    def _diverged(
        self, what: str, epoch: int, window_index: int, parts: dict[str, float], window: Trajectories, beta: float
    ) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.objective_optimizer is not None:
            self.objective_optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            divergence_message(what, epoch, window_index, parts, window.rewards, beta, self.last_checkpoint())
        )

    def policy_log_probs(self, window: Trajectories) -> torch.Tensor:
        """``log P_F`` of every transition of the window's trajectories under the current weights, ``(B, N)``:
        the ones recorded while sampling if the weights have not changed since, else recomputed (no gradient)."""
        if self.sampled_weights_version == self.weights_version:
            return window.log_probs
        return self.policy.log_probs(window, self.config.train_batch_size)

    def transition_batch(
        self,
        window: Trajectories,
        rows: torch.Tensor,
        steps: torch.Tensor,
        state_rewards: Optional[StateRewardCache],
        beta: float,
    ) -> TransitionBatch:
        """The transitions ``x_t -> x_s`` of ``(rows, steps)`` for the objective (:meth:`TrainingPolicy.transition_batch`)."""
        return self.policy.transition_batch(window, rows, steps, state_rewards, beta, self.objective.trajectory_fields)

    def _score_predictions(self, predictions: torch.Tensor, prompts: list[str], metadata: list[dict], epoch: int):
        """The rewards of predicted samples ``x0_hat``, decoded (and counted) first."""
        with self.autocast():
            images = self.sd_pipeline.decode(predictions)
        self.counters.vae_decodes += len(prompts)
        return self.compute_rewards(images, prompts, metadata, epoch)[0]
