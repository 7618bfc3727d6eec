"""Pictures of a run: image grids (captioned for reports, plain for trackers) and the reward curve."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def image_pixels(images: torch.Tensor) -> np.ndarray:
    """Float images ``(B, 3, H, W)`` in [0, 1] (values outside are clipped) as a uint8 ``(B, H, W, 3)`` array."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (B, 3, H, W) with B >= 1, got {tuple(images.shape)}.")
    return (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def tile_images(
    pixels: np.ndarray, columns: int, padding: int = 0, caption_height: int = 0, background: int = 0
) -> np.ndarray:
    """Tile uint8 images ``(B, H, W, 3)`` row-major (image ``i`` in row ``i // columns``) into one ``(H', W', 3)``
    array, with ``padding`` pixels between and around the tiles and ``caption_height`` empty rows under each tile,
    all filled with the grey level ``background``."""
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / columns)
    cell_height = height + caption_height + padding
    grid = np.full((rows * cell_height + padding, columns * (width + padding) + padding, 3), background, np.uint8)
    for index, tile in enumerate(pixels):
        top = padding + (index // columns) * cell_height
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


def captioned_image_grid(
    images: torch.Tensor, captions: Sequence[str], columns: int = 4, tile_size: int = 128, caption_lines: int = 2
) -> Image.Image:
    """A white grid of ``images`` (float ``(B, 3, H, W)`` in [0, 1]) with a short caption under each tile, for a
    run's report.

    Each image is resized to ``tile_size`` pixels square with nearest-neighbour sampling, so that the pixels of small
    images stay visible; captions are wrapped to ``caption_lines`` lines and cut beyond.
    """
    pixels = image_pixels(images)
    if len(captions) != len(pixels):
        raise ValueError(f"got {len(captions)} captions for {len(pixels)} images.")
    tiles = np.stack(
        [np.asarray(Image.fromarray(tile).resize((tile_size, tile_size), Image.NEAREST)) for tile in pixels]
    )
    line_height = 12
    caption_height = caption_lines * line_height + 4
    grid = Image.fromarray(tile_images(tiles, columns, caption_height=caption_height, background=255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    characters_per_line = max(1, tile_size // 6)
    for index, caption in enumerate(captions):
        x = (index % columns) * tile_size
        y = (index // columns) * (tile_size + caption_height) + tile_size + 2
        lines = [caption[i : i + characters_per_line] for i in range(0, len(caption), characters_per_line)]
        for line_index, line in enumerate(lines[:caption_lines]):
            draw.text((x + 2, y + line_index * line_height), line, fill="black", font=font)
    return grid


def plot_reward_curve(
    history: Sequence[dict],
    path: Union[str, os.PathLike],
    title: str = "Reward per epoch",
    evaluations: Sequence[dict] = (),
) -> None:
    """Plot the reward of each epoch's sampled images (``history``: the trainer's ``reward_history``, dicts with
    ``epoch``, ``reward_mean`` and the quantiles ``reward_q05`` ... ``reward_q95``) as the median with its 25-75 % and
    5-95 % bands, and the mean; quantiles rather than mean +- std, which leaves a bounded reward's range. Entries of
    ``evaluations`` (the trainer's ``evaluation_history``: ``epoch`` and ``reward_mean`` on fixed prompts and noise)
    are drawn as points. Saved as an image at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    def column(entries: Sequence[dict], key: str) -> np.ndarray:
        return np.array([entry[key] for entry in entries], dtype=float)

    epochs = column(history, "epoch")
    figure, axis = pyplot.subplots(figsize=(6, 4))
    if history and "reward_q50" in history[0]:
        axis.fill_between(epochs, column(history, "reward_q05"), column(history, "reward_q95"), alpha=0.15,
                          color="C0", label="5-95 %")  # fmt: skip
        axis.fill_between(epochs, column(history, "reward_q25"), column(history, "reward_q75"), alpha=0.3,
                          color="C0", label="25-75 %")  # fmt: skip
        axis.plot(epochs, column(history, "reward_q50"), color="C0", label="median")
    axis.plot(epochs, column(history, "reward_mean"), color="C1", marker="o", markersize=3, label="mean")
    if evaluations:
        axis.plot(column(evaluations, "epoch"), column(evaluations, "reward_mean"), "s", color="C3",
                  label="evaluation mean (fixed prompts and noise)")  # fmt: skip
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward of sampled images")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
