"""Samplers as stochastic policies: each step with its forward and backward log-probabilities."""

from .ddim import DDIMStepOutput, check_scheduler, ddim_step_with_logprob
from .gaussian import (
    FLOW_SIGMA_MIN,
    GaussianStepCoefficients,
    GaussianStepOutput,
    StepOutput,
    ddim_coefficients,
    flow_grpo_coefficients,
    flow_matching_alpha_sigma,
    gaussian_step_with_logprob,
    noising_kernel,
    shift_time,
    vp_alpha_sigma,
    vp_ddim_coefficients,
    x0_and_eps_from_prediction,
)

__all__ = [
    "DDIMStepOutput",
    "FLOW_SIGMA_MIN",
    "GaussianStepCoefficients",
    "GaussianStepOutput",
    "StepOutput",
    "check_scheduler",
    "ddim_coefficients",
    "ddim_step_with_logprob",
    "flow_grpo_coefficients",
    "flow_matching_alpha_sigma",
    "gaussian_step_with_logprob",
    "noising_kernel",
    "shift_time",
    "vp_alpha_sigma",
    "vp_ddim_coefficients",
    "x0_and_eps_from_prediction",
]
