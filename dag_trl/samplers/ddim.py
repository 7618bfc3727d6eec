r"""The DDIM sampler of diffusers' ``DDIMScheduler`` as a stochastic policy: one step with its forward and backward
log-probabilities, and the check that a scheduler is one the step reproduces.

The step is the general Gaussian step (:func:`dag_trl.samplers.gaussian.gaussian_step_with_logprob`) with the VP
schedule's coefficients in their ``abar`` form (:func:`dag_trl.samplers.gaussian.vp_ddim_coefficients`); this
module adds what the scheduler knows: its timesteps, its ``alphas_cumprod`` and its prediction type.

Notation: a DDIM transition goes from the noisier state ``x_t`` to ``x_s`` (``s`` the next, smaller timestep); ``abar`` is the
scheduler's ``alphas_cumprod``. Log-densities are Gaussian, computed per latent element in float32 and reduced over
all non-batch dimensions by ``"mean"`` (the paper's choice) or ``"sum"`` (the true log-density).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from .gaussian import (
    LOG_SQRT_2PI,
    MIN_STEP_STD,
    StepOutput,
    _check_eta,
    ddim_variance,
    gaussian_log_prob,
    gaussian_step_kl,
    gaussian_step_with_logprob,
    noising_log_prob,
    reduce_over_sample,
    vp_alpha_sigma,
    vp_ddim_coefficients,
    vp_noising_kernel,
    x0_and_eps_from_prediction,
)

__all__ = [
    "DDIMStepOutput",
    "LOG_SQRT_2PI",
    "MIN_STEP_STD",
    "UNSUPPORTED_SCHEDULER_OPTIONS",
    "alphas_cumprod_at",
    "backward_log_prob",
    "check_scheduler",
    "ddim_step_with_logprob",
    "ddim_variance",
    "gaussian_log_prob",
    "gaussian_step_kl",
    "original_sample_and_noise",
    "previous_timestep",
    "reduce_over_sample",
]

# The one step output type, under the name this module has always returned.
DDIMStepOutput = StepOutput
# The prediction types of diffusers' DDIMScheduler.
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Scheduler options that change what diffusers' DDIM step does to x0_hat, which ddim_step_with_logprob does not do.
UNSUPPORTED_SCHEDULER_OPTIONS = {
    "clip_sample": "clips x0_hat to clip_sample_range",
    "thresholding": "applies dynamic thresholding to x0_hat",
}


def previous_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The DDIM timestep ``s`` that follows ``t``: ``t - num_train_timesteps // num_inference_steps``.

    At the last step this is negative; :func:`alphas_cumprod_at` maps it to ``abar[0]``.
    """
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alphas_cumprod_at(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """``abar[t]`` in float32 for each entry of ``timestep``; negative timesteps (after the last step) give
    ``abar[0]``.

    That is diffusers' ``set_alpha_to_one=False`` (Stable Diffusion's setting, and the reference's), whatever the
    scheduler says: with ``abar = 1`` after the last step, that step would be deterministic (variance 0) and its
    log-probability undefined.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timestep.device, dtype=torch.float32)
    return alphas_cumprod[timestep.clamp(min=0).long()]


def original_sample_and_noise(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Convert a model output into ``(x0_hat, eps)`` for the three prediction types of diffusers' DDIM scheduler:
    :func:`~dag_trl.samplers.gaussian.x0_and_eps_from_prediction` on the VP schedule
    :math:`\alpha_t = \sqrt{\bar\alpha_t}`, :math:`\sigma_t = \sqrt{1 - \bar\alpha_t}`.

    - ``epsilon``: :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`.
    - ``v_prediction``: :math:`\hat x_0 = \sqrt{\bar\alpha_t} x_t - \sqrt{1-\bar\alpha_t} v`,
      :math:`\epsilon = \sqrt{\bar\alpha_t} v + \sqrt{1-\bar\alpha_t} x_t` (Salimans & Ho, 2022).
    - ``sample``: :math:`\hat x_0` is the output, :math:`\epsilon = (x_t - \sqrt{\bar\alpha_t}\hat x_0)/\sqrt{1-\bar\alpha_t}`.

    ``alpha_prod_t`` is per sample, shape ``(B,)``. All arithmetic is float32.
    """
    if prediction_type not in VP_PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r} is not supported: expected 'epsilon', 'v_prediction' or "
            "'sample'."
        )
    alpha_t, sigma_t = vp_alpha_sigma(alpha_prod_t.float())
    return x0_and_eps_from_prediction(
        model_output, sample, alpha_t, sigma_t, prediction_type, variance_preserving=True
    )


def backward_log_prob(
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    log_prob_reduction: str = "mean",
) -> torch.Tensor:
    r"""Log-density of the fixed backward kernel, the noising step from ``x_s`` back to ``x_t``:
    :math:`P_B(x_t \mid x_s) = \mathcal N(\sqrt{a}\,x_s, (1 - a) I)` with :math:`a = \bar\alpha_t / \bar\alpha_s`.

    It depends on no parameter. ``alpha_prod_*`` are per sample, shape ``(B,)``.
    """
    scale, variance = vp_noising_kernel(alpha_prod_t, alpha_prod_prev)
    return noising_log_prob(sample, prev_sample, scale, variance.sqrt(), log_prob_reduction)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[int, torch.Tensor],
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
    prev_timestep: Optional[Union[int, torch.Tensor]] = None,
    log_prob_reduction: str = "mean",
) -> StepOutput:
    r"""One DDIM step (Song et al., 2021) that also returns the policy's and the backward kernel's log-probabilities.

    With :math:`\hat x_0` and :math:`\epsilon` from :func:`original_sample_and_noise`,
    :math:`\sigma = \eta\,\sqrt{\mathrm{var}}` (:func:`ddim_variance`) and
    :math:`\mu = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\epsilon`, the step samples
    :math:`x_s = \mu + \sigma z` (or takes the given ``prev_sample``) and scores it under
    :math:`P_F = \mathcal N(\mu, \sigma^2 I)` with ``x_s`` detached, so gradients reach the model only through
    :math:`\mu`. That is :func:`~dag_trl.samplers.gaussian.gaussian_step_with_logprob` with
    :func:`~dag_trl.samplers.gaussian.vp_ddim_coefficients`. No clipping of :math:`\hat x_0` (Stable Diffusion does
    not clip; :func:`check_scheduler` refuses schedulers that do).

    Args:
        scheduler: a diffusers ``DDIMScheduler`` on which ``set_timesteps`` was called.
        model_output: the (guided) UNet output at ``(sample, timestep)``, any float dtype.
        timestep: ``t``, an int or a ``(B,)`` tensor (timesteps may differ per sample).
        sample: ``x_t``.
        eta: DDIM eta, in (0, 1].
        prev_sample: a given ``x_s`` to score instead of sampling one.
        generator: generator(s) for the noise ``z``.
        prev_timestep: ``s``; defaults to ``t - num_train_timesteps // num_inference_steps``.
        log_prob_reduction: ``"mean"`` or ``"sum"`` over the latent's elements.

    Returns:
        A [`StepOutput`] (also named ``DDIMStepOutput``) whose tensors are float32.
    """
    batch_size = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch_size)
    if prev_timestep is None:
        prev_timestep = previous_timestep(scheduler, timestep)
    prev_timestep = torch.as_tensor(prev_timestep, device=sample.device).reshape(-1).expand(batch_size)

    alpha_prod_t = alphas_cumprod_at(scheduler, timestep)
    # vp_ddim_coefficients checks eta before any arithmetic.
    coefficients = vp_ddim_coefficients(alpha_prod_t, alphas_cumprod_at(scheduler, prev_timestep), eta)
    original, noise = original_sample_and_noise(model_output, sample, alpha_prod_t, scheduler.config.prediction_type)
    return gaussian_step_with_logprob(
        sample, original, noise, coefficients, prev_sample, generator, log_prob_reduction
    )


def check_scheduler(scheduler: Any, num_steps: int, eta: float) -> None:
    r"""Raise ``ValueError`` for a scheduler, step count or eta with which :func:`ddim_step_with_logprob` would
    sample other than the scheduler describes, or give NaN log-probabilities; call it before training.

    ``scheduler`` is a diffusers scheduler or its config: like the Stable Diffusion pipeline, the check builds a
    ``DDIMScheduler`` from the config (the given scheduler's timesteps are left alone) and runs ``set_timesteps``
    and the step's own timestep and ``alphas_cumprod`` logic. Refused:

    - ``clip_sample=True`` or ``thresholding=True``: the policy's step never clips or thresholds ``x0_hat``, so
      sampling would silently differ from the scheduler (Stable Diffusion's configs set neither).
    - ``num_steps`` above the scheduler's ``num_train_timesteps``, or so many that the first timestep is past the
      last trained one (``num_train_timesteps`` steps with ``steps_offset=1``).
    - timesteps that end at ``t = 0`` (``steps_offset=0`` with ``"leading"`` spacing, ``"linspace"`` spacing, or
      ``"trailing"`` spacing with more than two thirds of ``num_train_timesteps`` steps):
      the step from ``t = 0`` has :math:`\bar\alpha_t = \bar\alpha_s = \bar\alpha_0` (no less noisy level
      exists), zero variance, and a NaN ``log P_F`` and ``log P_B``. Only the timesteps can avoid it, and they come
      from the scheduler's settings.
    - ``prediction_type="epsilon"`` with :math:`\bar\alpha_t = 0` at a sampled timestep (zero terminal SNR):
      :math:`\hat x_0` divides by :math:`\sqrt{\bar\alpha_t}`.
    - an ``eta`` for which the smallest step standard deviation :math:`\eta \sqrt{\mathrm{var}}` is below
      :data:`MIN_STEP_STD`; the message gives the smallest ``eta`` that works for this scheduler and step count.
    """
    from diffusers import DDIMScheduler

    _check_eta(eta)
    ddim = DDIMScheduler.from_config(getattr(scheduler, "config", scheduler))
    config = ddim.config
    for name, what in UNSUPPORTED_SCHEDULER_OPTIONS.items():
        if config[name]:
            raise ValueError(
                f"scheduler {name}={config[name]!r} is not supported: diffusers' DDIM step then {what}, which the "
                f"policy's step (ddim_step_with_logprob) does not do, so sampling would differ from the scheduler. "
                f"Set {name}=False (Stable Diffusion's configs do), e.g. DDIMScheduler.from_config(config, "
                f"{name}=False)."
            )
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(
            f"GFlowNetConfig.sample_num_steps={num_steps!r} is invalid for this scheduler: expected an integer in "
            f"[1, {config.num_train_timesteps}] (its num_train_timesteps)."
        )
    ddim.set_timesteps(num_steps)
    timesteps = ddim.timesteps
    if timesteps[0].item() >= config.num_train_timesteps:
        raise ValueError(
            f"GFlowNetConfig.sample_num_steps={num_steps!r} is invalid for this scheduler: with "
            f"timestep_spacing={config.timestep_spacing!r} and steps_offset={config.steps_offset} its first timestep "
            f"is t={timesteps[0].item()}, past the last trained one ({config.num_train_timesteps - 1}); expected "
            "fewer steps."
        )
    alpha_prod_t = alphas_cumprod_at(ddim, timesteps)
    if config.prediction_type == "epsilon" and not (alpha_prod_t > 0).all():
        raise ValueError(
            f"scheduler prediction_type='epsilon' is not supported with alphas_cumprod[t]=0 at "
            f"t={timesteps[~(alpha_prod_t > 0)][0].item()} (rescale_betas_zero_snr={config.rescale_betas_zero_snr}): "
            "x0_hat divides by sqrt(alphas_cumprod[t]). Use prediction_type='v_prediction', as zero-terminal-SNR "
            "models do."
        )
    step_std = ddim_variance(alpha_prod_t, alphas_cumprod_at(ddim, previous_timestep(ddim, timesteps))).sqrt()
    degenerate = ~(step_std > 0)
    if degenerate.any():
        t = timesteps[degenerate][0].item()
        if t == 0:
            raise ValueError(
                f"scheduler timestep_spacing={config.timestep_spacing!r} with steps_offset={config.steps_offset} is "
                f"not supported: its {num_steps} timesteps end at t=0, where no less noisy level than "
                "alphas_cumprod[0] is left, so the last step has zero variance and NaN log-probabilities. Use "
                "timestep_spacing='leading' with steps_offset=1 (Stable Diffusion's config), whose last timestep is 1."
            )
        raise ValueError(
            f"scheduler betas give the DDIM step from t={t} the standard deviation "
            f"{step_std[degenerate][0].item():g}: its log-probability needs a positive one (alphas_cumprod must "
            "decrease strictly between the sampled timesteps and stay below 1)."
        )
    smallest = int(step_std.argmin())
    if not eta * step_std[smallest].item() >= MIN_STEP_STD:
        smallest_eta = _round_up(MIN_STEP_STD / step_std[smallest].item())
        raise ValueError(
            f"GFlowNetConfig.sample_eta={eta!r} is invalid for this scheduler and sample_num_steps={num_steps}: the "
            f"step from t={timesteps[smallest].item()} would have standard deviation eta * "
            f"{step_std[smallest].item():.3g} = {eta * step_std[smallest].item():.3g}, below the float32 floor "
            f"{MIN_STEP_STD:.2g} under which the sampled noise is lost in rounding and log P_F becomes inf or NaN; "
            f"expected a number in [{smallest_eta:g}, 1]."
        )


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits, so that the eta a message suggests passes the check."""
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale) * scale
