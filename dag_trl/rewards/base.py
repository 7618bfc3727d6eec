"""The reward contract, its input checks, and the base classes of every reward in :mod:`dag_trl.rewards`.

Every reward follows the contract of DDPO (Black et al. 2023, arXiv 2305.13301) and of TRL's ``DDPOTrainer``::

    rewards, info = reward_fn(images, prompts, metadata)

``images`` is a float tensor of shape ``(B, 3, H, W)`` with values in ``[0, 1]`` (what a Stable Diffusion pipeline
decodes), ``prompts`` a sequence of ``B`` strings and ``metadata`` a sequence of ``B`` dicts (or ``None``).
``rewards`` comes back as a float32 tensor of shape ``(B,)`` on the images' device and ``info`` is a dict of extra
per-batch values to log.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..registry import Registry

RewardOutput = tuple[torch.Tensor, dict[str, Any]]
# Rewards are trained on in float32: a larger finite float64 or int becomes inf there.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Any callable with the contract above: a RewardFunction, or a plain function such as DDPO's.
RewardCallable = Callable[[torch.Tensor, Sequence[str], Sequence[dict] | None], RewardOutput]
# The reward functions by name (registered in dag_trl/rewards/__init__.py); defined here, beside the contract, so that
# rewards built from other rewards (weighted.py) look names up without importing the package that imports them.
REWARDS: Registry[RewardCallable] = Registry("reward")


def validate_reward_inputs(
    images: Any, prompts: Any, metadata: Any
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Check a reward call's arguments and return them as ``(images, list of prompts, list of metadata dicts)``.

    Raises ``ValueError`` naming the offending argument, what it was and what is accepted: a reward silently
    computed on a uint8 or [-1, 1] image would train the model towards the wrong target without any visible error.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (B, 3, H, W) in [0, 1]; got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor with values in [0, 1]; got dtype {images.dtype} "
            "(convert uint8 images with `images.float() / 255`)"
        )
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, 3, H, W) (rank 4); got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels in dimension 1, shape (B, 3, H, W); got shape {tuple(images.shape)}"
        )
    batch_size = images.shape[0]
    if batch_size == 0:
        raise ValueError("images is an empty batch (B = 0); a reward needs at least one image")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must have a non-zero height and width; got shape {tuple(images.shape)}")
    # One reduction on the device, one host sync: cheap next to any model forward pass.
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("images contain NaN or infinite values; expected finite values in [0, 1]")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"images must have values in [0, 1]; got min {low:.4g} and max {high:.4g} "
            "(map [-1, 1] outputs with `(x / 2 + 0.5).clamp(0, 1)`)"
        )

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list or tuple of {batch_size} strings; got {type(prompts).__name__}")
    if len(prompts) != batch_size:
        raise ValueError(f"prompts has {len(prompts)} entries but images has batch size {batch_size}; they must match")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str; got {type(prompt).__name__}")

    if metadata is None:
        metadata = [{} for _ in range(batch_size)]
    elif isinstance(metadata, (str, Mapping)) or not isinstance(metadata, Sequence):
        raise ValueError(
            f"metadata must be None or a list or tuple of {batch_size} dicts; got {type(metadata).__name__}"
        )
    elif len(metadata) != batch_size:
        raise ValueError(
            f"metadata has {len(metadata)} entries but images has batch size {batch_size}; they must match"
        )
    return images, list(prompts), list(metadata)


def score_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a float32 reward, or ``None`` if it can.

    ``"NaN"``, ``"inf"`` and ``"-inf"`` for non-finite floats; ``"<value> (float32 overflow)"`` for a finite number
    beyond +-3.4e38 (1e308, or an int such as 10**400 that float64 cannot even hold), so that it is reported
    like NaN instead of turning into inf in training; ``"None"`` or ``"a <type>, not a number"`` for anything else
    (bool included: it is no score).
    """
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return f"a {type(value).__name__}, not a number"
    if isinstance(value, numbers.Integral):
        magnitude = abs(int(value))
        if magnitude <= FLOAT32_MAX:
            return None
        sign = "-" if value < 0 else ""
        return f"~{sign}1e{math.floor(math.log10(magnitude))} (float32 overflow)"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if abs(value) > FLOAT32_MAX:
        return f"{value:.3g} (float32 overflow)"
    return None


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to a (B, H, W, 3) uint8 array, rounding as ``PIL`` conversions in DDPO do."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class RewardFunction:
    """Base class of the rewards: checks the inputs, calls :meth:`score`, and returns float32 rewards on the images'
    device. Subclasses implement :meth:`score` on inputs already checked by :func:`validate_reward_inputs`.
    """

    name: str = "reward"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> RewardOutput:
        images, prompts, metadata = validate_reward_inputs(images, prompts, metadata)
        rewards, info = self.score(images, prompts, metadata)
        rewards = rewards.reshape(-1).to(device=images.device, dtype=torch.float32)
        if rewards.shape[0] != images.shape[0]:
            raise RuntimeError(f"{self.name} returned {rewards.shape[0]} rewards for {images.shape[0]} images")
        return rewards, info

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        """Score validated inputs; subclasses implement this."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from itself or its name (``"float16"``), as configs and the command line give it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'float16'); got {dtype!r}")
    return resolved


class ModelReward(RewardFunction):
    """A reward backed by neural networks that are loaded once and kept in eval mode without gradients.

    ``device=None`` puts the models on the device of the first batch of images; later batches on another device
    are moved to the models' device for scoring and the rewards moved back.
    """

    def __init__(self, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None) -> None:
        self.dtype = _resolve_dtype(dtype)
        self.device = torch.device(device) if device is not None else None
        self._loaded = False

    def load(self, device: str | torch.device | None = None) -> ModelReward:
        """Load the models now (otherwise they load on the first call); returns ``self``."""
        if not self._loaded:
            if device is not None:
                self.device = torch.device(device)
            if self.device is None:
                self.device = torch.device("cpu")
            try:
                self._load_models(self.device)
            except OSError as error:
                raise OSError(self._loading_failure(error)) from error
            self._loaded = True
        return self

    def weight_sources(self) -> list[str]:
        """The Hub repositories or local paths the reward's weights come from (for error messages)."""
        return []

    def _loading_failure(self, error: OSError) -> str:
        """What a failed load says: the reward, its error, and for weights from the Hub, how to fetch them ahead of
        an offline run (:func:`hub_download_advice`)."""
        message = f"reward {self.name!r} could not load its weights ({type(error).__name__}: {error})."
        return message + hub_download_advice(self.weight_sources())

    def _load_models(self, device: torch.device) -> None:
        raise NotImplementedError

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        self.load(images.device if self.device is None else None)
        return self._forward(images.to(self.device), prompts, metadata)


def hub_download_advice(sources: Sequence[str]) -> str:
    """For weights that failed to load from ``sources`` (Hub ids or local paths): a sentence naming the Hub
    repositories among them and the command that fetches each ahead of an offline run (the Hub client's own message
    only asks to check the internet connection); empty when every source is a local path."""
    hub = [source for source in dict.fromkeys(sources) if not os.path.exists(source)]
    if not hub:
        return ""
    commands = "; ".join(f"`hf download {repo}`" for repo in hub)
    return (
        f" They come from the Hub repositories {hub}, which must be in the Hub cache when the Hub cannot be "
        f"reached (HF_HUB_OFFLINE=1, or no network): download them beforehand where it can ({commands}), "
        "or pass local folders instead."
    )


def freeze(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype``, in eval mode and without gradients: reward models are only evaluated."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def resolve_file(path_or_repo: str, filename: str) -> str:
    """A local file, a file inside a local folder, or ``filename`` downloaded from the Hub repository ``path_or_repo``."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        candidate = os.path.join(path_or_repo, filename)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{filename!r} not found in the local folder {path_or_repo!r}")
        return candidate
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, filename)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or a (weights-only) torch pickle state dict onto the CPU."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # weights_only refuses arbitrary pickled code: these files come from third-party Hub repositories.
    return torch.load(path, map_location="cpu", weights_only=True)
