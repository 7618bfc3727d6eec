"""Shared fixtures: a tiny Stable Diffusion pipeline built offline, saved and reloaded like a Hub checkpoint."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import string
import tempfile
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

TINY_TEXT_HIDDEN_SIZE = 32
TINY_MAX_TOKENS = 24
TINY_IMAGE_SIZE = 16
TINY_LATENT_SIZE = 8


def write_tiny_clip_tokenizer(path: Path, model_max_length: int = TINY_MAX_TOKENS) -> Path:
    """Write a character-level CLIP BPE vocabulary (no merges) that a ``CLIPTokenizer`` can load from disk."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    symbols = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(symbols) + [s + "</w>" for s in symbols]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length).save_pretrained(path)
    return path


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """A ``DDIMScheduler`` with Stable Diffusion's noise schedule and spacing (scaled-linear betas, leading spacing
    with ``steps_offset=1``, ``abar[0]`` as the final alpha, no clipping)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a randomly initialised, tiny ``StableDiffusionPipeline`` and ``save_pretrained`` it to ``path``.

    16x16 RGB images, 4x8x8 latents, a 2-layer CLIP text encoder of width 32; loads in well under a second.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path / "_tokenizer_src"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_HIDDEN_SIZE,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=TINY_MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    with torch.no_grad():
        # A random decoder maps latents to nearly flat grey images; a larger output layer gives them contrast, so
        # image rewards (brightness, colour) depend on the latents enough for a learning check to be measurable.
        vae.decoder.conv_out.weight.mul_(10.0)
    scheduler = sd_ddim_scheduler(prediction_type)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


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
    from dag_trl.shapes import get_shapes_model

    return get_shapes_model()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision included); start every test without it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
