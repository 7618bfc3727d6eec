r"""Rectified-flow families (SD3 / SD3.5, FLUX) as stochastic policies with exact log-probabilities.

The denoiser predicts a velocity :math:`v = \epsilon - x_0` for :math:`x_t = (1 - t) x_0 + t\epsilon`; diffusers
samples it with the deterministic Euler ODE step, which has no log-probability. Here the same schedule (the
scheduler's shifted sigmas) is sampled by a Gaussian policy from :mod:`dag_trl.samplers.gaussian`:

- ``sampler="ddim"`` (default): DDIM with ``eta`` for the schedule :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`;
  at ``eta = 1`` it is the Gaussian posterior :math:`q(x_s \mid x_t, \hat x_0)`, the only sampler against whose
  backward kernel (the exact noising kernel) detailed balance, hence DAG, has a solution.
- ``sampler="flow_grpo"``: Flow-GRPO's SDE step (Liu et al. 2025, arXiv 2505.05470) with noise level ``noise_level``
  (0.7 by default), for comparisons with Flow-GRPO; ``sample_eta`` must stay 1 (the noise level is the knob).

The last step ends at :data:`~dag_trl.samplers.gaussian.FLOW_SIGMA_MIN` instead of ``t = 0`` (whose step has no
variance), so the final latent carries noise of that level. Latents are kept unpacked, ``(B, C, h, w)``, in every
family (FLUX packs them only for its transformer), so that the flow network sees the same layout everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Optional, Union

import torch

from ..samplers.gaussian import (
    MIN_STEP_STD,
    GaussianStepCoefficients,
    StepOutput,
    _check_eta,
    ddim_coefficients,
    flow_grpo_coefficients,
    flow_matching_alpha_sigma,
    gaussian_step_with_logprob,
    x0_and_eps_from_prediction,
)
from .diffusers_family import DiffusersGFlowNetPipeline

FLOW_SAMPLERS = ("ddim", "flow_grpo")


class FlowMatchingGFlowNetPipeline(DiffusersGFlowNetPipeline):
    """The sampling side shared by rectified-flow families: the shifted schedule of the model's
    ``FlowMatchEulerDiscreteScheduler``, the Gaussian step with its log-probabilities, ``x0_hat`` from the velocity,
    and unpacked latents.

    Args (besides those of [`DiffusersGFlowNetPipeline`]):
        sampler: ``"ddim"`` (DDIM with ``eta``; detailed balance at ``eta = 1``) or ``"flow_grpo"``.
        noise_level: Flow-GRPO's :math:`a` (``sampler="flow_grpo"`` only).
        resolution: the image side in pixels that training samples (``None``: the family's default).
        max_sequence_length: T5 tokens read from each prompt.
    """

    # The pixel side of the family's default sample when its config does not say (FLUX's transformer config has no
    # sample size; FluxPipeline's default_sample_size of 128 latents times the VAE's factor 8).
    default_resolution: ClassVar[int] = 1024

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
        max_sequence_length: int = 256,
    ):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is invalid: expected one of {FLOW_SAMPLERS}.")
        if not (isinstance(noise_level, (int, float)) and 0 < noise_level < float("inf")):
            raise ValueError(f"noise_level={noise_level!r} is invalid: expected a positive finite number.")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} is invalid: expected an integer >= 1.")
        super().__init__(
            pretrained_model_name,
            pretrained_model_revision=pretrained_model_revision,
            use_lora=use_lora,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_init_seed=lora_init_seed,
            torch_dtype=torch_dtype,
            lora_target_modules=lora_target_modules,
        )
        self.sampler = sampler
        self.noise_level = float(noise_level)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * 2  # whole 2x2 latent patches
        self.resolution = resolution or self.family_default_resolution()
        if not isinstance(self.resolution, int) or self.resolution < multiple or self.resolution % multiple:
            raise ValueError(
                f"resolution={self.resolution!r} is invalid: expected a positive multiple of {multiple} (the VAE's "
                "downscale factor times the transformer's 2x2 patches)."
            )
        self._timesteps: Optional[torch.Tensor] = None
        self._sigmas: Optional[torch.Tensor] = None

    def family_default_resolution(self) -> int:
        """The transformer config's ``sample_size`` in pixels, else :attr:`default_resolution`."""
        sample_size = getattr(self.denoiser.config, "sample_size", None)
        return sample_size * self.vae_scale_factor if sample_size else self.default_resolution

    # ------------------------------------------------------------------ the schedule

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def pooled_embedding_dim(self) -> int:
        return self.denoiser.config.pooled_projection_dim

    @property
    def prompt_embedding_dim(self) -> int:
        """The MMDiT's text-stream input width (T5's, 4096 for SD3 and FLUX)."""
        return self.denoiser.config.joint_attention_dim

    def check_sampler(self, num_steps: int, eta: float) -> None:
        """Refuse an ``eta`` other than 1 with ``flow_grpo``, and any step whose standard deviation is below the
        float32 floor :data:`~dag_trl.samplers.gaussian.MIN_STEP_STD`."""
        if self.sampler == "flow_grpo" and eta != 1:
            raise ValueError(
                f"GFlowNetConfig.sample_eta={eta!r} is invalid with sampler='flow_grpo': its noise is set by "
                f"noise_level={self.noise_level} (DDIM's eta does not apply); expected sample_eta=1."
            )
        _check_eta(eta)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"GFlowNetConfig.sample_num_steps={num_steps!r} is invalid: expected an integer >= 1.")
        timesteps = self.set_timesteps(num_steps)
        std = self._coefficients(torch.arange(num_steps), eta).std
        smallest = int(std.argmin())
        if not std[smallest] >= MIN_STEP_STD:
            raise ValueError(
                f"GFlowNetConfig.sample_eta={eta!r} gives the step from t={timesteps[smallest].item():g} the standard "
                f"deviation {std[smallest].item():.3g}, below the float32 floor {MIN_STEP_STD:.2g}; expected a larger "
                "eta or fewer steps."
            )

    def scheduler_timesteps(self, num_inference_steps: int, device: Optional[torch.device]) -> None:
        """Set the scheduler's timesteps exactly as the family's diffusers pipeline does (see the subclasses)."""
        raise NotImplementedError

    def dynamic_shift(self, default_max_shift: float) -> float:
        """The resolution-dependent shift ``mu`` of schedulers with ``use_dynamic_shifting`` (diffusers'
        ``calculate_shift`` on the number of 2x2 latent patches and the scheduler's settings)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        return calculate_shift(
            (self.latent_side // 2) ** 2,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", default_max_shift),
        )

    def set_timesteps(self, num_inference_steps: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """The scheduler's timesteps (``1000 * t``, float32) and, kept here in float64, its times
        ``t_0 = 1 > ... > t_{N-1}`` followed by 0."""
        self.scheduler_timesteps(num_inference_steps, device)
        self._timesteps = self.scheduler.timesteps.float()
        self._sigmas = self.scheduler.sigmas.detach().double().cpu()
        return self.scheduler.timesteps

    def _step_indices(self, timesteps: Union[int, float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The index in the schedule of each sample's timestep (a scalar or ``(B,)`` for the batch ``like``), on the
        CPU."""
        timesteps = torch.as_tensor(timesteps, device=like.device).reshape(-1).expand(like.shape[0])
        if self._timesteps is None:
            raise RuntimeError("set_timesteps must be called before a step.")
        table = self._timesteps.to(timesteps.device)
        distance = (timesteps.float()[:, None] - table[None, :]).abs()
        nearest, index = distance.min(dim=1)
        if not (nearest <= 1e-3 * table.abs().max()).all():
            raise ValueError(
                f"timesteps {timesteps.tolist()} are not those of the schedule set by set_timesteps "
                f"({table.tolist()})."
            )
        return index.cpu()

    def _coefficients(self, indices: torch.Tensor, eta: float) -> GaussianStepCoefficients:
        """The step coefficients from the schedule's times ``t = sigmas[i]`` to ``s = sigmas[i + 1]`` (float64
        arithmetic)."""
        t, s = self._sigmas[indices], self._sigmas[indices + 1]
        if self.sampler == "flow_grpo":
            return flow_grpo_coefficients(t, s, t_max=self._sigmas[1], noise_level=self.noise_level)
        return ddim_coefficients(*flow_matching_alpha_sigma(t), *flow_matching_alpha_sigma(s), eta=eta)

    def detailed_balance_holds(self, eta: float) -> bool:
        return self.sampler == "ddim" and eta == 1

    def scheduler_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, float, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 1.0,
        prev_sample: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        log_prob_reduction: str = "mean",
    ) -> StepOutput:
        """One Gaussian step from ``x_t`` (see the module docstring); ``model_output`` is the (guided) velocity."""
        _check_eta(eta)
        indices = self._step_indices(timestep, sample)
        coefficients = GaussianStepCoefficients(
            *(value.to(sample.device) for value in self._coefficients(indices, eta))
        )
        original, noise = self._x0_and_eps(model_output, sample, indices)
        return gaussian_step_with_logprob(
            sample, original, noise, coefficients, prev_sample, generator, log_prob_reduction
        )

    def predict_original_sample(
        self, model_output: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """``x0_hat = x_t - t v``."""
        return self._x0_and_eps(model_output, latents, self._step_indices(timesteps, latents))[0]

    def _x0_and_eps(
        self, velocity: torch.Tensor, sample: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` of ``sample`` at the schedule's times ``t = sigmas[indices]`` (unclamped)."""
        t = self._sigmas[indices].float().to(sample.device)
        return x0_and_eps_from_prediction(velocity, sample, 1 - t, t, "flow_prediction")

    def initial_latents(
        self,
        batch_size: int,
        generator: Optional[torch.Generator],
        device: torch.device,
        height: Optional[int] = None,
        width: Optional[int] = None,
    ) -> torch.Tensor:
        """Standard normal ``x_1`` of shape ``(B, C, height / f, width / f)``, unpacked (``f``: the VAE's factor);
        the same draw as the family's diffusers pipeline makes before packing."""
        from diffusers.utils.torch_utils import randn_tensor

        height = (height or self.resolution) // self.vae_scale_factor
        width = (width or self.resolution) // self.vae_scale_factor
        shape = (batch_size, self.latent_channels, height, width)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
