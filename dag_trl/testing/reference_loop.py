"""The straightforward DAG / DAG-KL / relative-DB training window (Zhang et al., 2024, sections 3-4), transition by
transition.

This is the oracle the product loop (``GFlowNetDiffusionTrainer.train_window``) is tested and benchmarked against:
every transition recomputes ``x0_hat`` of both of its states with its own no-grad conditional UNet forwards, decodes
and scores both, evaluates the flow of both states (the terminal one too, then discards it) and recomputes
``log P_B``, as the reference implementation does. Not a product code path.
"""

from __future__ import annotations

import torch

from ..objectives.losses import (
    detailed_balance_residual,
    forward_looking_log_flow,
    leave_one_out_advantages,
    ppo_clipped_loss,
    proximal_regulariser,
    relative_detailed_balance_residual,
)
from ..trainer import WorkCounters


def _intermediate_reward(trainer, window, rows, latents, timesteps, counters, epoch):
    """x0_hat of ``latents`` from a fresh no-grad conditional forward, decoded and scored."""
    pipeline = trainer.sd_pipeline
    with torch.no_grad(), trainer.autocast():
        _, conditional = pipeline.predict(latents, timesteps, window.prompt_embeds[rows], None, 1.0)
        original = pipeline.predict_original_sample(conditional, timesteps, latents)
        images = pipeline.decode(original)
    counters.vae_decodes += len(rows)
    counters.reward_calls += 1
    counters.reward_samples += len(rows)
    rewards, _ = trainer.reward_fn(images, [window.prompts[i] for i in rows], [window.metadata[i] for i in rows])
    return torch.as_tensor(rewards, dtype=torch.float32, device=latents.device)


def reference_train_window(trainer, window, kept, beta: float, epoch: int, counters: WorkCounters) -> None:
    """One optimiser step of the straightforward loop on the same window, kept transitions and grouping as
    ``trainer.train_window`` (transitions of a trajectory from the last to the first).

    Decodes and reward calls are counted in ``counters``; denoiser and flow-network calls, like the trainer's own,
    by the trainer's forward hooks in ``trainer.counters``."""
    config = trainer.config
    pipeline = trainer.sd_pipeline
    num_steps = window.log_probs.shape[1]
    if config.train_transition_order == "by_timestep":
        kept = torch.sort(kept, dim=1, descending=True).values
    num_kept = kept.shape[1]
    batches = range(0, kept.shape[0], config.train_batch_size)
    assert len(batches) * num_kept == trainer.accelerator.gradient_accumulation_steps
    for start in batches:
        rows = torch.arange(start, min(start + config.train_batch_size, kept.shape[0]))
        for column in range(num_kept):
            steps = kept[rows, column]
            latents = window.latents[rows, steps]
            next_latents = window.latents[rows, steps + 1]
            timesteps = window.timesteps[rows, steps]
            terminal = ((steps + 1) == num_steps).to(latents.device)
            next_timesteps = window.timesteps[rows, (steps + 1).clamp(max=num_steps - 1)]
            # A terminal row's next state is the final sample: its x0_hat and flow are computed at the row's own
            # timestep (a time the family's schedule has) and discarded, as the reference computes and discards them.
            embeds = window.prompt_embeds[rows]
            negative = trainer.negative_prompt_embeds.expand(len(rows)) if trainer.trains_with_guidance else None

            with trainer.autocast():
                guided, _ = pipeline.predict(
                    latents, timesteps, embeds, negative, config.sample_guidance_scale, denoiser=trainer.denoiser
                )
            step = pipeline.scheduler_step(
                guided,
                timesteps,
                latents,
                eta=config.sample_eta,
                prev_sample=next_latents,
                log_prob_reduction=config.train_log_prob_reduction,
            )
            reward_now = _intermediate_reward(trainer, window, rows.tolist(), latents, timesteps, counters, epoch)
            reward_next = _intermediate_reward(
                trainer, window, rows.tolist(), next_latents, next_timesteps, counters, epoch
            )
            flow_now = trainer.objective_model(latents, timesteps, embeds.hidden_states, embeds.pooled)
            flow_next = trainer.objective_model(next_latents, next_timesteps, embeds.hidden_states, embeds.pooled)
            log_flow = forward_looking_log_flow(flow_now, reward_now, beta)
            next_log_flow = torch.where(
                terminal, beta * window.rewards[rows], forward_looking_log_flow(flow_next, reward_next, beta)
            )
            regulariser = proximal_regulariser(guided, window.model_outputs[rows, steps])
            if config.objective_name == "rdb":
                # The pretrained model's step, recomputed here with the adapter switched off (the trainer records it
                # while sampling).
                with torch.no_grad(), pipeline.adapter_disabled(), trainer.autocast():
                    prior_guided, _ = pipeline.predict(
                        latents, timesteps, embeds, negative, config.sample_guidance_scale, denoiser=trainer.denoiser
                    )
                prior_step = pipeline.scheduler_step(
                    prior_guided, timesteps, latents, eta=config.sample_eta, prev_sample=next_latents,
                    log_prob_reduction=config.train_log_prob_reduction,
                )  # fmt: skip
                residual = relative_detailed_balance_residual(
                    log_flow, step.log_probs, next_log_flow, prior_step.log_probs
                )
                loss = residual**2 + config.train_unet_reg * regulariser
            elif config.objective_name == "dag_kl":
                residual = detailed_balance_residual(
                    log_flow, step.log_probs.detach(), step.backward_log_probs, next_log_flow
                )
                advantages = leave_one_out_advantages(-residual.detach(), config.train_adv_clip_max)
                kl = ppo_clipped_loss(
                    advantages, step.log_probs, window.log_probs[rows, steps], config.train_clip_range
                )
                loss = residual**2 + config.train_klpf * kl + config.train_unet_reg * regulariser
            else:
                residual = detailed_balance_residual(log_flow, step.log_probs, step.backward_log_probs, next_log_flow)
                loss = residual**2 + config.train_unet_reg * regulariser
            # The trainer's accelerator divides by its gradient_accumulation_steps: the window's backward passes
            # (asserted above).
            trainer.accelerator.backward(loss.mean())

    trainer.accelerator.unscale_gradients()
    denoiser_parameters = [p for p in trainer.denoiser.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(denoiser_parameters, config.train_max_grad_norm)
    torch.nn.utils.clip_grad_norm_(trainer.objective_model.parameters(), config.train_max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.weights_version += 1
