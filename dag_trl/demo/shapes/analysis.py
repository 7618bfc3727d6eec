"""Measuring generated shapes images: what each image shows, and how often it is what its prompt asked for.

:func:`analyse_images` segments each image (pixels far from the colour of the image border are the shape) and names
the shape's colour, the background's colour (nearest palette colour of the median pixel) and the shape's kind (the
circle, square or triangle template, inscribed in the shape's bounding box, with the highest IoU).
:func:`prompt_adherence`, :func:`colour_distribution` and :func:`shape_distribution` summarise it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from .data import COLOUR_NAMES, COLOURS, SHAPES, parse_prompt, shape_mask

# The palette's RGB colours on a 0-1 scale, in the order of COLOUR_NAMES.
PALETTE = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float64) / 255.0
# Pixels further than this (Euclidean RGB distance, 0-1 scale) from the background colour belong to the shape.
SEGMENT_THRESHOLD = 0.3
# Fewer shape pixels than this means no shape was drawn (the smallest rendered shape has about 100).
MIN_SHAPE_PIXELS = 12

# What the measurements accept: a tensor (B, 3, H, W) or an array (B, H, W, 3) in [0, 1], or PIL images.
ImagesLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]


@dataclass(frozen=True)
class ShapeAnalysis:
    """What :func:`analyse_images` sees in one image; ``shape`` and ``colour`` are ``None`` when no shape is found."""

    shape: str | None
    colour: str | None
    background: str
    shape_pixels: int
    # Median RGB (0-1) of the shape pixels, or None; the reward scores this colour.
    shape_rgb: tuple[float, float, float] | None


def _to_hwc_float(images: ImagesLike) -> np.ndarray:
    """Images as a float64 array ``(B, H, W, 3)`` in [0, 1].

    Accepts a tensor ``(B, 3, H, W)`` in [0, 1] (DDPO's reward contract), an array ``(B, H, W, 3)`` in [0, 1] (a
    diffusers pipeline's ``output_type="np"``) or a sequence of PIL images.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape (B, 3, H, W), got {tuple(images.shape)}.")
        return images.detach().cpu().double().permute(0, 2, 3, 1).numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an image array of shape (B, H, W, 3), got {images.shape}.")
        return images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images])


def _nearest_colour(rgb: np.ndarray) -> str:
    distances = np.linalg.norm(PALETTE.numpy() - rgb, axis=1)
    return COLOUR_NAMES[int(np.argmin(distances))]


def _classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, inscribed in ``mask``'s bounding box, overlaps ``mask`` best (IoU)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    y, x = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2

    def iou(shape: str) -> float:
        template = shape_mask(shape, x, y, cx, cy, rx, ry)
        return float((template & mask).sum() / (template | mask).sum())

    return max(SHAPES, key=iou)


def analyse_images(images: ImagesLike) -> list[ShapeAnalysis]:
    """Segment each image into shape and background and name the shape, its colour and the background colour.

    The background colour is the median of the border pixels (shapes keep a margin from the border); shape pixels
    are those further than ``SEGMENT_THRESHOLD`` from it; colours are the nearest palette colours of the medians,
    and the shape is the best-matching template in the shape's bounding box (see :func:`_classify_shape`).
    """
    analyses = []
    for image in _to_hwc_float(images):
        border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
        background_rgb = np.median(border, axis=0)
        mask = np.linalg.norm(image - background_rgb, axis=-1) > SEGMENT_THRESHOLD
        pixels = int(mask.sum())
        background = _nearest_colour(background_rgb)
        if pixels < MIN_SHAPE_PIXELS:
            analyses.append(ShapeAnalysis(None, None, background, pixels, None))
            continue
        shape_rgb = np.median(image[mask], axis=0)
        analyses.append(
            ShapeAnalysis(
                shape=_classify_shape(mask),
                colour=_nearest_colour(shape_rgb),
                background=background,
                shape_pixels=pixels,
                shape_rgb=(float(shape_rgb[0]), float(shape_rgb[1]), float(shape_rgb[2])),
            )
        )
    return analyses


def prompt_adherence(images: ImagesLike, prompts: Sequence[str]) -> dict[str, float | int | None]:
    """How often the images show what their prompts say, per attribute, by :func:`analyse_images`.

    Returns ``colour``, ``background`` and ``shape``: the fraction of the images whose prompt names that attribute
    (``n_colour`` etc. of them) in which it is seen (``None`` when no prompt names it), and ``all``: the fraction of
    all images in which every named attribute is seen. An image without a detectable shape fails ``colour`` and
    ``shape``. Chance level on fully specified prompts is 1/7 for colours and 1/3 for shapes.
    """
    analyses = analyse_images(images)
    if len(analyses) != len(prompts):
        raise ValueError(f"got {len(analyses)} images for {len(prompts)} prompts.")
    hits: dict[str, list[bool]] = {"colour": [], "background": [], "shape": []}
    all_hits = []
    for analysis, prompt in zip(analyses, prompts, strict=True):
        matches = [
            (attribute, getattr(analysis, attribute) == value) for attribute, value in parse_prompt(prompt).items()
        ]
        for attribute, hit in matches:
            hits[attribute].append(hit)
        all_hits.append(all(hit for _, hit in matches))
    result: dict[str, float | int | None] = {}
    for attribute, values in hits.items():
        result[attribute] = float(np.mean(values)) if values else None
        result[f"n_{attribute}"] = len(values)
    result["all"] = float(np.mean(all_hits)) if all_hits else None
    return result


def colour_distribution(images: ImagesLike) -> dict[str, float]:
    """Fraction of the images whose shape has each palette colour, plus ``"none"`` for images without a shape."""
    colours = [analysis.colour or "none" for analysis in analyse_images(images)]
    return {name: colours.count(name) / max(len(colours), 1) for name in (*COLOUR_NAMES, "none")}


def shape_distribution(images: ImagesLike) -> dict[str, float]:
    """Fraction of the images showing each shape, plus ``"none"`` for images without a shape."""
    shapes = [analysis.shape or "none" for analysis in analyse_images(images)]
    return {name: shapes.count(name) / max(len(shapes), 1) for name in (*SHAPES, "none")}
