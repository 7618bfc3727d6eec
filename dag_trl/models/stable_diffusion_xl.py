"""Stable Diffusion XL (Podell et al. 2023, arXiv 2307.01952) as a model family: SD's UNet and DDIM sampler, with
two text encoders (their penultimate states concatenated), a pooled embedding and the size / crop "time ids" as extra
conditioning."""

from __future__ import annotations

from typing import Optional

import torch

from .diffusers_family import token_counts
from .pipeline import PromptEmbeddings, classifier_free_guidance
from .stable_diffusion import DefaultGFlowNetStableDiffusionPipeline


class DefaultGFlowNetStableDiffusionXLPipeline(DefaultGFlowNetStableDiffusionPipeline):
    """A diffusers ``StableDiffusionXLPipeline`` (SDXL base) with a DDIM scheduler, frozen VAE and text encoders,
    and a LoRA on the UNet's attention (or the full UNet) to train. The constructor is the SD one's.

    Samples are ``unet.config.sample_size * 8`` pixels square (1024 for SDXL base), conditioned on the time ids
    ``(height, width, 0, 0, height, width)``: original size = target size, no crop, as diffusers' defaults.
    """

    diffusers_pipeline_class = "StableDiffusionXLPipeline"
    upcasts_vae_in_float16 = True
    loading_kwargs = {}

    @property
    def pooled_embedding_dim(self) -> int:
        return self.sd_pipeline.text_encoder_2.config.projection_dim

    @property
    def prompt_embedding_dim(self) -> int:
        return self.denoiser.config.cross_attention_dim

    def prompt_token_counts(self, prompts: list[str]) -> tuple[list[int], int]:
        """Token counts of the first tokenizer present (both CLIP tokenizers read the same number of tokens)."""
        tokenizer = self.sd_pipeline.tokenizer or self.sd_pipeline.tokenizer_2
        return token_counts(tokenizer, prompts), tokenizer.model_max_length

    @property
    def resolution(self) -> int:
        return self.denoiser.config.sample_size * self.sd_pipeline.vae_scale_factor

    def _time_ids(self, batch_size: int, device: torch.device) -> torch.Tensor:
        side = float(self.resolution)
        return torch.tensor([[side, side, 0.0, 0.0, side, side]], device=device).expand(batch_size, -1)

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        """Both encoders' penultimate token states (concatenated), text_encoder_2's pooled projection and the time
        ids, from diffusers' ``encode_prompt``."""
        device = (self.sd_pipeline.text_encoder or self.sd_pipeline.text_encoder_2).device
        hidden, _, pooled, _ = self.sd_pipeline.encode_prompt(
            prompt=list(prompts), device=device, do_classifier_free_guidance=False
        )
        return PromptEmbeddings(hidden, pooled=pooled, extra={"time_ids": self._time_ids(len(hidden), device)})

    def encode_negative_prompt(self, prompt: str) -> PromptEmbeddings:
        """Zeros for an empty negative prompt when the model's config says so (``force_zeros_for_empty_prompt``,
        SDXL base), as diffusers' pipeline does; else the prompt's encoding."""
        if prompt or not self.sd_pipeline.config.get("force_zeros_for_empty_prompt", False):
            return self.encode_prompt([prompt])
        embeds = self.encode_prompt([prompt])
        return PromptEmbeddings(
            torch.zeros_like(embeds.hidden_states), pooled=torch.zeros_like(embeds.pooled), extra=embeds.extra
        )

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet outputs ``(guided, conditional)`` in float32, with the pooled embedding and time ids as
        ``added_cond_kwargs``."""
        denoiser = self.denoiser if denoiser is None else denoiser
        dtype = self.denoiser.dtype

        def call(latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeddings) -> torch.Tensor:
            added = {"text_embeds": embeds.pooled.to(dtype), "time_ids": embeds.extra["time_ids"].to(dtype)}
            return denoiser(
                latents.to(dtype), timesteps, embeds.hidden_states.to(dtype), added_cond_kwargs=added
            ).sample.float()

        return classifier_free_guidance(
            call, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
        )
