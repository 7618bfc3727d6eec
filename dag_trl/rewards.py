"""Reward functions for aligning text-to-image diffusion models.

Every reward follows the contract of DDPO (Black et al. 2023, arXiv 2305.13301) and of TRL's ``DDPOTrainer``::

    rewards, info = reward_fn(images, prompts, metadata)

``images`` is a float tensor of shape ``(B, 3, H, W)`` with values in ``[0, 1]`` (what a Stable Diffusion pipeline
decodes), ``prompts`` a sequence of ``B`` strings and ``metadata`` a sequence of ``B`` dicts (or ``None``).
``rewards`` comes back as a float32 tensor of shape ``(B,)`` on the images' device and ``info`` is a dict of extra
per-batch values to log.

The DAG paper (Zhang et al. 2024, arXiv 2406.00633) evaluates on the LAION aesthetic score, ImageReward, HPSv2 and
JPEG (in)compressibility; PickScore and CLIP score are the other common choices. DAG evaluates the reward on the
predicted clean image of *every* denoising state, so the model-based rewards here are built for repeated calls:
weights load once (lazily, on first call, or eagerly with ``.load()``), run in eval mode under ``no_grad`` in a
chosen dtype and device, and the image preprocessing is done with torch ops on the images' device instead of a PIL
round trip per image.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .hub import callable_name

__all__ = [
    "RewardFunction",
    "ImagePreprocessor",
    "JpegReward",
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

RewardOutput = tuple[torch.Tensor, dict[str, Any]]
RewardCallable = Callable[[torch.Tensor, Sequence[str], Sequence[dict] | None], RewardOutput]

# The normalisation constants OpenAI's CLIP was trained with; ImageReward's BLIP reuses them and open_clip's
# ViT-H-14 (the HPSv2 backbone) defaults to them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------------------------


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


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] to a (B, H, W, 3) uint8 array, rounding as ``PIL`` conversions in DDPO do."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------------------------


class RewardFunction:
    """Base class: checks the inputs, calls :meth:`score`, and returns float32 rewards on the images' device."""

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
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (e.g. 'float16'); got {dtype!r}")
    return resolved


class _ModelReward(RewardFunction):
    """A reward backed by neural networks that are loaded once and kept in eval mode without gradients.

    ``device=None`` puts the models on the device of the first batch of images; later batches on another device
    are moved to the models' device for scoring and the rewards moved back.
    """

    def __init__(self, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None) -> None:
        self.dtype = _resolve_dtype(dtype)
        self.device = torch.device(device) if device is not None else None
        self._loaded = False

    def load(self, device: str | torch.device | None = None) -> _ModelReward:
        """Load the models now (otherwise they load on the first call); returns ``self``."""
        if not self._loaded:
            if device is not None:
                self.device = torch.device(device)
            if self.device is None:
                self.device = torch.device("cpu")
            self._load_models(self.device)
            self._loaded = True
        return self

    def _load_models(self, device: torch.device) -> None:
        raise NotImplementedError

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        self.load(images.device if self.device is None else None)
        return self._forward(images.to(self.device), prompts, metadata)


def _freeze(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _features(output: Any) -> torch.Tensor:
    """Projected CLIP features from ``get_image_features`` / ``get_text_features``.

    transformers < 5 returns the tensor itself, transformers >= 5 a model output whose ``pooler_output`` holds it.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _resolve_file(path_or_repo: str, filename: str, repo_type: str | None = None) -> str:
    """A local file, a file inside a local folder, or ``filename`` downloaded from the Hub repository ``path_or_repo``."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        candidate = os.path.join(path_or_repo, filename)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{filename!r} not found in the local folder {path_or_repo!r}")
        return candidate
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, filename, repo_type=repo_type)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing on the device
# ----------------------------------------------------------------------------------------------------------------

# PIL resampling filter ids (PIL.Image.Resampling) to torch interpolation modes. PIL's BILINEAR and BICUBIC filters
# widen their support when downsampling, which is what torch's ``antialias=True`` reproduces; torch's antialiased
# bicubic uses PIL's a = -0.5 kernel for exactly this reason.
_PIL_TO_TORCH_MODE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


class ImagePreprocessor:
    """Resize, centre-crop and normalise ``(B, 3, H, W)`` images in [0, 1] with torch ops on their own device.

    It reproduces what a transformers ``CLIPImageProcessor`` (PIL backend) does to a ``PIL`` image made from the same
    tensor, including its uint8 rounding: ``quantize=True`` rounds to the 0..255 grid before resizing (the PIL image
    the pipeline would have produced) and after it (PIL resizes 8-bit images to 8-bit). Values then differ from the
    PIL path by at most about one grey level, from PIL's fixed-point filter arithmetic.

    ``shortest_edge`` resizes the short side to that many pixels keeping the aspect ratio (the long side is
    truncated, as transformers and torchvision do); ``size`` resizes to an exact ``(height, width)`` instead.
    ``pad_longest_edge`` instead scales the *long* side to that size and zero-pads to a square, which is the
    evaluation transform of HPSv2's open_clip fork.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        shortest_edge: int | None = None,
        size: tuple[int, int] | None = None,
        crop_size: tuple[int, int] | None = None,
        pad_longest_edge: int | None = None,
        resample: int | str = "bicubic",
        rescale_factor: float = 1 / 255,
        quantize: bool = True,
    ) -> None:
        if sum(option is not None for option in (shortest_edge, size, pad_longest_edge)) > 1:
            raise ValueError("give at most one of shortest_edge, size and pad_longest_edge")
        if isinstance(resample, str):
            mode = resample
        else:
            if int(resample) not in _PIL_TO_TORCH_MODE:
                raise ValueError(
                    f"resample={resample!r} is not supported; accepted PIL filters are NEAREST (0), BILINEAR (2) "
                    "and BICUBIC (3)"
                )
            mode = _PIL_TO_TORCH_MODE[int(resample)]
        if mode not in _PIL_TO_TORCH_MODE.values():
            raise ValueError(
                f"resample={resample!r} is not supported; accepted: {sorted(_PIL_TO_TORCH_MODE.values())}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 (RGB) values each; got mean={list(mean)} and std={list(std)}")
        self.mode = mode
        self.shortest_edge = shortest_edge
        self.size = tuple(size) if size is not None else None
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.pad_longest_edge = pad_longest_edge
        self.rescale_factor = rescale_factor
        self.quantize = quantize
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # The normalisation's scale and shift, moved to each device once rather than on every call.
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_image_processor(cls, image_processor: Any, quantize: bool = True) -> ImagePreprocessor:
        """Build from a transformers image processor, reading its size, crop, filter and normalisation settings."""

        def setting(key: str) -> Any:
            value = getattr(image_processor, key, None)
            return value.to_dict() if hasattr(value, "to_dict") else value

        def get(mapping: Any, key: str) -> Any:
            return mapping.get(key) if isinstance(mapping, Mapping) else getattr(mapping, key, None)

        shortest_edge = size = crop_size = None
        if setting("do_resize"):
            size_cfg = setting("size")
            if isinstance(size_cfg, int):
                shortest_edge = size_cfg
            elif get(size_cfg, "shortest_edge") is not None and get(size_cfg, "longest_edge") is None:
                shortest_edge = int(get(size_cfg, "shortest_edge"))
            elif get(size_cfg, "height") is not None and get(size_cfg, "width") is not None:
                size = (int(get(size_cfg, "height")), int(get(size_cfg, "width")))
            else:
                raise ValueError(
                    f"unsupported image processor size {size_cfg!r}; accepted: {{'shortest_edge': n}} or "
                    "{'height': h, 'width': w}"
                )
        if setting("do_center_crop"):
            crop_cfg = setting("crop_size")
            if isinstance(crop_cfg, int):
                crop_size = (crop_cfg, crop_cfg)
            else:
                crop_size = (int(get(crop_cfg, "height")), int(get(crop_cfg, "width")))
        if setting("do_normalize"):
            mean, std = list(setting("image_mean")), list(setting("image_std"))
        else:
            mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        rescale_factor = float(setting("rescale_factor")) if setting("do_rescale") else 1.0
        resample = setting("resample")
        return cls(
            mean=mean,
            std=std,
            shortest_edge=shortest_edge,
            size=size,
            crop_size=crop_size,
            resample=3 if resample is None else resample,
            rescale_factor=rescale_factor,
            quantize=quantize,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) after resizing an image of the given size, before cropping/padding."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is not None:
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        if self.pad_longest_edge is not None:
            scale = self.pad_longest_edge / max(height, width)
            return round(height * scale), round(width * scale)
        return height, width

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if self.mode == "nearest-exact":
            return F.interpolate(x, size=size, mode=self.mode)
        # PIL filters 8-bit images in two passes, horizontal then vertical, rounding and clamping to 0..255 after
        # each; the clamp matters because bicubic overshoots next to sharp edges.
        passes = [(x.shape[-2], size[1]), size] if self.quantize else [size]
        for pass_size in passes:
            x = F.interpolate(x, size=pass_size, mode=self.mode, align_corners=False, antialias=True).clamp_(0, 255)
            if self.quantize:
                x.round_()
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess ``(B, 3, H, W)`` images in [0, 1] to float32 pixel values on the same device."""
        x = images.float().mul(255)
        if self.quantize:
            x.round_()
        height, width = x.shape[-2:]
        x = self._resize(x, self.output_size(height, width))
        if self.pad_longest_edge is not None:
            side = self.pad_longest_edge
            pad_h, pad_w = side - x.shape[-2], side - x.shape[-1]
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
            height, width = x.shape[-2:]
            if crop_h > height or crop_w > width:
                raise ValueError(
                    f"crop size {self.crop_size} is larger than the resized image ({height}, {width}); "
                    "this preprocessing only supports crops inside the image"
                )
            # Same offsets as transformers' center_crop (floor of half the excess).
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            x = x[..., top : top + crop_h, left : left + crop_w]
        # (x * rescale - mean) / std as one fused multiply-add.
        if x.device not in self._constants:
            scale = self.rescale_factor / self._std
            self._constants[x.device] = (scale.to(x.device), (-self._mean / self._std).to(x.device))
        scale, shift = self._constants[x.device]
        return torch.addcmul(shift, x, scale)


# ----------------------------------------------------------------------------------------------------------------
# JPEG (in)compressibility
# ----------------------------------------------------------------------------------------------------------------


class JpegReward(RewardFunction):
    """Size of the image as a JPEG at ``quality`` (default 95), in kB (1000 bytes), as in DDPO and DAG.

    ``sign=-1`` rewards compressible images (``jpeg_compressibility``), ``sign=+1`` incompressible ones. The size
    is that of PIL's encoder applied to the uint8 image (values rounded from [0, 1] to 0..255); it runs on the CPU.
    """

    def __init__(self, sign: float, quality: int = 95, name: str | None = None) -> None:
        if sign not in (-1, 1, -1.0, 1.0):
            raise ValueError(f"sign must be +1 or -1; got {sign!r}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be an integer in [1, 100]; got {quality!r}")
        self.sign = float(sign)
        self.quality = int(quality)
        self.name = name or ("jpeg_compressibility" if sign < 0 else "jpeg_incompressibility")

    def jpeg_sizes_kb(self, images: torch.Tensor) -> torch.Tensor:
        """JPEG sizes in kB of a batch of (B, 3, H, W) images in [0, 1]."""
        sizes = []
        for array in _to_uint8_hwc(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self.sign * self.jpeg_sizes_kb(images), {}


def jpeg_compressibility(quality: int = 95) -> JpegReward:
    """Minus the JPEG size in kB: rewards images that compress well (DDPO's ``jpeg_compressibility``)."""
    return JpegReward(sign=-1, quality=quality)


def jpeg_incompressibility(quality: int = 95) -> JpegReward:
    """The JPEG size in kB: rewards detailed, hard-to-compress images (DDPO's ``jpeg_incompressibility``)."""
    return JpegReward(sign=+1, quality=quality)


# ----------------------------------------------------------------------------------------------------------------
# CLIP-based rewards (transformers)
# ----------------------------------------------------------------------------------------------------------------


def load_clip(
    model_name_or_path: str,
    processor_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a transformers ``CLIPModel`` (frozen, eval mode) and its processor from a Hub id or a local folder."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(processor_name_or_path or model_name_or_path)
    return _freeze(model, dtype, torch.device(device)), processor


class _ClipReward(_ModelReward):
    """Shared loading and encoding for rewards computed from a transformers ``CLIPModel``."""

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dtype=dtype, device=device)
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path or model_name_or_path

    def _load_models(self, device: torch.device) -> None:
        self.model, processor = load_clip(self.model_name_or_path, self.processor_name_or_path, self.dtype, device)
        self.tokenizer = processor.tokenizer
        self.preprocess = ImagePreprocessor.from_image_processor(processor.image_processor)
        # CLIP's text tower has a fixed number of positions (77 for the OpenAI/LAION models); longer prompts are
        # truncated as in the PickScore and CLIP-score reference code.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image features, float32."""
        pixel_values = self.preprocess(images).to(self.dtype)
        features = _features(self.model.get_image_features(pixel_values=pixel_values)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text features, float32."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        features = _features(self.model.get_text_features(**tokens)).float()
        return features / features.norm(dim=-1, keepdim=True)


class AestheticMLP(torch.nn.Module):
    """The LAION "improved aesthetic predictor" head (C. Schuhmann, github.com/christophschuhmann/
    improved-aesthetic-predictor): a purely linear stack 768-1024-128-64-16-1 (dropouts are inactive at inference)
    on L2-normalised CLIP ViT-L/14 image embeddings, trained with an MSE loss on SAC + LAION-Logos + AVA ratings.
    The module layout matches the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or a (weights-only) torch pickle state dict onto the CPU."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    # weights_only refuses arbitrary pickled code: these files come from third-party Hub repositories.
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(_ClipReward):
    """LAION aesthetic score, as used by DDPO and DAG: the improved aesthetic predictor MLP on CLIP ViT-L/14.

    The score is on the predictor's 1-10 rating scale. ``clip_model`` and ``mlp_path`` take Hub ids or local paths
    (``mlp_path`` may be a file, a folder holding ``mlp_filename``, or a Hub repository holding it).
    """

    name = "aesthetic_score"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        mlp_path: str = "camenduru/improved-aesthetic-predictor",
        mlp_filename: str = "sac+logos+ava1-l14-linearMSE.pth",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(clip_model, dtype=dtype, device=device)
        self.mlp_path = mlp_path
        self.mlp_filename = mlp_filename

    def _load_models(self, device: torch.device) -> None:
        super()._load_models(device)
        state_dict = _load_state_dict(_resolve_file(self.mlp_path, self.mlp_filename))
        mlp = AestheticMLP(input_size=self.model.config.projection_dim)
        try:
            mlp.load_state_dict(state_dict)
        except RuntimeError as error:
            raise RuntimeError(
                f"the aesthetic MLP weights from {self.mlp_path!r} do not fit a "
                f"{self.model.config.projection_dim}-1024-128-64-16-1 predictor on {self.model_name_or_path!r}: {error}"
            ) from error
        # The head is tiny; float32 keeps its score exact whatever dtype the CLIP tower runs in.
        self.mlp = _freeze(mlp, torch.float32, device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self.mlp(self.image_embeddings(images)).squeeze(-1), {}


class PickScoreReward(_ClipReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): CLIP ViT-H/14 fine-tuned on human
    preferences. The reward is the image-text logit ``exp(logit_scale) * cos(image, text)`` (about 18-24 for
    typical Stable Diffusion images), as in the model card's reference code.
    """

    name = "pickscore"

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cosine, {}


class ClipScoreReward(_ClipReward):
    """CLIP score (Hessel et al. 2021, "CLIPScore", arXiv 2104.08718; Radford et al. 2021): the cosine similarity of
    the CLIP image and text embeddings, in [-1, 1]. Multiply by 100 (and clip at 0) for CLIPScore's reporting scale.
    """

    name = "clip_score"

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        processor_name_or_path: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1), {}


def aesthetic_score(
    clip_model: str = "openai/clip-vit-large-patch14",
    mlp_path: str = "camenduru/improved-aesthetic-predictor",
    mlp_filename: str = "sac+logos+ava1-l14-linearMSE.pth",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> AestheticReward:
    """LAION aesthetic predictor score (see :class:`AestheticReward`)."""
    return AestheticReward(clip_model, mlp_path, mlp_filename, dtype=dtype, device=device)


def pickscore(
    model_name_or_path: str = "yuvalkirstain/PickScore_v1",
    processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> PickScoreReward:
    """PickScore_v1 image-text logit (see :class:`PickScoreReward`)."""
    return PickScoreReward(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)


def clip_score(
    model_name_or_path: str = "openai/clip-vit-large-patch14",
    processor_name_or_path: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> ClipScoreReward:
    """CLIP image-text cosine similarity (see :class:`ClipScoreReward`)."""
    return ClipScoreReward(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# HPSv2 (open_clip)
# ----------------------------------------------------------------------------------------------------------------

HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the hpsv2 reward needs open_clip; install it with `pip install dag_trl[hpsv2]` "
            "(or `pip install open_clip_torch`)"
        ) from error
    return open_clip


class HPSv2Reward(_ModelReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341).

    An open_clip ViT-H-14 fine-tuned on HPDv2; the score is the cosine similarity of its normalised image and text
    embeddings (about 0.2-0.35 for typical images), as in the official ``hpsv2.score``. Needs the ``hpsv2`` extra
    (``open_clip_torch``). The backbone is created without pretrained weights and the HPS checkpoint (from
    ``checkpoint``, a local file/folder or Hub repository, default ``xswu/HPSv2``) supplies all of them.
    Preprocessing follows HPSv2's evaluation transform: scale the longest side to 224, zero-pad to a square,
    normalise with the model's mean/std.
    """

    name = "hpsv2"

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str = "xswu/HPSv2",
        architecture: str = "ViT-H-14",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"unknown HPS version {version!r}; known versions: {sorted(HPS_CHECKPOINTS)}")
        super().__init__(dtype=dtype, device=device)
        self.version = version
        self.checkpoint = checkpoint
        self.architecture = architecture

    def _load_models(self, device: torch.device) -> None:
        open_clip = _import_open_clip()
        model = open_clip.create_model(self.architecture, pretrained=None)
        state = _load_state_dict(_resolve_file(self.checkpoint, HPS_CHECKPOINTS[self.version]))
        # The released checkpoints wrap the weights as {"state_dict": ...}.
        model.load_state_dict(state.get("state_dict", state))
        self.model = _freeze(model, self.dtype, device)
        self.tokenizer = open_clip.get_tokenizer(self.architecture)
        visual = self.model.visual
        image_size = visual.image_size
        side = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
        self.preprocess = ImagePreprocessor(
            mean=getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN,
            std=getattr(visual, "image_std", None) or OPENAI_CLIP_STD,
            pad_longest_edge=side,
            resample="bicubic",
        )

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        image_features = self.model.encode_image(self.preprocess(images).to(self.dtype), normalize=True).float()
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_features * text_features).sum(-1), {}


def hpsv2(
    version: str = "v2.1",
    checkpoint: str = "xswu/HPSv2",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> HPSv2Reward:
    """HPS v2 / v2.1 human preference score (see :class:`HPSv2Reward`); needs ``pip install dag_trl[hpsv2]``."""
    return HPSv2Reward(version=version, checkpoint=checkpoint, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# ImageReward (BLIP on transformers)
# ----------------------------------------------------------------------------------------------------------------

# Mean and standard deviation of the raw ImageReward-v1.0 head output, from the official ImageReward.py; the
# reported score is standardised with them.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


def convert_imagereward_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an official ``ImageReward.pt`` state dict into transformers ``BlipVisionModel``, ``BlipTextModel`` and
    MLP-head state dicts.

    The official BLIP vision tower is a timm-style ViT (``blip.visual_encoder.*``: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); transformers'
    port keeps the fused qkv layout under other names. The text tower (``blip.text_encoder.*``, BLIP's ``med.py``
    BERT with cross-attention) already uses the names of transformers' ``BlipTextModel``. Keys that ImageReward
    does not use for scoring (projections, position-id buffers) are dropped.
    """
    vision_renames = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    block_renames = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    vision, text, mlp = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            if name in vision_renames:
                vision[vision_renames[name]] = value
            elif name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                module, param = rest.rsplit(".", 1)
                if module in block_renames:
                    vision[f"encoder.layers.{index}.{block_renames[module]}.{param}"] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp.") :]] = value
    return vision, text, mlp


def _blip_vision_config(vision_state: Mapping[str, torch.Tensor], layer_norm_eps: float = 1e-6) -> Any:
    """Infer a ``BlipVisionConfig`` from the converted ViT weights (BLIP's ViTs use 64-dim heads, eps 1e-6)."""
    from transformers import BlipVisionConfig

    hidden_size = vision_state["embeddings.class_embedding"].shape[-1]
    patch_size = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision_state["embeddings.position_embedding"].shape[1] - 1
    num_layers = 1 + max(int(key.split(".")[2]) for key in vision_state if key.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        image_size=patch_size * math.isqrt(num_patches),
        patch_size=patch_size,
        layer_norm_eps=layer_norm_eps,
        hidden_act="gelu",
    )


def _blip_text_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> Any:
    """A ``BlipTextConfig`` from ImageReward's ``med_config.json`` (a BERT config with cross-attention)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=encoder_hidden_size,
        # transformers only builds the cross-attention layers of a BlipTextModel configured as a decoder; the
        # forward pass below still runs it as a bidirectional encoder (is_decoder=False), as ImageReward does.
        is_decoder=True,
    )


class ImageRewardModel(torch.nn.Module):
    """ImageReward (Xu et al. 2023, "ImageReward", arXiv 2304.05977) re-implemented on transformers' BLIP classes.

    The official ``image-reward`` package pins old dependencies, so this module rebuilds its scoring path from
    transformers parts: a ``BlipVisionModel`` (BLIP ViT-L/16) encodes the image; a ``BlipTextModel`` encodes the
    prompt with cross-attention to the image tokens; the MLP head (the same 768-1024-128-64-16-1 linear stack as the
    aesthetic predictor) maps the first token's feature to a raw reward, standardised with ImageReward's mean/std.
    The weights come unchanged from the official ``ImageReward.pt`` through :func:`convert_imagereward_state_dict`.
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(input_size=text_config.hidden_size)

    @classmethod
    def from_official_checkpoint(cls, checkpoint_path: str, med_config_path: str) -> ImageRewardModel:
        """Build the model from an official ``ImageReward.pt`` and its ``med_config.json``."""
        vision_state, text_state, mlp_state = convert_imagereward_state_dict(_load_state_dict(checkpoint_path))
        if not vision_state or not text_state or not mlp_state:
            raise RuntimeError(
                f"{checkpoint_path!r} is not an ImageReward checkpoint: expected 'blip.visual_encoder.*', "
                "'blip.text_encoder.*' and 'mlp.*' weights"
            )
        with open(med_config_path) as f:
            med_config = json.load(f)
        vision_config = _blip_vision_config(vision_state)
        model = cls(vision_config, _blip_text_config(med_config, vision_config.hidden_size))
        for module, state, part in ((model.vision, vision_state, "vision"), (model.text, text_state, "text")):
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"ImageReward {part} weights in {checkpoint_path!r} do not match the model: "
                    f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        model.mlp.load_state_dict(mlp_state)
        return model

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        raw = self.mlp(text[:, 0].float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageRewardReward(_ModelReward):
    """ImageReward-v1.0 score (see :class:`ImageRewardModel` for what is re-implemented).

    ``checkpoint`` is a Hub repository (default ``THUDM/ImageReward``) or local folder holding ``ImageReward.pt``
    and ``med_config.json``, or the ``.pt`` file itself (then ``med_config`` must point at the JSON).
    ``tokenizer`` is the BERT tokenizer ImageReward uses (``bert-base-uncased``); prompts are padded/truncated to
    35 tokens and images resized (bicubic, shortest side 224), centre-cropped and normalised with CLIP's constants,
    as in the official code.
    """

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        med_config: str | None = None,
        tokenizer: str = "google-bert/bert-base-uncased",
        max_length: int = 35,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dtype=dtype, device=device)
        self.checkpoint = checkpoint
        self.med_config = med_config
        self.tokenizer_name_or_path = tokenizer
        self.max_length = max_length

    def _load_models(self, device: torch.device) -> None:
        from transformers import AutoTokenizer

        checkpoint_path = _resolve_file(self.checkpoint, "ImageReward.pt")
        med_config_path = self.med_config or _resolve_file(
            os.path.dirname(checkpoint_path) if os.path.isfile(self.checkpoint) else self.checkpoint,
            "med_config.json",
        )
        self.model = _freeze(
            ImageRewardModel.from_official_checkpoint(checkpoint_path, med_config_path), self.dtype, device
        )
        self.model.mlp.float()
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        image_size = self.model.vision.config.image_size
        self.preprocess = ImagePreprocessor(
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            shortest_edge=image_size,
            crop_size=(image_size, image_size),
            resample="bicubic",
        )

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pixel_values = self.preprocess(images).to(self.dtype)
        return self.model(pixel_values, tokens.input_ids, tokens.attention_mask), {}


def imagereward(
    checkpoint: str = "THUDM/ImageReward",
    med_config: str | None = None,
    tokenizer: str = "google-bert/bert-base-uncased",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
) -> ImageRewardReward:
    """ImageReward-v1.0 (see :class:`ImageRewardReward`)."""
    return ImageRewardReward(checkpoint, med_config=med_config, tokenizer=tokenizer, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Combinations and remote rewards
# ----------------------------------------------------------------------------------------------------------------


class WeightedSumReward(RewardFunction):
    """``sum_i w_i * r_i(images, prompts, metadata)``; ``info`` holds each unweighted part under its name and each
    part's own info under ``"<name>/<key>"``.
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
            reward_fn = get_reward_fn(reward) if isinstance(reward, str) else reward
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


def weighted_sum(parts: Mapping[Any, float] | Iterable[tuple[Any, float]]) -> WeightedSumReward:
    """Combine rewards linearly: ``weighted_sum({"aesthetic_score": 1.0, my_reward_fn: 0.1})``.

    Keys are reward names (built with default arguments through :func:`get_reward_fn`) or reward callables.
    """
    return WeightedSumReward(parts)


class RemoteReward(RewardFunction):
    """Scores a batch on a user's HTTP server: for rewards that live in another environment (e.g. the VLM scorers
    of DDPO and Flow-GRPO, which run in their own processes).

    Request: ``POST url`` with a JSON body ``{"prompts": [...], "metadata": [...], "image_format": "png" | "uint8",
    "images": [base64, ...], "shape": [H, W, 3]}``: each image is a base64 PNG, or base64 raw uint8 bytes in HWC
    order (``shape`` gives their layout). Metadata values that are not JSON types are sent as their ``str``.
    Response: JSON ``{"scores": [B numbers], "info": {...}}`` (``info`` optional).

    Connection failures, timeouts (``timeout`` seconds per attempt) and HTTP 5xx answers are retried up to
    ``max_retries`` times with exponential backoff; anything else that is not a well-formed answer raises a
    ``RuntimeError`` naming the URL and what came back. No score is ever filled in.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        image_format: str = "png",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        scheme = urllib.parse.urlparse(url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"url must be an http:// or https:// URL; got {url!r}")
        if image_format not in ("png", "uint8"):
            raise ValueError(f"image_format must be 'png' or 'uint8'; got {image_format!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0 and backoff >= 0; got {timeout}, {max_retries}, {backoff}"
            )
        self.url = url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.image_format = image_format
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def encode_request(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> bytes:
        """The JSON request body for a batch."""
        arrays = _to_uint8_hwc(images)
        if self.image_format == "png":
            encoded = []
            for array in arrays:
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        else:
            encoded = [base64.b64encode(array.tobytes()).decode("ascii") for array in arrays]
        body = {
            "prompts": prompts,
            "metadata": metadata,
            "image_format": self.image_format,
            "shape": list(arrays.shape[1:]),
            "images": encoded,
        }
        return json.dumps(body, default=str).encode("utf-8")

    def _post(self, body: bytes) -> bytes:
        errors = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                detail = error.read()[:200].decode("utf-8", "replace")
                if error.code < 500:
                    raise RuntimeError(
                        f"remote reward at {self.url} answered HTTP {error.code} {error.reason}: {detail!r}"
                    ) from error
                errors.append(f"HTTP {error.code} {error.reason}: {detail!r}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                errors.append(f"{type(reason).__name__}: {reason}")
        raise RuntimeError(
            f"remote reward at {self.url} failed after {self.max_retries + 1} attempts (timeout {self.timeout}s): "
            + "; ".join(errors)
        )

    def decode_response(self, raw: bytes, batch_size: int) -> tuple[list[float], dict[str, Any]]:
        """Parse and check a server answer; raises ``RuntimeError`` naming the URL and the answer if malformed."""
        excerpt = raw[:200].decode("utf-8", "replace")
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RuntimeError(f"remote reward at {self.url} answered non-JSON ({error}): {excerpt!r}") from error
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise RuntimeError(
                f"remote reward at {self.url} answered without a 'scores' list (expected "
                f'{{"scores": [{batch_size} numbers]}}): {excerpt!r}'
            )
        if len(scores) != batch_size:
            raise RuntimeError(
                f"remote reward at {self.url} answered {len(scores)} scores for a batch of {batch_size}: {excerpt!r}"
            )
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise RuntimeError(f"remote reward at {self.url} answered non-numeric or non-finite scores: {excerpt!r}")
        info = answer.get("info", {})
        if not isinstance(info, dict):
            raise RuntimeError(f"remote reward at {self.url} answered an 'info' that is not an object: {excerpt!r}")
        return [float(s) for s in scores], info

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        raw = self._post(self.encode_request(images, prompts, metadata))
        scores, info = self.decode_response(raw, images.shape[0])
        return torch.tensor(scores, dtype=torch.float32), info


def remote_reward(
    url: str, timeout: float = 60.0, max_retries: int = 2, backoff: float = 0.5, image_format: str = "png"
) -> RemoteReward:
    """A reward computed by an HTTP scoring server (see :class:`RemoteReward` for the protocol)."""
    return RemoteReward(url, timeout=timeout, max_retries=max_retries, backoff=backoff, image_format=image_format)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------


class ShapesColourPreference(RewardFunction):
    """The built-in shapes model's colour-preference reward (see
    :func:`dag_trl.shapes.make_colour_preference_reward`), with the input checks of every :class:`RewardFunction`."""

    name = "shapes_colour_preference"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        from .shapes import make_colour_preference_reward

        self._reward = make_colour_preference_reward(weights)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self._reward(images, prompts, metadata)


def shapes_colour_preference(weights: Mapping[str, float] | None = None) -> ShapesColourPreference:
    """The built-in shapes model's colour-preference reward: 1 for a red or yellow shape by default (``weights``:
    colour name -> weight)."""
    return ShapesColourPreference(weights)


_REWARDS: dict[str, Callable[..., RewardCallable]] = {
    "shapes_colour_preference": shapes_colour_preference,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "aesthetic_score": aesthetic_score,
    "pickscore": pickscore,
    "clip_score": clip_score,
    "hpsv2": hpsv2,
    "imagereward": imagereward,
    "weighted_sum": weighted_sum,
    "remote_reward": remote_reward,
}


def available_rewards() -> list[str]:
    """The names :func:`get_reward_fn` accepts."""
    return sorted(_REWARDS)


def get_reward_fn(name: str | RewardCallable, **kwargs: Any) -> RewardCallable:
    """Build a reward by name, passing ``kwargs`` to its factory; a callable is returned unchanged (without kwargs).

    ``get_reward_fn("aesthetic_score", dtype="float16")``, ``get_reward_fn("remote_reward", url=...)``.
    """
    if callable(name) and not isinstance(name, str):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} cannot be applied to an already built reward {name!r}"
            )
        return name
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    return _REWARDS[name](**kwargs)
