"""Randomly initialised models of the real classes, built offline and saved like Hub checkpoints.

For the tests and the benchmarks; nothing here is downloaded. The Stable Diffusion builder
(:mod:`dag_trl.models.from_scratch`, which the offline demo uses too) takes its sizes from an
:class:`SDArchitecture`: :data:`TINY_SD` (the tests' pipeline, which loads in well under a second), the shapes
demo's model before training (``dag_trl.demo.shapes.training.SHAPES_ARCHITECTURE``) and SD1.5's widths
(``benchmarks/benchmark_training.py``). The reward towers (:func:`build_tiny_clip`,
:func:`build_tiny_imagereward`) and the evaluation's DINOv2 (:func:`build_tiny_dinov2`) keep the real file layouts
so that their loaders are exercised as with real checkpoints.

Every builder is seeded and bit-reproducible: initial weights come from torch's global generator in a fixed order,
which is why :attr:`SDArchitecture.init_order` is part of the architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The builders of Stable Diffusion pipelines live with the models, where the shapes demo also finds them; they are
# re-exported here under their former paths.
from ..models.from_scratch import (
    SD_NOISE_SCHEDULE,
    SDArchitecture,
    SDModules,
    assemble_sd_pipeline,
    make_sd_modules,
    sd_ddim_scheduler,
    write_tiny_clip_tokenizer,
)

__all__ = [
    "SD_NOISE_SCHEDULE",
    "TINY_SD",
    "SDArchitecture",
    "SDModules",
    "assemble_sd_pipeline",
    "build_tiny_clip",
    "build_tiny_imagereward",
    "build_tiny_sd_pipeline",
    "make_sd_modules",
    "sd_ddim_scheduler",
    "write_tiny_clip_tokenizer",
]

TINY_SD = SDArchitecture()


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
