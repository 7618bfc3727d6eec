"""Human Preference Score v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341) on open_clip."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelReward, RewardOutput, freeze, load_weights, resolve_file
from .preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessor

HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _import_open_clip() -> Any:
    """open_clip, or an ``ImportError`` naming the extra that installs it (it is optional, and only HPSv2 needs it)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "the hpsv2 reward needs open_clip; install it with `pip install dag_trl[hpsv2]` "
            "(or `pip install open_clip_torch`)"
        ) from error
    return open_clip


class HPSv2Reward(ModelReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341).

    An open_clip ViT-H-14 fine-tuned on HPDv2; the score is the cosine similarity of its normalised image and text
    embeddings (about 0.2-0.35 for typical images), as in the official ``hpsv2.score``. Needs the ``hpsv2`` extra
    (``open_clip_torch``). The backbone is created without pretrained weights and the HPS checkpoint (from
    ``checkpoint``, a local file/folder or Hub repository, default ``xswu/HPSv2``) supplies all of them.
    ``architecture`` is the open_clip model the checkpoint was trained from (``ViT-H-14`` for both releases).
    Preprocessing follows HPSv2's evaluation transform: scale the longest side to 224, zero-pad to a square,
    normalise with the model's mean/std.
    """

    name = "hpsv2"

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str = "xswu/HPSv2",
        architecture: str = "ViT-H-14",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"unknown HPS version {version!r}; known versions: {sorted(HPS_CHECKPOINTS)}")
        super().__init__(dtype=dtype, device=device)
        self.version = version
        self.checkpoint = checkpoint
        self.architecture = architecture

    def _load_models(self, device: torch.device) -> None:
        open_clip = _import_open_clip()
        model = open_clip.create_model(self.architecture, pretrained=None)
        state = load_weights(resolve_file(self.checkpoint, HPS_CHECKPOINTS[self.version]))
        # The released checkpoints wrap the weights as {"state_dict": ...}.
        model.load_state_dict(state.get("state_dict", state))
        self.model = freeze(model, self.dtype, device)
        self.tokenizer = open_clip.get_tokenizer(self.architecture)
        visual = self.model.visual
        image_size = visual.image_size
        side = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
        self.preprocess = ImagePreprocessor(
            mean=getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN,
            std=getattr(visual, "image_std", None) or OPENAI_CLIP_STD,
            pad_longest_edge=side,
            resample="bicubic",
        )

    def image_embeddings(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image tower's features, float32, L2-normalised unless ``normalize=False``."""
        return self.model.encode_image(self.preprocess(images).to(self.dtype), normalize=normalize).float()

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        image_features = self.image_embeddings(images)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_features * text_features).sum(-1), {}
