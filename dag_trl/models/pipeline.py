"""The model-family seam: what the trainer needs from a diffusion pipeline, and the sampling loop built on it.

The trainer never touches a scheduler, a text encoder or a VAE: a pipeline subclass is the only place that knows
its model family (the stochastic step with its log-probabilities, the timesteps, the latent shape, the text
conditioning and the sizes the flow network needs). The sampling loop itself, ``x_T -> ... -> x_0`` with what
training records at every step, is the same for every family and lives here.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..samplers.gaussian import StepOutput, gaussian_step_kl


@dataclass
class PromptEmbeddings:
    """The text conditioning of a batch of prompts; every tensor has the batch as its first dimension.

    Attributes:
        hidden_states: the text encoder's per-token states, shape ``(B, L, D)`` (cross-attention input).
        pooled: a pooled prompt embedding, shape ``(B, D')``, for families that use one (SDXL, SD3, FLUX).
        extra: further per-sample conditioning a family needs (for example SDXL's time ids).
    """

    hidden_states: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeddings:
        """A copy with ``function`` applied to every tensor."""
        return PromptEmbeddings(
            hidden_states=function(self.hidden_states),
            pooled=None if self.pooled is None else function(self.pooled),
            extra={name: function(value) for name, value in self.extra.items()},
        )

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, index: Any) -> PromptEmbeddings:
        """The rows ``index`` (an int tensor, a slice or a list), as a new batch."""
        return self.map(lambda value: value[index.to(value.device) if torch.is_tensor(index) else index])

    def expand(self, batch_size: int) -> PromptEmbeddings:
        """A batch of ``batch_size`` copies of a one-prompt batch (for example the negative prompt)."""
        return self.map(lambda value: value.expand(batch_size, *value.shape[1:]))

    def to(self, *args: Any, **kwargs: Any) -> PromptEmbeddings:
        return self.map(lambda value: value.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    @staticmethod
    def cat(batches: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        """Concatenate batches along the batch dimension."""
        first = batches[0]
        return PromptEmbeddings(
            hidden_states=torch.cat([batch.hidden_states for batch in batches]),
            pooled=None if first.pooled is None else torch.cat([batch.pooled for batch in batches]),
            extra={name: torch.cat([batch.extra[name] for batch in batches]) for name in first.extra},
        )


def classifier_free_guidance(
    model_call: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor],
    latents: torch.Tensor,
    timesteps: Union[int, float, torch.Tensor],
    prompt_embeds: PromptEmbeddings,
    negative_prompt_embeds: Optional[PromptEmbeddings],
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(guided, conditional)`` outputs of ``model_call(latents, timesteps, embeds)`` (float32) with
    classifier-free guidance (Ho & Salimans, 2022).

    With ``negative_prompt_embeds`` the model runs once on the batch ``[unconditional; conditional]`` and the guided
    output is :math:`o_u + w (o_c - o_u)`; without, guided = conditional. ``timesteps`` is a scalar or per sample
    ``(B,)``; ``model_call`` receives them per sample.
    """
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    if negative_prompt_embeds is None:
        conditional = model_call(latents, timesteps, prompt_embeds)
        return conditional, conditional
    output = model_call(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        PromptEmbeddings.cat([negative_prompt_embeds, prompt_embeds]),
    )
    unconditional, conditional = output.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional), conditional


@dataclass
class GFlowNetPipelineOutput:
    """Trajectories sampled by a [`GFlowNetStableDiffusionPipeline`].

    Attributes:
        images: decoded final states ``x_0``, float32 in [0, 1], shape ``(B, 3, H, W)``.
        latents: every state ``x_T, ..., x_0`` as stored and scored, float32, shape ``(B, N + 1, C, h, w)``.
        log_probs: ``log P_F`` of each transition, float32, shape ``(B, N)``.
        backward_log_probs: ``log P_B`` of each transition, float32, shape ``(B, N)``; it depends on no parameter,
            so it is computed once, here.
        timesteps: the sampler's timesteps ``t_0 > ... > t_{N-1}``, shape ``(N,)``.
        noise_preds: the guided model output of each transition (the proximal regulariser's reference), float32,
            shape ``(B, N, C, h, w)``.
        conditional_noise_preds: the prompt-conditional (unguided) model output of each transition, from which the
            one-step prediction ``x0_hat`` of every non-terminal state follows without another model call.
        prior_log_probs: with ``record_prior_log_probs``, ``log P_F`` of each transition under the pretrained model
            (the adapter disabled, the same guidance), float32 ``(B, N)``; else ``None``.
        prior_means: with ``record_prior_log_probs`` and ``record_prior_means``, the mean of the pretrained model's
            step at each visited state, float32 ``(B, N, C, h, w)``, if the family's step reports its mean; else
            ``None``.
        prior_kls: with ``prior_means``, the closed-form KL in nats (summed over the latent's elements) from the
            sampling policy's step to the pretrained model's at each visited state, ``|mu_theta - mu_prior|^2 /
            (2 s^2)`` (both steps have the variance ``s^2``), ``(B, N)``.
    """

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    backward_log_probs: torch.Tensor
    timesteps: torch.Tensor
    noise_preds: torch.Tensor
    conditional_noise_preds: torch.Tensor
    prior_log_probs: Optional[torch.Tensor] = None
    prior_means: Optional[torch.Tensor] = None
    prior_kls: Optional[torch.Tensor] = None


class GFlowNetStableDiffusionPipeline(ABC):
    """The contract between the trainer and a model family (the counterpart of TRL's
    ``DDPOStableDiffusionPipeline``). Subclass it to train another family: implement the abstract methods; the
    sampling loop (``__call__``) and the checkpoint hooks are written once, here, in terms of them.

    :attr:`denoiser` is the trainable denoising network whatever its architecture (a UNet, or a transformer in DiT
    families); the trainer calls it only through :meth:`predict`. ``unet`` (TRL's ``DDPOStableDiffusionPipeline``
    name) and ``predict_noise`` are other names for them; a family written against those names (defining ``unet`` and
    ``predict_noise``) keeps working, the new names resolving to its methods.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A family that implements the first names only (``unet``, ``predict_noise``) gets the new ones from them.
        if "unet" in cls.__dict__ and "denoiser" not in cls.__dict__:
            cls.denoiser = cls.__dict__["unet"]
        if "predict_noise" in cls.__dict__ and "predict" not in cls.__dict__:
            predict_noise = cls.__dict__["predict_noise"]

            def predict(self, *inputs: Any, denoiser: Optional[torch.nn.Module] = None, **options: Any):
                return predict_noise(self, *inputs, unet=denoiser, **options)

            cls.predict = predict

    # ------------------------------------------------------------------ the family's pieces

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The denoising network that training updates (through its LoRA, or all of it)."""

    @property
    def unet(self) -> torch.nn.Module:
        """:attr:`denoiser`, under the name TRL's ``DDPOStableDiffusionPipeline`` gives it."""
        return self.denoiser

    @property
    @abstractmethod
    def use_lora(self) -> bool: ...

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latent states (the flow network's input)."""

    @property
    @abstractmethod
    def prompt_embedding_dim(self) -> int:
        """Width ``D`` of :attr:`PromptEmbeddings.hidden_states` (the flow network's cross-attention input)."""

    @property
    def pooled_embedding_dim(self) -> Optional[int]:
        """Width of :attr:`PromptEmbeddings.pooled` for families that provide one (the flow network conditions on
        it), else ``None``."""
        return None

    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        """The text conditioning of a list of prompts."""

    def check_sampler(self, num_steps: int, eta: float) -> None:
        """Raise ``ValueError`` if sampling ``num_steps`` steps at ``eta`` would not give finite log-probabilities
        (e.g. a step with zero or underflowing variance), naming the setting; the trainer calls it before anything
        else is set up. The default accepts everything."""
        return None

    def detailed_balance_holds(self, eta: float) -> bool:
        """Whether the sampler at ``eta`` can satisfy detailed balance against the noising kernel ``P_B`` (which
        DAG's objectives assume): DDIM only at ``eta = 1`` (see :mod:`dag_trl.samplers.gaussian`)."""
        return eta == 1

    def encode_negative_prompt(self, prompt: str) -> PromptEmbeddings:
        """The guidance's unconditional input for ``prompt`` (default: :meth:`encode_prompt`); families whose
        pipelines use zeros for an empty negative prompt (SDXL) override it."""
        return self.encode_prompt([prompt])

    def prompt_token_counts(self, prompts: list[str]) -> Optional[tuple[list[int], int]]:
        """``(tokens per prompt without truncation, the most the text encoder reads)``, so that the trainer can warn
        about prompts cut short; ``None`` (no check) for families without a tokenizer limit."""
        return None

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Set the sampler to ``num_inference_steps`` steps (training recomputes steps with this spacing) and
        return the timesteps ``t_0 > ... > t_{N-1}``."""

    @abstractmethod
    def initial_latents(
        self,
        batch_size: int,
        generator: Optional[torch.Generator],
        device: torch.device,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> torch.Tensor:
        """The starting states ``x_T`` (float32), drawn from the sampler's prior with ``generator``."""

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        denoiser: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(guided, conditional)`` model outputs in float32 (a noise, velocity or sample prediction, as the
        family's scheduler expects); without ``negative_prompt_embeds``, guided is the conditional output.
        ``denoiser`` is the module to call (for example the accelerate-prepared one; default :attr:`denoiser`)."""

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings],
        guidance_scale: float,
        unet: Optional[torch.nn.Module] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict` under its first name (``unet`` is its ``denoiser``)."""
        return self.predict(latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, denoiser=unet)

    @abstractmethod
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
        """One stochastic step ``x_t -> x_s`` with ``log P_F`` and ``log P_B`` (see [`ddim_step_with_logprob`]);
        with ``prev_sample`` it scores that state instead of sampling one."""

    @abstractmethod
    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """The one-step prediction ``x0_hat`` of ``latents`` at ``timesteps`` from a model output."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode clean latents to float32 images in [0, 1]."""

    @abstractmethod
    def prepare_for_training(self, device: torch.device, weight_dtype: torch.dtype, gradient_checkpointing: bool):
        """Move the frozen modules to ``device`` in ``weight_dtype`` and the trainable parameters in float32."""

    @abstractmethod
    def get_trainable_layers(self) -> list[torch.nn.Parameter]: ...

    @abstractmethod
    def save_pretrained(self, output_dir: Union[str, os.PathLike], unet: Optional[torch.nn.Module] = None) -> None:
        """Save the trained weights of ``unet`` (default: this pipeline's): the LoRA in the family's diffusers
        format, or the whole network. The trainer passes the network it trains, which may be a wrapped copy."""

    @abstractmethod
    def load_trained_weights(self, unet: torch.nn.Module, input_dir: str) -> None:
        """Load what :meth:`save_pretrained` wrote in ``input_dir`` into ``unet``."""

    # ------------------------------------------------------------------ defaults

    @property
    def autocast(self) -> Optional[Callable[[], contextlib.AbstractContextManager]]:
        """A context-manager factory for the model forward, or ``None`` to use the accelerator's."""
        return None

    def adapter_disabled(self) -> contextlib.AbstractContextManager:
        """A context in which the denoiser is the pretrained model (its trained adapter switched off), for
        objectives whose target involves the prior. Families that train a LoRA implement it."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot switch its adapter off, which objectives that use the pretrained prior "
            "need (train it with use_lora=True, on a family that implements adapter_disabled)."
        )

    def save_checkpoint(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate ``save_state`` pre-hook: save the denoiser found in ``models`` with :meth:`save_pretrained`
        and drop its entry from ``weights`` so that accelerate does not also pickle it; ``models`` is unchanged."""
        index = next(i for i, model in enumerate(models) if model is self.denoiser)
        self.save_pretrained(output_dir, unet=models[index])
        weights.pop(index)

    def load_checkpoint(self, models: list, input_dir: str) -> None:
        """accelerate ``load_state`` pre-hook: load what :meth:`save_checkpoint` wrote into the denoiser found in
        ``models`` and remove it from ``models``."""
        denoiser = models.pop(next(i for i, model in enumerate(models) if model is self.denoiser))
        self.load_trained_weights(denoiser, input_dir)

    # ------------------------------------------------------------------ the sampling loop

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_prompt_embeds: Optional[PromptEmbeddings] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        log_prob_reduction: str = "mean",
        show_progress: bool = False,
        record_prior_log_probs: bool = False,
        lora_min_timestep: int = 0,
        record_prior_means: bool = False,
    ) -> GFlowNetPipelineOutput:
        """Sample trajectories from prompt embeddings and record what training needs.

        With ``record_prior_log_probs``, each sampled transition is also scored under the pretrained model (see
        :meth:`adapter_disabled`): one more model call per step; with ``record_prior_means`` too, the pretrained
        model's step means and the closed-form per-step KLs are kept. Steps from timesteps below ``lora_min_timestep``
        are the pretrained model's (the adapter switched off; their prior log-probability is their own).

        Guidance is applied when ``negative_prompt_embeds`` is given and ``guidance_scale != 1``. Latents and
        log-probabilities are float32 and refer to the same tensor values, so recomputing a log-probability on the
        stored latents with unchanged weights gives the stored one.
        """
        device = prompt_embeds.device
        if guidance_scale == 1.0:
            negative_prompt_embeds = None
        timesteps = self.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = self.initial_latents(len(prompt_embeds), generator, device, height, width)
        latents = latents.float()

        all_latents, all_log_probs, all_backward, all_noise_preds, all_conditional = [latents], [], [], [], []
        all_prior_log_probs, all_prior_means, all_prior_kls = [], [], []
        if show_progress:
            from tqdm.auto import tqdm

            timesteps_iterator = tqdm(timesteps, desc="sampling")
        else:
            timesteps_iterator = timesteps
        for timestep in timesteps_iterator:
            frozen = int(timestep) < lora_min_timestep
            with self.adapter_disabled() if frozen else contextlib.nullcontext():
                guided, conditional = self.predict(
                    latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale
                )
            step = self.scheduler_step(
                guided, timestep, latents, eta=eta, generator=generator, log_prob_reduction=log_prob_reduction
            )
            if record_prior_log_probs:
                prior_step = step  # a frozen step is the pretrained model's own
                if not frozen:
                    with self.adapter_disabled():
                        prior_guided, _ = self.predict(
                            latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale
                        )
                    prior_step = self.scheduler_step(
                        prior_guided, timestep, latents, eta=eta, prev_sample=step.latents,
                        log_prob_reduction=log_prob_reduction,
                    )  # fmt: skip
                all_prior_log_probs.append(prior_step.log_probs)
                if record_prior_means and getattr(step, "mean", None) is not None:
                    all_prior_means.append(prior_step.mean)
                    all_prior_kls.append(gaussian_step_kl(step.mean, prior_step.mean, step.std))
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
            prior_log_probs=torch.stack(all_prior_log_probs, dim=1) if record_prior_log_probs else None,
            prior_means=torch.stack(all_prior_means, dim=1) if all_prior_means else None,
            prior_kls=torch.stack(all_prior_kls, dim=1) if all_prior_kls else None,
        )
