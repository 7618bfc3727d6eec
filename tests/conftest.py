"""Shared fixtures: a tiny Stable Diffusion pipeline built offline (:mod:`dag_trl.testing.tiny_models`), saved and
reloaded like a Hub checkpoint, and the real shapes model."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# trackio reads its store's folder once, when imported: point it away from the user's cache before any test does
# (removed at exit; atexit runs this after the handlers trackio registers later).
if "TRACKIO_DIR" not in os.environ:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="dag_trl_tests_trackio_")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

# Tiny pipelines are small enough that extra threads only add scheduling noise on 2-core CI machines.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# After the environment above: huggingface_hub reads HF_HUB_OFFLINE when dag_trl first imports it. Tests import
# the builders from here too (``from conftest import sd_ddim_scheduler``).
from dag_trl.testing.tiny_models import (  # noqa: E402
    TINY_SD,
    build_tiny_sd_pipeline,
    sd_ddim_scheduler,  # noqa: F401
    write_tiny_clip_tokenizer,  # noqa: F401
)

# The tiny pipeline's sizes, for tests that build inputs for it.
TINY_TEXT_HIDDEN_SIZE = TINY_SD.text_hidden_size
TINY_MAX_TOKENS = TINY_SD.max_tokens
TINY_IMAGE_SIZE = TINY_SD.image_size
TINY_LATENT_SIZE = TINY_SD.latent_size


# Helpers shared by the trainer, checkpoint, hub and distributed tests.
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat"]


def tiny_config(tmp_path, **overrides):
    """A GFlowNetConfig sized for the tiny pipeline: 4 DDIM steps, batches of 2 to 4, float32."""
    from dag_trl import GFlowNetConfig

    kwargs = dict(
        num_epochs=2,
        sample_num_steps=4,
        sample_batch_size=4,
        sample_num_batches_per_epoch=2,
        train_batch_size=2,
        train_gradient_accumulation_steps=2,
        mixed_precision="no",
        flow_block_out_channels=[8, 16],
        flow_attention_heads=2,
        flow_time_embedding_dim=8,
        train_reward_exp=10.0,
        logdir=str(tmp_path / "logs"),
        save_freq=100,
    )
    kwargs.update(overrides)
    return GFlowNetConfig(**kwargs)


def brightness(images, prompts, metadata):
    """Mean pixel value: a reward with DDPO's contract that needs no model."""
    return images.mean(dim=(1, 2, 3)), {}


def make_resumable_trainer(tmp_path, tiny_sd_path, use_lora=True, **overrides):
    """A trainer with one optimiser step per epoch (4 trajectories of 4 steps), a checkpoint per epoch and a
    seedable prompt set, as resume needs."""
    from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
    from dag_trl.prompts import PromptList

    settings = dict(num_epochs=2, sample_num_batches_per_epoch=1, save_freq=1)
    settings.update(overrides)
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=use_lora)
    prompts = PromptList(PROMPTS, name="shapes", seed=0)
    return GFlowNetDiffusionTrainer(tiny_config(tmp_path, **settings), brightness, prompts, pipeline)


def files_under(folder) -> set[str]:
    """Every file below ``folder``, as '/'-separated relative paths."""
    return {
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    }


@contextlib.contextmanager
def another_run_holding(folder) -> Iterator[subprocess.Popen]:
    """A live process that holds the run lock of ``folder`` and records itself beside it as a run does; killed (not
    asked to stop) on exit."""
    from dag_trl.trainer.checkpointing import RUN_LOCK_NAME, RUN_OWNER_NAME

    os.makedirs(folder, exist_ok=True)
    holder = (
        "import json, os, socket, sys, time\n"
        "from filelock import FileLock\n"
        f"lock = FileLock({os.path.join(folder, RUN_LOCK_NAME)!r})\n"  # kept referenced: a collected lock is released
        "lock.acquire()\n"
        f"with open({os.path.join(folder, RUN_OWNER_NAME)!r}, 'w') as handle:\n"
        "    json.dump({'pid': os.getpid(), 'host': socket.gethostname()}, handle)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def run_lock_is_free(path) -> bool:
    """Whether a new lock on ``path`` can be taken now (then given back)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    lock.release(force=True)
    return True


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """Folder of a tiny epsilon-prediction Stable Diffusion checkpoint, as ``save_pretrained`` writes it."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_prediction_path(tmp_path_factory) -> Path:
    """Same as ``tiny_sd_path`` with a v-prediction scheduler (the SD 2.x 768 px setting)."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def shapes_model_path() -> Path:
    """The real built-in shapes model: the copy shipped in the package (built on first use if it is unusable)."""
    from dag_trl.demo.shapes import get_shapes_model

    return get_shapes_model()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision included); start every test without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class RecordingTracker:
    """An accelerate tracker that keeps what the trainer logs, as ``(step, values)`` pairs, in ``logged``."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        self.logged: list[tuple] = []

    @property
    def tracker(self) -> list[tuple]:
        return self.logged

    def store_init_configuration(self, values: dict) -> None:
        self.logged.append((None, {"config": dict(values)}))

    def log(self, values: dict, step=None, **kwargs) -> None:
        self.logged.append((step, dict(values)))

    def finish(self) -> None:
        return None


def record_logs(trainer) -> list[tuple]:
    """Attach a :class:`RecordingTracker` to ``trainer``'s accelerator (beside any real tracker) and return its log,
    which fills as ``accelerator.log`` is called."""
    recorder = RecordingTracker()
    trainer.accelerator.trackers.append(recorder)
    return recorder.logged
