"""JPEG (in)compressibility, the simplest reward of DDPO (Black et al. 2023, arXiv 2305.13301) and DAG."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from .base import RewardFunction, RewardOutput, to_uint8_hwc


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
        for array in to_uint8_hwc(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self.sign * self.jpeg_sizes_kb(images), {}


class JpegCompressibility(JpegReward):
    """Minus the JPEG size in kB: rewards images that compress well (DDPO's ``jpeg_compressibility``)."""

    def __init__(self, quality: int = 95) -> None:
        super().__init__(sign=-1, quality=quality)


class JpegIncompressibility(JpegReward):
    """The JPEG size in kB: rewards detailed, hard-to-compress images (DDPO's ``jpeg_incompressibility``)."""

    def __init__(self, quality: int = 95) -> None:
        super().__init__(sign=+1, quality=quality)
