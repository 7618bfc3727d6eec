"""The policy being trained, as the optimiser windows evaluate it: the prepared denoiser under the current weights,
stepped with the training sampler's settings, and the batches of transitions handed to the objective."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..objectives import Trajectories, TransitionBatch

if TYPE_CHECKING:
    from ..models.pipeline import GFlowNetStableDiffusionPipeline, PromptEmbeddings
    from .state_rewards import StateRewardCache


@dataclass
class TrainingPolicy:
    """The forward policy ``P_F`` under the current weights.

    Attributes:
        pipeline: the model family (its ``predict``, ``scheduler_step`` and ``adapter_disabled``).
        denoiser: the trained denoiser as accelerate prepared it (its forwards carry gradients to the LoRA).
        negative_prompt_embeds: the one-row negative prompt of guided training, or ``None``: training recomputes
            guided outputs only where sampling guided them (``train_cfg`` and a guidance scale other than 1).
        guidance_scale, eta, log_prob_reduction: the training sampler's settings.
        lora_min_timestep: rows at timesteps below it are the pretrained model's (the adapter switched off).
        autocast: the context of model forwards (the trainer's mixed precision).
    """

    pipeline: GFlowNetStableDiffusionPipeline
    denoiser: torch.nn.Module
    negative_prompt_embeds: Optional[PromptEmbeddings]
    guidance_scale: float
    eta: float
    log_prob_reduction: str
    lora_min_timestep: int
    autocast: Callable[[], contextlib.AbstractContextManager]

    def step(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        next_latents: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(guided, conditional, step)`` of the policy (guided if training is), ``step`` the family's step output
        scoring ``next_latents`` (``step.log_probs``: ``log P_F``); rows at timesteps below ``lora_min_timestep``
        are the pretrained model's (no gradient reaches the LoRA from them)."""
        negative = None
        if self.negative_prompt_embeds is not None:
            negative = self.negative_prompt_embeds.expand(len(latents))

        def predict(rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = (latents, timesteps, prompt_embeds, negative)
            if rows is not None:
                inputs = tuple(None if value is None else value[rows] for value in inputs)
            with self.autocast():
                return self.pipeline.predict(*inputs, self.guidance_scale, denoiser=self.denoiser)

        frozen = timesteps < self.lora_min_timestep
        if not frozen.any():
            guided, conditional = predict()  # the usual case: no copies of the batch
        else:
            guided, conditional = torch.empty_like(latents), torch.empty_like(latents)
            trained = torch.nonzero(~frozen).squeeze(-1)
            if len(trained):
                guided[trained], conditional[trained] = predict(trained)
            with self.pipeline.adapter_disabled():
                rows = torch.nonzero(frozen).squeeze(-1)
                guided[rows], conditional[rows] = predict(rows)
        step = self.pipeline.scheduler_step(
            guided,
            timesteps,
            latents,
            eta=self.eta,
            prev_sample=next_latents,
            log_prob_reduction=self.log_prob_reduction,
        )
        return guided, conditional, step

    @torch.no_grad()
    def log_probs(self, window: Trajectories, batch_size: int) -> torch.Tensor:
        """``log P_F`` of every transition of ``window``, ``(B, N)``, recomputed ``batch_size`` trajectories at a
        time without gradient."""
        total, num_steps = window.log_probs.shape
        result = torch.empty_like(window.log_probs)
        for start in range(0, total, batch_size):
            rows = torch.arange(start, min(start + batch_size, total), device=result.device)
            for step in range(num_steps):
                result[rows, step] = self.step(
                    window.latents[rows, step],
                    window.timesteps[rows, step],
                    window.prompt_embeds[rows],
                    window.latents[rows, step + 1],
                )[2].log_probs
        return result

    @torch.no_grad()
    def conditional_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: PromptEmbeddings
    ) -> torch.Tensor:
        """The conditional model output at ``(latents, timesteps)`` (no guidance, no gradient), from which the
        one-step prediction ``x0_hat`` of each state follows."""
        with self.autocast():
            _, conditional = self.pipeline.predict(
                latents, timesteps, prompt_embeds, None, 1.0, denoiser=self.denoiser
            )
        return conditional

    def transition_batch(
        self,
        window: Trajectories,
        rows: torch.Tensor,
        steps: torch.Tensor,
        state_rewards: Optional[StateRewardCache],
        beta: float,
        trajectory_fields: tuple[str, ...],
    ) -> TransitionBatch:
        """The transitions ``x_t -> x_s`` of ``(rows, steps)`` with the policy's log-probability under the current
        weights (one model forward with gradient), the rows of the window's ``extras`` named by
        ``trajectory_fields`` and, with ``state_rewards``, the states' rewards."""
        device = window.latents.device
        num_steps = window.num_steps
        rows_d, steps_d = rows.to(device), steps.to(device)
        latents = window.latents[rows_d, steps_d]
        next_latents = window.latents[rows_d, steps_d + 1]
        timesteps = window.timesteps[rows_d, steps_d]
        is_terminal = (steps_d + 1) == num_steps
        next_timesteps = window.timesteps[rows_d, (steps_d + 1).clamp(max=num_steps - 1)]
        prompt_embeds = window.prompt_embeds[rows_d]

        guided, conditional, step = self.step(latents, timesteps, prompt_embeds, next_latents)
        final_rewards = window.rewards[rows_d].float()
        reward_now = reward_next = None
        if state_rewards is not None:
            states = list(zip(rows.tolist(), steps.tolist(), strict=True))
            # A state's x0_hat comes from the conditional half of the forward just done (weights are unchanged).
            state_rewards.add_from_outputs(states, latents, timesteps, conditional)
            reward_now = torch.stack([torch.as_tensor(state_rewards[state]) for state in states]).to(device)
            # In random order a kept next state may come later in the window: score it now.
            state_rewards.add_missing([(row, state + 1) for row, state in states if state + 1 < num_steps])
            reward_next = final_rewards.clone()
            for index, (row, state) in enumerate(states):
                if state + 1 < num_steps:
                    reward_next[index] = state_rewards[(row, state + 1)]
        return TransitionBatch(
            latents=latents,
            next_latents=next_latents,
            timesteps=timesteps,
            next_timesteps=next_timesteps,
            is_terminal=is_terminal,
            prompt_embeds=prompt_embeds,
            model_output=guided,
            sampled_model_output=window.model_outputs[rows_d, steps_d],
            log_prob_forward=step.log_probs,
            sampled_log_prob=window.log_probs[rows_d, steps_d],
            log_prob_backward=window.backward_log_probs[rows_d, steps_d],
            final_rewards=final_rewards,
            state_rewards=reward_now,
            next_state_rewards=reward_next,
            beta=beta,
            trajectory={name: window.extras[name][rows_d] for name in trajectory_fields},
            step_index=steps_d,
            policy_mean=getattr(step, "mean", None),
            step_std=getattr(step, "std", None),
            prior_log_prob=None if window.prior_log_probs is None else window.prior_log_probs[rows_d, steps_d],
            prior_mean=None if window.prior_means is None else window.prior_means[rows_d, steps_d],
        )
