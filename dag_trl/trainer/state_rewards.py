"""The rewards of intermediate states, for objectives that declare ``uses_state_rewards`` (DAG's forward-looking
flow): the reward of the decoded one-step prediction ``x0_hat`` of a state, computed once per optimiser window and
shared by the two transitions that need it (as the state left and as the state reached)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.pipeline import PromptEmbeddings
    from ..objectives import Trajectories

State = tuple[int, int]  # (trajectory row in the window, state index); index num_steps is the final sample


def state_indices(window: Trajectories, states: list[State]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(trajectory rows, state indices)`` tensors of ``(trajectory, state)`` pairs, on the window's device."""
    device = window.latents.device
    rows = torch.tensor([i for i, _ in states], device=device)
    steps = torch.tensor([k for _, k in states], device=device)
    return rows, steps


class StateRewardCache:
    """Rewards of a window's states, keyed by ``(trajectory, state)``, filled in three ways:

    - right after sampling (weights unchanged), from the conditional model outputs recorded while sampling;
    - from the conditional half of the forward that a transition's loss runs anyway (:meth:`add_from_outputs`),
      since the window visits each trajectory's kept transitions from the last to the first;
    - for states the window reaches but never leaves, from one no-grad conditional forward each.

    Args:
        window: the window's trajectories.
        conditional_output: ``(latents, timesteps, prompt_embeds) -> outputs``, the conditional model outputs
            under the current weights, without gradient.
        predict_x0: ``(conditional_outputs, timesteps, latents) -> x0_hat``, the family's one-step prediction.
        score: ``(x0_hat, prompts, metadata) -> rewards``, decoding and scoring predicted samples.
        batch_size: how many states one ``conditional_output`` call takes.
        decode_batch_size: how many states one ``score`` call takes.
    """

    def __init__(
        self,
        window: Trajectories,
        conditional_output: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor],
        predict_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        score: Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor],
        batch_size: int,
        decode_batch_size: int,
    ):
        self.window = window
        self.conditional_output = conditional_output
        self.predict_x0 = predict_x0
        self.score = score
        self.batch_size = batch_size
        self.decode_batch_size = decode_batch_size
        self.rewards: dict[State, torch.Tensor] = {}

    def __contains__(self, state: State) -> bool:
        return state in self.rewards

    def __getitem__(self, state: State) -> torch.Tensor:
        return self.rewards[state]

    def prefill(self, kept: torch.Tensor, weights_unchanged: bool) -> None:
        """Fill in what the window's first pass cannot: every needed state if the recorded outputs are current,
        else the states reached but never left. ``kept`` holds each trajectory's trained transitions."""
        num_steps = self.window.num_steps
        kept_set = {(i, k) for i in range(kept.shape[0]) for k in kept[i].tolist()}
        needed = sorted(kept_set | {(i, k + 1) for i, k in kept_set if k + 1 < num_steps})
        if weights_unchanged:
            recorded = {state: self.window.conditional_model_outputs[state] for state in needed}
            self._add_from_predictions(needed, recorded)
        else:
            self._add_fresh([state for state in needed if state not in kept_set])

    def add_missing(self, states: list[State]) -> None:
        """Score those of ``states`` not yet known, with one no-grad conditional forward each."""
        missing = [state for state in states if state not in self.rewards]
        if missing:
            self._add_fresh(missing)

    def add_from_outputs(
        self,
        states: list[State],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditional_outputs: torch.Tensor,
    ) -> None:
        """Score the states of ``states`` not yet known, from the conditional outputs of the current weights."""
        missing = [index for index, state in enumerate(states) if state not in self.rewards]
        if not missing:
            return
        values = self._score(
            [states[i][0] for i in missing],
            latents[missing],
            timesteps[missing],
            conditional_outputs.detach()[missing],
        )
        self.rewards.update(zip([states[i] for i in missing], values, strict=True))

    def _add_fresh(self, states: list[State]) -> None:
        predictions = {}
        for start in range(0, len(states), self.batch_size):
            part = states[start : start + self.batch_size]
            rows, steps = state_indices(self.window, part)
            conditional = self.conditional_output(
                self.window.latents[rows, steps], self.window.timesteps[rows, steps], self.window.prompt_embeds[rows]
            )
            predictions.update(zip(part, conditional, strict=True))
        self._add_from_predictions(states, predictions)

    def _add_from_predictions(self, states: list[State], predictions: dict) -> None:
        """Decode and score ``states`` from given conditional outputs, ``config.decode_batch_size`` at a time."""
        chunk = self.decode_batch_size
        for start in range(0, len(states), chunk):
            part = states[start : start + chunk]
            rows, steps = state_indices(self.window, part)
            latents = self.window.latents[rows, steps]
            timesteps = self.window.timesteps[rows, steps]
            outputs = torch.stack([predictions[state] for state in part])
            self.rewards.update(zip(part, self._score(rows.tolist(), latents, timesteps, outputs), strict=True))

    def _score(
        self, rows: list[int], latents: torch.Tensor, timesteps: torch.Tensor, conditional_outputs: torch.Tensor
    ) -> torch.Tensor:
        """Score the one-step prediction ``x0_hat`` of each state (no gradient)."""
        with torch.no_grad():
            original = self.predict_x0(conditional_outputs, timesteps, latents)
            return self.score(
                original, [self.window.prompts[i] for i in rows], [self.window.metadata[i] for i in rows]
            )
