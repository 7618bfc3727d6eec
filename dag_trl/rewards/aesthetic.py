"""The LAION aesthetic score used by DDPO (Black et al. 2023, arXiv 2305.13301) and DAG (Zhang et al. 2024,
arXiv 2406.00633): the "improved aesthetic predictor" MLP on CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

from typing import Any

import torch

from .base import RewardOutput, freeze, load_weights, resolve_file
from .clip import ClipReward


class AestheticMLP(torch.nn.Module):
    """The LAION "improved aesthetic predictor" head (C. Schuhmann, github.com/christophschuhmann/
    improved-aesthetic-predictor): a purely linear stack 768-1024-128-64-16-1 (dropouts are inactive at inference)
    on L2-normalised CLIP ViT-L/14 image embeddings, trained with an MSE loss on SAC + LAION-Logos + AVA ratings.
    The module layout matches the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticReward(ClipReward):
    """LAION aesthetic score, as used by DDPO and DAG: the improved aesthetic predictor MLP on CLIP ViT-L/14.

    The score is on the predictor's 1-10 rating scale. ``clip_model`` and ``mlp_path`` take Hub ids or local paths
    (``mlp_path`` may be a file, a folder holding ``mlp_filename``, or a Hub repository holding it).
    """

    name = "aesthetic_score"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        mlp_path: str = "camenduru/improved-aesthetic-predictor",
        mlp_filename: str = "sac+logos+ava1-l14-linearMSE.pth",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(clip_model, dtype=dtype, device=device)
        self.mlp_path = mlp_path
        self.mlp_filename = mlp_filename

    def weight_sources(self) -> list[str]:
        return [*super().weight_sources(), self.mlp_path]

    def _load_models(self, device: torch.device) -> None:
        super()._load_models(device)
        state_dict = load_weights(resolve_file(self.mlp_path, self.mlp_filename))
        mlp = AestheticMLP(input_size=self.model.config.projection_dim)
        try:
            mlp.load_state_dict(state_dict)
        except RuntimeError as error:
            raise RuntimeError(
                f"the aesthetic MLP weights from {self.mlp_path!r} do not fit a "
                f"{self.model.config.projection_dim}-1024-128-64-16-1 predictor on {self.model_name_or_path!r}: {error}"
            ) from error
        # The head is tiny; float32 keeps its score exact whatever dtype the CLIP tower runs in.
        self.mlp = freeze(mlp, torch.float32, device)

    def _forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return self.mlp(self.image_embeddings(images)).squeeze(-1), {}
