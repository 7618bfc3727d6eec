"""Tracker helpers: a tracker-safe copy of the config and the default ``image_samples_hook`` (a grid of samples).

The trainer logs through accelerate's trackers; these helpers only adapt what goes in: accelerate's TensorBoard
tracker stores the run config with ``SummaryWriter.add_hparams``, which accepts scalars and strings only, and each
tracker has its own image type.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from .reporting import image_pixels, tile_images

logger = logging.getLogger(__name__)

# A grid of at most this many samples: enough to see what the policy does, small enough to log every epoch.
MAX_GRID_IMAGES = 16
GRID_PADDING = 2


# Trackers whose init takes the run's display name as `name`.
NAMED_RUN_TRACKERS = ("wandb", "trackio")


def tracker_init_kwargs(tracker_kwargs: dict[str, dict], run_name: str) -> dict[str, dict]:
    """``tracker_kwargs`` (accelerate's ``init_kwargs``, per tracker) with the run named ``run_name`` in wandb and
    trackio, unless ``tracker_kwargs`` names it already; the input is not modified."""
    merged = {tracker: dict(kwargs) for tracker, kwargs in tracker_kwargs.items()}
    for tracker in NAMED_RUN_TRACKERS:
        merged.setdefault(tracker, {}).setdefault("name", run_name)
    return merged


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every entry a bool, int, float or str, as all of accelerate's trackers accept.

    Lists and dicts become JSON strings and ``None`` becomes ``"None"``, so that nothing is dropped and the
    TensorBoard tracker's ``add_hparams`` does not reject the config.
    """
    converted = {}
    for name, value in values.items():
        if isinstance(value, (bool, int, float, str)):
            converted[name] = value
        elif value is None:
            converted[name] = "None"
        else:
            converted[name] = json.dumps(value, default=str)
    return converted


def tracker_image_grid(
    images: torch.Tensor, max_images: int = MAX_GRID_IMAGES, padding: int = GRID_PADDING
) -> np.ndarray:
    """Tile up to ``max_images`` float images ``(B, 3, H, W)`` in [0, 1] at their own resolution into a near-square
    uint8 ``(H', W', 3)`` grid with ``padding`` black pixels between and around the tiles (row-major: image ``i`` is
    at row ``i // columns``)."""
    pixels = image_pixels(images[:max_images])
    return tile_images(pixels, columns=math.ceil(math.sqrt(len(pixels))), padding=padding)


def grid_caption(prompts: list[str], rewards: Any, max_images: int = MAX_GRID_IMAGES) -> str:
    """One line per tile of :func:`tracker_image_grid`, in grid order: ``"<index>: <prompt> (reward <value>)"``."""
    values = torch.as_tensor(rewards).detach().float().cpu().reshape(-1).tolist()
    lines = zip(prompts[:max_images], values[:max_images], strict=True)
    return "\n".join(f"{i}: {prompt} (reward {value:.4g})" for i, (prompt, value) in enumerate(lines))


def log_image_samples(prompt_image_data: list, global_step: int, tracker: Optional[Any]) -> None:
    """The default ``image_samples_hook``: log a grid of the epoch's first sampling batch with its prompts and rewards.

    ``prompt_image_data`` is the trainer's ``[[images, prompts, metadata, rewards, reward_info], ...]``; only the
    first batch is drawn. Writes the image ``samples`` (and, for TensorBoard, the text ``samples/prompts``) to the
    wandb, TensorBoard or trackio tracker; any other tracker, or none, gets nothing.
    """
    if tracker is None or not prompt_image_data:
        return
    images, prompts, _, rewards, _ = prompt_image_data[0]
    grid = tracker_image_grid(images)
    caption = grid_caption(list(prompts), rewards)
    name = getattr(tracker, "name", None)
    if name == "wandb":
        import wandb

        tracker.log({"samples": wandb.Image(grid, caption=caption)}, step=global_step)
    elif name == "tensorboard":
        tracker.writer.add_image("samples", grid, global_step, dataformats="HWC")
        # Markdown needs two trailing spaces for a line break inside one text block.
        tracker.writer.add_text("samples/prompts", caption.replace("\n", "  \n"), global_step)
    elif name == "trackio":
        import trackio

        tracker.log({"samples": trackio.Image(grid, caption=caption)}, step=global_step)
    else:
        logger.debug("No sample images for tracker %r: only wandb, tensorboard and trackio are supported.", name)
