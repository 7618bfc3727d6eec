"""The run report's pictures: captioned image grids and the reward curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dag_trl.io.reporting import captioned_image_grid, plot_reward_curve


def test_captioned_image_grid_upscales_each_tile_and_leaves_room_for_captions():
    images = torch.zeros(5, 3, 4, 4)
    for index in range(5):
        images[index, index % 3] = (index + 1) / 5  # tile i: one channel at a distinct level
    grid = captioned_image_grid(images, [f"prompt {i}" for i in range(5)], columns=3, tile_size=32, caption_lines=2)
    caption_height = 2 * 12 + 4
    assert grid.size == (3 * 32, 2 * (32 + caption_height))
    pixels = np.asarray(grid)
    for index in range(5):
        top, left = (index // 3) * (32 + caption_height), (index % 3) * 32
        tile = pixels[top : top + 32, left : left + 32]
        expected = np.zeros(3, dtype=np.uint8)
        expected[index % 3] = round((index + 1) / 5 * 255)
        assert (tile == expected).all(), index  # nearest-neighbour upscaling keeps every pixel exact
        caption = pixels[top + 32 : top + 32 + caption_height, left : left + 32]
        assert (caption < 128).any() and (caption == 255).any()  # dark text on white
    # The sixth cell of the second row stays white.
    assert (pixels[32 + caption_height :, 2 * 32 :] == 255).all()


@pytest.mark.parametrize(
    "images, captions, message",
    [
        (torch.zeros(2, 1, 4, 4), ["a", "b"], r"shape \(B, 3, H, W\) with B >= 1, got \(2, 1, 4, 4\)"),
        (torch.zeros(0, 3, 4, 4), [], r"shape \(B, 3, H, W\) with B >= 1, got \(0, 3, 4, 4\)"),
        (torch.zeros(2, 3, 4, 4), ["a"], "got 1 captions for 2 images"),
    ],
)
def test_captioned_image_grid_rejects_bad_input(images, captions, message):
    with pytest.raises(ValueError, match=message):
        captioned_image_grid(images, captions)


def test_reward_curve_is_saved_as_an_image(tmp_path):
    history = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05} for e in range(5)]
    path = tmp_path / "curve.png"
    plot_reward_curve(history, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)  # figsize (6, 4) inches at matplotlib's default 100 dpi
