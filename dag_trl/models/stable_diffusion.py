"""Stable Diffusion 1.x / 2.x as a model family: DDIM trajectories with log-probabilities, in the shape of TRL's
DDPO pipeline."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch

from ..samplers.ddim import (
    DDIMStepOutput,
    alphas_cumprod_at,
    check_scheduler,
    ddim_step_with_logprob,
    original_sample_and_noise,
)
from .pipeline import GFlowNetStableDiffusionPipeline, PromptEmbeddings

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


class DefaultGFlowNetStableDiffusionPipeline(GFlowNetStableDiffusionPipeline):
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
    """

    def __init__(
        self,
        pretrained_model_name: str,
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: Optional[float] = None,
        lora_init_seed: int = 0,
    ):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r} is invalid: expected an integer >= 1.")
        self.pretrained_model_name = str(pretrained_model_name)
        self.pretrained_model_revision = pretrained_model_revision
        kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if not os.path.isdir(self.pretrained_model_name):
            kwargs["revision"] = pretrained_model_revision
        self.sd_pipeline = StableDiffusionPipeline.from_pretrained(self.pretrained_model_name, **kwargs)
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(self.sd_pipeline.scheduler.config)
        self._use_lora = use_lora
        self._adapter_off = False  # inside adapter_disabled()
        self.lora_rank = lora_rank
        self.lora_alpha = lora_rank if lora_alpha is None else lora_alpha

        self.sd_pipeline.vae.requires_grad_(False)
        self.sd_pipeline.text_encoder.requires_grad_(False)
        self.sd_pipeline.unet.requires_grad_(not use_lora)
        if use_lora:
            from peft import LoraConfig

            lora_config = LoraConfig(
                r=lora_rank,
                lora_alpha=self.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGET_MODULES,
            )
            # The UNet is still on the CPU here, so forking the CPU random state covers every draw.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(lora_init_seed)
                self.sd_pipeline.unet.add_adapter(lora_config)

    @property
    def unet(self) -> torch.nn.Module:
        return self.sd_pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.sd_pipeline.vae

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def scheduler(self):
        return self.sd_pipeline.scheduler

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.sd_pipeline.text_encoder

    @property
    def use_lora(self) -> bool:
        return self._use_lora

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def prompt_embedding_dim(self) -> int:
        return self.text_encoder.config.hidden_size

    def prepare_for_training(
        self, device: torch.device, weight_dtype: torch.dtype, gradient_checkpointing: bool = False
    ) -> None:
        """VAE and text encoder in ``weight_dtype``; the UNet in ``weight_dtype`` with float32 LoRA parameters, or
        all float32 for full fine-tuning."""
        self.vae.to(device, dtype=weight_dtype)
        self.text_encoder.to(device, dtype=weight_dtype)
        if self.use_lora:
            self.unet.to(device, dtype=weight_dtype)
            for parameter in self.get_trainable_layers():
                parameter.data = parameter.data.float()
        else:
            self.unet.to(device, dtype=torch.float32)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The pretrained UNet: the LoRA switched off (diffusers' ``disable_adapters``), no second copy. Re-entrant:
        a nested use (e.g. a ``lora_min_timestep`` step while sampling the prior) leaves the LoRA off until the
        outermost one exits."""
        if not self.use_lora:
            raise ValueError(
                "use_lora=False: the whole UNet is trained, so there is no adapter to switch off and no pretrained "
                "prior left to score with; train a LoRA (use_lora=True) for objectives that use the prior."
            )
        if self._adapter_off:
            yield
            return
        self.unet.disable_adapters()
        self._adapter_off = True
        try:
            yield
        finally:
            self.unet.enable_adapters()
            self._adapter_off = False

    def get_trainable_layers(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]

    def lora_state_dict(self, unet: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
        """The UNet's LoRA weights with diffusers' key names, as ``load_lora_weights`` reads them."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet if unet is not None else self.unet))

    def save_pretrained(self, output_dir: Union[str, os.PathLike], unet: Optional[torch.nn.Module] = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (LoRA) or a diffusers ``unet/`` folder (full fine-tuning)."""
        from diffusers import StableDiffusionPipeline

        unet = unet if unet is not None else self.unet
        if self.use_lora:
            StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=self.lora_state_dict(unet))
        else:
            unet.save_pretrained(os.path.join(output_dir, "unet"))

    def load_trained_weights(self, unet: torch.nn.Module, input_dir: str) -> None:
        """Load the LoRA (``pytorch_lora_weights.safetensors``) or ``unet/`` folder in ``input_dir`` into ``unet``."""
        from diffusers import UNet2DConditionModel

        if self.use_lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict

            lora_state, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
            unet_state = {k.removeprefix("unet."): v for k, v in lora_state.items() if k.startswith("unet.")}
            result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(
                    f"The LoRA checkpoint in {input_dir} does not fit this UNet: unexpected {unexpected[:5]}."
                )
        else:
            loaded = UNet2DConditionModel.from_pretrained(os.path.join(input_dir, "unet"))
            unet.load_state_dict(loaded.state_dict())

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
        counts = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False).input_ids]
        return counts, self.tokenizer.model_max_length

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        unet: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""UNet outputs at ``(latents, timesteps)`` with classifier-free guidance (Ho & Salimans, 2022).

        With ``negative_prompt_embeds`` the UNet runs once on the batch ``[unconditional; conditional]`` and the
        guided output is :math:`\epsilon_u + w(\epsilon_c - \epsilon_u)`; without, guided = conditional. Returns
        ``(guided, conditional)`` in float32; per-sample ``timesteps`` of shape ``(B,)`` are allowed. ``unet`` is the
        module to call, for example the accelerate-prepared (DDP-wrapped) UNet during training.
        """
        unet = self.unet if unet is None else unet
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        unet_dtype = self.unet.dtype
        if negative_prompt_embeds is None:
            conditional = unet(latents.to(unet_dtype), timesteps, prompt_embeds.hidden_states.to(unet_dtype))
            conditional = conditional.sample.float()
            return conditional, conditional
        output = unet(
            torch.cat([latents, latents]).to(unet_dtype),
            torch.cat([timesteps, timesteps]),
            torch.cat([negative_prompt_embeds.hidden_states, prompt_embeds.hidden_states]).to(unet_dtype),
        ).sample.float()
        unconditional, conditional = output.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional), conditional

    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        alpha_prod = alphas_cumprod_at(self.scheduler, timesteps)
        original, _ = original_sample_and_noise(
            model_output, latents, alpha_prod, self.scheduler.config.prediction_type
        )
        return original

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode Stable Diffusion latents (divided by the VAE's ``scaling_factor`` first) to float32 images in [0, 1]."""
        vae_dtype = self.vae.dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def scheduler_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 1.0,
        prev_sample: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        log_prob_reduction: str = "mean",
    ) -> DDIMStepOutput:
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
        height = height or self.unet.config.sample_size * scale
        width = width or self.unet.config.sample_size * scale
        shape = (batch_size, self.latent_channels, height // scale, width // scale)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
