"""KL-regularised policy gradient with the closed-form KL of each step to the pretrained model (Fan et al., 2023,
"DPOK", arXiv 2305.16381; Uehara et al., 2024, "Fine-tuning of continuous-time diffusion models as entropy-regularized
control", arXiv 2402.15194)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from ..samplers.ddim import gaussian_step_kl
from .base import PRIOR_SAMPLER_SETTINGS, Objective, TransitionBatch, check_prior_available, process_share
from .losses import kl_regularised_returns, leave_one_out_baseline
from .trajectories import Trajectories


class KLRegularisedPolicyGradient(Objective):
    r"""Maximise :math:`J(\theta) = \mathbb E_{\pi_\theta}[\beta R(x_0) - \sum_n k_n(z_n)]`, where
    :math:`k_n(z_n) = \lVert\mu_\theta(z_n) - \mu_p(z_n)\rVert^2 / (2 s_n^2)` is the exact KL from the policy's step
    to the pretrained model's at the visited state :math:`z_n` (both Gaussian with the step's variance :math:`s_n^2`;
    the prior is the same network with its adapter switched off, the same guidance, eta and timesteps).

    The start :math:`x_T \sim \mathcal N(0, I)` stays fixed, so the optimum is the **conditional tilt**
    :math:`p(\tau \mid x_T)\, e^{\beta R(x_0)} / h(x_T)`, :math:`h(x_T) = \mathbb E_p[e^{\beta R} \mid x_T]` (within
    what fixed-variance Gaussian steps can represent): the reward-tilted prior only where the start does not
    predict the reward (see ``docs/algorithm.md``).

    The exact gradient is
    :math:`\nabla J = \mathbb E[\sum_n \nabla \log \pi_\theta(z_{n+1} \mid z_n)\, A_n] - \mathbb E[\sum_n \nabla
    k_n(z_n)]` with :math:`A_n = \beta R - \sum_{m > n} k_m - b_n`: a score-function term for what the action
    changes later, and the pathwise gradient of the step's own KL (autograd through :math:`\mu_\theta` at the
    visited state), the deterministic pull back to the prior that a score-function estimate of the KL lacks.
    :math:`b_n` is the leave-one-out mean of the same return over the epoch's other trajectories of the prompt
    (:func:`~.losses.leave_one_out_baseline`; over all the epoch's other trajectories for a prompt drawn once). The advantages are neither standardised nor clipped: that would
    reweight the score term against the pathwise one and move the optimum. Each transition is backpropagated on its
    own with the surrogate :math:`N k_n - N A_n \log \pi_\theta(z_{n+1} \mid z_n)` (``A_n`` detached), whose mean
    over a trajectory's transitions is the gradient above.

    The advantages are computed once per epoch from the sampling policy's KLs (recorded while sampling): the
    gradient is exact for the first optimiser step of an epoch and, like DDPO's, slightly off-policy for later ones
    (one optimiser step per epoch keeps it exact; a config with more warns).
    """

    name = "kl_pg"
    display_name = "KL-regularised PG"
    description = "policy gradient on the reward with the closed-form per-step KL to the pretrained model"
    paper = ("Fan et al., 2023 (DPOK); Uehara et al., 2024", "https://arxiv.org/abs/2305.16381")
    trajectory_fields = ("kl_pg_advantages",)
    main_metric = "kl_step"
    uses_prior_log_probs = True
    uses_prior_means = True
    target_settings = Objective.target_settings + PRIOR_SAMPLER_SETTINGS
    required_settings = {
        "train_log_prob_reduction": ("sum", "the KL and the score terms are in nats only with summed log-densities"),
        "train_cfg": (True, "the trajectories come from the guided sampler, whose steps the KL compares"),
        "train_reward_exp_anneal": ("none", "an annealed beta changes the objective during training"),
    }

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        windows = config.samples_per_epoch // config.trajectories_per_step
        if windows * config.train_num_inner_epochs > 1:
            warnings.warn(
                f"train_objective='kl_pg' computes its advantages once per epoch, from the sampling policy: with "
                f"{windows} optimiser step(s) per epoch and train_num_inner_epochs={config.train_num_inner_epochs}, "
                "every step after an epoch's first is slightly off-policy. For the exact gradient make one step per "
                "epoch (train_batch_size * train_gradient_accumulation_steps = sample_batch_size * "
                "sample_num_batches_per_epoch, train_num_inner_epochs=1), as the shapes recipe does.",
                stacklevel=3,
            )

    def create_model(self, pipeline) -> None:
        check_prior_available(pipeline, self.name)
        return None

    def prepare_samples(self, samples: Trajectories, accelerator: Any) -> None:
        """The advantages ``(B, N)`` of every transition, with baselines over every process's trajectories."""
        from accelerate.utils import gather_object

        rewards = accelerator.gather(samples.rewards.float())
        step_kls = accelerator.gather(samples.prior_kls.float())
        prompts = gather_object(list(samples.prompts)) if accelerator.num_processes > 1 else samples.prompts
        returns = kl_regularised_returns(rewards, step_kls, self.config.train_reward_exp)
        baseline = leave_one_out_baseline(returns, prompts)
        # A prompt drawn once this epoch has no other trajectory of its own: the mean of every other trajectory's
        # return, which is independent of it too, keeps the gradient unbiased with far less variance than none.
        alone = torch.tensor([prompts.count(prompt) == 1 for prompt in prompts], device=returns.device)
        if alone.any() and len(prompts) > 1:
            epoch_baseline = leave_one_out_baseline(returns, [0] * len(prompts))
            baseline = torch.where(alone.unsqueeze(1), epoch_baseline, baseline)
        advantages = returns - baseline
        samples.extras["kl_pg_advantages"] = process_share(advantages, accelerator, len(samples))

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        num_steps = self.config.sample_num_steps
        rows = torch.arange(len(batch), device=batch.step_index.device)
        advantages = batch.trajectory["kl_pg_advantages"][rows, batch.step_index].detach()
        step_kl = gaussian_step_kl(batch.policy_mean, batch.prior_mean, batch.step_std)
        surrogate = num_steps * (step_kl - advantages * batch.log_prob_forward)
        return surrogate.mean(), {
            "kl_step": step_kl.mean().item(),
            "advantage_abs": advantages.abs().mean().item(),
            "log_prob_forward": batch.log_prob_forward.mean().item(),
            "ratio": torch.exp(batch.log_prob_forward - batch.sampled_log_prob).mean().item(),
        }
