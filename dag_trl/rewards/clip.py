"""Rewards computed from a transformers ``CLIPModel`` (Radford et al. 2021, arXiv 2103.00020): PickScore and
CLIP score, and the loading and encoding they share with the aesthetic score."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelReward, RewardOutput, freeze
from .preprocessing import ImagePreprocessor


def projected_features(output: Any) -> torch.Tensor:
    """Projected CLIP features from ``get_image_features`` / ``get_text_features``.

    transformers < 5 returns the tensor itself, transformers >= 5 a model output whose ``pooler_output`` holds it.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(
    model_name_or_path: str,
    processor_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a transformers ``CLIPModel`` (frozen, eval mode) and its processor from a Hub id or a local folder."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_name_or_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(processor_name_or_path or model_name_or_path)
    return freeze(model, dtype, torch.device(device)), processor


class ClipReward(ModelReward):
    """Shared loading and encoding for rewards computed from a transformers ``CLIPModel``."""

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(dtype=dtype, device=device)
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path or model_name_or_path

    def weight_sources(self) -> list[str]:
        return [self.model_name_or_path, self.processor_name_or_path]

    def _load_models(self, device: torch.device) -> None:
        self.model, processor = load_clip(self.model_name_or_path, self.processor_name_or_path, self.dtype, device)
        self.tokenizer = processor.tokenizer
        self.preprocess = ImagePreprocessor.from_image_processor(processor.image_processor)
        # CLIP's text tower has a fixed number of positions (77 for the OpenAI/LAION models); longer prompts are
        # truncated as in the PickScore and CLIP-score reference code.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def image_embeddings(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected image features, float32, L2-normalised unless ``normalize=False`` (the evaluation's features,
        :mod:`dag_trl.evaluation_features`, take them as they are)."""
        pixel_values = self.preprocess(images).to(self.dtype)
        features = projected_features(self.model.get_image_features(pixel_values=pixel_values)).float()
        return features / features.norm(dim=-1, keepdim=True) if normalize else features

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text features, float32."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        features = projected_features(self.model.get_text_features(**tokens)).float()
        return features / features.norm(dim=-1, keepdim=True)


class PickScoreReward(ClipReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): CLIP ViT-H/14 fine-tuned on human
    preferences. The reward is the image-text logit ``exp(logit_scale) * cos(image, text)`` (about 18-24 for
    typical Stable Diffusion images), as in the model card's reference code.
    """

    name = "pickscore"

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cosine, {}


class ClipScoreReward(ClipReward):
    """CLIP score (Hessel et al. 2021, "CLIPScore", arXiv 2104.08718; Radford et al. 2021): the cosine similarity of
    the CLIP image and text embeddings, in [-1, 1]. Multiply by 100 (and clip at 0) for CLIPScore's reporting scale.
    """

    name = "clip_score"

    def __init__(
        self,
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        processor_name_or_path: str | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path, dtype=dtype, device=device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1), {}
