"""The shapes model's prompt sets, seeded like every prompt set of :mod:`dag_trl.prompts`."""

from __future__ import annotations

import numpy as np

from .data import SHAPES, draw_colours, make_prompt, parse_prompt

PROMPT_SETS: tuple[str, ...] = ("shape", "shape_on_background", "full")


class ShapePrompts:
    """A seeded prompt function with DDPO's contract: each call returns ``(prompt, metadata)``.

    ``metadata`` holds the attributes the prompt specifies (see :func:`parse_prompt`). Prompt sets:

    * ``"shape"``: ``"a circle"``, ``"a square"`` or ``"a triangle"``; colours and backgrounds are left to the model,
      which is where a colour reward has something to reshape.
    * ``"shape_on_background"``: e.g. ``"a circle on a blue background"``; the shape's colour is left open.
    * ``"full"``: e.g. ``"a red circle on a blue background"``, every attribute fixed (for adherence checks).

    ``reseed(seed)`` restarts the draws, as for every prompt set in :mod:`dag_trl.prompts`: the trainer reseeds per
    process and epoch, so that processes draw different prompts and a resumed run draws the uninterrupted one's.
    Registered as the ``shapes`` prompt set: ``get_prompt_fn("shapes", prompt_set="full", seed=0)``.
    """

    name = "shapes"

    def __init__(self, prompt_set: str = "shape", seed: int | None = 0) -> None:
        if prompt_set not in PROMPT_SETS:
            raise ValueError(f"unknown prompt_set {prompt_set!r}; expected one of {PROMPT_SETS}.")
        self.prompt_set = prompt_set
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the draws from ``seed`` (``None``: from fresh entropy, like the other prompt sets)."""
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[str, dict[str, str]]:
        shape = SHAPES[int(self.rng.integers(len(SHAPES)))]
        if self.prompt_set == "shape":
            prompt = make_prompt(shape)
        else:
            colour, background = draw_colours(self.rng)
            prompt = make_prompt(shape, colour if self.prompt_set == "full" else None, background)
        return prompt, parse_prompt(prompt)
