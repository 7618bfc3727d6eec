"""The learned log-partition function ``log Z(c)`` of trajectory-balance objectives (RTB)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class LogPartitionHead(ModelMixin, ConfigMixin):
    r"""Estimate :math:`\log Z(c)` from the prompt embedding: :math:`b + w^\top \bar h / \lVert \bar h \rVert`, with
    :math:`\bar h` the mean over tokens of the text encoder's states. Starts at :math:`\log Z = 0` (``w = 0``,
    ``b = 0``). The unit-norm features keep one optimiser step from moving :math:`\log Z` by more than about
    ``lr * (1 + sqrt(D))`` under Adam, whatever the scale of the text encoder's states.

    A ``ModelMixin``, so ``save_pretrained`` / ``from_pretrained`` write and read safetensors plus a config.

    Args:
        embedding_dim: width ``D`` of the prompt embedding's per-token states.
    """

    @register_to_config
    def __init__(self, embedding_dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(embedding_dim, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``log Z`` of each prompt, float32 ``(B,)``, from ``hidden_states`` ``(B, L, D)``; in the weights' dtype
        even inside an autocast region (see :meth:`FlowNetwork.forward`)."""
        pooled = hidden_states.float().mean(dim=1)
        features = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self.linear(features.to(self.linear.weight.dtype)).squeeze(-1).float()
