"""FLUX.1 (Black Forest Labs, 2024) as a model family: a rectified-flow MMDiT over packed 2x2 latent patches,
conditioned on T5 token states and a pooled CLIP embedding; FLUX.1-dev is guidance-distilled (the guidance scale is
an input of the transformer, one call per step). Sampled as a Gaussian policy (see
:mod:`dag_trl.models.flow_matching`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from .diffusers_family import token_counts
from .flow_matching import FlowMatchingGFlowNetPipeline
from .pipeline import PromptEmbeddings, classifier_free_guidance

# Attention on both streams and both feed-forwards of the double-stream blocks, and the single-stream blocks'
# attention (their to_q / to_k / to_v), as in diffusers' FLUX LoRA training script.
FLUX_LORA_TARGET_MODULES = (
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
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


class DefaultGFlowNetFluxPipeline(FlowMatchingGFlowNetPipeline):
    """A diffusers ``FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell) with a LoRA (or the full transformer) to train and
    the VAE and text encoders frozen.

    The distilled guidance is ``guidance_embedding_scale`` (FLUX.1-dev's default 3.5; ignored by models without a
    guidance embedding such as schnell), applied in every model call, so the policy's conditional output is the
    distilled model's. ``GFlowNetConfig.sample_guidance_scale`` is true classifier-free guidance on top (two calls
    per step, diffusers' ``true_cfg_scale``); FLUX recipes set it to 1.

    Args: those of [`FlowMatchingGFlowNetPipeline`] (``max_sequence_length``: T5 tokens, at most 512, FLUX.1-dev's
        default) and ``guidance_embedding_scale``: the distilled guidance (unused by models without a guidance
        embedding).
    """

    diffusers_pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    lora_target_modules = FLUX_LORA_TARGET_MODULES

    def __init__(
        self,
        pretrained_model_name: Union[str, os.PathLike, Any],
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: Optional[float] = None,
        lora_init_seed: int = 0,
        torch_dtype: Optional[torch.dtype] = None,
        lora_target_modules: Optional[Sequence[str]] = None,
        sampler: str = "ddim",
        noise_level: float = 0.7,
        resolution: Optional[int] = None,
        max_sequence_length: int = 512,
        guidance_embedding_scale: float = 3.5,
    ):
        if not (isinstance(guidance_embedding_scale, (int, float)) and guidance_embedding_scale >= 0):
            raise ValueError(
                f"guidance_embedding_scale={guidance_embedding_scale!r} is invalid: expected a number >= 0."
            )
        if isinstance(max_sequence_length, int) and max_sequence_length > 512:
            raise ValueError(
                f"max_sequence_length={max_sequence_length} is invalid: FLUX reads at most 512 T5 tokens."
            )
        self.guidance_embedding_scale = float(guidance_embedding_scale)
        super().__init__(
            pretrained_model_name,
            pretrained_model_revision=pretrained_model_revision,
            use_lora=use_lora,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_init_seed=lora_init_seed,
            torch_dtype=torch_dtype,
            lora_target_modules=lora_target_modules,
            sampler=sampler,
            noise_level=noise_level,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
        )

    def scheduler_timesteps(self, num_inference_steps: int, device: Optional[torch.device]) -> None:
        """As ``FluxPipeline``: the sigmas ``linspace(1, 1/N, N)`` (through the scheduler's static or dynamic shift;
        with ``use_flow_sigmas`` the scheduler's own), ``mu`` from the number of latent patches (default
        ``max_shift`` 1.15)."""
        import numpy as np

        config = self.scheduler.config
        sigmas = None
        if not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        kwargs = {"mu": self.dynamic_shift(default_max_shift=1.15)} if config.get("use_dynamic_shifting") else {}
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        """T5 token states and the pooled CLIP embedding, from diffusers' ``encode_prompt``."""
        device = self.sd_pipeline.text_encoder.device
        hidden, pooled, _ = self.sd_pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeddings(hidden_states=hidden, pooled=pooled)

    def prompt_token_counts(self, prompts: list[str]) -> tuple[list[int], int]:
        """Token counts of the T5 tokenizer, whose states condition the transformer, against
        ``max_sequence_length``."""
        return token_counts(self.sd_pipeline.tokenizer_2, prompts), self.max_sequence_length

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities ``(guided, conditional)`` in float32, unpacked to the latents' shape. The transformer reads
        2x2-packed latents, ``timestep / 1000`` and the distilled guidance; with ``negative_prompt_embeds`` true
        classifier-free guidance is applied on top."""
        transformer = self.denoiser if denoiser is None else denoiser
        pipeline_class = self.pipeline_class()
        dtype = self.denoiser.dtype
        height, width = latents.shape[-2:]
        pixels = height * self.vae_scale_factor, width * self.vae_scale_factor

        def call(latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeddings) -> torch.Tensor:
            batch, channels = latents.shape[:2]
            guidance = None
            if self.denoiser.config.guidance_embeds:
                guidance = torch.full((batch,), self.guidance_embedding_scale, device=latents.device)
            output = transformer(
                hidden_states=pipeline_class._pack_latents(latents.to(dtype), batch, channels, height, width),
                timestep=timesteps.to(dtype) / 1000,
                guidance=guidance,
                pooled_projections=embeds.pooled.to(dtype),
                encoder_hidden_states=embeds.hidden_states.to(dtype),
                txt_ids=torch.zeros(embeds.hidden_states.shape[1], 3, device=latents.device, dtype=dtype),
                img_ids=pipeline_class._prepare_latent_image_ids(
                    batch, height // 2, width // 2, latents.device, dtype
                ),
                return_dict=False,
            )[0]
            return pipeline_class._unpack_latents(output, *pixels, self.vae_scale_factor).float()

        return classifier_free_guidance(
            call, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
        )
