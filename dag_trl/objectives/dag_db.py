"""DAG-DB: detailed balance with a forward-looking flow (Zhang et al., 2024, arXiv 2406.00633, sections 3-4)."""

from __future__ import annotations

from typing import Optional

import torch

from ..models.flow_network import FlowNetwork
from .base import Objective, TransitionBatch
from .losses import detailed_balance_residual, forward_looking_log_flow, proximal_regulariser


class DAGDetailedBalance(Objective):
    r"""DAG's detailed-balance objective.

    For a transition :math:`x_t \to x_s` with forward-looking log-flows
    :math:`\log F(x) = F_\phi(x) + \beta r(\hat x_0(x))` (and :math:`\log F(x_0) = \beta R(x_0)` at the end), the
    loss is :math:`\delta^2 + \lambda u` with the residual
    :math:`\delta = \log F(x_t) + \log P_F(x_s \mid x_t) - \log P_B(x_t \mid x_s) - \log F(x_s)` and the proximal
    term :math:`u` (``train_unet_reg``). The flow network :math:`F_\phi` is the objective's own model.
    """

    uses_detailed_balance = True
    name = "dag_db"
    display_name = "DAG-DB"
    description = "detailed balance"
    paper = ("Zhang et al., 2024", "https://arxiv.org/abs/2406.00633")
    hyperparameters = ("train_klpf", "train_unet_reg", "train_flow_learning_rate")
    uses_state_rewards = True
    model_folder = "flow"

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        cls.check_klpf(config)

    @classmethod
    def check_klpf(cls, config) -> None:
        """DAG-DB's rule for ``train_klpf``."""
        # train_klpf picks DAG-KL when train_objective is unset; an explicit choice must agree with it.
        if config.train_klpf > 0:
            raise ValueError(
                f"GFlowNetConfig.train_objective={config.train_objective!r} conflicts with "
                f"train_klpf={config.train_klpf!r}: a positive train_klpf is DAG-KL's policy-gradient weight; set "
                "train_klpf <= 0 for DAG-DB, or train_objective='dag_kl'."
            )

    def create_model(self, pipeline) -> FlowNetwork:
        config = self.config
        return FlowNetwork(
            in_channels=pipeline.latent_channels,
            cross_attention_dim=pipeline.prompt_embedding_dim,
            block_out_channels=config.flow_block_out_channels,
            layers_per_block=config.flow_layers_per_block,
            attention_heads=config.flow_attention_heads,
            time_embedding_dim=config.flow_time_embedding_dim,
            pooled_embedding_dim=pipeline.pooled_embedding_dim,
        )

    def load_model(self, path: str) -> FlowNetwork:
        return FlowNetwork.from_pretrained(path)

    def learning_rate(self) -> float:
        return self.config.flow_learning_rate

    def probe_model(self, model, latents, timesteps, prompt_embeds) -> torch.Tensor:
        return model(latents, timesteps, prompt_embeds.hidden_states, prompt_embeds.pooled)

    @staticmethod
    def log_flows(batch: TransitionBatch, flow: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log F(x_t), log F(x_s), F_phi(x_t))``: one flow-network call on ``x_t`` and the non-terminal ``x_s``."""
        inner = torch.nonzero(~batch.is_terminal).squeeze(-1)
        embeds = batch.prompt_embeds
        pooled = None if embeds.pooled is None else torch.cat([embeds.pooled, embeds.pooled[inner]])
        flow_values = flow(
            torch.cat([batch.latents, batch.next_latents[inner]]),
            torch.cat([batch.timesteps, batch.next_timesteps[inner]]),
            torch.cat([embeds.hidden_states, embeds.hidden_states[inner]]),
            pooled,
        )
        flow_now, flow_next_inner = flow_values[: len(batch)], flow_values[len(batch) :]
        log_flow = forward_looking_log_flow(flow_now, batch.state_rewards, batch.beta)
        next_log_flow = batch.beta * batch.final_rewards
        if len(inner):
            next_log_flow = next_log_flow.index_put(
                (inner,), forward_looking_log_flow(flow_next_inner, batch.next_state_rewards[inner], batch.beta)
            )
        return log_flow, next_log_flow, flow_now

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        log_flow, next_log_flow, flow_now = self.log_flows(batch, model)
        regulariser = proximal_regulariser(batch.model_output, batch.sampled_model_output)
        db_loss = self.residual(batch, log_flow, next_log_flow) ** 2
        loss = db_loss + self.config.train_unet_reg * regulariser
        return loss.mean(), self.metrics(batch, loss, db_loss, torch.zeros_like(db_loss), regulariser, flow_now)

    @staticmethod
    def residual(batch: TransitionBatch, log_flow: torch.Tensor, next_log_flow: torch.Tensor) -> torch.Tensor:
        """The transition's balance residual: detailed balance against the noising kernel ``P_B``."""
        return detailed_balance_residual(log_flow, batch.log_prob_forward, batch.log_prob_backward, next_log_flow)

    @staticmethod
    def metrics(
        batch: TransitionBatch,
        loss: torch.Tensor,
        db_loss: torch.Tensor,
        kl_loss: torch.Tensor,
        regulariser: torch.Tensor,
        flow_now: torch.Tensor,
    ) -> dict[str, float]:
        return {
            "loss_total": loss.mean().item(),
            "loss_db": db_loss.mean().item(),
            "loss_kl": kl_loss.mean().item(),
            "regulariser": regulariser.mean().item(),
            "log_prob_forward": batch.log_prob_forward.mean().item(),
            "log_prob_backward": batch.log_prob_backward.mean().item(),
            "flow": flow_now.mean().item(),
            "intermediate_reward": batch.state_rewards.mean().item(),
            "ratio": torch.exp(batch.log_prob_forward - batch.sampled_log_prob).mean().item(),
        }
