"""Stable Diffusion pipelines that sample DDIM trajectories with log-probabilities, in the shape of TRL's DDPO ones."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .math import DDIMStepOutput, alphas_cumprod_at, ddim_step_with_logprob, original_sample_and_noise

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class GFlowNetPipelineOutput:
    """Trajectories sampled by a [`GFlowNetStableDiffusionPipeline`].

    Attributes:
        images: decoded final states ``x_0``, float32 in [0, 1], shape ``(B, 3, H, W)``.
        latents: every state ``x_T, ..., x_0`` as stored and scored, float32, shape ``(B, N + 1, C, h, w)``.
        log_probs: ``log P_F`` of each transition, float32, shape ``(B, N)``.
        backward_log_probs: ``log P_B`` of each transition, float32, shape ``(B, N)``; it depends on no parameter,
            so it is computed once, here.
        timesteps: the DDIM timesteps ``t_0 > ... > t_{N-1}``, shape ``(N,)``.
        noise_preds: the guided model output of each transition (the proximal regulariser's reference), float32,
            shape ``(B, N, C, h, w)``.
        conditional_noise_preds: the prompt-conditional (unguided) model output of each transition, from which the
            one-step prediction ``x0_hat`` of every non-terminal state follows without another UNet call.
    """

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    backward_log_probs: torch.Tensor
    timesteps: torch.Tensor
    noise_preds: torch.Tensor
    conditional_noise_preds: torch.Tensor


class GFlowNetStableDiffusionPipeline(ABC):
    """The contract the trainer needs from a diffusion pipeline (the counterpart of TRL's
    ``DDPOStableDiffusionPipeline``). Subclass it to train another model family."""

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> GFlowNetPipelineOutput:
        """Sample trajectories with log-probabilities."""

    @abstractmethod
    def scheduler_step(self, *args: Any, **kwargs: Any) -> DDIMStepOutput:
        """One DDIM step with log-probabilities (see [`ddim_step_with_logprob`])."""

    @abstractmethod
    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        guidance_scale: float,
        unet: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(guided, conditional)`` model outputs in float32."""

    @abstractmethod
    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """The one-step prediction ``x0_hat`` of ``latents`` at ``timesteps`` from a model output."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode clean latents to images in [0, 1]."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states of a list of prompts."""

    @property
    @abstractmethod
    def unet(self) -> torch.nn.Module: ...

    @property
    @abstractmethod
    def vae(self) -> torch.nn.Module: ...

    @property
    @abstractmethod
    def tokenizer(self): ...

    @property
    @abstractmethod
    def scheduler(self): ...

    @property
    @abstractmethod
    def text_encoder(self) -> torch.nn.Module: ...

    @property
    @abstractmethod
    def autocast(self) -> Optional[Callable[[], contextlib.AbstractContextManager]]:
        """A context-manager factory for the UNet forward, or ``None`` to use the accelerator's."""

    @property
    @abstractmethod
    def use_lora(self) -> bool: ...

    @abstractmethod
    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def save_pretrained(self, output_dir: Union[str, os.PathLike], unet: Optional[torch.nn.Module] = None) -> None:
        """Save the trained weights of ``unet`` (default: this pipeline's): the LoRA in diffusers format, or the
        whole UNet. The trainer passes the UNet it trains, which may be a wrapped copy."""

    @abstractmethod
    def get_trainable_layers(self) -> list[torch.nn.Parameter]: ...

    @abstractmethod
    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate ``save_state`` pre-hook for the UNet."""

    @abstractmethod
    def load_checkpoint(self, models: list, input_dir: str) -> None:
        """accelerate ``load_state`` pre-hook for the UNet."""


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
    def autocast(self) -> None:
        return None

    @property
    def use_lora(self) -> bool:
        return self._use_lora

    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None:
        self.sd_pipeline.set_progress_bar_config(*args, **kwargs)

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

    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        """Save the UNet found in ``models`` with :meth:`save_pretrained` and drop its entry from ``weights`` so that
        accelerate does not also pickle it; ``models`` is left as it is."""
        index = next(i for i, model in enumerate(models) if model is self.unet)
        self.save_pretrained(output_dir, unet=models[index])
        weights.pop(index)

    def load_checkpoint(self, models: list, input_dir: str) -> None:
        """Load what :meth:`save_checkpoint` wrote into the UNet found in ``models`` and remove it from ``models``."""
        from diffusers import UNet2DConditionModel

        unet = models.pop(next(i for i, model in enumerate(models) if model is self.unet))
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

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder for ``prompts`` (padded to the tokenizer's maximum length)."""
        tokens = self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(tokens)[0]

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
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
            conditional = unet(latents.to(unet_dtype), timesteps, prompt_embeds.to(unet_dtype)).sample.float()
            return conditional, conditional
        output = unet(
            torch.cat([latents, latents]).to(unet_dtype),
            torch.cat([timesteps, timesteps]),
            torch.cat([negative_prompt_embeds, prompt_embeds]).to(unet_dtype),
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

    def scheduler_step(self, *args: Any, **kwargs: Any) -> DDIMStepOutput:
        return ddim_step_with_logprob(self.scheduler, *args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        log_prob_reduction: str = "mean",
        show_progress: bool = False,
    ) -> GFlowNetPipelineOutput:
        """Sample DDIM trajectories from prompt embeddings and record what training needs (spec section 2).

        Guidance is applied when ``negative_prompt_embeds`` is given and ``guidance_scale != 1``. Latents and
        log-probabilities are float32 and refer to the same tensor values, so recomputing a log-probability on the
        stored latents with unchanged weights gives the stored one.
        """
        from diffusers.utils.torch_utils import randn_tensor

        device = prompt_embeds.device
        batch_size = prompt_embeds.shape[0]
        scale = self.sd_pipeline.vae_scale_factor
        height = height or self.unet.config.sample_size * scale
        width = width or self.unet.config.sample_size * scale
        if guidance_scale == 1.0:
            negative_prompt_embeds = None
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (batch_size, self.unet.config.in_channels, height // scale, width // scale)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.float()

        all_latents, all_log_probs, all_backward, all_noise_preds, all_conditional = [latents], [], [], [], []
        for timestep in self.sd_pipeline.progress_bar(timesteps) if show_progress else timesteps:
            guided, conditional = self.predict_noise(
                latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale
            )
            step = self.scheduler_step(
                guided, timestep, latents, eta=eta, generator=generator, log_prob_reduction=log_prob_reduction
            )
            latents = step.latents
            all_latents.append(latents)
            all_log_probs.append(step.log_probs)
            all_backward.append(step.backward_log_probs)
            all_noise_preds.append(guided)
            all_conditional.append(conditional)

        return GFlowNetPipelineOutput(
            images=self.decode(latents),
            latents=torch.stack(all_latents, dim=1),
            log_probs=torch.stack(all_log_probs, dim=1),
            backward_log_probs=torch.stack(all_backward, dim=1),
            timesteps=timesteps.clone(),
            noise_preds=torch.stack(all_noise_preds, dim=1),
            conditional_noise_preds=torch.stack(all_conditional, dim=1),
        )
