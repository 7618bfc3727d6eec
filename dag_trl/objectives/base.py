"""The objective seam: what an objective declares to the training loop, and the batch of transitions it scores.

The loop samples trajectories, recomputes the policy's log-probability of each kept transition with gradients, and
hands the objective a :class:`TransitionBatch`; the objective returns ``(loss, metrics)``. What the loop prepares
beyond that is read from the objective's declarations (a trainable model of its own such as a flow network, the
rewards of intermediate states), never from the algorithm's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

if TYPE_CHECKING:
    from ..config import GFlowNetConfig
    from ..models.pipeline import GFlowNetStableDiffusionPipeline, PromptEmbeddings
    from .trajectories import Trajectories


@dataclass
class TransitionBatch:
    """One batch of transitions ``x_t -> x_s``, one per trajectory row, as the loop hands it to an objective.

    Attributes:
        latents: ``x_t``, float32, ``(B, C, h, w)``. next_latents: ``x_s``.
        timesteps: ``t`` per row, ``(B,)``. next_timesteps: ``s`` per row (for a terminal transition, whose ``x_s``
            is the final sample, the value is ``t`` and must not be used).
        is_terminal: whether ``x_s`` is the trajectory's final sample, bool ``(B,)``.
        prompt_embeds: the rows' text conditioning.
        model_output: the guided model output at ``(x_t, t)`` under the current weights, with gradient.
        sampled_model_output: the guided model output recorded while sampling (the weights that drew ``x_s``).
        log_prob_forward: ``log P_F(x_s | x_t)`` under the current weights, with gradient, ``(B,)``.
        sampled_log_prob: ``log P_F(x_s | x_t)`` recorded while sampling.
        log_prob_backward: ``log P_B(x_t | x_s)`` of the fixed noising kernel.
        final_rewards: ``R(x_0)`` of each row's trajectory, float32 ``(B,)``.
        state_rewards: for objectives with ``uses_state_rewards``, ``R(x0_hat(x_t))``, the reward of the one-step
            prediction of ``x_t``; else ``None``.
        next_state_rewards: likewise for ``x_s`` (the final reward on terminal rows).
        beta: this epoch's reward exponent.
        trajectory: the rows of the per-trajectory tensors that the objective added to the trajectories' ``extras``
            (its ``trajectory_fields``), for example DDPO's advantages.
        step_index: each row's transition index ``n`` in sampling order (``0`` leaves ``x_T``), ``(B,)``.
        policy_mean: the mean of ``P_F(. | x_t)`` under the current weights, with gradient (``None`` for families
            whose step does not report it).
        step_std: the step's standard deviation, broadcastable against ``latents``.
        prior_log_prob: for objectives with ``uses_prior_log_probs``, ``log P_F^prior(x_s | x_t)`` of the pretrained
            model, recorded while sampling, ``(B,)``; else ``None``.
        prior_mean: for objectives with ``uses_prior_means``, the pretrained model's step mean at ``x_t``; else
            ``None``.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    next_timesteps: torch.Tensor
    is_terminal: torch.Tensor
    prompt_embeds: PromptEmbeddings
    model_output: torch.Tensor
    sampled_model_output: torch.Tensor
    log_prob_forward: torch.Tensor
    sampled_log_prob: torch.Tensor
    log_prob_backward: torch.Tensor
    final_rewards: torch.Tensor
    state_rewards: Optional[torch.Tensor]
    next_state_rewards: Optional[torch.Tensor]
    beta: float
    trajectory: dict[str, torch.Tensor] = field(default_factory=dict)
    step_index: Optional[torch.Tensor] = None
    policy_mean: Optional[torch.Tensor] = None
    step_std: Optional[torch.Tensor] = None
    prior_log_prob: Optional[torch.Tensor] = None
    prior_mean: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.latents.shape[0]


def process_share(gathered: Any, accelerator: Any, count: int) -> Any:
    """This process's ``count`` rows of values gathered over all processes: ``accelerator.gather`` concatenates the
    processes' equal-sized batches in process order."""
    start = accelerator.process_index * count
    return gathered[start : start + count]


def check_prior_available(pipeline: GFlowNetStableDiffusionPipeline, objective_name: str) -> None:
    """Refuse a pipeline without a LoRA for an objective whose target involves the pretrained model: the prior is
    the pretrained model with the adapter switched off, and a full fine-tune leaves none to switch back to."""
    if not pipeline.use_lora:
        raise ValueError(
            f"train_objective={objective_name!r} needs a pipeline with use_lora=True: the prior is the pretrained "
            "model with the LoRA switched off, and a full fine-tune leaves no pretrained model to switch back to."
        )


def check_guided_training(config: GFlowNetConfig, objective_name: str) -> None:
    """Refuse training an unguided policy on guided trajectories for an objective that compares the policy's
    log-probabilities (or steps) with the guided prior's."""
    if not config.train_cfg and config.sample_guidance_scale != 1.0:
        raise ValueError(
            f"GFlowNetConfig.train_cfg=False with sample_guidance_scale={config.sample_guidance_scale!r} is "
            f"invalid with train_objective={objective_name!r}: the trajectories come from the guided sampler, so "
            "its log-probabilities must be the guided ones (set train_cfg=True, or sample_guidance_scale=1.0)."
        )


# The sampler settings that define the prior of the prior-relative objectives (RTB, kl_pg, rdb): the pretrained model
# sampled with the same guidance, negative prompt, eta and timesteps; a resume that changes one changes the target.
PRIOR_SAMPLER_SETTINGS = ("sample_guidance_scale", "negative_prompts", "sample_eta", "sample_num_steps")


class Objective(ABC):
    """A training objective. Subclass it, set the class attributes, implement :meth:`loss`, and register the class
    with :func:`dag_trl.objectives.register_objective` under its ``name``; nothing in the trainer changes.

    Class attributes (the declarations the loop reads):
        name: the registry key, the value of ``GFlowNetConfig.train_objective``.
        display_name: how model cards, Hub tags, the CLI and logs name it.
        description: one line for the model card.
        paper: ``(short citation, URL)`` of the method, for the model card.
        hyperparameters: the config fields only this objective reads (the model card lists them for it alone).
        uses_state_rewards: the loop decodes and scores the one-step prediction ``x0_hat`` of the states of each
            transition and fills :attr:`TransitionBatch.state_rewards` / ``next_state_rewards``.
        model_folder: the folder (in checkpoints and saved models) of the objective's own trainable model; set it
            if and only if :meth:`create_model` returns one.
        trajectory_fields: the names of the per-trajectory tensors that :meth:`prepare_samples` adds to the epoch's
            :attr:`Trajectories.extras` (or :meth:`prepare_window` to a window's); the loop hands their rows to
            :meth:`loss` in :attr:`TransitionBatch.trajectory`.
        required_settings: config values the objective cannot train without, each with the reason:
            ``{field: (value, why)}``; :meth:`validate_config` refuses other values, and the ``dag-trl`` CLI sets
            them when neither the command line nor the ``--config`` file does.
        uses_detailed_balance: the loss is detailed balance against the noising kernel ``P_B``, which has a solution
            only for samplers that are the Gaussian posterior (DDIM at ``eta = 1``); the trainer warns on others.
        uses_prior_log_probs: sampling also scores every transition under the pretrained model (the pipeline's
            adapter switched off), stored as :attr:`Trajectories.prior_log_probs` ``(B, N)``.
        uses_prior_means: (with ``uses_prior_log_probs``) sampling also keeps the pretrained model's step mean at
            every visited state, :attr:`Trajectories.prior_means` ``(B, N, C, h, w)``, and the closed-form KL from
            the sampling policy's step to it, :attr:`Trajectories.prior_kls` ``(B, N)`` in nats; the loop fills
            :attr:`TransitionBatch.prior_mean`.
        main_metric: the metric of :meth:`loss` that the trainer's per-epoch console line shows (its epoch mean).
        target_settings: the config fields that define what the objective trains towards; a checkpoint records
            them, and a resume that changes one is refused (a resume may change others, such as learning rates).
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[tuple[str, str]]
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    uses_state_rewards: ClassVar[bool] = False
    model_folder: ClassVar[Optional[str]] = None
    trajectory_fields: ClassVar[tuple[str, ...]] = ()
    uses_prior_log_probs: ClassVar[bool] = False
    uses_prior_means: ClassVar[bool] = False
    uses_detailed_balance: ClassVar[bool] = False
    required_settings: ClassVar[dict[str, tuple[Any, str]]] = {}
    main_metric: ClassVar[str] = "loss_total"
    target_settings: ClassVar[tuple[str, ...]] = (
        "train_reward_exp",
        "train_reward_exp_anneal",
        "train_log_prob_reduction",
        "lora_min_timestep",
    )

    def __init__(self, config: GFlowNetConfig):
        self.config = config

    @classmethod
    def validate_config(cls, config: GFlowNetConfig) -> None:
        """Raise ``ValueError`` naming the field for settings this objective cannot train with (runs when the
        config is constructed, before any model is loaded). The default refuses values other than
        :attr:`required_settings`'."""
        for name, (required, why) in cls.required_settings.items():
            if getattr(config, name) != required:
                raise ValueError(
                    f"GFlowNetConfig.{name}={getattr(config, name)!r} is invalid with train_objective={cls.name!r}: "
                    f"expected {required!r} ({why})."
                )

    def create_model(self, pipeline: GFlowNetStableDiffusionPipeline) -> Optional[torch.nn.Module]:
        """The objective's own trainable model (for example DAG's flow network), or ``None``. It is trained with
        the denoiser, at :meth:`learning_rate`, and saved with ``save_pretrained`` under :attr:`model_folder`."""
        return None

    def load_model(self, path: str) -> torch.nn.Module:
        """Read a model that :meth:`create_model` made and ``save_pretrained`` wrote to ``path``."""
        raise NotImplementedError(f"{type(self).__name__} has no model of its own to load.")

    def prepare_samples(self, samples: Trajectories, accelerator: Any) -> None:
        """Called once per epoch after sampling and scoring, before training: add the :attr:`trajectory_fields` to
        ``samples.extras`` (tensors with one row per trajectory). ``accelerator`` reaches the other processes'
        samples."""
        return None

    def prepare_window(
        self,
        window: Trajectories,
        beta: float,
        policy_log_probs: Callable[[], torch.Tensor],
        model: Optional[torch.nn.Module],
    ) -> None:
        """Called before each optimiser window: objectives whose per-transition gradient depends on whole
        trajectories (RTB) compute it here. ``policy_log_probs()`` gives ``log P_F`` of every transition under the
        current weights, ``(B, N)`` (recomputed without gradient only when the weights changed since sampling)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State the objective carries across epochs (JSON-serialisable), saved in checkpoints for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None

    def learning_rate(self) -> float:
        """The learning rate of the objective's own model."""
        return self.config.train_learning_rate

    def probe_model(
        self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: PromptEmbeddings
    ) -> Optional[torch.Tensor]:
        """The objective's model's outputs on the states ``latents`` ``(B, C, h, w)`` at ``timesteps`` ``(B,)`` of a
        trajectory for ``prompt_embeds``, for the weights health check before a save (they must be finite); ``None``
        when the objective has no model to probe."""
        return None

    @abstractmethod
    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of ``batch`` (a mean over its rows) and its metrics (floats, averaged over the window by
        the loop). ``model`` is the objective's own model as the loop prepared it (wrapped for DDP), or ``None``."""
