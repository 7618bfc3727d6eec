"""The sampled trajectories that travel from the sampling step through the optimiser windows to the objectives.

The trainer samples an epoch of trajectories into one :class:`Trajectories`, cuts it into windows with
:meth:`Trajectories.take`, and the objectives read its fields (in :meth:`~dag_trl.objectives.Objective.prepare_samples`
and :meth:`~dag_trl.objectives.Objective.prepare_window`) and add their own per-trajectory values to
:attr:`Trajectories.extras`. It lives beside the objectives, which must not import the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..models.pipeline import PromptEmbeddings


def take_rows(value: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of one field: a tensor (indexed on its own device), prompt embeddings or a list."""
    if torch.is_tensor(value):
        return value[rows.to(value.device)]
    if isinstance(value, PromptEmbeddings):
        return value[rows]
    return [value[i] for i in rows.tolist()]


def cat_rows(parts: Sequence[Any]) -> Any:
    """One field of several batches of trajectories, concatenated along the rows."""
    if isinstance(parts[0], list):
        return sum(parts, [])
    if isinstance(parts[0], PromptEmbeddings):
        return PromptEmbeddings.cat(parts)
    return torch.cat(list(parts))


@dataclass
class Trajectories:
    """Trajectories ``x_T -> ... -> x_0`` of ``N`` sampling steps with what training needs, one row per trajectory.

    Attributes:
        prompts: the prompt of each trajectory. metadata: what the prompt function returned with it.
        prompt_embeds: the prompts' text conditioning (float32).
        latents: every visited state, ``(B, N + 1, C, h, w)``: ``latents[:, n]`` is the state that step ``n`` leaves
            (``latents[:, 0]`` is ``x_T``) and ``latents[:, N]`` the final sample.
        timesteps: the timestep of each step, ``(B, N)``.
        log_probs: ``log P_F`` of each step under the sampling weights, ``(B, N)``.
        backward_log_probs: ``log P_B`` of each step under the fixed noising kernel, ``(B, N)``.
        model_outputs: the guided model output of each step, ``(B, N, C, h, w)``.
        conditional_model_outputs: its conditional half (the output itself without guidance).
        rewards: ``R(x_0)`` of each final sample, ``(B,)``.
        prior_log_probs: for objectives with ``uses_prior_log_probs``, ``log P_F`` of each step under the pretrained
            model (the adapter switched off), ``(B, N)``; else ``None``.
        prior_means: for objectives with ``uses_prior_means``, the pretrained model's step mean at each visited
            state, ``(B, N, C, h, w)``; else ``None``.
        prior_kls: with ``prior_means``, the KL from the sampling policy's step to the pretrained model's, in nats,
            ``(B, N)``; else ``None``.
        extras: per-trajectory tensors the objectives add (one row per trajectory, e.g. DDPO's ``"advantages"``,
            RTB's ``"rtb_delta"``); :meth:`take` and :meth:`cat` carry them like the fields above.
    """

    prompts: list[str]
    metadata: list[dict]
    prompt_embeds: PromptEmbeddings
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    backward_log_probs: torch.Tensor
    model_outputs: torch.Tensor
    conditional_model_outputs: torch.Tensor
    rewards: torch.Tensor
    prior_log_probs: Optional[torch.Tensor] = None
    prior_means: Optional[torch.Tensor] = None
    prior_kls: Optional[torch.Tensor] = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = len(self.prompts)
        for name, value in self._row_fields().items():
            if len(value) != rows:
                raise ValueError(
                    f"Trajectories.{name} has {len(value)} rows for {rows} prompts: expected one per prompt."
                )

    def _row_fields(self) -> dict[str, Any]:
        """Every field with one row per trajectory and a value (``extras`` entries as ``extras[name]``)."""
        values = {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name != "extras" and getattr(self, item.name) is not None
        }
        values.update({f"extras[{name!r}]": value for name, value in self.extras.items()})
        return values

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """``N``, the number of sampling steps (transitions) of each trajectory."""
        return self.log_probs.shape[1]

    def take(self, rows: torch.Tensor) -> Trajectories:
        """The trajectories ``rows`` (an integer tensor, in that order), with their ``extras``."""
        values = {
            item.name: None if getattr(self, item.name) is None else take_rows(getattr(self, item.name), rows)
            for item in dataclasses.fields(self)
            if item.name != "extras"
        }
        return Trajectories(**values, extras={name: take_rows(value, rows) for name, value in self.extras.items()})

    @classmethod
    def cat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        """The trajectories of ``parts`` one after the other. The parts must have recorded the same optional fields
        and ``extras``."""
        if not parts:
            raise ValueError("Trajectories.cat needs at least one batch of trajectories, got none.")
        values = {}
        for item in dataclasses.fields(cls):
            if item.name == "extras":
                continue
            present = [getattr(part, item.name) is not None for part in parts]
            if not all(present):
                if any(present):
                    raise ValueError(
                        f"Trajectories.cat: {item.name} is recorded in {sum(present)} of {len(parts)} batches; "
                        "expected all or none."
                    )
                values[item.name] = None
                continue
            values[item.name] = cat_rows([getattr(part, item.name) for part in parts])
        names = set(parts[0].extras)
        for part in parts[1:]:
            if set(part.extras) != names:
                raise ValueError(
                    f"Trajectories.cat: batches have different extras, {sorted(names)} and {sorted(part.extras)}; "
                    "expected the same names in every batch."
                )
        extras = {name: cat_rows([part.extras[name] for part in parts]) for name in parts[0].extras}
        return cls(**values, extras=extras)
