"""Stable Diffusion 1.x pipelines built from scratch: randomly initialised modules of the real classes, sized by an
:class:`SDArchitecture`, with a character-level CLIP tokenizer, assembled as a diffusers ``StableDiffusionPipeline``.

Shared by the offline demo (the shapes model, :mod:`dag_trl.demo.shapes`, is trained from such a pipeline) and the
tests and benchmarks (:mod:`dag_trl.testing.tiny_models` builds its tiny pipelines with it), so that neither imports
the other. Initial weights come from torch's global generator in a fixed order, which is why
:attr:`SDArchitecture.init_order` is part of the architecture: seed it first for bit-reproducible weights.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "SD_NOISE_SCHEDULE",
    "SDArchitecture",
    "SDModules",
    "assemble_sd_pipeline",
    "make_sd_modules",
    "sd_ddim_scheduler",
    "write_tiny_clip_tokenizer",
]

# Stable Diffusion 1.x's noise schedule: the DDIM sampler saved with every pipeline here, and the shapes model's
# training noise.
SD_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# What a character-level tokenizer spells every word with.
_TOKENIZER_SYMBOLS = string.ascii_lowercase + string.digits + ",.!?'-"


class SDModules(NamedTuple):
    """Freshly initialised modules of a Stable Diffusion pipeline."""

    text_encoder: Any
    unet: Any
    vae: Any


@dataclass(frozen=True)
class SDArchitecture:
    """The sizes of a Stable Diffusion 1.x pipeline built from scratch; the defaults are the tests' tiny
    pipeline (``dag_trl.testing.tiny_models.TINY_SD``).

    The VAE has one ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` per entry of ``vae_block_out_channels``, each but
    the last halving the resolution, so latents are ``image_size / 2 ** (len(vae_block_out_channels) - 1)`` wide.
    """

    image_size: int = 16
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_layers_per_block: int = 1
    vae_mid_block_attention: bool = True
    # Multiplies the VAE decoder's output layer after initialisation: a random decoder maps latents to nearly flat
    # grey images, and a larger output layer gives them contrast, so that image rewards (brightness, colour) depend
    # on the latents enough for a learning check to be measurable. 1 keeps the initialisation.
    vae_decoder_gain: float = 10.0
    text_hidden_size: int = 32
    text_intermediate_size: int = 37
    text_num_layers: int = 2
    text_num_heads: int = 4
    # None: the tokenizer's vocabulary size.
    text_vocab_size: int | None = None
    max_tokens: int = 24
    # Words the tokenizer reads as single tokens (through BPE merges); any other text is spelled character by
    # character.
    tokenizer_words: tuple[str, ...] = ()
    unet_block_out_channels: tuple[int, ...] = (16, 32)
    unet_layers_per_block: int = 1
    unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_attention_head_dim: int = 4
    norm_num_groups: int = 8
    # The order in which the three modules draw their initial weights from torch's global generator.
    init_order: tuple[str, ...] = ("text_encoder", "unet", "vae")

    def __post_init__(self) -> None:
        if sorted(self.init_order) != sorted(SDModules._fields):
            raise ValueError(f"init_order={self.init_order} must name each of {SDModules._fields} once.")

    @property
    def latent_size(self) -> int:
        """Width of the latents (and of the UNet's input)."""
        return self.image_size // 2 ** (len(self.vae_block_out_channels) - 1)


def write_tiny_clip_tokenizer(
    path: Path, model_max_length: int = SDArchitecture.max_tokens, words: Iterable[str] = ()
) -> Path:
    """Write a CLIP BPE tokenizer into ``path`` that ``CLIPTokenizer.from_pretrained(path)`` loads; returns ``path``.

    The vocabulary is the start and end tokens, lowercase letters, digits and ``,.!?'-`` (each alone and as a
    word end), so any lowercase text tokenizes character by character; each of ``words`` also becomes one token,
    through merges that spell it out, so that a text encoder needs no capacity to read those words from characters.
    """
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(_TOKENIZER_SYMBOLS) + [s + "</w>" for s in _TOKENIZER_SYMBOLS]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            parts = [parts[0] + parts[1]] + parts[2:]
            if merge not in merges:
                merges.append(merge)
            if parts[0] not in tokens:
                tokens.append(parts[0])
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges))
    # Saving records model_max_length next to the vocabulary, so that loading the folder needs no arguments.
    CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length).save_pretrained(path)
    return path


def make_sd_modules(architecture: SDArchitecture, vocab_size: int) -> SDModules:
    """Freshly initialised text encoder, UNet and VAE of ``architecture``, drawn from torch's global generator in
    ``architecture.init_order`` (seed it first for reproducible weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    a = architecture
    constructors = {
        "text_encoder": lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size if a.text_vocab_size is None else a.text_vocab_size,
                hidden_size=a.text_hidden_size,
                intermediate_size=a.text_intermediate_size,
                num_attention_heads=a.text_num_heads,
                num_hidden_layers=a.text_num_layers,
                max_position_embeddings=a.max_tokens,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ),
        "unet": lambda: UNet2DConditionModel(
            sample_size=a.latent_size,
            in_channels=a.latent_channels,
            out_channels=a.latent_channels,
            block_out_channels=a.unet_block_out_channels,
            layers_per_block=a.unet_layers_per_block,
            down_block_types=a.unet_down_block_types,
            up_block_types=a.unet_up_block_types,
            cross_attention_dim=a.text_hidden_size,
            attention_head_dim=a.unet_attention_head_dim,
            norm_num_groups=a.norm_num_groups,
        ),
        "vae": lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=a.vae_block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * len(a.vae_block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(a.vae_block_out_channels),
            layers_per_block=a.vae_layers_per_block,
            latent_channels=a.latent_channels,
            norm_num_groups=a.norm_num_groups,
            sample_size=a.image_size,
            mid_block_add_attention=a.vae_mid_block_attention,
        ),
    }
    modules = SDModules(**{name: constructors[name]() for name in a.init_order})
    if a.vae_decoder_gain != 1.0:
        with torch.no_grad():
            modules.vae.decoder.conv_out.weight.mul_(a.vae_decoder_gain)
    return modules


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> Any:
    """A ``DDIMScheduler`` with Stable Diffusion's noise schedule and spacing (scaled-linear betas, leading spacing
    with ``steps_offset=1``, ``abar[0]`` as the final alpha, no clipping)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD_NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def assemble_sd_pipeline(modules: SDModules, tokenizer: Any, prediction_type: str = "epsilon") -> Any:
    """A ``StableDiffusionPipeline`` of ``modules`` and ``tokenizer`` with :func:`sd_ddim_scheduler`, without a
    safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=modules.vae,
        text_encoder=modules.text_encoder,
        tokenizer=tokenizer,
        unet=modules.unet,
        scheduler=sd_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
