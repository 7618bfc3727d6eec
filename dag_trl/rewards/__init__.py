"""Reward functions for aligning text-to-image diffusion models.

Every reward follows the contract of DDPO (Black et al. 2023, arXiv 2305.13301) and of TRL's ``DDPOTrainer``,
``rewards, info = reward_fn(images, prompts, metadata)`` (see :mod:`dag_trl.rewards.base`).

The DAG paper (Zhang et al. 2024, arXiv 2406.00633) evaluates on the LAION aesthetic score, ImageReward, HPSv2 and
JPEG (in)compressibility; PickScore and CLIP score are the other common choices. DAG evaluates the reward on the
predicted clean image of *every* denoising state, so the model-based rewards here are built for repeated calls:
weights load once (lazily, on first call, or eagerly with ``.load()``), run in eval mode under ``no_grad`` in a
chosen dtype and device, and the image preprocessing is done with torch ops on the images' device instead of a PIL
round trip per image.

One module per scorer family: :mod:`~dag_trl.rewards.base` (the contract, input checks, base classes),
:mod:`~dag_trl.rewards.preprocessing`, :mod:`~dag_trl.rewards.jpeg`, :mod:`~dag_trl.rewards.clip` (PickScore,
CLIP score), :mod:`~dag_trl.rewards.aesthetic`, :mod:`~dag_trl.rewards.hps`, :mod:`~dag_trl.rewards.image_reward`,
:mod:`~dag_trl.rewards.weighted` and :mod:`~dag_trl.rewards.remote`.

:data:`REWARDS` maps each name to its class; ``REWARDS.register(name, factory)`` adds one (the shapes demo
registers its ``shapes_colour_preference`` this way).
"""

from __future__ import annotations

from typing import Any

from .aesthetic import AestheticMLP, AestheticReward
from .base import REWARDS, ModelReward, RewardCallable, RewardFunction, RewardOutput, validate_reward_inputs
from .clip import ClipReward, ClipScoreReward, PickScoreReward, load_clip
from .hps import HPS_CHECKPOINTS, HPSv2Reward
from .image_reward import ImageRewardModel, ImageRewardReward, convert_imagereward_state_dict
from .jpeg import JpegCompressibility, JpegIncompressibility, JpegReward
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor
from .remote import RemoteReward
from .weighted import WeightedSumReward

__all__ = [
    "REWARDS",
    "RewardFunction",
    "RewardCallable",
    "RewardOutput",
    "ModelReward",
    "ClipReward",
    "ImagePreprocessor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "HPS_CHECKPOINTS",
    "JpegReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "AestheticReward",
    "PickScoreReward",
    "ClipScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "WeightedSumReward",
    "RemoteReward",
    "AestheticMLP",
    "ImageRewardModel",
    "convert_imagereward_state_dict",
    "load_clip",
    "validate_reward_inputs",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "aesthetic_score",
    "pickscore",
    "clip_score",
    "hpsv2",
    "imagereward",
    "weighted_sum",
    "remote_reward",
    "get_reward_fn",
    "available_rewards",
]

# Each lowercase name (DDPO's style) is the class itself, registered under that name, rather than a function that
# repeats the class's arguments: a name always takes every option of its class.
jpeg_compressibility = REWARDS.register("jpeg_compressibility", JpegCompressibility)
jpeg_incompressibility = REWARDS.register("jpeg_incompressibility", JpegIncompressibility)
aesthetic_score = REWARDS.register("aesthetic_score", AestheticReward)
pickscore = REWARDS.register("pickscore", PickScoreReward)
clip_score = REWARDS.register("clip_score", ClipScoreReward)
hpsv2 = REWARDS.register("hpsv2", HPSv2Reward)
imagereward = REWARDS.register("imagereward", ImageRewardReward)
weighted_sum = REWARDS.register("weighted_sum", WeightedSumReward)
remote_reward = REWARDS.register("remote_reward", RemoteReward)


def available_rewards() -> list[str]:
    """The names :func:`get_reward_fn` accepts, sorted."""
    return REWARDS.names()


def get_reward_fn(name: str | RewardCallable, **kwargs: Any) -> RewardCallable:
    """Build a reward by name, passing ``kwargs`` to its class; a callable is returned unchanged (without kwargs).

    ``get_reward_fn("aesthetic_score", dtype="float16")``, ``get_reward_fn("remote_reward", url=...)``. An unknown
    name raises ``ValueError`` listing the known ones; keyword arguments the class does not take raise ``TypeError``
    listing the ones it does.
    """
    return REWARDS.resolve(name, **kwargs)
