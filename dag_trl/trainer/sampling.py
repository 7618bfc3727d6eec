"""Sampling trajectories for training, and images for evaluation; mixed into :class:`GFlowNetDiffusionTrainer`."""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..models.pipeline import PromptEmbeddings
from .inputs import validate_prompt

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import GFlowNetConfig
    from ..models.pipeline import GFlowNetStableDiffusionPipeline
    from .objectives import Objective


class SamplingMixin:
    """The epoch's trajectories with what training needs, and fixed-noise samples for evaluation."""

    config: GFlowNetConfig
    accelerator: Accelerator
    sd_pipeline: GFlowNetStableDiffusionPipeline
    negative_prompt_embeds: PromptEmbeddings
    objective: Objective

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
                **options,
            )

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images for ``prompts`` from the current policy, with the training sampler (steps, eta, guidance, negative
        prompt) and noise fixed by ``seed``, as float32 ``(B, 3, H, W)`` on the CPU: for evaluations that compare
        the model before and after training on the same noise."""
        config = self.config
        images = []
        for start in range(0, len(prompts), config.sample_batch_size):
            chunk = prompts[start : start + config.sample_batch_size]
            output = self._sample(self.sd_pipeline.encode_prompt(chunk), torch.Generator().manual_seed(seed + start))
            images.append(output.images.float().cpu())
        return torch.cat(images)

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
                output = self._sample(
                    prompt_embeds,
                    generator,
                    log_prob_reduction=config.train_log_prob_reduction,
                    record_prior_log_probs=self.objective.uses_prior_log_probs,
                )
            batch_size = len(prompts)
            # One (guided: two-row) UNet call per step, and as many for the prior when the objective records it.
            self.counters.unet_forward_no_grad += (
                batch_size
                * config.sample_num_steps
                * (2 if config.sample_guidance_scale != 1.0 else 1)
                * (2 if self.objective.uses_prior_log_probs else 1)
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
                    "prompt_embeds": prompt_embeds.map(lambda value: value.float()),
                    "latents": output.latents,
                    "log_probs": output.log_probs,
                    "backward_log_probs": output.backward_log_probs,
                    "timesteps": output.timesteps.unsqueeze(0).expand(batch_size, -1),
                    "noise_preds": output.noise_preds,
                    "conditional_noise_preds": output.conditional_noise_preds,
                    **({"prior_log_probs": output.prior_log_probs} if self.objective.uses_prior_log_probs else {}),
                }
            )
            prompt_image_data.append([output.images, prompts, metadata])
        for batch, data, result in zip(batches, prompt_image_data, pending):
            rewards, info = result.result() if isinstance(result, futures.Future) else result
            batch["rewards"] = rewards
            data.extend([rewards, info])
        samples = {key: self._concatenate([batch[key] for batch in batches]) for key in batches[0]}
        samples["weights_version"] = self.weights_version
        return samples, prompt_image_data[:1]

    @staticmethod
    def _concatenate(parts: list) -> Any:
        if isinstance(parts[0], list):
            return sum(parts, [])
        if isinstance(parts[0], PromptEmbeddings):
            return PromptEmbeddings.cat(parts)
        return torch.cat(parts)
