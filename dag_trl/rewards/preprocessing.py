"""Image preprocessing for the model rewards, done with torch ops on the images' own device.

DAG (Zhang et al. 2024, arXiv 2406.00633) evaluates the reward on the predicted clean image of *every* denoising
state, so the reward models run many times per sample: converting every image to ``PIL`` for a transformers image
processor would cost a host round trip per image. :class:`ImagePreprocessor` reproduces that processor's output on
the device instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# The normalisation constants OpenAI's CLIP was trained with; ImageReward's BLIP reuses them and open_clip's
# ViT-H-14 (the HPSv2 backbone) defaults to them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
