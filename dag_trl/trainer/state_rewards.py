"""The rewards of intermediate states, for objectives that declare ``uses_state_rewards`` (DAG's forward-looking
flow): the reward of the decoded one-step prediction ``x0_hat`` of a state, computed once per optimiser window and
shared by the two transitions that need it (as the state left and as the state reached)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..objectives import Trajectories
    from .trainer import GFlowNetDiffusionTrainer

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
    """

    def __init__(self, trainer: GFlowNetDiffusionTrainer, window: Trajectories, epoch: int):
        self.trainer = trainer
        self.window = window
        self.epoch = epoch
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
        trainer = self.trainer
        predictions = {}
        for start in range(0, len(states), trainer.config.train_batch_size):
            part = states[start : start + trainer.config.train_batch_size]
            rows, steps = state_indices(self.window, part)
            with torch.no_grad(), trainer.autocast():
                _, conditional = trainer.sd_pipeline.predict_noise(
                    self.window.latents[rows, steps],
                    self.window.timesteps[rows, steps],
                    self.window.prompt_embeds[rows],
                    None,
                    1.0,
                    unet=trainer.unet,
                )
            predictions.update(zip(part, conditional, strict=True))
        self._add_from_predictions(states, predictions)

    def _add_from_predictions(self, states: list[State], predictions: dict) -> None:
        """Decode and score ``states`` from given conditional outputs, ``config.decode_batch_size`` at a time."""
        chunk = self.trainer.config.decode_batch_size
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
        """Decode ``x0_hat`` of each state and score it with the reward function (no gradient)."""
        trainer = self.trainer
        with torch.no_grad():
            original = trainer.sd_pipeline.predict_original_sample(conditional_outputs, timesteps, latents)
            with trainer.autocast():
                images = trainer.sd_pipeline.decode(original)
            trainer.counters.vae_decodes += len(rows)
            rewards, _ = trainer.compute_rewards(
                images,
                [self.window.prompts[i] for i in rows],
                [self.window.metadata[i] for i in rows],
                self.epoch,
            )
        return rewards
