"""Deterministic test images for the rewards' tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure at a few scales (like decoded samples), not i.i.d. pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=generator)
    fine = torch.rand(batch, 3, height, width, generator=generator)
    return (0.8 * F.interpolate(coarse, size=(height, width), mode="bilinear") + 0.2 * fine).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float ``(B, 3, H, W)`` images in [0, 1] as 8-bit PIL images (rounded to the nearest level)."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]
