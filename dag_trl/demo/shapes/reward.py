"""The shapes model's colour-preference reward.

An under-specified prompt such as ``"a circle"`` gives circles of every colour; this reward on the shape's colour
is what DAG then reshapes that spread towards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...rewards import RewardFunction, RewardOutput
from .analysis import PALETTE, analyse_images
from .data import COLOUR_NAMES

# The default colour preference: two equally preferred colours, so that a GFlowNet (which samples in proportion to
# the reward) keeps both instead of collapsing onto one, as reward maximisation would.
DEFAULT_COLOUR_PREFERENCE: dict[str, float] = {"red": 1.0, "yellow": 1.0}
# Temperature of the soft nearest-palette assignment of the reward, in squared RGB distance: small enough that a
# palette colour gets (almost) exactly its weight, large enough that the reward varies smoothly between colours.
REWARD_TEMPERATURE = 0.02


def make_colour_preference_reward(
    weights: Mapping[str, float] | None = None,
) -> Callable[[torch.Tensor, Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A reward on the shape's colour, with DDPO's contract ``reward_fn(images, prompts, metadata) -> (rewards, info)``.

    ``weights`` maps palette colours to rewards (colours left out get 0; default ``DEFAULT_COLOUR_PREFERENCE``: red
    and yellow 1). An image's reward is ``sum_c weight_c * softmax_c(-|m - palette_c|^2 / REWARD_TEMPERATURE)``
    where ``m`` is the median colour of its shape pixels: a palette colour gets its weight, colours in between a
    blend; an image without a shape gets 0. ``images`` are float tensors ``(B, 3, H, W)`` in [0, 1]; ``rewards`` is
    float32 ``(B,)`` on their device and ``info["colour_index"]`` the nearest palette index per image (-1: none).
    """
    weights = DEFAULT_COLOUR_PREFERENCE if weights is None else weights
    unknown = set(weights) - set(COLOUR_NAMES)
    if unknown:
        raise ValueError(f"unknown colours {sorted(unknown)} in weights; expected among {COLOUR_NAMES}.")
    weight_vector = torch.tensor([float(weights.get(name, 0.0)) for name in COLOUR_NAMES], dtype=torch.float64)

    def colour_preference_reward(
        images: torch.Tensor, prompts: Any = None, metadata: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        analyses = analyse_images(images)
        rewards = torch.zeros(len(analyses), dtype=torch.float64)
        colour_index = torch.full((len(analyses),), -1, dtype=torch.long)
        for i, analysis in enumerate(analyses):
            if analysis.shape_rgb is None:
                continue
            squared_distances = (PALETTE - torch.tensor(analysis.shape_rgb, dtype=torch.float64)).pow(2).sum(dim=1)
            rewards[i] = (torch.softmax(-squared_distances / REWARD_TEMPERATURE, dim=0) * weight_vector).sum()
            colour_index[i] = COLOUR_NAMES.index(analysis.colour)
        return rewards.float().to(images.device), {"colour_index": colour_index.to(images.device)}

    return colour_preference_reward


colour_preference_reward = make_colour_preference_reward()


class ShapesColourPreference(RewardFunction):
    """The colour-preference reward of :func:`make_colour_preference_reward` with the input checks of every
    :class:`~dag_trl.rewards.RewardFunction`: ``get_reward_fn("shapes_colour_preference", weights=...)``."""

    name = "shapes_colour_preference"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self._reward = make_colour_preference_reward(weights)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self._reward(images, prompts, metadata)
