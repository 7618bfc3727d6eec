"""Sampling trajectories for training, and images for evaluation; mixed into :class:`GFlowNetDiffusionTrainer`."""

from __future__ import annotations

import contextlib
from concurrent import futures
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..models.pipeline import PromptEmbeddings
from ..objectives import Trajectories
from .divergence import TrainingDivergedError, first_non_finite, how_to_go_on
from .inputs import check_prompts, validate_prompt

# The seed of the health probe's noise (any fixed value: the probe must be the same at every save).
HEALTH_PROBE_SEED = 0

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import GFlowNetConfig
    from ..models.pipeline import GFlowNetStableDiffusionPipeline
    from ..objectives import Objective


class SamplingMixin:
    """The epoch's trajectories with what training needs, and fixed-noise samples for evaluation."""

    config: GFlowNetConfig
    accelerator: Accelerator
    sd_pipeline: GFlowNetStableDiffusionPipeline
    negative_prompt_embeds: PromptEmbeddings
    objective: Objective
    weights_version: int
    sampled_weights_version: int
    _prompts_checked: bool = False

    def _sample(self, prompt_embeds: PromptEmbeddings, generator: torch.Generator, **options: Any) -> Any:
        """The pipeline's trajectories for ``prompt_embeds`` with the training sampler (steps, eta, guidance with the
        negative prompt) under the trainer's autocast; ``options`` go to the pipeline."""
        config = self.config
        with self.autocast():
            return self.sd_pipeline(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=self.negative_prompt_embeds.expand(len(prompt_embeds)),
                num_inference_steps=config.sample_num_steps,
                guidance_scale=config.sample_guidance_scale,
                eta=config.sample_eta,
                generator=generator,
                lora_min_timestep=config.lora_min_timestep,
                **options,
            )

    @torch.no_grad()
    def sample_images(
        self, prompts: list[str], seed: int, prior: bool = False, initial_latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images for ``prompts`` from the current policy (``prior=True``: the pretrained model, the adapter switched
        off), with the training sampler (steps, eta, guidance, negative prompt), as float32 ``(B, 3, H, W)`` on the
        CPU, on every process: for evaluations that compare models on the same noise. The processes share the
        chunks of ``sample_batch_size`` prompts, and each chunk's noise is seeded by ``seed`` plus its position, so
        the images depend neither on the number of processes nor on the batch composition elsewhere.

        ``initial_latents`` (one row per prompt) fixes the starting states ``x_T``; the later steps' noise is still
        drawn from the chunks' generators (see :func:`dag_trl.evaluation.sample_repeated_starts`)."""
        config, accelerator = self.config, self.accelerator
        if initial_latents is not None and len(initial_latents) != len(prompts):
            raise ValueError(
                f"initial_latents has {len(initial_latents)} rows for {len(prompts)} prompts: expected one per prompt."
            )
        size = config.sample_batch_size
        mine = []
        for start in list(range(0, len(prompts), size))[accelerator.process_index :: accelerator.num_processes]:
            embeds = self.sd_pipeline.encode_prompt(prompts[start : start + size])
            generator = torch.Generator().manual_seed(seed + start)
            latents = None if initial_latents is None else initial_latents[start : start + size].to(embeds.device)
            with self.sd_pipeline.adapter_disabled() if prior else contextlib.nullcontext():
                mine.append((start, self._sample(embeds, generator, latents=latents).images.float().cpu()))
        chunks = gather_object(mine) if accelerator.num_processes > 1 else mine
        return torch.cat([images for _, images in sorted(chunks, key=lambda chunk: chunk[0])])

    @torch.no_grad()
    def health_probe(self) -> dict[str, torch.Tensor]:
        """The trained modules' outputs on a fixed probe, for the weights health check: one trajectory of the
        training sampler for the negative prompt from the noise of seed :data:`HEALTH_PROBE_SEED` (its latents and
        log-probabilities), and the objective's model on that trajectory's states (:meth:`Objective.probe_model`)."""
        config = self.config
        was_training = self.denoiser.training
        self.denoiser.eval()
        prompt_embeds = self.negative_prompt_embeds
        output = self._sample(
            prompt_embeds,
            torch.Generator().manual_seed(HEALTH_PROBE_SEED),
            log_prob_reduction=config.train_log_prob_reduction,
        )
        if was_training:
            self.denoiser.train()
        probe = {"sampled latents": output.latents, "log-probabilities": output.log_probs}
        model = self.unwrapped_objective_model
        if model is not None:
            num_steps = output.log_probs.shape[1]
            with self.autocast():
                outputs = self.objective.probe_model(
                    model,
                    output.latents[0, :num_steps],
                    output.timesteps.to(output.latents.device),
                    prompt_embeds.expand(num_steps),
                )
            if outputs is not None:
                probe[f"{self.objective.model_folder} outputs"] = outputs
        return probe

    def generate_samples(self, epoch: int) -> tuple[Trajectories, list]:
        """The epoch's trajectories from the current policy with their rewards, and the first sampling batch's
        ``[[images, prompts, metadata, rewards, reward_info]]`` for the image samples hook. Records the weights
        version they were sampled with (``sampled_weights_version``): until the weights change, what sampling
        recorded is what the current weights would compute."""
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
            if not self._prompts_checked:
                # Once per run: empty prompts, and prompts the text encoder cuts short, are accepted with a warning.
                check_prompts(prompts, *(self.sd_pipeline.prompt_token_counts(prompts) or (None, None)))
                self._prompts_checked = True
            with torch.no_grad():
                prompt_embeds = self.sd_pipeline.encode_prompt(prompts)
                output = self._sample(
                    prompt_embeds,
                    generator,
                    log_prob_reduction=config.train_log_prob_reduction,
                    record_prior_log_probs=self.objective.uses_prior_log_probs,
                    record_prior_means=self.objective.uses_prior_means,
                )
            bad = first_non_finite([output.latents, output.log_probs])
            if bad is not None:
                # Before the reward function sees the images, which it would be blamed for.
                largest = max(p.detach().abs().max().item() for p in self.trainable_parameters())
                raise TrainingDivergedError(
                    f"Training diverged before epoch {epoch}: the policy's sampled "
                    f"{('latents', 'log-probabilities')[bad]} hold NaN or infinite values (largest trained weight "
                    f"{largest:.3g}). {how_to_go_on(self.last_checkpoint())}"
                )
            batch_size = len(prompts)
            self.counters.vae_decodes += batch_size
            if config.async_reward_computation:
                pending.append(self.executor.submit(self.compute_rewards, output.images, prompts, metadata, epoch))
            else:
                pending.append(self.compute_rewards(output.images, prompts, metadata, epoch))
            batches.append(
                dict(
                    prompts=prompts,
                    metadata=metadata,
                    prompt_embeds=prompt_embeds.map(lambda value: value.float()),
                    latents=output.latents,
                    log_probs=output.log_probs,
                    backward_log_probs=output.backward_log_probs,
                    timesteps=output.timesteps.unsqueeze(0).expand(batch_size, -1),
                    model_outputs=output.noise_preds,
                    conditional_model_outputs=output.conditional_noise_preds,
                    prior_log_probs=output.prior_log_probs if self.objective.uses_prior_log_probs else None,
                    **self._prior_means(output),
                )
            )
            prompt_image_data.append([output.images, prompts, metadata])
        parts = []
        for batch, data, result in zip(batches, prompt_image_data, pending, strict=True):
            rewards, info = result.result() if isinstance(result, futures.Future) else result
            parts.append(Trajectories(**batch, rewards=rewards))
            data.extend([rewards, info])
        self.sampled_weights_version = self.weights_version
        return Trajectories.cat(parts), prompt_image_data[:1]

    def _prior_means(self, output: Any) -> dict[str, torch.Tensor]:
        """The pretrained model's step means and per-step KLs, for objectives that declare ``uses_prior_means``."""
        if not self.objective.uses_prior_means:
            return {}
        if output.prior_means is None:
            raise ValueError(
                f"train_objective={self.objective.name!r} needs the mean of each sampling step, and "
                f"{type(self.sd_pipeline).__name__}.scheduler_step returns none (its output has no 'mean')."
            )
        return {"prior_means": output.prior_means, "prior_kls": output.prior_kls}
