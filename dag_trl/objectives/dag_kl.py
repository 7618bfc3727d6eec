"""DAG-KL: a KL-based policy gradient for the denoiser, detailed balance for the flow network (Zhang et al., 2024,
arXiv 2406.00633, section 4)."""

from __future__ import annotations

from typing import Optional

import torch

from .base import TransitionBatch
from .dag_db import DAGDetailedBalance
from .losses import detailed_balance_residual, leave_one_out_advantages, ppo_clipped_loss, proximal_regulariser


class DAGKL(DAGDetailedBalance):
    r"""DAG-KL: the flow network learns by detailed balance with :math:`\log P_F` held fixed; the denoiser gets the
    PPO-clipped surrogate of the leave-one-out advantage of :math:`-\delta`, weighted by ``train_klpf``:
    :math:`\delta^2 + w\,\mathrm{PPO}(A) + \lambda u`, with the batch's rows as the leave-one-out group.
    """

    name = "dag_kl"
    display_name = "DAG-KL"
    description = "KL-based policy gradient plus detailed balance"
    hyperparameters = DAGDetailedBalance.hyperparameters + ("train_clip_range", "train_adv_clip_max")

    @classmethod
    def validate_config(cls, config) -> None:
        if not config.train_klpf > 0:
            raise ValueError(
                f"GFlowNetConfig.train_objective={config.train_objective!r} conflicts with "
                f"train_klpf={config.train_klpf!r}: DAG-KL needs a positive train_klpf (the weight of its policy "
                "gradient); set train_klpf > 0, or train_objective='dag_db'."
            )
        if config.train_batch_size < 2:
            raise ValueError(
                f"GFlowNetConfig.train_batch_size={config.train_batch_size!r} is invalid: expected at least 2 with "
                "DAG-KL (the leave-one-out baseline needs 2)."
            )

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        config = self.config
        log_flow, next_log_flow, flow_now = self.log_flows(batch, model)
        regulariser = proximal_regulariser(batch.model_output, batch.sampled_model_output)
        flow_residual = detailed_balance_residual(
            log_flow, batch.log_prob_forward.detach(), batch.log_prob_backward, next_log_flow
        )
        advantages = leave_one_out_advantages(-flow_residual.detach(), config.train_adv_clip_max)
        kl_loss = ppo_clipped_loss(advantages, batch.log_prob_forward, batch.sampled_log_prob, config.train_clip_range)
        db_loss = flow_residual**2
        loss = db_loss + config.train_klpf * kl_loss + config.train_unet_reg * regulariser
        return loss.mean(), self.metrics(batch, loss, db_loss, kl_loss, regulariser, flow_now)
