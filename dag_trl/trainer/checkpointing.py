"""Atomic, resumable checkpoints through accelerate's ``save_state`` / ``load_state``, and the lock of a run.

A checkpoint folder ``<logdir>/checkpoints/checkpoint_<epoch>`` (``<project_dir>/checkpoints/...`` when
``project_kwargs`` names a ``project_dir``, as TRL's DDPO example does) holds accelerate's state (optimiser, RNG, or
DeepSpeed's engine files), the denoiser's trained weights in the model family's format (the pipeline writes them),
the objective's own model (``flow/`` for DAG) and ``trainer_state.json``. It is written to ``<name>.tmp`` and renamed
when complete, so an interrupted save never leaves a folder that looks complete. ``trainer_state.json`` also lists
every file of the checkpoint with its size and the settings that shape the saved weights, so that a damaged file or a
checkpoint of another configuration is named before anything is loaded.

While a run trains it holds ``run.lock`` in the folder above ``checkpoints/``, an operating-system file lock
(``filelock``) that ends with its process, however that process ends; ``run.lock.owner.json`` beside it names the
process. A second run writing the same folder would prune the first one's checkpoints and resume from them.

:class:`Checkpointer` does all of this for a trainer, which owns one; the functions below are what it, the CLI and
the tests share.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from filelock import FileLock, Timeout

from ..config import GFlowNetConfig
from ..objectives import get_objective_class

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from ..models.pipeline import GFlowNetStableDiffusionPipeline
    from ..objectives import Objective

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
RUN_LOCK_NAME = "run.lock"
# Who holds run.lock, for the message another run gets: the lock file cannot carry it, since every attempt to take the
# lock truncates it.
RUN_OWNER_NAME = "run.lock.owner.json"
# The run locks this process holds, by path: its own lock is no conflict (a trainer built twice in one script, or
# train() taking the lock again after the constructor did).
_HELD_RUN_LOCKS: dict[str, FileLock] = {}
# Settings a resume may change, with a warning (with the learning rates the objective reads): how the run goes on,
# not what it trains towards.
RESUME_WARNED_SETTINGS = ("seed", "train_learning_rate")
# The counters of progress a resume restores; a trainer_state.json without one of them cannot be resumed from.
REQUIRED_STATE_KEYS = ("epoch", "global_step", "weights_version")
# Of those, the ones the trainer implements itself: it always names checkpoints (checkpoint_<epoch>) and prunes them,
# so accelerate must not (its automatic naming ignores the folder each save is given).
CHECKPOINT_NAMING_KWARGS = ("automatic_checkpoint_naming", "total_limit")
# Why a save failed when the disk is full: the OS's errors, and what torch's zip writer raises instead of them.
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")


def accelerate_project_kwargs(config: GFlowNetConfig) -> dict[str, Any]:
    """Arguments of accelerate's ``ProjectConfiguration``: ``project_dir`` defaults to ``logdir`` and the rest of
    ``project_kwargs`` passes through, except checkpoint naming and ``total_limit``, which the trainer applies to its
    own ``checkpoint_<epoch>`` folders (:func:`checkpoint_limit`)."""
    kwargs = {"project_dir": config.logdir, **config.project_kwargs}
    for name in CHECKPOINT_NAMING_KWARGS:
        kwargs.pop(name, None)
    return kwargs


def run_dir(config: GFlowNetConfig) -> str:
    """The folder holding a run's ``checkpoints/`` and ``run.lock``: ``project_kwargs["project_dir"]`` when given
    (TRL's DDPO saves there), else ``logdir``."""
    return os.fspath(config.project_kwargs.get("project_dir") or config.logdir)


def checkpoint_dir(config: GFlowNetConfig) -> str:
    """The folder holding a run's checkpoints: ``<logdir>/checkpoints`` (``<project_dir>/checkpoints``)."""
    return os.path.join(run_dir(config), "checkpoints")


def checkpoint_limit(config: GFlowNetConfig) -> Optional[int]:
    """How many checkpoints are kept: ``project_kwargs["total_limit"]`` when given (DDPO's setting; ``None`` keeps
    all of them, as in accelerate), else ``num_checkpoint_limit``."""
    if "total_limit" in config.project_kwargs:
        return config.project_kwargs["total_limit"]
    return config.num_checkpoint_limit


def tracker_logging_dir(config: GFlowNetConfig) -> str:
    """Where local trackers (TensorBoard) write this project's logs: ``<logging_dir>/<tracker_project_name>``, with
    accelerate's ``logging_dir`` (``project_kwargs``' own, else the project folder)."""
    kwargs = accelerate_project_kwargs(config)
    return os.path.join(os.fspath(kwargs.get("logging_dir") or kwargs["project_dir"]), config.tracker_project_name)


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


def refuse_incomplete_newest(config: GFlowNetConfig, folder: str) -> None:
    """Raise ``ValueError`` when the highest-numbered ``checkpoint_<N>`` folder in ``folder`` has no
    ``trainer_state.json``: saves are atomic, so such a folder was damaged afterwards, and resuming from the one
    before it would silently repeat epochs."""
    numbered = [
        (int(name[len("checkpoint_") :]), os.path.join(folder, name))
        for name in os.listdir(folder)
        if name.startswith("checkpoint_") and name[len("checkpoint_") :].isdigit()
    ]
    if not numbered:
        return
    newest = max(numbered)[1]
    if not os.path.exists(os.path.join(newest, TRAINER_STATE_NAME)):
        complete = list_checkpoints(folder)
        instead = (
            f"resume from the newest complete one, resume_from={complete[-1][1]!r}, or delete {newest!r}"
            if complete
            else "no complete checkpoint is left: start a new run (resume_from='')"
        )
        raise ValueError(
            f"GFlowNetConfig.resume_from={config.resume_from!r}: the newest checkpoint, {newest!r}, has no "
            f"{TRAINER_STATE_NAME} (it was damaged or is not one this library wrote); {instead}."
        )


def saved_objective(path: str) -> Optional[str]:
    """The objective recorded in the checkpoint ``path``'s ``trainer_state.json``, or ``None`` if unreadable."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
            objective = json.load(handle).get("objective")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return objective if isinstance(objective, str) else None


def resolve_resume_from(config: GFlowNetConfig) -> str:
    """The checkpoint folder ``config.resume_from`` names, checked to be one this library wrote, by this run's
    objective: ``"latest"`` is the newest under :func:`checkpoint_dir`, and a folder that holds ``checkpoint_<N>``
    folders (TRL's DDPO convention) its newest one. Cheap: call it before loading any model."""
    resume_from = os.path.normpath(os.path.expanduser(config.resume_from))
    if config.resume_from == "latest":
        if os.path.isdir(checkpoint_dir(config)):
            refuse_incomplete_newest(config, checkpoint_dir(config))
        checkpoints = list_checkpoints(checkpoint_dir(config))
        if not checkpoints:
            raise ValueError(
                f"GFlowNetConfig.resume_from='latest' found no checkpoint under {checkpoint_dir(config)!r}."
            )
        resume_from = checkpoints[-1][1]
    if not os.path.isdir(resume_from):
        raise ValueError(f"GFlowNetConfig.resume_from={config.resume_from!r}: no such folder.")
    if not os.path.exists(os.path.join(resume_from, TRAINER_STATE_NAME)):
        refuse_incomplete_newest(config, resume_from)
        checkpoints = list_checkpoints(resume_from)
        if checkpoints:
            resume_from = checkpoints[-1][1]
    objective = saved_objective(resume_from)
    if objective is not None and objective != config.objective_name:
        raise ValueError(
            f"GFlowNetConfig.resume_from={config.resume_from!r} ({resume_from!r}) is a checkpoint of "
            f"train_objective={objective!r}, but this run trains train_objective={config.objective_name!r}: a "
            f"checkpoint resumes only the objective that wrote it. Set train_objective={objective!r} to continue that "
            "run, or start a new one (resume_from='')."
        )
    model_folder = get_objective_class(config.objective_name).model_folder
    required = [TRAINER_STATE_NAME] + ([model_folder] if model_folder else [])
    missing = [name for name in required if not os.path.exists(os.path.join(resume_from, name))]
    if missing:
        raise ValueError(
            f"GFlowNetConfig.resume_from={config.resume_from!r} is not a complete dag_trl checkpoint: "
            f"missing {missing} (expected a folder written by GFlowNetDiffusionTrainer, e.g. "
            f"{os.path.join(checkpoint_dir(config), 'checkpoint_0')!r}, or a folder of such checkpoints)."
        )
    return resume_from


def previous_checkpoint(path: str) -> Optional[str]:
    """The newest complete checkpoint beside ``path`` with a lower epoch, or ``None``."""
    folder, name = os.path.split(os.path.normpath(path))
    suffix = name[len("checkpoint_") :]
    epoch = int(suffix) if name.startswith("checkpoint_") and suffix.isdigit() else None
    earlier = [other for number, other in list_checkpoints(folder) if epoch is None or number < epoch]
    earlier = [other for other in earlier if os.path.normpath(other) != os.path.normpath(path)]
    return earlier[-1] if earlier else None


def resume_advice(path: str) -> str:
    """What to do when the checkpoint ``path`` cannot be resumed from: the previous one, if any is left."""
    previous = previous_checkpoint(path)
    if previous is None:
        return (
            f"No earlier checkpoint is left in {os.path.dirname(os.path.normpath(path))!r}: restore the file, or "
            "start a new run (resume_from='')."
        )
    return (
        f"Resume from the previous checkpoint instead: resume_from={previous!r} (or delete {path!r}, after which "
        "resume_from='latest' picks that one)."
    )


def read_trainer_state(path: str) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint ``path``, with ``ValueError`` naming the file and what to do when it
    is unreadable or lacks a counter of progress."""
    file = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(file) as handle:
            state = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Checkpoint {path!r} is damaged: {TRAINER_STATE_NAME} cannot be read ({error}). {resume_advice(path)}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"Checkpoint {path!r} is damaged: {TRAINER_STATE_NAME} holds a {type(state).__name__}, not the JSON "
            f"object the trainer writes. {resume_advice(path)}"
        )
    missing = [key for key in REQUIRED_STATE_KEYS if not isinstance(state.get(key), int)]
    if missing:
        raise ValueError(
            f"Checkpoint {path!r} is damaged: {TRAINER_STATE_NAME} has no integer {missing}. {resume_advice(path)}"
        )
    return state


def file_sizes(folder: str) -> dict[str, int]:
    """Every file under ``folder`` with its size in bytes, by '/'-separated relative path."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            file = os.path.join(root, name)
            sizes[os.path.relpath(file, folder).replace(os.sep, "/")] = os.path.getsize(file)
    return sizes


def damaged_files(path: str, state: dict[str, Any]) -> list[str]:
    """The files that ``trainer_state.json`` lists but that are missing from ``path`` or have another size, each as
    ``"name (why)"``. Checkpoints written before the list existed have nothing to compare with."""
    found = file_sizes(path)
    damaged = []
    for name, size in sorted(state.get("files", {}).items()):
        if name not in found:
            damaged.append(f"{name} (missing)")
        elif found[name] != size:
            damaged.append(f"{name} ({found[name]} bytes, saved with {size})")
    return damaged


def is_disk_full(error: BaseException) -> bool:
    """Whether a failed write ran out of disk space or quota: the OS's error, or torch's zip writer's message for
    it (torch reports a short write as ``unexpected pos``)."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in TORCH_WRITE_FAILURES)


def run_lock_path(config: GFlowNetConfig) -> str:
    return os.path.abspath(os.path.join(run_dir(config), RUN_LOCK_NAME))


def run_owner_path(config: GFlowNetConfig) -> str:
    return os.path.join(os.path.dirname(run_lock_path(config)), RUN_OWNER_NAME)


def _read_owner(config: GFlowNetConfig) -> dict[str, Any]:
    """``{"pid", "host"}`` of the run holding the lock, as it recorded itself (``"unknown"`` values while it has not
    yet written them)."""
    try:
        with open(run_owner_path(config)) as handle:
            owner = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        owner = {}
    if not isinstance(owner, dict):
        owner = {}
    return {"pid": owner.get("pid", "unknown"), "host": owner.get("host", "unknown")}


def run_lock_holder(config: GFlowNetConfig) -> Optional[dict[str, Any]]:
    """The other live run (``{"pid", "host"}``) that holds ``config``'s folder, or ``None``: no run does, or this
    process does. Looks without taking the lock (it is taken and given back at once)."""
    path = run_lock_path(config)
    if path in _HELD_RUN_LOCKS or not os.path.isfile(path):
        return None  # a live run keeps its lock file
    probe = FileLock(path)
    try:
        probe.acquire(blocking=False)
    except Timeout:
        return _read_owner(config)
    probe.release(force=True)
    return None


def run_lock_message(config: GFlowNetConfig, holder: dict[str, Any]) -> str:
    return (
        f"Another run (pid {holder['pid']} on {holder.get('host')!r}) is writing to {run_dir(config)!r}: two runs in "
        "one folder prune and resume each other's checkpoints. Wait for it to end (its lock ends with its process), "
        "or use another logdir (project_dir)."
    )


def acquire_run_lock(config: GFlowNetConfig) -> None:
    """Take ``run.lock`` in :func:`run_dir` (unless this process holds it) and record this process's id and host
    beside it; ``RuntimeError`` naming the other run's process if a live run holds it."""
    path = run_lock_path(config)
    if path in _HELD_RUN_LOCKS:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise RuntimeError(run_lock_message(config, _read_owner(config))) from None
    _HELD_RUN_LOCKS[path] = lock
    owner = run_owner_path(config)
    with open(f"{owner}.tmp", "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
    os.replace(f"{owner}.tmp", owner)


def release_run_lock(config: GFlowNetConfig) -> None:
    """Give ``run.lock`` back if this process holds it."""
    lock = _HELD_RUN_LOCKS.pop(run_lock_path(config), None)
    if lock is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(run_owner_path(config))
    lock.release(force=True)


class Checkpointer:
    """A run's checkpoints, owned by the trainer: the folder and its ``run.lock``, the checks of a checkpoint before
    a resume, the hooks that give accelerate's ``save_state`` / ``load_state`` the model family's and the objective
    model's formats, atomic saves with pruning to ``num_checkpoint_limit``, and loads.

    What a checkpoint restores of the training progress (epoch, steps, histories, the objective's state) is the
    trainer's: :meth:`save` writes the ``progress`` it is given into ``trainer_state.json`` and :meth:`load` returns
    that file's contents.

    Args:
        config: the run's config (folders, limits, the settings a resume compares).
        accelerator: the run's accelerator, whose ``save_state`` / ``load_state`` write and read the state.
        pipeline: the model family, which writes and reads the denoiser's trained weights.
        objective: the run's objective (its name, model folder, target settings, model loading).
        uses_deepspeed: whether accelerate runs DeepSpeed (its engine saves every trained network itself).
    """

    def __init__(
        self,
        config: GFlowNetConfig,
        accelerator: Accelerator,
        pipeline: GFlowNetStableDiffusionPipeline,
        objective: Objective,
        uses_deepspeed: bool,
    ):
        self.config = config
        self.accelerator = accelerator
        self.pipeline = pipeline
        self.objective = objective
        self.uses_deepspeed = uses_deepspeed
        self.folder = checkpoint_dir(config)
        self.objective_model: Optional[torch.nn.Module] = None
        self.save_weights: Optional[Callable[[str], None]] = None

    def register_hooks(self, objective_model: Optional[torch.nn.Module], save_weights: Callable[[str], None]) -> None:
        """Have accelerate's ``save_state`` / ``load_state`` write and read the denoiser's trained weights in the
        family's format and ``objective_model`` (unwrapped) under the objective's ``model_folder``.
        ``save_weights(folder)`` writes the portable copies of both that a DeepSpeed checkpoint carries beside the
        engine's files."""
        self.objective_model = objective_model
        self.save_weights = save_weights
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)

    def path(self, epoch: int) -> str:
        """The folder of the checkpoint after ``epoch``: ``<checkpoint_dir>/checkpoint_<epoch>``."""
        return os.path.join(self.folder, f"checkpoint_{epoch}")

    def last_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint of this run's folder, or ``None``."""
        checkpoints = list_checkpoints(self.folder)
        return checkpoints[-1][1] if checkpoints else None

    def _run_settings(self) -> dict[str, Any]:
        """What a resumed run must match (:meth:`check_resumable`): the launch (DeepSpeed, process count), the
        objective, and the pipeline settings that shape the saved weights (``None`` where the family has none)."""
        pipeline = self.pipeline
        base_model = getattr(pipeline, "pretrained_model_name", None)
        if base_model is not None and os.path.isdir(base_model):
            base_model = os.path.realpath(base_model)  # the same local model however its path is spelled
        return {
            "deepspeed": self.uses_deepspeed,
            "num_processes": self.accelerator.num_processes,
            "use_lora": pipeline.use_lora,
            "objective": self.objective.name,
            "pretrained_model_name": base_model,
            "pretrained_model_revision": getattr(pipeline, "pretrained_model_revision", None),
            "lora_rank": getattr(pipeline, "lora_rank", None) if pipeline.use_lora else None,
            "lora_alpha": getattr(pipeline, "lora_alpha", None) if pipeline.use_lora else None,
        }

    def _objective_model_differences(self, path: str, model: Optional[torch.nn.Module]) -> dict[str, tuple]:
        """``{field: (saved, this run)}`` between the objective model's saved ``config.json`` and ``model``'s
        config; fields that a ``GFlowNetConfig`` field sets (``flow_<key>``) are named by it."""
        config = getattr(model, "config", None)
        if config is None:
            return {}
        folder = self.objective.model_folder
        try:
            with open(os.path.join(path, folder, "config.json")) as handle:
                saved = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # the file check names a missing or damaged file
        current = json.loads(json.dumps(dict(config), default=str))
        differences = {}
        for key, value in current.items():
            if key.startswith("_") or key not in saved or saved[key] == value:
                continue
            name = f"{folder}_{key}" if f"{folder}_{key}" in GFlowNetConfig.__dataclass_fields__ else f"{folder}.{key}"
            differences[name] = (saved[key], value)
        return differences

    def check_resumable(self, path: str, objective_model: Optional[torch.nn.Module]) -> None:
        """Refuse, before anything is loaded, a checkpoint this run cannot continue: written with or without
        DeepSpeed, by another number of processes, with another objective, base model, LoRA or objective-model
        shape; with an unreadable ``trainer_state.json``; or with a file missing or of another size than saved."""
        state = read_trainer_state(path)
        differences = {
            key: (state[key], value)
            for key, value in self._run_settings().items()
            if key in state and state[key] is not None and value is not None and state[key] != value
        }
        differences.update(self._objective_model_differences(path, objective_model))
        if differences:
            saved = ", ".join(f"{key}={old!r}" for key, (old, _) in differences.items())
            here = ", ".join(f"{key}={new!r}" for key, (_, new) in differences.items())
            raise ValueError(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r} ({path!r}) was written with {saved}, but "
                f"this run has {here}: resume with the launch settings, config and pipeline of that run."
            )
        self._compare_config(path, state.get("config", {}))
        # accelerate's files: the optimiser state, or DeepSpeed's engine folder.
        needed = "pytorch_model" if self.uses_deepspeed else "optimizer.bin"
        if not os.path.exists(os.path.join(path, needed)):
            raise ValueError(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r} has no {needed!r}: it is not a complete "
                f"checkpoint of a {'DeepSpeed' if self.uses_deepspeed else 'non-DeepSpeed'} run."
            )
        damaged = damaged_files(path, state)
        if damaged:
            raise ValueError(f"Checkpoint {path!r} is damaged: {'; '.join(damaged)}. {resume_advice(path)}")

    def _compared_settings(self) -> tuple[str, ...]:
        """The config fields a checkpoint records for :meth:`_compare_config`: the objective's target settings,
        then the seed and the learning rates it reads."""
        rates = tuple(name for name in self.objective.hyperparameters if name.endswith("learning_rate"))
        return (*self.objective.target_settings, *RESUME_WARNED_SETTINGS, *rates)

    def _compare_config(self, path: str, saved: dict[str, Any]) -> None:
        """Refuse a resume that changes a setting defining the objective's target (``target_settings``: the run
        would continue towards another distribution than its checkpoint was trained for); warn when it changes the
        seed or a learning rate (allowed: the advice after a divergence is to resume at a lower learning rate)."""
        changed = {
            name: (saved[name], getattr(self.config, name))
            for name in self._compared_settings()
            if name in saved and saved[name] != getattr(self.config, name)
        }
        target = {name: values for name, values in changed.items() if name in self.objective.target_settings}
        if target:
            raise ValueError(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r} ({path!r}) was trained with "
                + ", ".join(f"{name}={old!r}" for name, (old, _) in target.items())
                + ", but this run has "
                + ", ".join(f"{name}={new!r}" for name, (_, new) in target.items())
                + f": these settings define what {self.objective.display_name} trains towards, so a resume must keep "
                "them. Resume with the saved values, or start a new run (resume_from='')."
            )
        if changed and self.accelerator.is_main_process:
            warnings.warn(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r}: {path!r} was trained with "
                + ", ".join(f"{name}={old!r}" for name, (old, _) in changed.items())
                + "; this run goes on with "
                + ", ".join(f"{name}={new!r}" for name, (_, new) in changed.items())
                + ", so it no longer repeats the uninterrupted run.",
                UserWarning,
                stacklevel=4,
            )

    def acquire_run_lock(self) -> None:
        """Take ``run.lock`` on the main process; every process raises if another run holds it."""
        from accelerate.utils import broadcast_object_list

        refusal = None
        if self.accelerator.is_main_process:
            try:
                acquire_run_lock(self.config)
            except RuntimeError as error:
                refusal = str(error)
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise RuntimeError(refusal)

    def release_run_lock(self) -> None:
        if self.accelerator.is_main_process:
            release_run_lock(self.config)

    def warn_about_other_checkpoints(self) -> None:
        """A run that does not resume, in a folder that holds another run's checkpoints, would prune its own
        checkpoints before those of higher epochs, and ``resume_from="latest"`` would pick the other run's."""
        existing = [epoch for epoch, _ in list_checkpoints(self.folder)]
        if existing and self.accelerator.is_main_process:
            warnings.warn(
                f"{self.folder!r} already holds checkpoints of epochs {existing} from an earlier run, and "
                "this run does not resume: pruning keeps the highest epochs of both runs and resume_from='latest' "
                "picks the newest of either. Resume that run (resume_from='latest'), delete its checkpoints, or use "
                "another logdir.",
                stacklevel=3,
            )

    def _objective_model_index(self, models: list) -> int:
        unwrapped = self.accelerator.unwrap_model
        return next(i for i, m in enumerate(models) if unwrapped(m) is self.objective_model)

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # accelerate calls this hook on every process but saves model weights from the main one only; do the same,
        # or processes sharing a filesystem write the same files at once.
        if not self.accelerator.is_main_process:
            return
        if self.uses_deepspeed:
            # The engine's own checkpoint holds every trained network and the optimiser; the files written here are
            # the portable ones (diffusers LoRA, flow network) that `resume_from` checks for and other tools load.
            self.save_weights(output_dir)
            return
        # accelerate passes its own model list here: leave it intact and drop the entries we save from `weights`.
        others = list(range(len(models)))
        if self.objective_model is not None:
            index = self._objective_model_index(models)
            self.objective_model.save_pretrained(os.path.join(output_dir, self.objective.model_folder))
            weights.pop(index)
            others.remove(index)
        self.pipeline.save_checkpoint([self.accelerator.unwrap_model(models[i]) for i in others], weights, output_dir)

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        if self.uses_deepspeed:
            return  # the engine's load_checkpoint has restored every network and the optimiser
        if self.objective_model is not None:
            models.pop(self._objective_model_index(models))
            loaded = self.objective.load_model(os.path.join(input_dir, self.objective.model_folder))
            self.objective_model.load_state_dict(loaded.state_dict())
        remaining = [self.accelerator.unwrap_model(m) for m in models]
        self.pipeline.load_checkpoint(remaining, input_dir)
        # Whatever the pipeline loaded is gone from `remaining`; accelerate must not look for its weights file.
        models[:] = [m for m in models if self.accelerator.unwrap_model(m) in remaining]

    @contextlib.contextmanager
    def _disk_errors_named(self, final: str, temporary: str) -> Iterator[None]:
        """Turn a save that ran out of disk space into an ``OSError`` that says so, names the checkpoint and what
        is left, after removing the partial folder (which also gives the space back)."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            if not is_disk_full(error):
                raise
            shutil.rmtree(temporary, ignore_errors=True)
            free = shutil.disk_usage(self.folder).free / 2**20
            previous = list_checkpoints(self.folder)
            kept = f"the newest complete checkpoint, {previous[-1][1]!r}, is intact" if previous else "no checkpoint"
            raise OSError(
                errno.ENOSPC,
                f"Saving checkpoint {final!r} failed: the disk holding {self.folder!r} is full or over its "
                f"quota ({error}). The partial folder {temporary!r} was removed ({free:.0f} MiB free now); "
                f"{kept}. Free some space (or lower num_checkpoint_limit, or move logdir to a larger disk), then "
                "resume with resume_from='latest'.",
            ) from error

    def save(self, epoch: int, progress: dict[str, Any]) -> str:
        """Write the training state after ``epoch`` atomically (a temporary folder, renamed when complete) with
        ``progress`` (the trainer's counters and histories, JSON-serialisable) in ``trainer_state.json``, then prune
        the oldest checkpoints beyond the limit (:func:`checkpoint_limit`); returns the checkpoint's folder. Call it
        on every process."""
        final = self.path(epoch)
        temporary = final + ".tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(temporary, exist_ok=True)
        self.accelerator.wait_for_everyone()
        with self._disk_errors_named(final, temporary):
            self.accelerator.save_state(temporary, **self._deepspeed_checkpoint_kwargs(saving=True))
        # Every process writes into the folder (its RNG state, its DeepSpeed optimiser shard): rename it after all.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {
                "epoch": epoch,
                **progress,
                **self._run_settings(),
                # What a resume compares: the settings that define the target, and those it may change with a warning.
                "config": {name: getattr(self.config, name) for name in self._compared_settings()},
                # Every file with its size: a resume names the one that is missing or truncated.
                "files": file_sizes(temporary),
            }
            with self._disk_errors_named(final, temporary):
                with open(os.path.join(temporary, TRAINER_STATE_NAME), "w") as handle:
                    json.dump(state, handle)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            limit = checkpoint_limit(self.config)
            if limit is not None:
                for _, old in list_checkpoints(self.folder)[:-limit]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _deepspeed_checkpoint_kwargs(self, saving: bool) -> dict[str, bool]:
        """DeepSpeed's checkpoint of a LoRA run leaves out the frozen base UNet (it comes from the base model)."""
        if not (self.uses_deepspeed and self.pipeline.use_lora):
            return {}
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}

    def load(self, path: str, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """Restore accelerate's state (weights, ``optimizers``, RNG) from the checkpoint ``path``, keeping this run's
        learning rates, and return its ``trainer_state.json`` for the trainer to restore its progress from."""
        state = read_trainer_state(path)
        # The optimisers' saved state carries the saved run's learning rates; this run's config sets them (a resume
        # after a divergence lowers them).
        learning_rates = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
        try:
            self.accelerator.load_state(path, **self._deepspeed_checkpoint_kwargs(saving=False))
        except (OSError, RuntimeError, ValueError, EOFError, KeyError, IndexError, pickle.UnpicklingError) as error:
            # A file damaged without changing its size (the file list catches the rest before any loading).
            raise ValueError(
                f"Checkpoint {path!r} could not be loaded ({type(error).__name__}: {error}). If one of its files is "
                f"damaged: {resume_advice(path)}"
            ) from error
        for optimizer, rates in zip(optimizers, learning_rates, strict=True):
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        first_epoch = state["epoch"] + 1
        if first_epoch >= self.config.num_epochs:
            warnings.warn(
                f"GFlowNetConfig.resume_from={self.config.resume_from!r}: {path!r} was saved after epoch "
                f"{state['epoch']}, and num_epochs={self.config.num_epochs} ends there, so train() has no epoch "
                f"left to run. Set num_epochs above {first_epoch} to train further.",
                stacklevel=3,
            )
        logger.info("Resumed from %s at epoch %d", path, first_epoch)
        return state
