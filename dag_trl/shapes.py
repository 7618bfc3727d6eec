"""A small, real text-to-image model of coloured shapes, built offline on CPU, and the tools to measure it.

The project's main job must show DAG working end to end on a machine without a GPU or Hub access, so this module
builds its own latent diffusion model (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models") on synthetic data and saves it as a diffusers ``StableDiffusionPipeline``:

* **Data.** 32x32 RGB images of one shape (circle, square or triangle) in one of seven colours on a background of a
  different colour, at a random size and position, with prompts such as ``"a red circle on a blue background"``.
  Training also uses *partial* prompts that leave attributes out (``"a circle"``, ``"a red shape"``,
  ``"a square on a white background"``) and the empty prompt (for classifier-free guidance), so an under-specified
  prompt samples a spread of the attributes it leaves out: ``"a circle"`` gives circles of every colour, which a
  reward such as :func:`colour_preference_reward` can then reshape.
* **Model.** A ``AutoencoderKL`` (32x32x3 images to 8x8x4 latents), a word-level ``CLIPTokenizer`` and a two-layer
  ``CLIPTextModel``, and a ``UNet2DConditionModel`` trained jointly with the text encoder on the standard
  epsilon-prediction objective (``DDPMScheduler`` with Stable Diffusion's ``scaled_linear`` betas); saved with a
  ``DDIMScheduler`` configured like Stable Diffusion 1.x. :func:`build_shapes_model` is seeded and takes a few
  minutes on two CPU cores; :func:`get_shapes_model` caches the result (verified by checksums) and rebuilds it when
  it is missing or corrupt.
* **Measurement.** :func:`analyse_images` segments each image (pixels far from the colour of the image border are
  the shape) and names the shape's colour, the background's colour (nearest palette colour of the median pixel) and
  the shape's kind (the circle, square or triangle template, inscribed in the shape's bounding box, with the highest
  IoU). :func:`prompt_adherence`, :func:`colour_distribution`, :func:`colour_preference_reward` and
  :class:`ShapePrompts` build on it.

Command line: ``python -m dag_trl.shapes build --output DIR [--seed 0]`` builds into ``DIR``;
``python -m dag_trl.shapes get`` prints the cached model's folder, building it first when needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
LATENT_SIZE = 8
LATENT_CHANNELS = 4
TEXT_HIDDEN_SIZE = 64
MAX_PROMPT_TOKENS = 16

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

# The default colour preference: two equally preferred colours, so that a GFlowNet (which samples in proportion to
# the reward) keeps both instead of collapsing onto one, as reward maximisation would.
DEFAULT_COLOUR_PREFERENCE: dict[str, float] = {"red": 1.0, "yellow": 1.0}

PROMPT_SETS: tuple[str, ...] = ("shape", "shape_on_background", "full")

_PALETTE = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float64) / 255.0
# Pixels further than this (Euclidean RGB distance, 0-1 scale) from the background colour belong to the shape.
SEGMENT_THRESHOLD = 0.3
# Fewer shape pixels than this means no shape was drawn (the smallest rendered shape has about 100).
MIN_SHAPE_PIXELS = 12
# Temperature of the soft nearest-palette assignment of the reward, in squared RGB distance: small enough that a
# palette colour gets (almost) exactly its weight, large enough that the reward varies smoothly between colours.
REWARD_TEMPERATURE = 0.02

# Bump when the data, architecture or training code changes, so that cached builds made by older code are rebuilt.
BUILD_FORMAT_VERSION = 1
MARKER_FILE = "dag_trl_shapes.json"
# The default build, shipped in the package so that the main job and the tests need not spend minutes building it.
PACKAGED_SEED = 0
PACKAGED_MODEL = Path(__file__).resolve().parent / "assets" / f"shapes-seed{PACKAGED_SEED}"
CACHE_ENV_VAR = "DAG_TRL_CACHE"

ImagesLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and data
# ----------------------------------------------------------------------------------------------------------------------


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


def _draw_colours(rng: np.random.Generator) -> tuple[str, str]:
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
        colour, background = _draw_colours(rng)
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


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
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
    inside = _shape_mask(spec.shape, x, y, spec.cx, spec.cy, spec.r, spec.r)
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


class ShapePrompts:
    """A seeded prompt function with DDPO's contract: each call returns ``(prompt, metadata)``.

    ``metadata`` holds the attributes the prompt specifies (see :func:`parse_prompt`). Prompt sets:

    * ``"shape"``: ``"a circle"``, ``"a square"`` or ``"a triangle"``; colours and backgrounds are left to the model,
      which is where a colour reward has something to reshape.
    * ``"shape_on_background"``: e.g. ``"a circle on a blue background"``; the shape's colour is left open.
    * ``"full"``: e.g. ``"a red circle on a blue background"``, every attribute fixed (for adherence checks).

    ``reseed(seed)`` restarts the draws, as for every prompt set in :mod:`dag_trl.prompts`: the trainer reseeds per
    process and epoch, so that processes draw different prompts and a resumed run draws the uninterrupted one's.
    """

    name = "shapes"

    def __init__(self, prompt_set: str = "shape", seed: int = 0) -> None:
        if prompt_set not in PROMPT_SETS:
            raise ValueError(f"unknown prompt_set {prompt_set!r}; expected one of {PROMPT_SETS}.")
        self.prompt_set = prompt_set
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed``."""
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[str, dict[str, str]]:
        shape = SHAPES[int(self.rng.integers(len(SHAPES)))]
        if self.prompt_set == "shape":
            prompt = make_prompt(shape)
        else:
            colour, background = _draw_colours(self.rng)
            prompt = make_prompt(shape, colour if self.prompt_set == "full" else None, background)
        return prompt, parse_prompt(prompt)


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


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
    distances = np.linalg.norm(_PALETTE.numpy() - rgb, axis=1)
    return COLOUR_NAMES[int(np.argmin(distances))]


def _classify_shape(mask: np.ndarray) -> str:
    """The shape whose template, inscribed in ``mask``'s bounding box, overlaps ``mask`` best (IoU)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    y, x = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2

    def iou(shape: str) -> float:
        template = _shape_mask(shape, x, y, cx, cy, rx, ry)
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
    for analysis, prompt in zip(analyses, prompts):
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


def make_colour_preference_reward(
    weights: Mapping[str, float] | None = None,
) -> Callable[[torch.Tensor, Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A reward on the shape's colour, with DDPO's contract ``reward_fn(images, prompts, metadata) -> (rewards, info)``.

    ``weights`` maps palette colours to rewards (colours left out get 0; default ``DEFAULT_COLOUR_PREFERENCE``: red
    and yellow 1). An image's reward is ``sum_c weight_c * softmax_c(-|m - palette_c|^2 / REWARD_TEMPERATURE)``
    where ``m`` is the median colour of its shape pixels: a palette colour gets its weight, colours in between a
    blend; an image without a shape gets 0. ``images`` are float tensors ``(B, 3, H, W)`` in [0, 1]; ``rewards`` is
    float32 ``(B,)`` on their device and ``info["colour_index"]`` the nearest palette index per image (-1: none).
    """
    weights = DEFAULT_COLOUR_PREFERENCE if weights is None else weights
    unknown = set(weights) - set(COLOUR_NAMES)
    if unknown:
        raise ValueError(f"unknown colours {sorted(unknown)} in weights; expected among {COLOUR_NAMES}.")
    weight_vector = torch.tensor([float(weights.get(name, 0.0)) for name in COLOUR_NAMES], dtype=torch.float64)

    def colour_preference_reward(
        images: torch.Tensor, prompts: Any = None, metadata: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        analyses = analyse_images(images)
        rewards = torch.zeros(len(analyses), dtype=torch.float64)
        colour_index = torch.full((len(analyses),), -1, dtype=torch.long)
        for i, analysis in enumerate(analyses):
            if analysis.shape_rgb is None:
                continue
            squared_distances = (_PALETTE - torch.tensor(analysis.shape_rgb, dtype=torch.float64)).pow(2).sum(dim=1)
            rewards[i] = (torch.softmax(-squared_distances / REWARD_TEMPERATURE, dim=0) * weight_vector).sum()
            colour_index[i] = COLOUR_NAMES.index(analysis.colour)
        return rewards.float().to(images.device), {"colour_index": colour_index.to(images.device)}

    return colour_preference_reward


colour_preference_reward = make_colour_preference_reward()
colour_preference_reward.__doc__ = "The colour preference reward with ``DEFAULT_COLOUR_PREFERENCE`` (red, yellow: 1)."


# ----------------------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapesBuildConfig:
    """Training budget of :func:`build_shapes_model`; the defaults take about 7 minutes on two idle CPU cores.

    Smaller values (e.g. a few steps) give a quick, useless model with the same files, for tests of the plumbing.
    """

    dataset_size: int = 8192
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    # Small: the latents only need to be smooth enough for diffusion, not a prior-matched code.
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    # Fraction of training prompts that are empty (what classifier-free guidance's unconditional branch sees) and
    # fully specified; the rest name a random strict subset of the attributes.
    empty_prompt_probability: float = 0.1
    full_prompt_probability: float = 0.5
    # Adherence measured at the end of the build: every fully specified prompt, once, with DDIM and guidance.
    eval_inference_steps: int = 20
    eval_guidance_scale: float = 5.0


def config_hash(seed: int, config: ShapesBuildConfig) -> str:
    """Hex digest identifying a build: the format version, the seed and every field of ``config``."""
    payload = json.dumps(
        {"format_version": BUILD_FORMAT_VERSION, "seed": seed, **dataclasses.asdict(config)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_tokenizer_files(path: Path) -> Path:
    """Write a word-level CLIP BPE vocabulary for the shapes prompts into ``path`` (``vocab.json``, ``merges.txt``).

    Each prompt word is one token (its merges spell it out), so the text encoder needs no capacity to read words
    from characters; single characters stay in the vocabulary so that any other lowercase text still tokenizes.
    """
    path.mkdir(parents=True, exist_ok=True)
    symbols = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(symbols) + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in ("a", "an", "on", "shape", "background", *SHAPES, *COLOUR_NAMES):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            parts = [parts[0] + parts[1]] + parts[2:]
            if merge not in merges:
                merges.append(merge)
            if parts[0] not in tokens:
                tokens.append(parts[0])
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    return path


def _make_models(vocab_size: int) -> tuple[Any, Any, Any]:
    """Freshly initialised ``(vae, text_encoder, unet)`` (initialisation draws from torch's global generator)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Three blocks: two 2x downsamplings, 32x32 pixels to 8x8 latents; no attention, which shapes do not need.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=2 * TEXT_HIDDEN_SIZE,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return vae, text_encoder, unet


# Stable Diffusion 1.x's noise schedule, shared by training (DDPM) and the saved sampler (DDIM).
_SD_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of ``steps``, then cosine decay to 10%: short runs need the high rate early."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_vae(
    vae: Any, pixels: torch.Tensor, config: ShapesBuildConfig, generator: torch.Generator, progress: bool
) -> None:
    """Fit ``vae`` to ``pixels`` (``(N, 3, H, W)`` in [-1, 1]): reconstruction MSE of posterior samples plus KL."""
    # Start the posterior almost deterministic (std about 0.05 instead of 1): with unit noise on latents of unit
    # scale, reconstructions stay blurry for far longer than the build can afford; the KL term still trains it.
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] -= 6.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, config.vae_steps)
    bar = tqdm(range(config.vae_steps), desc="shapes model: VAE", disable=not progress)
    for _ in bar:
        batch = pixels[torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        # Decoding posterior samples, not means, makes the decoder tolerate the small latent errors of diffusion.
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()


def _prompt_token_table(dataset: ShapesDataset, tokenizer: Any) -> torch.Tensor:
    """Token ids ``(N, 9, L)``: for image ``i``, entry ``k < 8`` names the attributes in bitmask ``k`` (1: shape,
    2: colour, 4: background; 7 is the full prompt) and entry 8 is the empty prompt."""
    variants = [
        [dataset.prompt(i, *(bool(k & bit) for bit in (1, 2, 4))) for k in range(8)] + [""]
        for i in range(len(dataset))
    ]
    # Tokenize each distinct prompt once (there are a few hundred), then index.
    distinct = sorted({prompt for row in variants for prompt in row})
    ids = tokenizer(distinct, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt")
    position = {prompt: j for j, prompt in enumerate(distinct)}
    return ids.input_ids[torch.tensor([[position[prompt] for prompt in row] for row in variants])]


def _train_unet(
    unet: Any,
    text_encoder: Any,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    config: ShapesBuildConfig,
    generator: torch.Generator,
    progress: bool,
) -> None:
    """Train ``unet`` and ``text_encoder`` jointly on the epsilon-prediction objective (Ho et al. 2020)."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**_SD_NOISE_SCHEDULE)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_learning_rate, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, config.unet_steps)
    # Prompt variant per sample: 8 = empty, 7 = full, otherwise a strict subset (bitmask 0-6) of the attributes.
    variant_probabilities = torch.tensor(
        [(1.0 - config.empty_prompt_probability - config.full_prompt_probability) / 7] * 7
        + [config.full_prompt_probability, config.empty_prompt_probability]
    )
    bar = tqdm(range(config.unet_steps), desc="shapes model: UNet + text encoder", disable=not progress)
    for _ in bar:
        index = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        variant = torch.multinomial(
            variant_probabilities, config.unet_batch_size, replacement=True, generator=generator
        )
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prompt_embeds = text_encoder(tokens[index, variant])[0]
        loss = F.mse_loss(unet(noisy, timesteps, prompt_embeds).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.eval()
    text_encoder.eval()


def _make_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A ``StableDiffusionPipeline`` of the trained parts, with a DDIM sampler configured like Stable Diffusion 1.x."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        **_SD_NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_images(
    pipeline: Any,
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt with ``pipeline``: a float tensor ``(B, 3, H, W)`` in [0, 1] on the CPU.

    Image ``i`` starts from its own generator seeded with ``seed + i``, so it does not depend on ``batch_size`` and
    the same ``(prompts, seed)`` before and after fine-tuning start from the same noise.
    """
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.device
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device=device).manual_seed(seed + start + j) for j in range(len(chunk))]
        output = pipeline(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


class ShapesModelError(RuntimeError):
    """A shapes model folder is missing, incomplete, corrupt or from a different build configuration."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shapes_model(
    path: str | os.PathLike, seed: int | None = None, config: ShapesBuildConfig | None = None
) -> dict[str, Any]:
    """Check that ``path`` holds a complete, unmodified shapes model and return its build record.

    The record (``MARKER_FILE``, written last by :func:`build_shapes_model`) lists every file with its size and
    SHA-256, so a truncated or missing weight file or ``model_index.json`` is caught here, with a message saying
    what to do, instead of deep inside diffusers. With ``config``, the build must also have used it and ``seed``.
    Raises :class:`ShapesModelError`.
    """
    path = Path(path)
    remedy = (
        f"delete {path} and rebuild it (get_shapes_model(rebuild=True), or "
        f"python -m dag_trl.shapes build --output {path} --overwrite)."
    )
    if not path.is_dir():
        raise ShapesModelError(f"no shapes model at {path}: the folder does not exist.")
    try:
        record = json.loads((path / MARKER_FILE).read_text())
    except FileNotFoundError:
        raise ShapesModelError(
            f"{path} is not a complete shapes model: its build record {MARKER_FILE} is missing (an interrupted "
            f"build, or not a folder written by build_shapes_model); {remedy}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShapesModelError(f"the build record {path / MARKER_FILE} is unreadable ({error}); {remedy}") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "model_index.json" not in files:
        raise ShapesModelError(f"the build record {path / MARKER_FILE} lists no model files; {remedy}")
    if config is not None and record.get("config_hash") != config_hash(0 if seed is None else seed, config):
        raise ShapesModelError(
            f"the shapes model at {path} was built with a different seed, configuration or version of dag_trl; {remedy}"
        )
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise ShapesModelError(f"the shapes model at {path} is incomplete: {name} is missing; {remedy}")
        size = file.stat().st_size
        if size != expected.get("size") or _sha256(file) != expected.get("sha256"):
            raise ShapesModelError(
                f"the shapes model at {path} is corrupt: {name} has {size} bytes and a different checksum than the "
                f"{expected.get('size')} bytes written by the build (truncated or modified); {remedy}"
            )
    return record


def load_shapes_pipeline(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Verify the shapes model at ``path`` (:func:`verify_shapes_model`) and load it as a ``StableDiffusionPipeline``.

    ``kwargs`` go to ``StableDiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype``).
    """
    from diffusers import StableDiffusionPipeline

    verify_shapes_model(path)
    return StableDiffusionPipeline.from_pretrained(path, **kwargs)


def _count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _build_into(path: Path, seed: int, config: ShapesBuildConfig, progress: bool) -> dict[str, Any]:
    """Train the three models, save the pipeline into the empty folder ``path``, measure adherence, and write the
    build record last (its presence marks a finished build). Returns the record."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = ShapesDataset(config.dataset_size, seed)
    # The vocabulary files go where save_pretrained puts the tokenizer: transformers 5 loads tokenizer.json, which
    # save_pretrained adds, and transformers 4's slow CLIPTokenizer reads these two files.
    tokenizer_dir = _write_tokenizer_files(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=MAX_PROMPT_TOKENS)
    vae, text_encoder, unet = _make_models(len(tokenizer))

    pixels = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    _train_vae(vae, pixels, config, generator, progress)
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])
    # Like Stable Diffusion's 0.18215: scale latents to unit variance, which the noise schedule assumes.
    vae.register_to_config(scaling_factor=round(1.0 / float(means.std()), 5))
    latents = means * vae.config.scaling_factor

    _train_unet(unet, text_encoder, latents, _prompt_token_table(dataset, tokenizer), config, generator, progress)
    _make_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(path)

    # Measure the saved files, not the models in memory, so that the number describes what users load.
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    prompts = all_full_prompts()
    images = sample_images(
        pipeline, prompts, seed, config.eval_inference_steps, config.eval_guidance_scale, progress=progress
    )
    files = sorted(p for p in path.rglob("*") if p.is_file())
    record = {
        "format_version": BUILD_FORMAT_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "config_hash": config_hash(seed, config),
        "image_size": IMAGE_SIZE,
        "latent_size": LATENT_SIZE,
        "parameters": {
            "vae": _count_parameters(vae),
            "text_encoder": _count_parameters(text_encoder),
            "unet": _count_parameters(unet),
        },
        "adherence": prompt_adherence(images, prompts),
        "build_seconds": round(time.perf_counter() - start, 1),
        "files": {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (path / MARKER_FILE).write_text(json.dumps(record, indent=2))
    return record


def build_shapes_model(
    output_dir: str | os.PathLike,
    seed: int = 0,
    config: ShapesBuildConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the shapes text-to-image model and save it as a ``StableDiffusionPipeline`` in ``output_dir``.

    Seeded and reproducible (for the same machine, library versions and thread count): data, initialisation and
    training noise all derive from ``seed``; training runs on at most two threads. The folder is built under a
    temporary name next to ``output_dir`` and renamed into place when complete, so an interrupted build never leaves
    a folder that looks finished. An existing non-empty ``output_dir`` is replaced only with ``overwrite``. The build record
    (``MARKER_FILE``) holds the configuration, parameter counts, file checksums and the measured prompt adherence.
    """
    config = ShapesBuildConfig() if config is None else config
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    # mkdtemp makes the folder private (0700); the published model should be readable like any other folder.
    staging.chmod(0o755)
    threads = torch.get_num_threads()
    # These models are too small to gain from more than two threads, which only contend with other work (set
    # OMP_NUM_THREADS=1 on a busy machine: spinning threads then slow the build down several times).
    torch.set_num_threads(min(2, threads))
    try:
        _build_into(staging, seed, config, progress)
        previous = None
        if output_dir.exists():
            previous = output_dir.with_name(f".{output_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            os.rename(output_dir, previous)
        os.rename(staging, output_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def default_cache_dir() -> Path:
    """``$DAG_TRL_CACHE`` if set, else ``~/.cache/dag_trl``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "dag_trl")


def get_shapes_model(
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    seed: int = 0,
    config: ShapesBuildConfig | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the shapes model for ``(seed, config)``, building it first when needed.

    The default build (seed 0, default configuration) ships inside the package (5.5 MB, ``dag_trl/assets``), written
    by exactly this build; it is used when its checksums verify.

    The cache lives in ``cache_dir`` (default :func:`default_cache_dir`) under a name that includes a hash of the
    build configuration. A cached folder that fails :func:`verify_shapes_model` (missing, interrupted, truncated or
    modified files, another configuration) is rebuilt with a warning; ``rebuild=True`` rebuilds unconditionally.
    Raises :class:`ShapesModelError` when the cache folder cannot be written.
    """
    config = ShapesBuildConfig() if config is None else config
    if not rebuild and seed == PACKAGED_SEED and config == ShapesBuildConfig():
        try:
            verify_shapes_model(PACKAGED_MODEL, seed, config)
            return PACKAGED_MODEL
        except ShapesModelError as error:
            logger.warning("The shapes model shipped with dag_trl is unusable (%s) Using the cache instead.", error)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"shapes-seed{seed}-{config_hash(seed, config)[:12]}"
    if not rebuild:
        try:
            verify_shapes_model(target, seed, config)
            return target
        except ShapesModelError as error:
            if target.exists():
                logger.warning("%s Rebuilding it.", error)
    logger.info("Building the shapes model into %s (about 7 minutes on 2 idle CPU cores).", target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return build_shapes_model(target, seed, config, progress=progress, overwrite=True)
    except PermissionError as error:
        raise ShapesModelError(
            f"cannot write the shapes model cache in {root} ({error}); set ${CACHE_ENV_VAR} or pass cache_dir."
        ) from None


def _format_adherence(adherence: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{attribute} {adherence[attribute]:.1%} of {adherence[f'n_{attribute}']}"
        for attribute in ("colour", "background", "shape")
        if adherence.get(attribute) is not None
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``build --output DIR [--seed S] [--overwrite]`` or ``get [--cache-dir DIR] [--rebuild]``."""
    parser = argparse.ArgumentParser(prog="python -m dag_trl.shapes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the shapes model into a folder")
    build.add_argument("--output", required=True, type=Path, help="folder to write the pipeline into")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    get = commands.add_parser("get", help="print the cached model's folder, building it first if needed")
    get.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV_VAR} or ~/.cache/dag_trl")
    get.add_argument("--seed", type=int, default=0)
    get.add_argument("--rebuild", action="store_true", help="rebuild even if a valid cached model exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "build":
            path = build_shapes_model(args.output, seed=args.seed, overwrite=args.overwrite)
        else:
            path = get_shapes_model(args.cache_dir, rebuild=args.rebuild, seed=args.seed)
        record = verify_shapes_model(path)
    except (ShapesModelError, FileExistsError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"shapes model: {path}")
    print(f"built in {record['build_seconds']:.0f} s; parameters: {record['parameters']}")
    print(f"prompt adherence on all {len(all_full_prompts())} full prompts: {_format_adherence(record['adherence'])}")


if __name__ == "__main__":
    main()
