"""Relative detailed balance: DAG's detailed balance with the pretrained model's step in place of the noising kernel
(Zhang et al., 2024, arXiv 2406.00633; the relative balance of Venkatraman et al., 2024, arXiv 2405.20971)."""

from __future__ import annotations

from typing import Optional

import torch

from .base import (
    PRIOR_SAMPLER_SETTINGS,
    Objective,
    TransitionBatch,
    check_guided_training,
    check_prior_available,
)
from .dag_db import DAGDetailedBalance
from .losses import relative_detailed_balance_residual


class RelativeDetailedBalance(DAGDetailedBalance):
    r"""DAG with the prior: for each transition :math:`x_t \to x_s` the residual
    :math:`\delta = \log F(x_t) + \log P_F^\theta(x_s \mid x_t) - \log F(x_s) - \log P_F^{\text{prior}}(x_s \mid
    x_t)` (:func:`~.losses.relative_detailed_balance_residual`) with DAG's forward-looking flow
    :math:`\log F(x) = F_\phi(x) + \beta r(\hat x_0(x))` and :math:`\log F(x_0) = \beta R(x_0)`; the loss is
    :math:`\delta^2 + \lambda u` (``train_unet_reg``, as DAG-DB's).

    At zero loss the steps telescope to :math:`P_F^\theta(\tau \mid x_T) = p(\tau \mid x_T)\, e^{\beta R(x_0)} /
    F(x_T)`: the **conditional tilt** of the pretrained model given the start :math:`x_T`, with :math:`F(x_T) =
    h(x_T) = \mathbb E_p[e^{\beta R} \mid x_T]` (see ``docs/algorithm.md``). Unlike DAG-DB it needs no backward
    kernel, so any eta works, and unlike RTB each transition gets its own residual (per-step credit), on- or
    off-policy. The prior's log-probability of each sampled transition is recorded while sampling (one more model
    call per step).
    """

    uses_detailed_balance = False
    name = "rdb"
    display_name = "Relative DB"
    description = "detailed balance against the pretrained model's step (towards the prior tilted by the reward)"
    hyperparameters = ("train_unet_reg", "train_flow_learning_rate")
    uses_prior_log_probs = True
    target_settings = Objective.target_settings + PRIOR_SAMPLER_SETTINGS
    required_settings = {
        "train_log_prob_reduction": ("sum", "the target is a distribution only with true (summed) log-densities"),
        "train_reward_exp_anneal": ("none", "an annealed beta moves the target under the learned flow"),
    }

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)  # the required settings
        check_guided_training(config, cls.name)

    @classmethod
    def check_klpf(cls, config) -> None:
        """None: relative DB does not read ``train_klpf`` (DAG-DB's rule is that a positive one means DAG-KL)."""

    def create_model(self, pipeline):
        check_prior_available(pipeline, self.name)
        return super().create_model(pipeline)

    @staticmethod
    def residual(batch: TransitionBatch, log_flow: torch.Tensor, next_log_flow: torch.Tensor) -> torch.Tensor:
        """The transition's balance residual against the pretrained model's step (DAG-DB's loss uses it)."""
        return relative_detailed_balance_residual(
            log_flow, batch.log_prob_forward, next_log_flow, batch.prior_log_prob
        )

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss(batch, model)
        metrics["log_prob_prior"] = batch.prior_log_prob.mean().item()
        return loss, metrics
