"""Atomic, resumable checkpoints through accelerate's ``save_state`` / ``load_state``.

A checkpoint folder ``<logdir>/checkpoints/checkpoint_<epoch>`` holds accelerate's state (optimiser, RNG, or
DeepSpeed's engine files), the denoiser's trained weights in the model family's format (the pipeline writes them),
the objective's own model (``flow/`` for DAG) and ``trainer_state.json``. It is written to ``<name>.tmp`` and renamed
when complete, so an interrupted save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import TYPE_CHECKING

from ..config import GFlowNetConfig
from .objectives import get_objective_class

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..models.pipeline import GFlowNetStableDiffusionPipeline
    from .objectives import Objective

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_dir(config: GFlowNetConfig) -> str:
    """The folder holding a run's checkpoints: ``<logdir>/checkpoints``."""
    return os.path.join(config.logdir, "checkpoints")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder`` as ``(epoch, path)``, oldest first; ``.tmp`` folders of interrupted saves
    are ignored."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith("checkpoint_") and name[len("checkpoint_") :].isdigit():
            if os.path.exists(os.path.join(path, TRAINER_STATE_NAME)):
                found.append((int(name[len("checkpoint_") :]), path))
    return sorted(found)


def resolve_resume_from(config: GFlowNetConfig) -> str:
    """The checkpoint folder ``config.resume_from`` names (``"latest"``: the newest under ``<logdir>/checkpoints``),
    checked to be one this library wrote. Cheap: call it before loading any model."""
    resume_from = os.path.normpath(os.path.expanduser(config.resume_from))
    if config.resume_from == "latest":
        checkpoints = list_checkpoints(checkpoint_dir(config))
        if not checkpoints:
            raise ValueError(
                f"GFlowNetConfig.resume_from='latest' found no checkpoint under {checkpoint_dir(config)!r}."
            )
        resume_from = checkpoints[-1][1]
    if not os.path.isdir(resume_from):
        raise ValueError(f"GFlowNetConfig.resume_from={config.resume_from!r}: no such folder.")
    model_folder = get_objective_class(config.objective_name).model_folder
    required = [TRAINER_STATE_NAME] + ([model_folder] if model_folder else [])
    missing = [name for name in required if not os.path.exists(os.path.join(resume_from, name))]
    if missing:
        raise ValueError(
            f"GFlowNetConfig.resume_from={config.resume_from!r} is not a complete dag_trl checkpoint: "
            f"missing {missing} (expected a folder written by GFlowNetDiffusionTrainer, e.g. "
            f"{os.path.join(checkpoint_dir(config), 'checkpoint_0')!r})."
        )
    return resume_from


class CheckpointingMixin:
    """Saving and restoring the training state; mixed into :class:`GFlowNetDiffusionTrainer`, whose attributes
    (``accelerator``, ``sd_pipeline``, ``objective``, ``objective_model``, the counters of progress) it uses."""

    config: GFlowNetConfig
    accelerator: Accelerator
    sd_pipeline: GFlowNetStableDiffusionPipeline
    objective: Objective
    uses_deepspeed: bool

    @property
    def checkpoint_dir(self) -> str:
        return checkpoint_dir(self.config)

    def _check_resumable(self, path: str) -> None:
        """Refuse, before any training, a checkpoint this run cannot load: written with or without DeepSpeed, by
        another number of processes, for a LoRA where this run trains the whole UNet (or the reverse), or with
        another objective."""
        with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
            state = json.load(handle)
        this_run = {
            "deepspeed": self.uses_deepspeed,
            "num_processes": self.accelerator.num_processes,
            "use_lora": self.sd_pipeline.use_lora,
            "objective": self.objective.name,
        }
        for key, value in this_run.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"GFlowNetConfig.resume_from={self.config.resume_from!r} was written with {key}={state[key]!r}, "
                    f"but this run has {key}={value!r}: resume with the launch settings and pipeline of that run."
                )
        # accelerate's files: the optimiser state, or DeepSpeed's engine folder.
        needed = "pytorch_model" if self.uses_deepspeed else "optimizer.bin"
        if not os.path.exists(os.path.join(path, needed)):
            raise ValueError(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r} has no {needed!r}: it is not a complete "
                f"checkpoint of a {'DeepSpeed' if self.uses_deepspeed else 'non-DeepSpeed'} run."
            )

    def _objective_model_index(self, models: list) -> int:
        unwrapped = self.accelerator.unwrap_model
        return next(i for i, m in enumerate(models) if unwrapped(m) is self.unwrapped_objective_model)

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # accelerate calls this hook on every process but saves model weights from the main one only; do the same,
        # or processes sharing a filesystem write the same files at once.
        if not self.accelerator.is_main_process:
            return
        if self.uses_deepspeed:
            # The engine's own checkpoint holds every trained network and the optimiser; the files written here are
            # the portable ones (diffusers LoRA, flow network) that `resume_from` checks for and other tools load.
            self._save_trained_weights(output_dir)
            return
        # accelerate passes its own model list here: leave it intact and drop the entries we save from `weights`.
        others = list(range(len(models)))
        if self.unwrapped_objective_model is not None:
            index = self._objective_model_index(models)
            self.unwrapped_objective_model.save_pretrained(os.path.join(output_dir, self.objective.model_folder))
            weights.pop(index)
            others.remove(index)
        self.sd_pipeline.save_checkpoint(
            [self.accelerator.unwrap_model(models[i]) for i in others], weights, output_dir
        )

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        if self.uses_deepspeed:
            return  # the engine's load_checkpoint has restored every network and the optimiser
        if self.unwrapped_objective_model is not None:
            models.pop(self._objective_model_index(models))
            loaded = self.objective.load_model(os.path.join(input_dir, self.objective.model_folder))
            self.unwrapped_objective_model.load_state_dict(loaded.state_dict())
        remaining = [self.accelerator.unwrap_model(m) for m in models]
        self.sd_pipeline.load_checkpoint(remaining, input_dir)
        # Whatever the pipeline loaded is gone from `remaining`; accelerate must not look for its weights file.
        models[:] = [m for m in models if self.accelerator.unwrap_model(m) in remaining]

    def save_checkpoint(self, epoch: int) -> str:
        """Write the training state after ``epoch`` atomically (temporary folder, then rename) and prune old ones."""
        final = os.path.join(self.checkpoint_dir, f"checkpoint_{epoch}")
        temporary = final + ".tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(temporary, **self._deepspeed_checkpoint_kwargs(saving=True))
        # Every process writes into the folder (its RNG state, its DeepSpeed optimiser shard): rename it after all.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {
                "epoch": epoch,
                "global_step": self.global_step,
                "weights_version": self.weights_version,
                "reward_history": self.reward_history,
                "objective_state": self.objective.state_dict(),
                # What a resumed run must match (_check_resumable).
                "deepspeed": self.uses_deepspeed,
                "num_processes": self.accelerator.num_processes,
                "use_lora": self.sd_pipeline.use_lora,
                "objective": self.objective.name,
            }
            with open(os.path.join(temporary, TRAINER_STATE_NAME), "w") as handle:
                json.dump(state, handle)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            for _, old in list_checkpoints(self.checkpoint_dir)[: -self.config.num_checkpoint_limit]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _deepspeed_checkpoint_kwargs(self, saving: bool) -> dict[str, bool]:
        """DeepSpeed's checkpoint of a LoRA run leaves out the frozen base UNet (it comes from the base model)."""
        if not (self.uses_deepspeed and self.sd_pipeline.use_lora):
            return {}
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}

    def _load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path, **self._deepspeed_checkpoint_kwargs(saving=False))
        with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
            state = json.load(handle)
        self.first_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.weights_version = state["weights_version"]
        self.reward_history = state.get("reward_history", [])
        self.objective.load_state_dict(state.get("objective_state", {}))
        logger.info("Resumed from %s at epoch %d", path, self.first_epoch)
