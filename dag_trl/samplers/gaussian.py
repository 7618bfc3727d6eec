r"""Gaussian samplers for any noise schedule :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`, as stochastic policies
with exact forward and backward log-probabilities: small pure functions in the style of diffusers' schedulers.

Notation: a step goes from the noisier state ``x_t`` to ``x_s`` (``s < t``). The schedule is given by its
coefficients: Stable Diffusion 1.x/2.x's variance-preserving (VP) one has :math:`\alpha_t = \sqrt{\bar\alpha_t}`,
:math:`\sigma_t = \sqrt{1 - \bar\alpha_t}` (``abar`` = the scheduler's ``alphas_cumprod``); rectified flow / flow
matching (SD3, FLUX; Liu et al. 2022, arXiv 2209.03003; Lipman et al. 2022, arXiv 2210.02747) has
:math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`, which is not variance preserving.

**Backward kernel.** The forward (noising) process has the Gaussian transition
:math:`q(x_t \mid x_s) = \mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)` with :math:`\alpha_{t|s} = \alpha_t/\alpha_s`
and :math:`\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2 \sigma_s^2`; it is the GFlowNet's fixed backward policy
:math:`P_B(x_t \mid x_s)`, whatever the sampler.

**DDIM with eta** (Song et al. 2021, arXiv 2010.02502, eq. 12 and 16, written for any schedule). Bayes' rule on the
two Gaussians :math:`q(x_s \mid x_0)` and :math:`q(x_t \mid x_s)` gives the posterior
:math:`q(x_s \mid x_t, x_0) = \mathcal N(\mu, v I)` with

.. math::
    \mu = \frac{\alpha_s \sigma_{t|s}^2}{\sigma_t^2} x_0 + \frac{\alpha_{t|s} \sigma_s^2}{\sigma_t^2} x_t, \qquad
    v = \frac{\sigma_{t|s}^2 \sigma_s^2}{\sigma_t^2}.

DDIM's step with :math:`\sigma_\eta = \eta \sqrt v`, :math:`\eta \in (0, 1]`, is
:math:`P_F(x_s \mid x_t) = \mathcal N(\alpha_s \hat x_0 + \sqrt{\sigma_s^2 - \sigma_\eta^2}\,\hat\epsilon,
\sigma_\eta^2 I)`: whatever :math:`\eta`, if :math:`x_t \sim q(x_t \mid x_0)` and the model is exact then
:math:`x_s \sim q(x_s \mid x_0)` (mean :math:`\alpha_s x_0`; the noise coefficient :math:`c_\epsilon` gives
variance :math:`c_\epsilon^2 + \sigma_\eta^2 = \sigma_s^2`).
At :math:`\eta = 1`, substituting :math:`\hat\epsilon = (x_t - \alpha_t \hat x_0)/\sigma_t` gives exactly the
posterior above with :math:`x_0 = \hat x_0`.

**Detailed balance.** For a point-mass data distribution and an exact model, the :math:`\eta = 1` step satisfies
:math:`q(x_s \mid x_t, x_0)\, q(x_t \mid x_0) = q(x_t \mid x_s)\, q(x_s \mid x_0)` exactly (Bayes' rule), i.e.
:math:`\log P_F + \log q(x_t \mid x_0) = \log P_B + \log q(x_s \mid x_0)`. For a general data distribution the true
reverse kernel of a finite step is not Gaussian, so detailed balance against this :math:`P_B` holds for a Gaussian
:math:`P_F` only at :math:`\eta = 1` and only in the small-step limit; with :math:`\eta < 1`, or with the Flow-GRPO
step, it has no solution (DAG objectives should refuse or warn; RTB and DDPO, which need no :math:`P_B`, take any).

**Exact VP path.** :func:`vp_ddim_coefficients` computes the VP case in its ``abar`` form; it is the schedule of
:func:`dag_trl.samplers.ddim.ddim_step_with_logprob`, which is :func:`gaussian_step_with_logprob` with these
coefficients. :func:`ddim_coefficients` with :math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1 - \bar\alpha}`
agrees within float32 round-off (its :math:`\sigma_t^2 - \alpha_{t|s}^2\sigma_s^2` rounds differently from
``1 - abar_t / abar_s``).

**Endpoints.** The step to the clean sample (:math:`\sigma_s = 0`) has zero variance, hence no log-probability:
clamp the last time to :data:`FLOW_SIGMA_MIN` (:func:`flow_matching_alpha_sigma`), as ``ddim.py`` ends at
``abar[0]`` instead of ``abar = 1``; the final latent then carries noise of level ``sigma_min`` (decode it, or
``x0_hat``). A flow model's first step starts at :math:`t = 1` (:math:`\alpha_t = 0`): the DDIM step is finite
there (:math:`\alpha_{t|s} = 0`, :math:`P_B = \mathcal N(0, I)`, and velocity or ``x0`` predictions need no
division by :math:`\alpha_t`; only the ``epsilon`` conversion does), but Flow-GRPO's noise level
:math:`a\sqrt{t/(1-t)}` is infinite, so :func:`flow_grpo_coefficients` clamps it with ``t_max``. Timesteps must
stay above ``sigma_min``: a step from :math:`t \le` ``sigma_min`` has no variance.

**Precision.** The coefficients are per-sample scalars computed in float64 when any schedule input is float64 (else
float32) and returned as float32; :math:`\sigma_{t|s}^2` cancels for small steps, so pass float64 times when steps
are many and small. Log-densities are computed per latent element in float32 and reduced over all non-batch
dimensions by ``"mean"`` or ``"sum"`` (the true log-density), as in ``ddim.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

ScheduleValue = Union[float, torch.Tensor]

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# The smallest standard deviation of a step that the samplers' checks accept: 2**-20 ~ 9.5e-7, the float32 spacing
# of latents of magnitude 8 (unit-variance latents, 8 sigma). Below it the noise of x_s = mean + std * z is lost when
# the sum is rounded, so log P_F scores rounding error: a mean recomputed a few ulps away in training moves it by
# (ulps / std)^2 per element, and once std**2 underflows (eta ~ 1e-20 on Stable Diffusion) it is inf or NaN.
MIN_STEP_STD = 8 * torch.finfo(torch.float32).eps

# Where a flow sampler's last step ends instead of t = 0, whose step has zero variance (as ddim.py's ends at
# abar[0] instead of abar = 1). It is below the last time that diffusers' flow samplers step from (the
# FlowMatchEulerDiscreteScheduler's sigma_min: 1/1000, raised by any shift >= 1), so that step keeps a variance; its
# std from t = 1e-3 is about eta * 1e-4, above MIN_STEP_STD (9.5e-7) for eta >= 0.01.
FLOW_SIGMA_MIN = 1e-4


@dataclass
class StepOutput:
    r"""Result of one sampler step with log-probabilities: the one step output type of every family and schedule
    (``GaussianStepOutput`` and ``DDIMStepOutput`` are other names for it, kept for code written against them).

    Attributes:
        latents: ``x_s``, the next (less noisy) state, float32, detached.
        log_probs: ``log P_F(x_s | x_t)`` of the policy, float32, shape ``(B,)``; differentiable through the model
            output (through ``mean``), never through ``x_s``.
        backward_log_probs: ``log P_B(x_t | x_s)`` of the fixed noising kernel, float32, shape ``(B,)``, no gradient.
        pred_original_sample: ``x0_hat``, the model's estimate of the clean latent, float32.
        mean: the mean of :math:`P_F(x_s \mid x_t)`, float32, differentiable through the model's predictions;
            ``None`` from a step that does not report it (a family's own ``scheduler_step``).
        std: its standard deviation, float32, per sample, shape ``(B, 1, ..., 1)`` (``(1, ..., 1)`` if shared);
            ``None`` likewise.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    backward_log_probs: torch.Tensor
    pred_original_sample: torch.Tensor
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None


# The step output's name before every family shared it (``ddim.py`` keeps ``DDIMStepOutput``).
GaussianStepOutput = StepOutput


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


def gaussian_step_kl(mean: torch.Tensor, prior_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""Closed-form KL divergence of one step from the prior's step, two Gaussians with the same variance:

    .. math::
        k = \mathrm{KL}\big(\mathcal N(\mu, \sigma^2 I) \,\|\, \mathcal N(\mu_p, \sigma^2 I)\big)
          = \frac{\lVert \mu - \mu_p \rVert^2}{2\sigma^2},

    the squared norm summed over every dimension but the first (the true, summed log-density's KL; it equals
    :math:`\mathbb E_\pi[\log \pi - \log p \mid x_t]` exactly). Differentiable in both means, so its gradient
    through the policy's mean at a visited state is the pathwise pull back to the prior of DPOK (Fan et al., 2023,
    arXiv 2305.16381) and Uehara et al. (2024, arXiv 2402.15194). ``std`` is a scalar, per row ``(B,)``, or shaped
    to broadcast like :attr:`StepOutput.std`. Returns ``(B,)``, in at least float32 (float64 is kept).
    """
    dtype = torch.promote_types(torch.promote_types(mean.dtype, prior_mean.dtype), torch.float32)
    std = torch.as_tensor(std, device=mean.device).to(dtype)
    if std.ndim == 1:
        std = _per_sample(std, mean)
    return reduce_over_sample((mean.to(dtype) - prior_mean.to(dtype)) ** 2 / (2 * std**2), "sum")


def noising_log_prob(
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    backward_scale: torch.Tensor,
    backward_std: torch.Tensor,
    reduction: str,
) -> torch.Tensor:
    r"""``log P_B(x_t | x_s)`` of the noising kernel :math:`\mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)`
    (``backward_scale``, ``backward_std``: per-sample scalars); it depends on no parameter, so nothing is
    differentiated."""
    scale, std = (_per_sample(value, sample) for value in (backward_scale, backward_std))
    return gaussian_log_prob(sample.detach(), scale * prev_sample.detach().float(), std, reduction)


def _check_eta(eta: float) -> None:
    """Refuse an eta outside (0, 1], where the step has no log-probability or no real mean."""
    if not 0 < eta <= 1:
        raise ValueError(
            f"eta={eta!r} is invalid: expected a number in (0, 1] (with eta = 0 DDIM has no log-probability; above 1 "
            "the mean's sqrt(1 - abar_s - sigma^2) can be the root of a negative number)."
        )


class GaussianStepCoefficients(NamedTuple):
    r"""The schedule part of a step, float32 per-sample scalars (shape ``()`` or ``(B,)``).

    :math:`P_F(x_s \mid x_t) = \mathcal N(\text{mean\_x0}\,\hat x_0 + \text{mean\_eps}\,\hat\epsilon, \text{std}^2 I)`
    and :math:`P_B(x_t \mid x_s) = \mathcal N(\text{backward\_scale}\,x_s, \text{backward\_std}^2 I)`.
    """

    mean_x0: torch.Tensor
    mean_eps: torch.Tensor
    std: torch.Tensor
    backward_scale: torch.Tensor
    backward_std: torch.Tensor


def _schedule_tensors(*values: ScheduleValue) -> tuple[torch.Tensor, ...]:
    """The values as tensors of one dtype, float64 if any is float64 (else float32), on the first tensor's device."""
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    device = tensors[0].device if tensors else None
    dtype = torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32
    return tuple(torch.as_tensor(value, dtype=dtype, device=device) for value in values)


def noising_kernel(
    alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The forward transition :math:`q(x_t \mid x_s) = \mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)`:
    returns :math:`(\alpha_{t|s}, \sigma_{t|s}^2)` with :math:`\alpha_{t|s} = \alpha_t / \alpha_s` and
    :math:`\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2 \sigma_s^2` (positive iff the signal-to-noise ratio
    :math:`\alpha^2/\sigma^2` decreases from ``s`` to ``t``)."""
    scale = alpha_t / alpha_s
    return scale, sigma_t**2 - scale**2 * sigma_s**2


def ddim_coefficients(
    alpha_t: ScheduleValue, sigma_t: ScheduleValue, alpha_s: ScheduleValue, sigma_s: ScheduleValue, eta: float = 1.0
) -> GaussianStepCoefficients:
    r"""DDIM with eta for any Gaussian schedule (Song et al. 2021, arXiv 2010.02502, eq. 12 and 16).

    :math:`\sigma_\eta = \eta\,\sigma_{t|s}\sigma_s/\sigma_t` (the posterior standard deviation at :math:`\eta = 1`),
    mean :math:`\alpha_s \hat x_0 + \sqrt{\sigma_s^2 - \sigma_\eta^2}\,\hat\epsilon`, backward kernel from
    :func:`noising_kernel`. ``sigma_s = 0`` gives a zero ``std``: clamp it (:func:`flow_matching_alpha_sigma`).
    The square root's argument is clamped at 0 against round-off (it is :math:`\ge 0` exactly, and 0 at
    :math:`\alpha_t = 0`, :math:`\eta = 1`).
    """
    _check_eta(eta)
    alpha_t, sigma_t, alpha_s, sigma_s = _schedule_tensors(alpha_t, sigma_t, alpha_s, sigma_s)
    scale, backward_variance = noising_kernel(alpha_t, sigma_t, alpha_s, sigma_s)
    std = eta * (backward_variance * sigma_s**2 / sigma_t**2).sqrt()
    return GaussianStepCoefficients(
        mean_x0=alpha_s.float(),
        mean_eps=(sigma_s**2 - std**2).clamp(min=0).sqrt().float(),
        std=std.float(),
        backward_scale=scale.float(),
        backward_std=backward_variance.sqrt().float(),
    )


def ddim_variance(alpha_prod_t: torch.Tensor, alpha_prod_prev: torch.Tensor) -> torch.Tensor:
    r"""DDIM posterior variance on the VP schedule (Song et al., 2021, eq. 16 with eta = 1):
    :math:`\sigma^2 = \frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}\left(1 - \frac{\bar\alpha_t}{\bar\alpha_s}\right)`."""
    return (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)


def vp_noising_kernel(
    alphas_cumprod_t: torch.Tensor, alphas_cumprod_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`noising_kernel` of the VP schedule in its ``abar`` form: :math:`(\sqrt r, 1 - r)` with
    :math:`r = \bar\alpha_t / \bar\alpha_s`, float32."""
    ratio = alphas_cumprod_t.float() / alphas_cumprod_s.float()
    return ratio.sqrt(), 1 - ratio


def vp_ddim_coefficients(
    alphas_cumprod_t: torch.Tensor, alphas_cumprod_s: torch.Tensor, eta: float = 1.0
) -> GaussianStepCoefficients:
    r""":func:`ddim_coefficients` for the VP schedule in its ``abar`` form, float32: the schedule of
    :func:`dag_trl.samplers.ddim.ddim_step_with_logprob`.
    :math:`\sigma_\eta = \eta\sqrt{\frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}(1 - \frac{\bar\alpha_t}{\bar\alpha_s})}`
    (:func:`ddim_variance`), mean :math:`\sqrt{\bar\alpha_s}\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma_\eta^2}\,\hat\epsilon`,
    :math:`P_B = \mathcal N(\sqrt{r} x_s, (1 - r) I)` with :math:`r = \bar\alpha_t / \bar\alpha_s`
    (:func:`vp_noising_kernel`).

    The mean's square root is clamped at 0: with zero terminal SNR (:math:`\bar\alpha_t = 0`) and :math:`\eta = 1`
    its argument is 0 exactly but rounds to -6e-8 for some ``s``; elsewhere the clamp changes nothing.
    """
    _check_eta(eta)
    alpha_prod_t = alphas_cumprod_t.float()
    alpha_prod_s = alphas_cumprod_s.float()
    std = eta * ddim_variance(alpha_prod_t, alpha_prod_s).sqrt()
    backward_scale, backward_variance = vp_noising_kernel(alpha_prod_t, alpha_prod_s)
    return GaussianStepCoefficients(
        mean_x0=alpha_prod_s.sqrt(),
        mean_eps=(1 - alpha_prod_s - std**2).clamp(min=0).sqrt(),
        std=std,
        backward_scale=backward_scale,
        backward_std=backward_variance.sqrt(),
    )


def flow_grpo_coefficients(
    t: ScheduleValue, s: ScheduleValue, *, t_max: ScheduleValue, noise_level: float = 0.7
) -> GaussianStepCoefficients:
    r"""Flow-GRPO's SDE step for a rectified-flow schedule (Liu et al. 2025, arXiv 2505.05470, eq. 9).

    The reverse-time SDE with the same marginals as the flow ODE,
    :math:`dx = [v + \frac{a_t^2}{2t}(x + (1 - t) v)]\,dt + a_t\,dw`, with noise level
    :math:`a_t = a\sqrt{t / (1 - t)}`, discretised by Euler-Maruyama over :math:`h = t - s`:

    .. math::
        x_s = x_t - h\,v - h\frac{a_t^2}{2t}\hat\epsilon + a_t\sqrt h\,z
            = (1 - s)\,\hat x_0 + \Big(s - h\frac{a_t^2}{2t}\Big)\hat\epsilon + a_t\sqrt h\,z,

    using :math:`\hat\epsilon = x_t + (1 - t) v`, :math:`x_t - h v = (1 - s)\hat x_0 + s\hat\epsilon`.
    For small steps this is DDIM with :math:`\eta \approx a/\sqrt 2`: the :math:`\eta = 1` variance is
    :math:`2ht/(1-t) + O(h^2)` and the means agree to :math:`O(h^2)`. Its backward kernel is the flow's
    :func:`noising_kernel`, but detailed balance against it has no solution.

    Args:
        t, s: the times of the step, :math:`1 \ge t > s \ge 0` (``s = 0`` is fine: ``std > 0``).
        t_max: the noise level is :math:`a\sqrt{t / (1 - \min(t, t_\max))}`, finite at :math:`t = 1`. Flow-GRPO
            uses the sampler's second time (``scheduler.sigmas[1]``), which makes the first step's standard
            deviation exactly ``noise_level``.
        noise_level: :math:`a > 0`, 0.7 by default as in Flow-GRPO.
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level={noise_level!r} is invalid: expected a positive number.")
    t, s, t_max = _schedule_tensors(t, s, t_max)
    level_sq = noise_level**2 * t / (1 - torch.minimum(t, t_max))
    step = t - s
    scale, backward_variance = noising_kernel(1 - t, t, 1 - s, s)
    return GaussianStepCoefficients(
        mean_x0=(1 - s).float(),
        mean_eps=(s - step * level_sq / (2 * t)).float(),
        std=(level_sq * step).sqrt().float(),
        backward_scale=scale.float(),
        backward_std=backward_variance.sqrt().float(),
    )


def gaussian_step_with_logprob(
    sample: torch.Tensor,
    pred_original_sample: torch.Tensor,
    pred_noise: torch.Tensor,
    coefficients: GaussianStepCoefficients,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
    log_prob_reduction: str = "mean",
) -> StepOutput:
    r"""One Gaussian step from ``x_t`` with its forward and backward log-probabilities: the step of every sampler
    (DDIM on the VP schedule is :func:`dag_trl.samplers.ddim.ddim_step_with_logprob`).

    Samples :math:`x_s = \mu + \text{std}\,z` with :math:`\mu = c_0 \hat x_0 + c_\epsilon \hat\epsilon` (or takes
    the given ``prev_sample``), and scores it under :math:`P_F = \mathcal N(\mu, \text{std}^2 I)` with ``x_s``
    detached (gradients reach the model only through :math:`\mu`) and ``x_t`` under
    :math:`P_B = \mathcal N(\alpha_{t|s} x_s, \sigma_{t|s}^2 I)` (:func:`noising_log_prob`).

    Args:
        sample: ``x_t``.
        pred_original_sample: :math:`\hat x_0` (:func:`x0_and_eps_from_prediction`), any float dtype.
        pred_noise: :math:`\hat\epsilon`, any float dtype.
        coefficients: from :func:`ddim_coefficients`, :func:`vp_ddim_coefficients` or
            :func:`flow_grpo_coefficients`.
        prev_sample: a given ``x_s`` to score instead of sampling one.
        generator: generator(s) for the noise ``z``.
        log_prob_reduction: ``"mean"`` or ``"sum"`` over the non-batch dimensions.

    Returns:
        A [`StepOutput`] whose tensors are float32, ``pred_original_sample`` the given :math:`\hat x_0`.
    """
    original = pred_original_sample.float()
    mean_x0, mean_eps, std, backward_scale, backward_std = (_per_sample(c, original) for c in coefficients)
    mean = mean_x0 * original + mean_eps * pred_noise.float()
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean.detach() + std * noise
    prev_sample = prev_sample.detach().float()
    return StepOutput(
        latents=prev_sample,
        log_probs=gaussian_log_prob(prev_sample, mean, std, log_prob_reduction),
        backward_log_probs=noising_log_prob(sample, prev_sample, backward_scale, backward_std, log_prob_reduction),
        pred_original_sample=original,
        mean=mean,
        std=std,
    )


def x0_and_eps_from_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: ScheduleValue,
    sigma_t: ScheduleValue,
    prediction_type: str,
    variance_preserving: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Convert a model output into :math:`(\hat x_0, \hat\epsilon)` for :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`.

    - ``epsilon``: :math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon) / \alpha_t` (needs :math:`\alpha_t > 0`).
    - ``v_prediction`` (Salimans & Ho 2022, :math:`v = \alpha_t\epsilon - \sigma_t x_0`, SD 2.x):
      :math:`\hat x_0 = (\alpha_t x_t - \sigma_t v)/(\alpha_t^2 + \sigma_t^2)`,
      :math:`\hat\epsilon = (\sigma_t x_t + \alpha_t v)/(\alpha_t^2 + \sigma_t^2)`; the denominator is 1 for VP,
      where ``variance_preserving=True`` takes it as exactly 1 instead of dividing by its float32 rounding.
    - ``sample``: :math:`\hat x_0` is the output, :math:`\hat\epsilon = (x_t - \alpha_t\hat x_0)/\sigma_t`.
    - ``flow_prediction`` (rectified flow, :math:`v = \epsilon - x_0`, :math:`\alpha_t = 1 - \sigma_t`):
      :math:`\hat x_0 = x_t - \sigma_t v`, :math:`\hat\epsilon = x_t + \alpha_t v`, finite at :math:`t = 1`.

    ``alpha_t`` and ``sigma_t`` are scalars or per sample, shape ``(B,)``, unclamped (the model's own time).
    All arithmetic is float32.
    """
    output = model_output.float()
    sample = sample.float()
    alpha, sigma = (_per_sample(value.float(), sample) for value in _schedule_tensors(alpha_t, sigma_t))
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        original, noise = alpha * sample - sigma * output, sigma * sample + alpha * output
        if variance_preserving:
            return original, noise
        norm = alpha**2 + sigma**2
        return original / norm, noise / norm
    if prediction_type == "sample":
        return output, (sample - alpha * output) / sigma
    if prediction_type == "flow_prediction":
        return sample - sigma * output, sample + alpha * output
    raise ValueError(
        f"prediction_type={prediction_type!r} is not supported: expected 'epsilon', 'v_prediction', 'sample' or "
        "'flow_prediction'."
    )


def vp_alpha_sigma(alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The VP schedule's coefficients :math:`(\sqrt{\bar\alpha}, \sqrt{1 - \bar\alpha})`."""
    return alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()


def flow_matching_alpha_sigma(
    t: ScheduleValue, sigma_min: float = FLOW_SIGMA_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rectified flow's coefficients :math:`(1 - t', t')` with :math:`t' = \max(t, \sigma_\min)`.

    The clamp keeps the last step (to ``t = 0``) stochastic: it goes to ``sigma_min``
    (:data:`FLOW_SIGMA_MIN` by default), as ``ddim.py``'s last step goes to ``abar[0]``. Keeps ``t``'s dtype
    (float32 for a Python float).
    """
    sigma = torch.as_tensor(t).clamp(min=sigma_min)
    return 1 - sigma, sigma


def shift_time(t: ScheduleValue, shift: float) -> torch.Tensor:
    r"""SD3's timestep shift (Esser et al. 2024, arXiv 2403.03206, eq. 23): :math:`t' = s t / (1 + (s - 1) t)`.

    Maps 0 to 0 and 1 to 1 and is increasing; ``shift > 1`` spends more steps at high noise. FLUX's
    resolution-dependent shift :math:`e^\mu / (e^\mu + 1/t - 1)` is this with ``shift = exp(mu)``.
    """
    if not shift > 0:
        raise ValueError(f"shift={shift!r} is invalid: expected a positive number.")
    t = torch.as_tensor(t)
    return shift * t / (1 + (shift - 1) * t)
