"""Pictures of a run: captioned image grids and the reward curve."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: torch.Tensor, captions: Sequence[str], columns: int = 4, tile_size: int = 128, caption_lines: int = 2
) -> Image.Image:
    """A grid of ``images`` (float ``(B, 3, H, W)`` in [0, 1]) with a short caption under each tile.

    Small images are upscaled with nearest-neighbour sampling so that their pixels stay visible.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images.")
    font = ImageFont.load_default()
    line_height = 12
    caption_height = caption_lines * line_height + 4
    rows = math.ceil(images.shape[0] / columns)
    grid = Image.new("RGB", (columns * tile_size, rows * (tile_size + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    characters_per_line = max(1, tile_size // 6)
    for index, (tile, caption) in enumerate(zip(pixels, captions)):
        x = (index % columns) * tile_size
        y = (index // columns) * (tile_size + caption_height)
        grid.paste(Image.fromarray(tile).resize((tile_size, tile_size), Image.NEAREST), (x, y))
        lines = [caption[i : i + characters_per_line] for i in range(0, len(caption), characters_per_line)]
        for line_index, line in enumerate(lines[:caption_lines]):
            draw.text((x + 2, y + tile_size + 2 + line_index * line_height), line, fill="black", font=font)
    return grid


def plot_reward_curve(history: Sequence[dict], path: Union[str, os.PathLike], title: str = "Reward per epoch") -> None:
    """Plot the mean reward per epoch with a band of one standard deviation (``history``: dicts with ``epoch``,
    ``reward_mean`` and ``reward_std``) and save it as an image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    epochs = np.array([entry["epoch"] for entry in history])
    means = np.array([entry["reward_mean"] for entry in history])
    stds = np.array([entry["reward_std"] for entry in history])
    figure, axis = pyplot.subplots(figsize=(6, 4))
    axis.plot(epochs, means, marker="o", label="mean")
    axis.fill_between(epochs, means - stds, means + stds, alpha=0.25, label="± 1 std")
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward of sampled images")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
