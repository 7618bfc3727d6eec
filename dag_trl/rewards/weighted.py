"""Linear combinations of rewards."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..utils import callable_name
from .base import REWARDS, RewardCallable, RewardFunction, RewardOutput


class WeightedSumReward(RewardFunction):
    """``sum_i w_i * r_i(images, prompts, metadata)``: ``weighted_sum({"aesthetic_score": 1.0, my_reward_fn: 0.1})``.

    ``parts`` maps rewards to weights (or is a list of ``(reward, weight)`` pairs, to use one reward twice). A
    reward is a callable or a registered name, built with default arguments. ``info`` holds each unweighted part
    under its name (the second of two equal names as ``<name>_2``) and each part's own info under
    ``"<name>/<key>"``.
    """

    name = "weighted_sum"

    def __init__(self, parts: Mapping[Any, float] | Iterable[tuple[Any, float]]) -> None:
        items = list(parts.items()) if isinstance(parts, Mapping) else list(parts)
        if not items:
            raise ValueError("weighted_sum needs at least one (reward, weight) pair; got none")
        self.parts: list[tuple[str, RewardCallable, float]] = []
        for reward, weight in items:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {callable_name(reward)!r} must be a finite number; got {weight!r}")
            reward_fn = REWARDS.get(reward) if isinstance(reward, str) else reward
            if not callable(reward_fn):
                raise ValueError(f"weighted_sum parts must be reward names or callables; got {reward!r}")
            name = base = callable_name(reward_fn)
            suffix = 1
            while any(name == existing for existing, _, _ in self.parts):
                suffix += 1
                name = f"{base}_{suffix}"
            self.parts.append((name, reward_fn, float(weight)))

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        info: dict[str, Any] = {}
        for name, reward_fn, weight in self.parts:
            rewards, part_info = reward_fn(images, prompts, metadata)
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=images.device).reshape(-1)
            if rewards.shape[0] != images.shape[0]:
                raise RuntimeError(f"reward {name!r} returned {rewards.shape[0]} values for {images.shape[0]} images")
            total = total + weight * rewards
            info[name] = rewards
            info.update({f"{name}/{key}": value for key, value in part_info.items()})
        return total, info
