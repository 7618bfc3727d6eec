"""Stable Diffusion 1.x / 2.x as a model family: DDIM trajectories with log-probabilities, in the shape of TRL's
DDPO pipeline."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..samplers.ddim import (
    StepOutput,
    alphas_cumprod_at,
    check_scheduler,
    ddim_step_with_logprob,
    original_sample_and_noise,
)
from .diffusers_family import DiffusersGFlowNetPipeline, token_counts
from .pipeline import PromptEmbeddings, classifier_free_guidance

# The UNet's attention projections (self- and cross-attention), as in diffusers' LoRA training scripts.
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


class DefaultGFlowNetStableDiffusionPipeline(DiffusersGFlowNetPipeline):
    """A diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x) with a DDIM scheduler, frozen VAE and text encoder, and
    a LoRA (or the full UNet) to train.

    Args:
        pretrained_model_name: a Hub id or a local folder written by ``StableDiffusionPipeline.save_pretrained``.
        pretrained_model_revision: the Hub revision (ignored for local folders).
        use_lora: train a LoRA (Hu et al., 2022) on the UNet's attention projections; else the whole UNet.
        lora_rank: LoRA rank (the paper: 4).
        lora_alpha: LoRA alpha; defaults to ``lora_rank`` (scale 1).
        lora_init_seed: seed of the LoRA initialisation (Gaussian ``A``, zero ``B``), drawn from a private random
            state so that the same seed gives the same initial adapter in every run; the global one is untouched.
        torch_dtype: the dtype to load the weights in (``None``: as saved).
    """

    diffusers_pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    lora_target_modules = LORA_TARGET_MODULES
    lora_keys_in_diffusers_format = True
    loading_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def sampling_scheduler(self, scheduler: Any) -> Any:
        """A ``DDIMScheduler`` with the saved scheduler's configuration (its noise schedule and timesteps)."""
        from diffusers import DDIMScheduler

        if "beta_schedule" not in scheduler.config:
            raise ValueError(
                f"{self.pretrained_model_name}: its scheduler ({type(scheduler).__name__}) has no beta schedule, so "
                "the DDIM policy cannot reproduce its noise levels (EDM-style checkpoints such as Playground v2.5 are "
                "not supported); expected a DDPM-style scheduler config with beta_schedule."
            )
        return DDIMScheduler.from_config(scheduler.config)

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.sd_pipeline.text_encoder

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def prompt_embedding_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        """Last hidden state of the text encoder for ``prompts`` (padded to the tokenizer's maximum length)."""
        tokens = self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
        ).input_ids.to(self.text_encoder.device)
        return PromptEmbeddings(self.text_encoder(tokens)[0])

    def check_sampler(self, num_steps: int, eta: float) -> None:
        check_scheduler(self.scheduler, num_steps, eta)

    def prompt_token_counts(self, prompts: list[str]) -> tuple[list[int], int]:
        return token_counts(self.tokenizer, prompts), self.tokenizer.model_max_length

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""UNet outputs at ``(latents, timesteps)`` with classifier-free guidance
        ([`classifier_free_guidance`]): ``(guided, conditional)`` in float32; per-sample ``timesteps`` of shape
        ``(B,)`` are allowed. ``denoiser`` is the module to call, for example the accelerate-prepared (DDP-wrapped)
        UNet during training.
        """
        denoiser = self.denoiser if denoiser is None else denoiser
        dtype = self.denoiser.dtype

        def call(latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeddings) -> torch.Tensor:
            return denoiser(latents.to(dtype), timesteps, embeds.hidden_states.to(dtype)).sample.float()

        return classifier_free_guidance(
            call, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
        )

    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        alpha_prod = alphas_cumprod_at(self.scheduler, timesteps)
        original, _ = original_sample_and_noise(
            model_output, latents, alpha_prod, self.scheduler.config.prediction_type
        )
        return original

    def scheduler_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 1.0,
        prev_sample: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        log_prob_reduction: str = "mean",
    ) -> StepOutput:
        return ddim_step_with_logprob(
            self.scheduler,
            model_output,
            timestep,
            sample,
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
            log_prob_reduction=log_prob_reduction,
        )

    def set_timesteps(self, num_inference_steps: int, device: Optional[torch.device] = None) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def initial_latents(
        self,
        batch_size: int,
        generator: Optional[torch.Generator],
        device: torch.device,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> torch.Tensor:
        """Standard normal ``x_T`` of shape ``(B, C, height / 8, width / 8)`` (the VAE's downscale factor);
        ``height`` and ``width`` default to the UNet's sample size."""
        from diffusers.utils.torch_utils import randn_tensor

        scale = self.sd_pipeline.vae_scale_factor
        height = height or self.denoiser.config.sample_size * scale
        width = width or self.denoiser.config.sample_size * scale
        shape = (batch_size, self.latent_channels, height // scale, width // scale)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
