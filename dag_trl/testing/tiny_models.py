"""Randomly initialised models of the real classes, built offline and saved like Hub checkpoints.

For the tests, the benchmarks and the offline demo; nothing here is downloaded. The Stable Diffusion builder takes
its sizes from an :class:`SDArchitecture`: :data:`TINY_SD` (the tests' pipeline, which loads in well under a
second), the shapes demo's model before training (``dag_trl.demo.shapes.training.SHAPES_ARCHITECTURE``) and SD1.5's
widths (``benchmarks/benchmark_training.py``). The reward towers (:func:`build_tiny_clip`,
:func:`build_tiny_imagereward`) and the evaluation's DINOv2 (:func:`build_tiny_dinov2`) keep the real file
layouts so that their loaders are exercised as with real checkpoints.

Every builder is seeded and bit-reproducible: initial weights come from torch's global generator in a fixed order,
which is why :attr:`SDArchitecture.init_order` is part of the architecture.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

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
    """The sizes of a Stable Diffusion 1.x pipeline built from scratch; the defaults are :data:`TINY_SD`.

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


TINY_SD = SDArchitecture()


def write_tiny_clip_tokenizer(
    path: Path, model_max_length: int = TINY_SD.max_tokens, words: Iterable[str] = ()
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


def build_tiny_sd_pipeline(
    path: Path, prediction_type: str = "epsilon", seed: int = 0, architecture: SDArchitecture = TINY_SD
) -> Path:
    """Build a randomly initialised ``StableDiffusionPipeline`` of ``architecture`` and ``save_pretrained`` it to
    ``path``; returns ``path``.

    The default, :data:`TINY_SD`: 16x16 RGB images, 4x8x8 latents, a 2-layer CLIP text encoder of width 32, a
    character-level tokenizer.
    """
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    # Written where save_pretrained puts the tokenizer, so the saved folder holds no second copy.
    tokenizer_path = write_tiny_clip_tokenizer(
        path / "tokenizer", architecture.max_tokens, architecture.tokenizer_words
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path)
    modules = make_sd_modules(architecture, len(tokenizer))
    assemble_sd_pipeline(modules, tokenizer, prediction_type).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reward towers
# ---------------------------------------------------------------------------------------------------------------------


def build_tiny_clip(path: Path, image_size: int = 32, shortest_edge: int = 40, patch_size: int = 8) -> Path:
    """Save a random ``CLIPModel`` + ``CLIPProcessor`` (resize the shortest edge, centre crop ``image_size``) as a
    Hub-style folder; returns ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path / "_tokenizer"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    crop_size = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size={"shortest_edge": shortest_edge}, crop_size=crop_size)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def build_tiny_dinov2(path: Path, image_size: int = 32, shortest_edge: int = 40, patch_size: int = 8) -> Path:
    """Save a random ``Dinov2Model`` (width 24) and its ``BitImageProcessor`` (resize the shortest edge, centre crop
    ``image_size``, ImageNet statistics, as ``facebook/dinov2-base`` has them) as a Hub-style folder; returns
    ``path``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=24,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


# The tiny ImageReward's BLIP ViT: width, depth, patch size and input size.
VIT_HIDDEN, VIT_DEPTH, VIT_PATCH, VIT_IMAGE = 64, 2, 8, 16


def tiny_blip_text_config(med_config: dict[str, Any]) -> Any:
    """The ``BlipTextConfig`` of a ``med_config.json``, built independently of dag_trl's converter."""
    from transformers import BlipTextConfig

    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return BlipTextConfig(
        **{k: med_config[k] for k in sizes},
        max_position_embeddings=med_config["max_position_embeddings"],
        encoder_hidden_size=med_config["encoder_width"],
        is_decoder=True,
    )


def build_tiny_imagereward(path: Path, image_size: int = VIT_IMAGE, patch_size: int = VIT_PATCH) -> Path:
    """Save a random checkpoint in the official ``ImageReward.pt`` layout, with ``med_config.json`` and a BERT
    tokenizer; returns ``path``."""
    from transformers import BertTokenizer, BlipTextModel

    from ..rewards import AestheticMLP

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["cat", "dog", "red", "car", "owl", "sofa", "on", "an"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(path).save_pretrained(path)
    med_config = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        pad_token_id=0,
        encoder_width=VIT_HIDDEN,
        add_cross_attention=True,
    )
    (path / "med_config.json").write_text(json.dumps(med_config))

    generator = torch.Generator().manual_seed(7)

    def rand(*shape: int, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
        return offset + scale * torch.randn(*shape, generator=generator)

    d, tokens = VIT_HIDDEN, (image_size // patch_size) ** 2 + 1
    state = {
        "blip.visual_encoder.cls_token": rand(1, 1, d),
        "blip.visual_encoder.pos_embed": rand(1, tokens, d),
        "blip.visual_encoder.patch_embed.proj.weight": rand(d, 3, patch_size, patch_size),
        "blip.visual_encoder.patch_embed.proj.bias": rand(d),
        "blip.visual_encoder.norm.weight": rand(d, offset=1.0),
        "blip.visual_encoder.norm.bias": rand(d),
        "blip.vision_proj.weight": rand(16, d),  # in the official file, unused for scoring
    }
    for i in range(VIT_DEPTH):
        prefix = f"blip.visual_encoder.blocks.{i}."
        for name, shape in [
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("mlp.fc1", (2 * d, d)),
            ("mlp.fc2", (d, 2 * d)),
        ]:
            state[prefix + name + ".weight"] = rand(*shape, scale=0.2)
            state[prefix + name + ".bias"] = rand(shape[0])
        for name in ("norm1", "norm2"):
            state[prefix + name + ".weight"] = rand(d, offset=1.0)
            state[prefix + name + ".bias"] = rand(d)
    torch.manual_seed(8)
    text = BlipTextModel(tiny_blip_text_config(med_config), add_pooling_layer=False)
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    state.update({f"mlp.{k}": v for k, v in AestheticMLP(32).state_dict().items()})
    torch.save(state, path / "ImageReward.pt")
    return path
