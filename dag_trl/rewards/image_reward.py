"""ImageReward v1.0 (Xu et al. 2023, "ImageReward", arXiv 2304.05977), rebuilt on transformers' BLIP classes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from .aesthetic import AestheticMLP
from .base import ModelReward, RewardOutput, freeze, load_weights, resolve_file
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor

# Mean and standard deviation of the raw ImageReward-v1.0 head output, from the official ImageReward.py; the
# reported score is standardised with them.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


def convert_imagereward_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an official ``ImageReward.pt`` state dict into transformers ``BlipVisionModel``, ``BlipTextModel`` and
    MLP-head state dicts.

    The official BLIP vision tower is a timm-style ViT (``blip.visual_encoder.*``: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); transformers'
    port keeps the fused qkv layout under other names. The text tower (``blip.text_encoder.*``, BLIP's ``med.py``
    BERT with cross-attention) already uses the names of transformers' ``BlipTextModel``. Keys that ImageReward
    does not use for scoring (projections, position-id buffers) are dropped.
    """
    vision_renames = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    block_renames = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    vision, text, mlp = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            if name in vision_renames:
                vision[vision_renames[name]] = value
            elif name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                module, param = rest.rsplit(".", 1)
                if module in block_renames:
                    vision[f"encoder.layers.{index}.{block_renames[module]}.{param}"] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp.") :]] = value
    return vision, text, mlp


def _blip_vision_config(vision_state: Mapping[str, torch.Tensor], layer_norm_eps: float = 1e-6) -> Any:
    """Infer a ``BlipVisionConfig`` from the converted ViT weights (BLIP's ViTs use 64-dim heads, eps 1e-6)."""
    from transformers import BlipVisionConfig

    hidden_size = vision_state["embeddings.class_embedding"].shape[-1]
    patch_size = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision_state["embeddings.position_embedding"].shape[1] - 1
    num_layers = 1 + max(int(key.split(".")[2]) for key in vision_state if key.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        image_size=patch_size * math.isqrt(num_patches),
        patch_size=patch_size,
        layer_norm_eps=layer_norm_eps,
        hidden_act="gelu",
    )


def _blip_text_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> Any:
    """A ``BlipTextConfig`` from ImageReward's ``med_config.json`` (a BERT config with cross-attention)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=encoder_hidden_size,
        # transformers only builds the cross-attention layers of a BlipTextModel configured as a decoder; the
        # forward pass below still runs it as a bidirectional encoder (is_decoder=False), as ImageReward does.
        is_decoder=True,
    )


class ImageRewardModel(torch.nn.Module):
    """ImageReward (Xu et al. 2023, "ImageReward", arXiv 2304.05977) re-implemented on transformers' BLIP classes.

    The official ``image-reward`` package pins old dependencies, so this module rebuilds its scoring path from
    transformers parts: a ``BlipVisionModel`` (BLIP ViT-L/16) encodes the image; a ``BlipTextModel`` encodes the
    prompt with cross-attention to the image tokens; the MLP head (the same 768-1024-128-64-16-1 linear stack as the
    aesthetic predictor) maps the first token's feature to a raw reward, standardised with ImageReward's mean/std.
    The weights come unchanged from the official ``ImageReward.pt`` through :func:`convert_imagereward_state_dict`.
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(input_size=text_config.hidden_size)

    @classmethod
    def from_official_checkpoint(cls, checkpoint_path: str, med_config_path: str) -> ImageRewardModel:
        """Build the model from an official ``ImageReward.pt`` and its ``med_config.json``."""
        vision_state, text_state, mlp_state = convert_imagereward_state_dict(load_weights(checkpoint_path))
        if not vision_state or not text_state or not mlp_state:
            raise RuntimeError(
                f"{checkpoint_path!r} is not an ImageReward checkpoint: expected 'blip.visual_encoder.*', "
                "'blip.text_encoder.*' and 'mlp.*' weights"
            )
        with open(med_config_path) as f:
            med_config = json.load(f)
        vision_config = _blip_vision_config(vision_state)
        model = cls(vision_config, _blip_text_config(med_config, vision_config.hidden_size))
        for module, state, part in ((model.vision, vision_state, "vision"), (model.text, text_state, "text")):
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"ImageReward {part} weights in {checkpoint_path!r} do not match the model: "
                    f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        model.mlp.load_state_dict(mlp_state)
        return model

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        raw = self.mlp(text[:, 0].float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


class ImageRewardReward(ModelReward):
    """ImageReward-v1.0 score (see :class:`ImageRewardModel` for what is re-implemented).

    ``checkpoint`` is a Hub repository (default ``THUDM/ImageReward``) or local folder holding ``ImageReward.pt``
    and ``med_config.json``, or the ``.pt`` file itself (then ``med_config`` must point at the JSON).
    ``tokenizer`` is the BERT tokenizer ImageReward uses (``bert-base-uncased``); prompts are padded/truncated to
    ``max_length`` tokens (35 in the official code) and images resized (bicubic, shortest side 224), centre-cropped
    and normalised with CLIP's constants, as in the official code.
    """

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward",
        med_config: str | None = None,
        tokenizer: str = "google-bert/bert-base-uncased",
        max_length: int = 35,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dtype=dtype, device=device)
        self.checkpoint = checkpoint
        self.med_config = med_config
        self.tokenizer_name_or_path = tokenizer
        self.max_length = max_length

    def _load_models(self, device: torch.device) -> None:
        from transformers import AutoTokenizer

        checkpoint_path = resolve_file(self.checkpoint, "ImageReward.pt")
        med_config_path = self.med_config or resolve_file(
            os.path.dirname(checkpoint_path) if os.path.isfile(self.checkpoint) else self.checkpoint,
            "med_config.json",
        )
        self.model = freeze(
            ImageRewardModel.from_official_checkpoint(checkpoint_path, med_config_path), self.dtype, device
        )
        self.model.mlp.float()
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        image_size = self.model.vision.config.image_size
        self.preprocess = ImagePreprocessor(
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            shortest_edge=image_size,
            crop_size=(image_size, image_size),
            resample="bicubic",
        )

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pixel_values = self.preprocess(images).to(self.dtype)
        return self.model(pixel_values, tokens.input_ids, tokens.attention_mask), {}
