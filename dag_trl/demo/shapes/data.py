"""The shapes model's data: colours and shapes, the prompt grammar, rendering, and the seeded training dataset.

Images are 32x32 RGB: one shape (circle, square or triangle) in one of seven colours on a background of another
colour, at a random size and position, with prompts such as ``"a red circle on a blue background"``; partial
prompts (``"a circle"``, ``"a red shape"``) leave attributes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32

# Well separated in RGB (the closest pair is more than 0.5 apart on a 0-1 scale) so that a blurry or slightly
# off-colour generated shape is still named correctly by its nearest palette colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 60, 220),
    "magenta": (200, 50, 200),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# A shape fills a box of side 2r, r drawn from this range (pixels), centred within this many pixels of the image
# centre. The box keeps at least 3 pixels from the border, so the border pixels are pure background (which the
# segmentation relies on). Modest variation: a model trained for minutes on a CPU learns colours long before it
# learns sharp shapes at arbitrary positions.
SHAPE_RADIUS_RANGE = (7.0, 10.0)
SHAPE_CENTRE_JITTER = 3.0


def make_prompt(shape: str | None = None, colour: str | None = None, background: str | None = None) -> str:
    """The prompt naming the given attributes, e.g. ``"a red circle on a blue background"``, ``"a red shape"``."""
    words = ["a"]
    if colour is not None:
        words.append(colour)
    words.append("shape" if shape is None else shape)
    if background is not None:
        words += ["on", "a", background, "background"]
    return " ".join(words)


_PROMPT_PATTERN = re.compile(
    rf"^an? (?:(?P<colour>{'|'.join(COLOUR_NAMES)}) )?(?P<shape>{'|'.join(SHAPES)}|shape)"
    rf"(?: on an? (?P<background>{'|'.join(COLOUR_NAMES)}) background)?$"
)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a shapes prompt specifies (keys among ``shape``, ``colour``, ``background``).

    Inverse of :func:`make_prompt`, ignoring case, surrounding spaces and a final full stop. Raises ``ValueError`` for
    a prompt that is not of that form, so that adherence is never silently measured on prompts it cannot read.
    """
    match = _PROMPT_PATTERN.match(prompt.strip().rstrip(".").lower())
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a shapes prompt; expected the form 'a [colour] <{'|'.join(SHAPES)}|shape>"
            f" [on a <colour> background]' with colours {', '.join(COLOUR_NAMES)}."
        )
    attributes = {key: value for key, value in match.groupdict().items() if value is not None}
    if attributes.get("shape") == "shape":
        del attributes["shape"]
    return attributes


@dataclass(frozen=True)
class ShapeSpec:
    """One image: which shape, its colour, the background colour, and its box (centre ``cx, cy`` and half-side ``r``)."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    r: float

    @property
    def prompt(self) -> str:
        """The fully specified prompt of this image."""
        return make_prompt(self.shape, self.colour, self.background)


def draw_colours(rng: np.random.Generator) -> tuple[str, str]:
    """A uniformly random ``(colour, background)`` pair of different colours."""
    colour_index = int(rng.integers(len(COLOUR_NAMES)))
    # Drawing from the other colours keeps every (colour, background) pair equally likely.
    background_index = (colour_index + 1 + int(rng.integers(len(COLOUR_NAMES) - 1))) % len(COLOUR_NAMES)
    return COLOUR_NAMES[colour_index], COLOUR_NAMES[background_index]


def sample_specs(n: int, seed: int) -> list[ShapeSpec]:
    """``n`` random image specifications: attributes uniform, background colour different from the shape's."""
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        colour, background = draw_colours(rng)
        r = float(rng.uniform(*SHAPE_RADIUS_RANGE))
        low, high = IMAGE_SIZE / 2 - SHAPE_CENTRE_JITTER, IMAGE_SIZE / 2 + SHAPE_CENTRE_JITTER
        specs.append(
            ShapeSpec(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=colour,
                background=background,
                cx=float(rng.uniform(low, high)),
                cy=float(rng.uniform(low, high)),
                r=r,
            )
        )
    return specs


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Which points ``(x, y)`` lie in ``shape`` inscribed in the box of centre ``(cx, cy)`` and half-sides ``rx, ry``.

    The triangle points up: apex at the middle of the box's top edge, base along its bottom edge.
    """
    dx, dy = (x - cx) / rx, (y - cy) / ry
    if shape == "circle":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    if shape == "triangle":
        return (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")


_SUPERSAMPLE = 4


def render(spec: ShapeSpec) -> np.ndarray:
    """Render ``spec`` as a ``(IMAGE_SIZE, IMAGE_SIZE, 3)`` uint8 image, anti-aliased by 4x4 supersampling."""
    grid = (np.arange(IMAGE_SIZE * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(grid, grid)
    inside = shape_mask(spec.shape, x, y, spec.cx, spec.cy, spec.r, spec.r)
    coverage = inside.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    background = np.array(COLOURS[spec.background], dtype=np.float64)
    return np.round(coverage * colour + (1.0 - coverage) * background).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """A seeded synthetic dataset of coloured shapes: item ``i`` is ``(image, prompt)``.

    ``image`` is a float tensor ``(3, IMAGE_SIZE, IMAGE_SIZE)`` in [0, 1] and ``prompt`` the fully specified prompt;
    ``specs`` holds every image's attributes and :meth:`prompt` gives its partial prompts. All images are rendered
    up front (3 KB each) because training revisits them thousands of times.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.specs = sample_specs(size, seed)
        self.images = np.stack([render(spec) for spec in self.specs])

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 255.0
        return image, self.specs[index].prompt

    def prompt(
        self, index: int, keep_shape: bool = True, keep_colour: bool = True, keep_background: bool = True
    ) -> str:
        """Image ``index``'s prompt naming only the kept attributes (all dropped gives ``"a shape"``)."""
        spec = self.specs[index]
        return make_prompt(
            spec.shape if keep_shape else None,
            spec.colour if keep_colour else None,
            spec.background if keep_background else None,
        )


def all_full_prompts() -> list[str]:
    """Every fully specified prompt (3 shapes x 7 colours x 6 other background colours = 126)."""
    return [
        make_prompt(shape, colour, background)
        for shape in SHAPES
        for colour in COLOUR_NAMES
        for background in COLOUR_NAMES
        if background != colour
    ]
