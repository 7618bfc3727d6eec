"""``GFlowNetDiffusionTrainer``: DAG and DAG-KL training of a Stable Diffusion LoRA (TRL ``DDPOTrainer``-shaped).

Zhang et al., "Improving GFlowNets for Text-to-Image Diffusion Alignment" (arXiv 2406.00633). One epoch samples
trajectories with the current policy, scores their final images, then trains the UNet (through its LoRA) and the flow
network on every kept transition. The math lives in :mod:`dag_trl.math`; this module only orchestrates.

How a training window (one optimiser step; the weights are fixed inside it) avoids the reference's repeated work,
with the same losses and gradients:

- the one-step prediction ``x0_hat`` of a state, its VAE decode and its reward are computed once per window and
  shared by the two transitions that need them (as the state left and as the state reached);
- right after sampling, ``x0_hat`` comes from the conditional noise predictions recorded while sampling; later, from
  the conditional half of the classifier-free-guidance forward that the loss needs anyway, because each trajectory's
  kept transitions are processed from the last (least noisy) to the first, so the state a transition reaches has
  been visited before; only states reached but never left within the window need a no-grad conditional forward;
- the terminal state's forward-looking term is never computed (its log-flow is the true log-reward);
- ``log P_B`` is recorded while sampling; with several processes, gradients synchronise once per window.

Under DeepSpeed (ZeRO stages 0-2) the UNet and the flow network are handed to accelerate as one module
(:class:`TrainableModules`), since DeepSpeed's engine takes one model, and the engine runs the clipping and the
optimiser step at the end of each window.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GFlowNetConfig
from .flow_model import FlowNetwork
from .hub import HUB_TAGS, callable_name, create_model_card, push_folder_to_hub
from .math import (
    ddim_step_with_logprob,
    detailed_balance_residual,
    forward_looking_log_flow,
    leave_one_out_advantages,
    ppo_clipped_loss,
    proximal_regulariser,
    reward_exponent,
)
from .pipeline import GFlowNetStableDiffusionPipeline
from .tracking import log_image_samples, tracker_config, tracker_init_kwargs

logger = logging.getLogger(__name__)

RewardFunction = Callable[[torch.Tensor, tuple, tuple], tuple[Any, dict]]
PromptFunction = Callable[[], tuple[str, dict]]
TRAINER_STATE_NAME = "trainer_state.json"
FLOW_FOLDER = "flow"
MODEL_CARD_NAME = "README.md"
# derive_seed stream of the prompt order; streams 0 (sampling noise) and 1.. (inner-epoch shuffles) are taken.
PROMPT_SEED_STREAM = 1 << 20


def derive_seed(seed: int, process_index: int, epoch: int, stream: int) -> int:
    """A 32-bit seed per (run seed, process, epoch, stream): every process samples different noise and prompts
    orders, and a resumed run draws what the uninterrupted one would have (no RNG state needs restoring)."""
    return int(np.random.SeedSequence([seed, process_index, epoch, stream]).generate_state(1)[0])


def validate_rewards(rewards: Any, prompts: list[str], epoch: int, device: torch.device) -> torch.Tensor:
    """Convert a reward function's output to a float32 tensor of shape ``(B,)``, or raise naming the bad prompts.

    Accepts a tensor, an array or a list of ``B`` numbers; rejects the wrong length, non-numbers, NaN and inf.
    """
    try:
        values = torch.as_tensor(
            rewards.detach().cpu() if torch.is_tensor(rewards) else np.asarray(rewards, dtype=np.float64)
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"reward_function returned {type(rewards).__name__} {rewards!r:.200} at epoch {epoch}: expected a tensor, "
            f"array or list of {len(prompts)} numbers (one per prompt)."
        ) from error
    if values.dtype == torch.bool or not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"reward_function returned values of dtype {values.dtype} at epoch {epoch}: expected numbers."
        )
    values = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if values.ndim != 1 or values.shape[0] != len(prompts):
        raise ValueError(
            f"reward_function returned shape {tuple(values.shape)} at epoch {epoch} for {len(prompts)} prompts: "
            f"expected ({len(prompts)},), one reward per image."
        )
    values = values.to(torch.float32)
    bad = [prompt for prompt, ok in zip(prompts, torch.isfinite(values).tolist()) if not ok]
    if bad:
        raise ValueError(
            f"reward_function returned NaN or inf at epoch {epoch} for prompt(s) {bad[:5]!r}"
            f"{' ...' if len(bad) > 5 else ''}: rewards must be finite numbers."
        )
    return values.to(device)


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


@dataclass
class WorkCounters:
    """How much work an epoch did, counted in samples: the figures issue of the redundancy-free loop."""

    unet_forward_grad: int = 0
    unet_forward_no_grad: int = 0
    vae_decodes: int = 0
    reward_calls: int = 0
    reward_samples: int = 0
    flow_forwards: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {f"counters/{name}": value for name, value in self.__dict__.items()}


def checkpoint_dir(config: GFlowNetConfig) -> str:
    """The folder holding a run's checkpoints: ``<logdir>/checkpoints``."""
    return os.path.join(config.logdir, "checkpoints")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder`` as ``(epoch, path)``, oldest first; ``.tmp`` folders of interrupted saves
    are ignored."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith("checkpoint_") and name[len("checkpoint_") :].isdigit():
            if os.path.exists(os.path.join(path, TRAINER_STATE_NAME)):
                found.append((int(name[len("checkpoint_") :]), path))
    return sorted(found)


def resolve_resume_from(config: GFlowNetConfig) -> str:
    """The checkpoint folder ``config.resume_from`` names (``"latest"``: the newest under ``<logdir>/checkpoints``),
    checked to be one this library wrote. Cheap: call it before loading any model."""
    resume_from = os.path.normpath(os.path.expanduser(config.resume_from))
    if config.resume_from == "latest":
        checkpoints = list_checkpoints(checkpoint_dir(config))
        if not checkpoints:
            raise ValueError(
                f"GFlowNetConfig.resume_from='latest' found no checkpoint under {checkpoint_dir(config)!r}."
            )
        resume_from = checkpoints[-1][1]
    if not os.path.isdir(resume_from):
        raise ValueError(f"GFlowNetConfig.resume_from={config.resume_from!r}: no such folder.")
    required = [TRAINER_STATE_NAME, FLOW_FOLDER]
    missing = [name for name in required if not os.path.exists(os.path.join(resume_from, name))]
    if missing:
        raise ValueError(
            f"GFlowNetConfig.resume_from={config.resume_from!r} is not a complete dag_trl checkpoint: "
            f"missing {missing} (expected a folder written by GFlowNetDiffusionTrainer, e.g. "
            f"{os.path.join(checkpoint_dir(config), 'checkpoint_0')!r})."
        )
    return resume_from


class TrainableModules(torch.nn.Module):
    """The UNet and the flow network as one module, for engines that take a single model (DeepSpeed).

    The trainer calls ``unet`` and ``flow`` directly; the container has no ``forward`` of its own.
    """

    def __init__(self, unet: torch.nn.Module, flow: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.flow = flow


def configure_deepspeed(plugin: Any, config: GFlowNetConfig) -> None:
    """Fill a DeepSpeed config's batch, accumulation and clipping entries from ``config``, before ``prepare``.

    ``plugin`` is accelerate's ``DeepSpeedPlugin`` (from ``accelerate launch --config_file ...`` or
    ``accelerator_kwargs``). Entries that are ``"auto"`` or absent get the trainer's values: one micro-batch is
    ``train_batch_size`` transitions, an optimiser step accumulates ``config.backward_passes_per_step`` of them,
    and ``train_max_grad_norm`` clips the global norm of the UNet and flow parameters together. An explicit
    different value, and ZeRO stage 3 (which shards the parameters the trainer calls directly), raise
    ``ValueError`` when the trainer is constructed, before anything is moved to the device or trained.
    """
    deepspeed_config = plugin.deepspeed_config
    stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"DeepSpeed zero_optimization.stage={stage!r} is not supported: expected 0, 1 or 2 (ZeRO-3 shards the "
            "parameters, and the trainer calls the UNet and the flow network outside the engine)."
        )
    required = {
        "train_micro_batch_size_per_gpu": (config.train_batch_size, "GFlowNetConfig.train_batch_size"),
        "gradient_accumulation_steps": (
            config.backward_passes_per_step,
            f"GFlowNetConfig.train_gradient_accumulation_steps * num_train_timesteps = "
            f"{config.train_gradient_accumulation_steps} * {config.num_train_timesteps}",
        ),
        "gradient_clipping": (config.train_max_grad_norm, "GFlowNetConfig.train_max_grad_norm"),
    }
    for key, (value, source) in required.items():
        current = deepspeed_config.get(key, "auto")
        if current == "auto":
            deepspeed_config[key] = value
        elif current != value:
            raise ValueError(
                f"The DeepSpeed config sets {key}={current!r}, but the trainer needs {value!r} ({source}): "
                'set it to "auto" or leave it out.'
            )


class GFlowNetDiffusionTrainer:
    """Train a Stable Diffusion policy with DAG or DAG-KL (Zhang et al., 2024), the way TRL's ``DDPOTrainer`` is used.

    Args:
        config: the [`GFlowNetConfig`].
        reward_function: ``(images, prompts, metadata) -> (rewards, info)``, or a name for
            :func:`dag_trl.rewards.get_reward_fn`; images are float tensors in [0, 1],
            rewards a tensor, array or list of one number per image. It is also called on the decoded one-step
            predictions of intermediate states (the forward-looking flow).
        prompt_function: ``() -> (prompt, metadata)``, or a name for :func:`dag_trl.prompts.get_prompt_fn`.
        sd_pipeline: a [`GFlowNetStableDiffusionPipeline`], usually [`DefaultGFlowNetStableDiffusionPipeline`].
        image_samples_hook: ``(prompt_image_data, global_step, tracker)`` called once per epoch on the main process
            with ``[[images, prompts, metadata, rewards, reward_info]]`` of the first sampling batch and the first
            tracker (or ``None``). Defaults to [`~dag_trl.tracking.log_image_samples`], which logs a grid of the
            samples with their prompts and rewards to wandb, TensorBoard or trackio; pass ``lambda *args: None``
            to log no images.

    Prompt functions with a ``reseed(seed)`` method (all of :mod:`dag_trl.prompts`) are reseeded at every epoch
    from ``config.seed``, the process index and the epoch, so that processes draw different prompts and a resumed
    run draws the prompts of the uninterrupted one.
    """

    _tag_names = list(HUB_TAGS)

    def __init__(
        self,
        config: GFlowNetConfig,
        reward_function: Union[RewardFunction, str],
        prompt_function: Union[PromptFunction, str],
        sd_pipeline: GFlowNetStableDiffusionPipeline,
        image_samples_hook: Optional[Callable] = None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration

        if not isinstance(config, GFlowNetConfig):
            raise TypeError(f"config must be a GFlowNetConfig, got {type(config).__name__}.")
        config.validate()
        if isinstance(reward_function, str):
            from .rewards import get_reward_fn

            reward_function = get_reward_fn(reward_function)
        if isinstance(prompt_function, str):
            from .prompts import get_prompt_fn

            prompt_function = get_prompt_fn(prompt_function)
        for name, value in (("reward_function", reward_function), ("prompt_function", prompt_function)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}.")
        if not isinstance(sd_pipeline, GFlowNetStableDiffusionPipeline):
            raise TypeError(
                f"sd_pipeline must be a GFlowNetStableDiffusionPipeline, got {type(sd_pipeline).__name__}."
            )
        if config.train_use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "GFlowNetConfig.train_use_8bit_adam=True needs bitsandbytes: `pip install bitsandbytes`."
                ) from error
        self.config = config
        self.reward_fn = reward_function
        self.prompt_fn = prompt_function
        self.sd_pipeline = sd_pipeline
        self.image_samples_hook = image_samples_hook if image_samples_hook is not None else log_image_samples
        self.resume_path = resolve_resume_from(config) if config.resume_from else None

        project_config = ProjectConfiguration(project_dir=config.logdir, **config.project_kwargs)
        # One optimiser step per window: accelerate averages the window's backward passes and, with several
        # processes, synchronises gradients on the last one only (`accumulate` in `train_window`).
        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,
            project_config=project_config,
            gradient_accumulation_steps=config.backward_passes_per_step,
            **config.accelerator_kwargs,
        )
        self.uses_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.uses_deepspeed:
            configure_deepspeed(self.accelerator.state.deepspeed_plugin, config)
        if self.resume_path is not None:
            self._check_resumable(self.resume_path)
        if self.accelerator.is_main_process and config.log_with is not None:
            self.accelerator.init_trackers(
                config.tracker_project_name,
                config=tracker_config(config.to_dict()),
                init_kwargs=tracker_init_kwargs(config.tracker_kwargs, config.run_name or config.exp_name),
            )
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        sd_pipeline.vae.to(device, dtype=self.weight_dtype)
        sd_pipeline.text_encoder.to(device, dtype=self.weight_dtype)
        sd_pipeline.set_progress_bar_config(disable=True)
        # Training recomputes DDIM steps on stored trajectories, which needs the sampling timestep spacing.
        sd_pipeline.scheduler.set_timesteps(config.sample_num_steps, device=device)
        if sd_pipeline.use_lora:
            sd_pipeline.unet.to(device, dtype=self.weight_dtype)
            for parameter in sd_pipeline.get_trainable_layers():
                parameter.data = parameter.data.float()
        else:
            sd_pipeline.unet.to(device, dtype=torch.float32)
        if config.train_gradient_checkpointing:
            sd_pipeline.unet.enable_gradient_checkpointing()

        torch.manual_seed(config.seed)
        flow = FlowNetwork(
            in_channels=sd_pipeline.unet.config.in_channels,
            cross_attention_dim=sd_pipeline.text_encoder.config.hidden_size,
            block_out_channels=config.flow_block_out_channels,
            layers_per_block=config.flow_layers_per_block,
            attention_heads=config.flow_attention_heads,
            time_embedding_dim=config.flow_time_embedding_dim,
        ).to(device)
        self.optimizer = self._create_optimizer(sd_pipeline.get_trainable_layers(), list(flow.parameters()))

        with torch.no_grad():
            self.negative_prompt_embeds = sd_pipeline.encode_prompt([config.negative_prompts])
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        if self.uses_deepspeed:
            engine, self.optimizer = self.accelerator.prepare(TrainableModules(sd_pipeline.unet, flow), self.optimizer)
            # ZeRO stages 1-2 shard optimiser states and gradients, not parameters: the engine's modules can be
            # called directly, and `accelerator.backward` routes every backward pass through the engine.
            self.unet, self.flow = engine.module.unet, engine.module.flow
            self.prepared_models: tuple = (engine,)
        else:
            self.unet, self.flow, self.optimizer = self.accelerator.prepare(sd_pipeline.unet, flow, self.optimizer)
            self.prepared_models = (self.unet, self.flow)
        self.executor = futures.ThreadPoolExecutor(max_workers=config.max_workers)
        self.first_epoch = 0
        self.global_step = 0
        self.weights_version = 0
        self.counters = WorkCounters()
        self.reward_history: list[dict[str, float]] = []
        if self.resume_path is not None:
            self._load_checkpoint(self.resume_path)

    # ------------------------------------------------------------------ set-up helpers

    def _create_optimizer(self, unet_parameters: list, flow_parameters: list) -> torch.optim.Optimizer:
        config = self.config
        if config.train_use_8bit_adam:
            import bitsandbytes

            optimizer_class = bitsandbytes.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(
            [
                {"params": unet_parameters, "lr": config.train_learning_rate},
                {"params": flow_parameters, "lr": config.flow_learning_rate},
            ],
            betas=(config.train_adam_beta1, config.train_adam_beta2),
            weight_decay=config.train_adam_weight_decay,
            eps=config.train_adam_epsilon,
        )

    @property
    def checkpoint_dir(self) -> str:
        return checkpoint_dir(self.config)

    def _check_resumable(self, path: str) -> None:
        """Refuse, before any training, a checkpoint this run cannot load: written with or without DeepSpeed, by
        another number of processes, or for a LoRA where this run trains the whole UNet (or the reverse)."""
        with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
            state = json.load(handle)
        this_run = {
            "deepspeed": self.uses_deepspeed,
            "num_processes": self.accelerator.num_processes,
            "use_lora": self.sd_pipeline.use_lora,
        }
        for key, value in this_run.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"GFlowNetConfig.resume_from={self.config.resume_from!r} was written with {key}={state[key]!r}, "
                    f"but this run has {key}={value!r}: resume with the launch settings and pipeline of that run."
                )
        # accelerate's files: the optimiser state, or DeepSpeed's engine folder.
        needed = "pytorch_model" if self.uses_deepspeed else "optimizer.bin"
        if not os.path.exists(os.path.join(path, needed)):
            raise ValueError(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r} has no {needed!r}: it is not a complete "
                f"checkpoint of a {'DeepSpeed' if self.uses_deepspeed else 'non-DeepSpeed'} run."
            )

    def _find_flow(self, models: list) -> int:
        return next(i for i, m in enumerate(models) if isinstance(self.accelerator.unwrap_model(m), FlowNetwork))

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # accelerate calls this hook on every process but saves model weights from the main one only; do the same,
        # or processes sharing a filesystem write the same files at once.
        if not self.accelerator.is_main_process:
            return
        if self.uses_deepspeed:
            # The engine's own checkpoint holds both networks and the optimiser; the files written here are the
            # portable ones (diffusers LoRA, flow network) that `resume_from` checks for and other tools load.
            self._save_trained_weights(output_dir)
            return
        # accelerate passes its own model list here: leave it intact and drop the entries we save from `weights`.
        flow_index = self._find_flow(models)
        self.accelerator.unwrap_model(models[flow_index]).save_pretrained(os.path.join(output_dir, FLOW_FOLDER))
        weights.pop(flow_index)
        others = [self.accelerator.unwrap_model(m) for i, m in enumerate(models) if i != flow_index]
        self.sd_pipeline.save_checkpoint(others, weights, output_dir)

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        if self.uses_deepspeed:
            return  # the engine's load_checkpoint has restored both networks and the optimiser
        flow = models.pop(self._find_flow(models))
        loaded = FlowNetwork.from_pretrained(os.path.join(input_dir, FLOW_FOLDER))
        self.accelerator.unwrap_model(flow).load_state_dict(loaded.state_dict())
        remaining = [self.accelerator.unwrap_model(m) for m in models]
        self.sd_pipeline.load_checkpoint(remaining, input_dir)
        # Whatever the pipeline loaded is gone from `remaining`; accelerate must not look for its weights file.
        models[:] = [m for m in models if self.accelerator.unwrap_model(m) in remaining]

    def save_checkpoint(self, epoch: int) -> str:
        """Write the training state after ``epoch`` atomically (temporary folder, then rename) and prune old ones."""
        final = os.path.join(self.checkpoint_dir, f"checkpoint_{epoch}")
        temporary = final + ".tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(temporary, **self._deepspeed_checkpoint_kwargs(saving=True))
        # Every process writes into the folder (its RNG state, its DeepSpeed optimiser shard): rename it after all.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {
                "epoch": epoch,
                "global_step": self.global_step,
                "weights_version": self.weights_version,
                "reward_history": self.reward_history,
                # What a resumed run must match (_check_resumable).
                "deepspeed": self.uses_deepspeed,
                "num_processes": self.accelerator.num_processes,
                "use_lora": self.sd_pipeline.use_lora,
            }
            with open(os.path.join(temporary, TRAINER_STATE_NAME), "w") as handle:
                json.dump(state, handle)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            for _, old in list_checkpoints(self.checkpoint_dir)[: -self.config.num_checkpoint_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _deepspeed_checkpoint_kwargs(self, saving: bool) -> dict[str, bool]:
        """DeepSpeed's checkpoint of a LoRA run leaves out the frozen base UNet (it comes from the base model)."""
        if not (self.uses_deepspeed and self.sd_pipeline.use_lora):
            return {}
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}

    def _load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path, **self._deepspeed_checkpoint_kwargs(saving=False))
        with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
            state = json.load(handle)
        self.first_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.weights_version = state["weights_version"]
        self.reward_history = state.get("reward_history", [])
        logger.info("Resumed from %s at epoch %d", path, self.first_epoch)

    # ------------------------------------------------------------------ public API

    @property
    def flow_model(self) -> FlowNetwork:
        """The (unwrapped) flow network."""
        return self.accelerator.unwrap_model(self.flow)

    def train(self, epochs: Optional[int] = None) -> None:
        """Train for ``epochs`` (default ``config.num_epochs``) epochs, resuming where a checkpoint left off."""
        last_epoch = self.config.num_epochs if epochs is None else epochs
        for epoch in range(self.first_epoch, last_epoch):
            self.global_step = self.step(epoch, self.global_step)
        self.first_epoch = max(self.first_epoch, last_epoch)
        if self.config.push_to_hub:
            self.push_to_hub()

    def step(self, epoch: int, global_step: int) -> int:
        """Run one epoch: sample, score, log, train; checkpoint every ``save_freq`` epochs. Returns the global step."""
        config = self.config
        beta = reward_exponent(epoch, config.num_epochs, config.train_reward_exp, config.train_reward_exp_anneal)
        self.counters = WorkCounters()
        self.unet.eval()
        reseed = getattr(self.prompt_fn, "reseed", None)
        if callable(reseed):
            reseed(self._seed_for(epoch, PROMPT_SEED_STREAM))
        samples, prompt_image_data = self._generate_samples(epoch)

        rewards = self.accelerator.gather(samples["rewards"]).cpu()
        epoch_metrics = {
            "epoch": epoch,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "beta": beta,
        }
        self.reward_history.append(epoch_metrics)
        self.accelerator.log(epoch_metrics, step=global_step)
        if self.image_samples_hook is not None and self.accelerator.is_main_process:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(prompt_image_data, global_step, tracker)

        self.unet.train()
        self.flow.train()
        for inner_epoch in range(config.train_num_inner_epochs):
            generator = torch.Generator().manual_seed(self._seed_for(epoch, 1 + inner_epoch))
            global_step = self._train_on_samples(samples, beta, epoch, global_step, generator)
        self.accelerator.log(self.counters.as_metrics(), step=global_step)
        self.global_step = global_step
        if (epoch + 1) % config.save_freq == 0:
            self.save_checkpoint(epoch)
        return global_step

    # ------------------------------------------------------------------ sampling

    def _seed_for(self, epoch: int, stream: int) -> int:
        return derive_seed(self.config.seed, self.accelerator.process_index, epoch, stream)

    def compute_rewards(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], epoch: int):
        """Call the reward function on a batch and validate its output; returns ``(rewards, info)``."""
        self.counters.reward_calls += 1
        self.counters.reward_samples += len(prompts)
        rewards, info = self.reward_fn(images, tuple(prompts), tuple(metadata))
        return validate_rewards(rewards, prompts, epoch, self.accelerator.device), info

    def _generate_samples(self, epoch: int) -> tuple[dict[str, Any], list]:
        config = self.config
        generator = torch.Generator().manual_seed(self._seed_for(epoch, 0))
        batches, prompt_image_data, pending = [], [], []
        for _ in tqdm(
            range(config.sample_num_batches_per_epoch),
            desc=f"Epoch {epoch}: sampling",
            disable=not self.accelerator.is_local_main_process,
            leave=False,
        ):
            pairs = [validate_prompt(self.prompt_fn()) for _ in range(config.sample_batch_size)]
            prompts = [prompt for prompt, _ in pairs]
            metadata = [meta for _, meta in pairs]
            with torch.no_grad():
                prompt_embeds = self.sd_pipeline.encode_prompt(prompts)
                negative = self.negative_prompt_embeds.expand(len(prompts), -1, -1)
                with self._autocast():
                    output = self.sd_pipeline(
                        prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative,
                        num_inference_steps=config.sample_num_steps,
                        guidance_scale=config.sample_guidance_scale,
                        eta=config.sample_eta,
                        generator=generator,
                        log_prob_reduction=config.train_log_prob_reduction,
                    )
            batch_size = len(prompts)
            self.counters.unet_forward_no_grad += (
                batch_size * config.sample_num_steps * (2 if config.sample_guidance_scale != 1.0 else 1)
            )
            self.counters.vae_decodes += batch_size
            if config.async_reward_computation:
                pending.append(self.executor.submit(self.compute_rewards, output.images, prompts, metadata, epoch))
            else:
                pending.append(self.compute_rewards(output.images, prompts, metadata, epoch))
            batches.append(
                {
                    "prompts": prompts,
                    "metadata": metadata,
                    "prompt_embeds": prompt_embeds.float(),
                    "latents": output.latents,
                    "log_probs": output.log_probs,
                    "backward_log_probs": output.backward_log_probs,
                    "timesteps": output.timesteps.unsqueeze(0).expand(batch_size, -1),
                    "noise_preds": output.noise_preds,
                    "conditional_noise_preds": output.conditional_noise_preds,
                }
            )
            prompt_image_data.append([output.images, prompts, metadata])
        for batch, data, result in zip(batches, prompt_image_data, pending):
            rewards, info = result.result() if isinstance(result, futures.Future) else result
            batch["rewards"] = rewards
            data.extend([rewards, info])
        samples = {
            key: (
                sum((b[key] for b in batches), [])
                if isinstance(batches[0][key], list)
                else torch.cat([b[key] for b in batches])
            )
            for key in batches[0]
        }
        samples["weights_version"] = self.weights_version
        return samples, prompt_image_data[:1]

    def _autocast(self) -> contextlib.AbstractContextManager:
        factory = self.sd_pipeline.autocast
        if factory is not None:
            return factory()
        if self.uses_deepspeed and self.weight_dtype != torch.float32:
            # DeepSpeed keeps 16-bit weights and leaves autocasting to the script; accelerate's autocast is a no-op.
            return torch.autocast(self.accelerator.device.type, dtype=self.weight_dtype)
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ training

    def _train_on_samples(
        self, samples: dict[str, Any], beta: float, epoch: int, global_step: int, generator: torch.Generator
    ) -> int:
        """One pass over the epoch's samples, one optimiser step per window."""
        windows = self.windows(samples, generator)
        for window, kept in tqdm(
            windows, desc=f"Epoch {epoch}: training", disable=not self.accelerator.is_local_main_process, leave=False
        ):
            metrics = self.train_window(window, kept, beta, epoch)
            metrics.update({"epoch": epoch, "beta": beta})
            self.accelerator.log(metrics, step=global_step)
            global_step += 1
        return global_step

    def windows(
        self, samples: dict[str, Any], generator: torch.Generator
    ) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """Shuffle the trajectories, draw each one's kept transitions (the first ``train_timestep_fraction`` of a
        random permutation), and cut into windows of ``train_batch_size * train_gradient_accumulation_steps``."""
        config = self.config
        total, num_steps = samples["log_probs"].shape
        order = torch.randperm(total, generator=generator)
        num_kept = config.num_train_timesteps
        kept = torch.stack([torch.randperm(num_steps, generator=generator)[:num_kept] for _ in range(total)])
        size = config.train_batch_size * config.train_gradient_accumulation_steps
        return [
            (
                {key: self._take(value, order[start : start + size]) for key, value in samples.items()},
                kept[start : start + size],
            )
            for start in range(0, total, size)
        ]

    @staticmethod
    def _take(value: Any, indices: torch.Tensor) -> Any:
        if torch.is_tensor(value):
            return value[indices.to(value.device)]
        if isinstance(value, list):
            return [value[i] for i in indices.tolist()]
        return value

    @staticmethod
    def _state_indices(window: dict[str, Any], states: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(trajectory rows, state indices)`` tensors of ``(trajectory, state)`` pairs, on the window's device."""
        device = window["latents"].device
        rows = torch.tensor([i for i, _ in states], device=device)
        steps = torch.tensor([k for _, k in states], device=device)
        return rows, steps

    def _state_rewards(
        self, window: dict[str, Any], states: list[tuple[int, int]], noise_preds: dict, epoch: int
    ) -> dict[tuple[int, int], torch.Tensor]:
        """Rewards of the decoded ``x0_hat`` of ``(trajectory, state)`` pairs, from given conditional noise
        predictions, decoded and scored in batches of ``config.decode_batch_size``."""
        rewards = {}
        chunk = self.config.decode_batch_size
        for start in range(0, len(states), chunk):
            part = states[start : start + chunk]
            rows, steps = self._state_indices(window, part)
            latents = window["latents"][rows, steps]
            timesteps = window["timesteps"][rows, steps]
            predictions = torch.stack([noise_preds[state] for state in part])
            values = self._rewards_of_predictions(window, rows.tolist(), latents, timesteps, predictions, epoch)
            rewards.update(zip(part, values))
        return rewards

    def _rewards_of_predictions(
        self,
        window: dict[str, Any],
        rows: list[int],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditional_noise_preds: torch.Tensor,
        epoch: int,
    ) -> torch.Tensor:
        """Decode ``x0_hat`` of each state and score it with the reward function (no gradient)."""
        with torch.no_grad():
            original = self.sd_pipeline.predict_original_sample(conditional_noise_preds, timesteps, latents)
            with self._autocast():
                images = self.sd_pipeline.decode(original)
            self.counters.vae_decodes += len(rows)
            rewards, _ = self.compute_rewards(
                images, [window["prompts"][i] for i in rows], [window["metadata"][i] for i in rows], epoch
            )
        return rewards

    def train_window(self, window: dict[str, Any], kept: torch.Tensor, beta: float, epoch: int) -> dict[str, float]:
        """One optimiser step on a window of whole trajectories (``train_gradient_accumulation_steps`` batches).

        ``kept`` holds, per trajectory, the indices of the transitions trained on. Returns the step's metrics.
        """
        config = self.config
        device = self.accelerator.device
        num_steps = window["log_probs"].shape[1]
        kept = torch.sort(kept, dim=1, descending=True).values
        kept_set = {(i, k) for i in range(kept.shape[0]) for k in kept[i].tolist()}
        # Rewards of the one-step predictions, keyed by (trajectory, state); state num_steps is terminal.
        state_reward: dict[tuple[int, int], torch.Tensor] = {}
        needed = sorted(kept_set | {(i, k + 1) for i, k in kept_set if k + 1 < num_steps})
        if window["weights_version"] == self.weights_version:
            recorded = {state: window["conditional_noise_preds"][state] for state in needed}
            state_reward.update(self._state_rewards(window, needed, recorded, epoch))
        else:
            reached_only = [state for state in needed if state not in kept_set]
            state_reward.update(self._fresh_state_rewards(window, reached_only, epoch))

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
                    parts = self._transition_loss(window, rows, kept[rows, column], state_reward, beta, epoch)
                    self.accelerator.backward(parts.pop("loss"))
                for name, value in parts.items():
                    sums[name] += value / num_backwards

        metrics = {
            name: self.accelerator.reduce(torch.tensor(value, device=device), "mean").item()
            for name, value in sums.items()
        }
        if self.uses_deepspeed:
            # The engine clipped the global norm of both networks and stepped inside the last backward pass. Its
            # optimiser reports that norm under ZeRO-1/2 and 16-bit training, not with ZeRO-0's plain float32 AdamW.
            grad_norm = self.prepared_models[0].get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
        else:
            unet_parameters = [p for p in self.unet.parameters() if p.requires_grad]
            # Unscale (fp16) once, then clip the two parameter groups separately, as the paper does.
            self.accelerator.unscale_gradients()
            metrics["grad_norm_unet"] = float(
                torch.nn.utils.clip_grad_norm_(unet_parameters, config.train_max_grad_norm)
            )
            metrics["grad_norm_flow"] = float(
                torch.nn.utils.clip_grad_norm_(self.flow.parameters(), config.train_max_grad_norm)
            )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.weights_version += 1
        return metrics

    def _fresh_state_rewards(self, window: dict[str, Any], states: list[tuple[int, int]], epoch: int) -> dict:
        """Rewards of states the window reaches but never leaves: one no-grad conditional forward each."""
        predictions = {}
        for start in range(0, len(states), self.config.train_batch_size):
            part = states[start : start + self.config.train_batch_size]
            rows, steps = self._state_indices(window, part)
            with torch.no_grad(), self._autocast():
                _, conditional = self.sd_pipeline.predict_noise(
                    window["latents"][rows, steps],
                    window["timesteps"][rows, steps],
                    window["prompt_embeds"][rows],
                    None,
                    1.0,
                    unet=self.unet,
                )
            self.counters.unet_forward_no_grad += len(part)
            predictions.update(zip(part, conditional))
        return self._state_rewards(window, states, predictions, epoch)

    def _transition_loss(
        self,
        window: dict[str, Any],
        rows: torch.Tensor,
        steps: torch.Tensor,
        state_reward: dict[tuple[int, int], torch.Tensor],
        beta: float,
        epoch: int,
    ) -> dict[str, Any]:
        """The DAG-DB or DAG-KL loss (spec sections 3-4) of one batch of transitions ``x_t -> x_s`` (one per row)."""
        config = self.config
        device = window["latents"].device
        num_steps = window["log_probs"].shape[1]
        rows_d, steps_d = rows.to(device), steps.to(device)
        latents = window["latents"][rows_d, steps_d]
        next_latents = window["latents"][rows_d, steps_d + 1]
        timesteps = window["timesteps"][rows_d, steps_d]
        prompt_embeds = window["prompt_embeds"][rows_d]
        negative = self.negative_prompt_embeds.expand(len(rows), -1, -1) if config.train_cfg else None

        with self._autocast():
            guided, conditional = self.sd_pipeline.predict_noise(
                latents, timesteps, prompt_embeds, negative, config.sample_guidance_scale, unet=self.unet
            )
        self.counters.unet_forward_grad += len(rows) * (2 if config.train_cfg else 1)
        step = ddim_step_with_logprob(
            self.sd_pipeline.scheduler,
            guided,
            timesteps,
            latents,
            eta=config.sample_eta,
            prev_sample=next_latents,
            log_prob_reduction=config.train_log_prob_reduction,
        )
        log_prob_forward = step.log_probs
        log_prob_backward = window["backward_log_probs"][rows_d, steps_d]

        states = list(zip(rows.tolist(), steps.tolist()))
        missing = [index for index, state in enumerate(states) if state not in state_reward]
        if missing:
            # The state's x0_hat comes from the conditional half of the forward just done (weights are unchanged).
            values = self._rewards_of_predictions(
                window,
                [states[i][0] for i in missing],
                latents[missing],
                timesteps[missing],
                conditional.detach()[missing],
                epoch,
            )
            state_reward.update(zip([states[i] for i in missing], values))
        reward_now = torch.stack([torch.as_tensor(state_reward[state]) for state in states]).to(device)

        terminal = (steps_d + 1) == num_steps
        inner = torch.nonzero(~terminal).squeeze(-1)
        flow_inputs = torch.cat([latents, next_latents[inner]])
        flow_timesteps = torch.cat([timesteps, window["timesteps"][rows_d[inner], steps_d[inner] + 1]])
        flow_embeds = torch.cat([prompt_embeds, prompt_embeds[inner]])
        flow_values = self.flow(flow_inputs, flow_timesteps, flow_embeds)
        self.counters.flow_forwards += flow_inputs.shape[0]
        flow_now, flow_next_inner = flow_values[: len(rows)], flow_values[len(rows) :]

        log_flow = forward_looking_log_flow(flow_now, reward_now, beta)
        next_log_flow = beta * window["rewards"][rows_d].float()
        if len(inner):
            reward_next = torch.stack(
                [torch.as_tensor(state_reward[(states[i][0], states[i][1] + 1)]) for i in inner.tolist()]
            ).to(device)
            next_log_flow = next_log_flow.index_put(
                (inner,), forward_looking_log_flow(flow_next_inner, reward_next, beta)
            )

        regulariser = proximal_regulariser(guided, window["noise_preds"][rows_d, steps_d])
        if config.is_dag_kl:
            flow_residual = detailed_balance_residual(
                log_flow, log_prob_forward.detach(), log_prob_backward, next_log_flow
            )
            advantages = leave_one_out_advantages(-flow_residual.detach(), config.train_adv_clip_max)
            kl_loss = ppo_clipped_loss(
                advantages, log_prob_forward, window["log_probs"][rows_d, steps_d], config.train_clip_range
            )
            db_loss = flow_residual**2
            loss = db_loss + config.train_klpf * kl_loss + config.train_unet_reg * regulariser
        else:
            residual = detailed_balance_residual(log_flow, log_prob_forward, log_prob_backward, next_log_flow)
            db_loss = residual**2
            kl_loss = torch.zeros_like(db_loss)
            loss = db_loss + config.train_unet_reg * regulariser
        return {
            "loss": loss.mean(),
            "loss_total": loss.mean().item(),
            "loss_db": db_loss.mean().item(),
            "loss_kl": kl_loss.mean().item(),
            "regulariser": regulariser.mean().item(),
            "log_prob_forward": log_prob_forward.mean().item(),
            "log_prob_backward": log_prob_backward.mean().item(),
            "flow": flow_now.mean().item(),
            "intermediate_reward": reward_now.mean().item(),
            "ratio": torch.exp(log_prob_forward - window["log_probs"][rows_d, steps_d]).mean().item(),
        }

    # ------------------------------------------------------------------ saving

    @property
    def reward_name(self) -> str:
        """Name of the reward function, for the model card (its ``name``, ``__name__`` or class name)."""
        return callable_name(self.reward_fn)

    @property
    def prompt_name(self) -> str:
        """Name of the prompt function, for the model card (its ``name``, ``__name__`` or class name)."""
        return callable_name(self.prompt_fn)

    def create_model_card(self, model_path: str, license: Optional[str] = None):
        """The ``README.md`` model card of the current weights (a ``huggingface_hub.ModelCard``); ``model_path`` is
        the Hub repository or local folder that the card's loading snippet points at."""
        pipeline = self.sd_pipeline
        return create_model_card(
            self.config,
            base_model=getattr(pipeline, "pretrained_model_name", "unknown"),
            model_path=model_path,
            use_lora=pipeline.use_lora,
            reward_name=self.reward_name,
            prompt_name=self.prompt_name,
            lora_rank=getattr(pipeline, "lora_rank", None),
            final_reward=self.reward_history[-1] if self.reward_history else None,
            num_processes=self.accelerator.num_processes,
            license=license,
        )

    def save_pretrained(
        self, output_dir: Union[str, os.PathLike], repo_id: Optional[str] = None, license: Optional[str] = None
    ) -> None:
        """Save the trained LoRA in diffusers format (``pytorch_lora_weights.safetensors``; ``unet/`` for full
        fine-tuning), the flow network (``flow/``) and a model card (``README.md``) into ``output_dir``.

        Only the main process writes; call it on every process (it does not wait for the others). ``repo_id`` is
        the Hub repository the card's loading snippet names (default: ``output_dir``).
        """
        if not self.accelerator.is_main_process:
            return
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        self._save_trained_weights(output_dir)
        card = self.create_model_card(repo_id or output_dir, license=license)
        card.save(os.path.join(output_dir, MODEL_CARD_NAME))

    def _save_trained_weights(self, output_dir: str) -> None:
        """The UNet's trained weights (diffusers LoRA or ``unet/``) and the flow network (``flow/``)."""
        self.sd_pipeline.save_pretrained(output_dir, unet=self.accelerator.unwrap_model(self.unet))
        self.flow_model.save_pretrained(os.path.join(output_dir, FLOW_FOLDER))

    def push_to_hub(
        self,
        repo_id: Optional[str] = None,
        *,
        output_dir: Optional[Union[str, os.PathLike]] = None,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        license: Optional[str] = None,
        commit_message: str = "Upload model trained with dag_trl",
    ) -> Optional[str]:
        """Save with :meth:`save_pretrained`, then upload exactly that folder to the Hub repository ``repo_id``.

        ``repo_id`` defaults to ``config.hub_model_id``, else ``config.exp_name`` (in the token owner's namespace).
        The folder is ``output_dir``, which must be empty or absent so that nothing else is uploaded, or by default
        ``<logdir>/hub/<repo_id with "/" as "--">``, emptied first. Only the main process saves and pushes; it
        returns the commit URL, the other processes ``None``. If the push fails (no token, no write access, no network), the local
        save is kept and a [`~dag_trl.hub.HubPushError`] says where it is.
        """
        repo_id = repo_id or self.config.hub_model_id or self.config.exp_name
        if not self.accelerator.is_main_process:
            return None
        if output_dir is None:
            output_dir = os.path.join(self.config.logdir, "hub", repo_id.replace("/", "--"))
            shutil.rmtree(output_dir, ignore_errors=True)
        output_dir = os.fspath(output_dir)
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            raise ValueError(
                f"push_to_hub(output_dir={output_dir!r}): the folder is not empty, and every file in it would be "
                "uploaded. Pass an empty or new folder, or leave output_dir unset."
            )
        self.save_pretrained(output_dir, repo_id=repo_id, license=license)
        return push_folder_to_hub(output_dir, repo_id, token=token, private=private, commit_message=commit_message)
