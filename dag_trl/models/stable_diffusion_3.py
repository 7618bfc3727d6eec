"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, arXiv 2403.03206) as a model family: an MMDiT transformer that
predicts rectified-flow velocities, three text encoders (two CLIP with pooled outputs, one T5), classifier-free
guidance, sampled as a Gaussian policy (see :mod:`dag_trl.models.flow_matching`)."""

from __future__ import annotations

from typing import Optional

import torch

from .diffusers_family import token_counts
from .flow_matching import FlowMatchingGFlowNetPipeline
from .pipeline import PromptEmbeddings, classifier_free_guidance

# The MMDiT's attention on both streams (image: to_*, text: add_*) and the image stream's feed-forward, as in
# diffusers' SD3 LoRA training script with its feed-forward option.
SD3_LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
)


class DefaultGFlowNetStableDiffusion3Pipeline(FlowMatchingGFlowNetPipeline):
    """A diffusers ``StableDiffusion3Pipeline`` (SD3, SD3.5 medium / large) with a LoRA (or the full transformer)
    to train and the VAE and three text encoders frozen.

    Args: those of [`FlowMatchingGFlowNetPipeline`]: ``pretrained_model_name`` (a Hub id such as
    ``stabilityai/stable-diffusion-3.5-medium`` or a local folder), ``pretrained_model_revision``, ``use_lora``,
    ``lora_rank``, ``lora_alpha``, ``lora_init_seed``, ``torch_dtype``, ``sampler``, ``noise_level``,
    ``resolution`` and ``max_sequence_length`` (T5 tokens; SD3's pipeline reads 256).
    """

    diffusers_pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    lora_target_modules = SD3_LORA_TARGET_MODULES

    def scheduler_timesteps(self, num_inference_steps: int, device: Optional[torch.device]) -> None:
        """As ``StableDiffusion3Pipeline``: the scheduler's own spacing (its static ``shift``), with ``mu`` when the
        scheduler shifts dynamically (default ``max_shift`` 1.16, the SD3 pipeline's)."""
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.dynamic_shift(default_max_shift=1.16)
        self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        """The joint CLIP-L / CLIP-G / T5 token states and the pooled CLIP embeddings, from diffusers'
        ``encode_prompt`` (the same prompt for all three encoders)."""
        device = self.sd_pipeline.text_encoder.device
        hidden, _, pooled, _ = self.sd_pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeddings(hidden_states=hidden, pooled=pooled)

    def prompt_token_counts(self, prompts: list[str]) -> tuple[list[int], int]:
        """Token counts of the CLIP tokenizer, which reads the fewest tokens (77 for SD3's; T5 reads
        ``max_sequence_length``)."""
        tokenizer = self.sd_pipeline.tokenizer
        return token_counts(tokenizer, prompts), tokenizer.model_max_length

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities ``(guided, conditional)`` in float32 at ``timesteps`` (the scheduler's ``1000 t``), with
        classifier-free guidance ([`classifier_free_guidance`])."""
        transformer = self.denoiser if denoiser is None else denoiser
        dtype = self.denoiser.dtype

        def call(latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeddings) -> torch.Tensor:
            return transformer(
                hidden_states=latents.to(dtype),
                timestep=timesteps,
                encoder_hidden_states=embeds.hidden_states.to(dtype),
                pooled_projections=embeds.pooled.to(dtype),
                return_dict=False,
            )[0].float()

        return classifier_free_guidance(
            call, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
        )
