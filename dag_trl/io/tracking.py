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


def init_trackers(accelerator: Any, config: Any) -> None:
    """Start the trackers of ``config.log_with`` on the main process (none without one): the project
    ``tracker_project_name``, the run config (:func:`tracker_config`) and ``tracker_kwargs`` with the run's name
    (:func:`tracker_init_kwargs`). ``config`` is a :class:`~dag_trl.GFlowNetConfig`."""
    if accelerator.is_main_process and config.log_with is not None:
        accelerator.init_trackers(
            config.tracker_project_name,
            config=tracker_config(config.to_dict()),
            init_kwargs=tracker_init_kwargs(config.tracker_kwargs, config.run_name or config.exp_name),
        )


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


def log_image_grid(
    tracker: Any, tag: str, images: torch.Tensor, prompts: list[str], rewards: Any, global_step: int
) -> None:
    """Log a grid of up to :data:`MAX_GRID_IMAGES` ``images`` with one caption line per tile (prompt and reward) as
    the image ``tag`` (and, for TensorBoard, the text ``<tag>/prompts``) to a wandb, TensorBoard or trackio tracker;
    any other tracker gets nothing."""
    grid = tracker_image_grid(images)
    caption = grid_caption(list(prompts), rewards)
    name = getattr(tracker, "name", None)
    if name == "wandb":
        import wandb

        tracker.log({tag: wandb.Image(grid, caption=caption)}, step=global_step)
    elif name == "tensorboard":
        tracker.writer.add_image(tag, grid, global_step, dataformats="HWC")
        # Markdown needs two trailing spaces for a line break inside one text block.
        tracker.writer.add_text(f"{tag}/prompts", caption.replace("\n", "  \n"), global_step)
    elif name == "trackio":
        import trackio

        tracker.log({tag: trackio.Image(grid, caption=caption)}, step=global_step)
    else:
        logger.debug("No images for tracker %r: only wandb, tensorboard and trackio are supported.", name)


def log_image_samples(prompt_image_data: list, global_step: int, tracker: Optional[Any]) -> None:
    """The default ``image_samples_hook``: log a grid of the epoch's first sampling batch with its prompts and rewards.

    ``prompt_image_data`` is the trainer's ``[[images, prompts, metadata, rewards, reward_info], ...]``; only the
    first batch is drawn. Writes the image ``samples`` (and, for TensorBoard, the text ``samples/prompts``) to the
    wandb, TensorBoard or trackio tracker; any other tracker, or none, gets nothing.
    """
    if tracker is None or not prompt_image_data:
        return
    images, prompts, _, rewards, _ = prompt_image_data[0]
    log_image_grid(tracker, "samples", images, list(prompts), rewards, global_step)


# The package each of accelerate's trackers imports, and the dag_trl extra that installs it (None: no extra).
TRACKER_PACKAGES = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet-ml", None),
    "mlflow": ("mlflow", None),
    "aim": ("aim", None),
    "clearml": ("clearml", None),
    "dvclive": ("dvclive", None),
    "swanlab": ("swanlab", None),
}


def tracker_installed(log_with: str) -> bool:
    """Whether accelerate can start the tracker ``log_with`` here (its own availability check: it drops a tracker
    whose package is missing, logging that at debug level only)."""
    import accelerate.utils

    return bool(getattr(accelerate.utils, f"is_{log_with}_available")())


def tracker_install_command(log_with: str) -> str:
    """The pip command that installs the tracker ``log_with``: dag_trl's extra where there is one."""
    package, extra = TRACKER_PACKAGES[log_with]
    return f"pip install 'dag_trl[{extra}]'" if extra else f"pip install {package}"


def check_tracker_installed(log_with: Optional[str]) -> None:
    """Raise ``ImportError`` naming the package and the pip command when the tracker ``log_with`` cannot start
    (``None`` and ``"all"``, which takes whatever is installed, pass)."""
    if log_with is None or log_with == "all" or tracker_installed(log_with):
        return
    raise ImportError(
        f"GFlowNetConfig.log_with={log_with!r} needs the {TRACKER_PACKAGES[log_with][0]} package, which is not "
        f"installed, so the run would log nothing: `{tracker_install_command(log_with)}`, or choose another tracker "
        "(log_with=None, --log_with none: no tracker)."
    )
