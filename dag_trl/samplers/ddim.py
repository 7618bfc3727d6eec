r"""The DDIM sampler as a stochastic policy: one step with its forward and backward log-probabilities, as small
pure functions in the style of diffusers' schedulers.

Notation: a DDIM transition goes from the noisier state ``x_t`` to ``x_s`` (``s`` the next, smaller timestep); ``abar`` is the
scheduler's ``alphas_cumprod``. Log-densities are Gaussian, computed per latent element in float32 and reduced over
all non-batch dimensions by ``"mean"`` (the paper's choice) or ``"sum"`` (the true log-density).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMStepOutput:
    """Result of one DDIM step with log-probabilities.

    Attributes:
        latents: ``x_s``, the next (less noisy) state, float32, shape ``(B, C, H, W)``.
        log_probs: ``log P_F(x_s | x_t)`` of the policy, float32, shape ``(B,)``; differentiable through the model
            output, never through ``x_s``.
        backward_log_probs: ``log P_B(x_t | x_s)`` of the fixed noising kernel, float32, shape ``(B,)``.
        pred_original_sample: ``x0_hat``, the model's estimate of the clean latent, float32.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    backward_log_probs: torch.Tensor
    pred_original_sample: torch.Tensor


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` tensor to ``(B, 1, 1, ...)`` so that it broadcasts against ``like``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def reduce_over_sample(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce every dimension but the first (the batch) by ``"mean"`` or ``"sum"``."""
    dims = tuple(range(1, values.ndim))
    if reduction == "mean":
        return values.mean(dim=dims)
    if reduction == "sum":
        return values.sum(dim=dims)
    raise ValueError(f"log_prob_reduction={reduction!r} is invalid: expected 'mean' or 'sum'.")


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    r"""Diagonal Gaussian log-density, reduced per sample.

    Per element: :math:`-\frac{(v - \mu)^2}{2\sigma^2} - \log\sigma - \log\sqrt{2\pi}`, then ``reduction`` over all
    non-batch dimensions. ``std`` broadcasts against ``value`` (a per-sample ``(B, 1, 1, 1)`` tensor is typical).
    """
    std = std.to(torch.float32)
    elementwise = -((value.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return reduce_over_sample(elementwise, reduction)


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
    r"""Convert a model output into ``(x0_hat, eps)`` for the three prediction types of diffusers.

    - ``epsilon``: :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`.
    - ``v_prediction``: :math:`\hat x_0 = \sqrt{\bar\alpha_t} x_t - \sqrt{1-\bar\alpha_t} v`,
      :math:`\epsilon = \sqrt{\bar\alpha_t} v + \sqrt{1-\bar\alpha_t} x_t` (Salimans & Ho, 2022).
    - ``sample``: :math:`\hat x_0` is the output, :math:`\epsilon = (x_t - \sqrt{\bar\alpha_t}\hat x_0)/\sqrt{1-\bar\alpha_t}`.

    ``alpha_prod_t`` is per sample, shape ``(B,)``. All arithmetic is float32.
    """
    model_output = model_output.float()
    sample = sample.float()
    alpha_prod_t = _per_sample(alpha_prod_t.float(), sample)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        noise = model_output
        original = (sample - beta_prod_t.sqrt() * noise) / alpha_prod_t.sqrt()
    elif prediction_type == "v_prediction":
        original = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        noise = alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    elif prediction_type == "sample":
        original = model_output
        noise = (sample - alpha_prod_t.sqrt() * original) / beta_prod_t.sqrt()
    else:
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r} is not supported: expected 'epsilon', 'v_prediction' or "
            "'sample'."
        )
    return original, noise


def ddim_variance(alpha_prod_t: torch.Tensor, alpha_prod_prev: torch.Tensor) -> torch.Tensor:
    r"""DDIM posterior variance (Song et al., 2021, eq. 16 with eta = 1):
    :math:`\sigma^2 = \frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}\left(1 - \frac{\bar\alpha_t}{\bar\alpha_s}\right)`."""
    return (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)


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
    ratio = _per_sample((alpha_prod_t / alpha_prod_prev).float(), sample)
    mean = ratio.sqrt() * prev_sample.float()
    return gaussian_log_prob(sample.detach(), mean.detach(), (1 - ratio).sqrt(), log_prob_reduction)


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
) -> DDIMStepOutput:
    r"""One DDIM step (Song et al., 2021) that also returns the policy's and the backward kernel's log-probabilities.

    With :math:`\hat x_0` and :math:`\epsilon` from :func:`original_sample_and_noise`,
    :math:`\sigma = \eta\,\sqrt{\mathrm{var}}` (:func:`ddim_variance`) and
    :math:`\mu = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\epsilon`, the step samples
    :math:`x_s = \mu + \sigma z` (or takes the given ``prev_sample``) and scores it under
    :math:`P_F = \mathcal N(\mu, \sigma^2 I)` with ``x_s`` detached, so gradients reach the model only through
    :math:`\mu`. No clipping of :math:`\hat x_0` (Stable Diffusion does not clip).

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
        A [`DDIMStepOutput`] whose tensors are float32.
    """
    if not 0 < eta <= 1:
        raise ValueError(
            f"eta={eta!r} is invalid: expected a number in (0, 1] (with eta = 0 DDIM has no log-probability; above 1 "
            "the mean's sqrt(1 - abar_s - sigma^2) can be the root of a negative number)."
        )
    batch_size = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch_size)
    if prev_timestep is None:
        prev_timestep = previous_timestep(scheduler, timestep)
    prev_timestep = torch.as_tensor(prev_timestep, device=sample.device).reshape(-1).expand(batch_size)

    alpha_prod_t = alphas_cumprod_at(scheduler, timestep)
    alpha_prod_prev = alphas_cumprod_at(scheduler, prev_timestep)
    original, noise = original_sample_and_noise(model_output, sample, alpha_prod_t, scheduler.config.prediction_type)
    std = eta * ddim_variance(alpha_prod_t, alpha_prod_prev).sqrt()
    std = _per_sample(std, original)
    alpha_prev = _per_sample(alpha_prod_prev, original)
    mean = alpha_prev.sqrt() * original + (1 - alpha_prev - std**2).sqrt() * noise

    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise_z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean.detach() + std * noise_z
    prev_sample = prev_sample.detach().float()

    log_probs = gaussian_log_prob(prev_sample, mean, std, log_prob_reduction)
    backward = backward_log_prob(sample, prev_sample, alpha_prod_t, alpha_prod_prev, log_prob_reduction)
    return DDIMStepOutput(
        latents=prev_sample, log_probs=log_probs, backward_log_probs=backward, pred_original_sample=original
    )
