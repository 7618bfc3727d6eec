"""Samplers as stochastic policies: each step with its forward and backward log-probabilities."""

from .ddim import DDIMStepOutput, check_scheduler, ddim_step_with_logprob

__all__ = ["DDIMStepOutput", "check_scheduler", "ddim_step_with_logprob"]
