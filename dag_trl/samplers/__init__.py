"""Samplers as stochastic policies: each step with its forward and backward log-probabilities."""

from .ddim import DDIMStepOutput, ddim_step_with_logprob

__all__ = ["DDIMStepOutput", "ddim_step_with_logprob"]
