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


def plotted_figure(monkeypatch, *args, **kwargs):
    """Run plot_reward_curve and return its figure, kept open (the function closes it after saving)."""
    from matplotlib import pyplot

    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)
    plot_reward_curve(*args, **kwargs)
    monkeypatch.undo()
    (figure,) = figures
    return figure


def band_vertices(collection) -> set[tuple[float, float]]:
    return {(round(x, 6), round(y, 6)) for x, y in collection.get_paths()[0].vertices}


def test_reward_curve_plots_the_quantile_bands_median_mean_and_evaluations(tmp_path, monkeypatch):
    from matplotlib import pyplot

    quantiles = {5: -0.4, 25: -0.1, 50: 0.0, 75: 0.2, 95: 0.6}  # offsets from the epoch's median 0.3 * e
    history = [
        {"epoch": e, "reward_mean": 0.25 * e, **{f"reward_q{q:02d}": 0.3 * e + d for q, d in quantiles.items()}}
        for e in range(5)
    ]
    evaluations = [{"epoch": 0, "reward_mean": 0.5}, {"epoch": 4, "reward_mean": 0.9}]
    path = tmp_path / "curve.png"
    figure = plotted_figure(monkeypatch, history, path, title="a run", evaluations=evaluations)
    (axis,) = figure.axes
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert sorted(lines) == ["evaluation mean (fixed prompts and noise)", "mean", "median"]
    np.testing.assert_allclose(lines["mean"].get_xdata(), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(lines["mean"].get_ydata(), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lines["median"].get_ydata(), [0.0, 0.3, 0.6, 0.9, 1.2])
    evaluation = lines["evaluation mean (fixed prompts and noise)"]
    np.testing.assert_allclose(evaluation.get_xdata(), [0, 4])
    np.testing.assert_allclose(evaluation.get_ydata(), [0.5, 0.9])
    bands = {collection.get_label(): band_vertices(collection) for collection in axis.collections}
    for label, (low, high) in {"5-95 %": (5, 95), "25-75 %": (25, 75)}.items():
        expected = {(e, round(0.3 * e + quantiles[q], 6)) for e in range(5) for q in (low, high)}
        assert expected <= bands[label], label  # each epoch's lower and upper quantile bound the band
    assert axis.get_title() == "a run" and axis.get_xlabel() == "epoch"
    pyplot.close(figure)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)  # figsize (6, 4) inches at matplotlib's default 100 dpi


def test_reward_curve_without_quantiles_plots_the_mean_alone(tmp_path, monkeypatch):
    from matplotlib import pyplot

    history = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05} for e in range(3)]
    figure = plotted_figure(monkeypatch, history, tmp_path / "curve.png")
    (axis,) = figure.axes
    assert [line.get_label() for line in axis.get_lines()] == ["mean"] and not axis.collections
    np.testing.assert_allclose(axis.get_lines()[0].get_ydata(), [0.0, 0.1, 0.2])
    pyplot.close(figure)
