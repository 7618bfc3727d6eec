"""Image features for the evaluation's diversity and kernel distance, by name (``GFlowNetConfig.eval_features``).

- ``"pixels"``: :func:`~dag_trl.evaluation.pixel_features`, 8x8 area-averaged pixels compared by Euclidean distance.
  Meaningful on the shapes model (flat colours on flat backgrounds), where the published numbers use it.
- ``"clip"``: a CLIP image tower's projected embedding (Radford et al. 2021, "Learning Transferable Visual Models
  From Natural Language Supervision", arXiv 2103.00020): semantic content. The reward's own tower when the reward
  has one (:func:`reward_image_tower`), else ``openai/clip-vit-large-patch14``.
- ``"dino"``: the CLS token of DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
  Supervision", arXiv 2304.07193), ``facebook/dinov2-base``: finer visual detail (layout, texture, pose).
- ``"dreamsim"``: DreamSim's embedding (Fu et al. 2023, "DreamSim: Learning New Dimensions of Human Visual
  Similarity using Synthetic Data", arXiv 2306.09344), tuned to human judgements of perceptual similarity; it needs
  the ``dreamsim`` package.

The embeddings are compared by cosine distance (:attr:`ImageFeatures.diversity_distance`): the per-prompt diversity
is then the mean pairwise cosine distance, and DreamSim's is exactly its own distance, ``1 - cos``. The kernel
distance takes the embeddings as they come (unnormalised), as KID takes Inception features.

Every tower loads on its first call (an evaluation), on the device it was built for, and preprocesses with torch
ops (resize, centre crop and normalisation from the model's image processor, :class:`~dag_trl.rewards.ImagePreprocessor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from .config import DREAMSIM_MISSING, split_eval_features
from .evaluation import pixel_features
from .rewards.base import freeze, hub_download_advice
from .rewards.clip import load_clip, projected_features
from .rewards.preprocessing import ImagePreprocessor

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"
# DreamSim's towers take 224 x 224 images in [0, 1] and normalise them themselves.
DREAMSIM_IMAGE_SIZE = 224

ImageFeatureFunction = Callable[[torch.Tensor], torch.Tensor]


def diversity_distance(image_features: ImageFeatureFunction) -> str:
    """The distance the diversity uses on ``image_features``' features: its ``diversity_distance`` (``"cosine"`` for
    the embeddings here), else ``"euclidean"`` (pixels, and any plain ``images -> features`` function)."""
    return getattr(image_features, "diversity_distance", "euclidean")


class ImageFeatures:
    """``images (B, 3, H, W) in [0, 1] -> (B, F)`` float32 features on the images' device, from a frozen tower that
    loads on the first call (onto ``device``, default the first images' device) and runs in batches of
    ``batch_size``."""

    name = "features"
    diversity_distance = "cosine"

    def __init__(self, device: Optional[Union[str, torch.device]] = None, batch_size: int = 32) -> None:
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size
        self._loaded = False

    def weight_sources(self) -> list[str]:
        """The Hub repositories or local folders the weights come from (for the loading error)."""
        return []

    def load(self, device: Optional[Union[str, torch.device]] = None) -> ImageFeatures:
        """Load the tower now (otherwise on the first call), on ``device`` if given; returns ``self``."""
        if not self._loaded:
            self.device = torch.device(device) if device is not None else self.device or torch.device("cpu")
            try:
                self._load(self.device)
            except OSError as error:
                raise OSError(
                    f"eval_features={self.name!r} could not load its weights ({type(error).__name__}: {error})."
                    + hub_download_advice(self.weight_sources())
                ) from error
            self._loaded = True
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.load(images.device if self.device is None else None)
        features = [self._embed(chunk.to(self.device)).float() for chunk in images.split(self.batch_size)]
        return torch.cat(features).to(images.device)

    def _load(self, device: torch.device) -> None:
        raise NotImplementedError

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class HubImageFeatures(ImageFeatures):
    """A transformers image tower from a Hub id or a local folder (``from_pretrained``)."""

    def __init__(self, model_name_or_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name_or_path = model_name_or_path

    def weight_sources(self) -> list[str]:
        return [self.model_name_or_path]


class ClipImageFeatures(HubImageFeatures):
    """The projected image embedding (``get_image_features``) of a CLIP checkpoint, loaded as the CLIP rewards load
    theirs (:func:`~dag_trl.rewards.load_clip`), so that ``"clip:<id>"`` and a reward's tower from ``<id>`` give
    the same features; its width is the model's ``projection_dim``."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.name = f"clip:{model_name_or_path}"

    def _load(self, device: torch.device) -> None:
        self.model, processor = load_clip(self.model_name_or_path, device=device)
        self.preprocess = ImagePreprocessor.from_image_processor(processor.image_processor)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return projected_features(self.model.get_image_features(pixel_values=self.preprocess(images)))


class DinoImageFeatures(HubImageFeatures):
    """The CLS token of the last layer (after its layer norm) of a DINOv2 checkpoint (``AutoModel``), preprocessed
    as its image processor says; its width is the model's ``hidden_size``."""

    def __init__(self, model_name_or_path: str = DEFAULT_DINO_MODEL, **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)
        self.name = f"dino:{model_name_or_path}"

    def _load(self, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.model = freeze(AutoModel.from_pretrained(self.model_name_or_path), torch.float32, device)
        self.preprocess = ImagePreprocessor.from_image_processor(
            AutoImageProcessor.from_pretrained(self.model_name_or_path)
        )

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(images)).last_hidden_state[:, 0]


class RewardTowerFeatures(ImageFeatures):
    """The image embedding of a reward's own CLIP tower (its ``image_embeddings(images, normalize=False)``): the
    evaluation then measures diversity in the space the reward scores in, and loads no second model."""

    def __init__(self, reward: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward = reward
        self.name = f"clip (the tower of reward {reward.name!r})"

    def load(self, device: Optional[Union[str, torch.device]] = None) -> ImageFeatures:
        # The reward keeps its own device when it has one, and names its own weights if they fail to load.
        self.reward.load(None if self.reward.device is not None else device or self.device)
        self.device = self.reward.device
        self._loaded = True
        return self

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.reward.image_embeddings(images, normalize=False)


def import_dreamsim() -> Callable[..., Any]:
    """The ``dreamsim`` package's model builder, or an ``ImportError`` naming how to install it (the package is not
    a dependency of dag_trl)."""
    try:
        from dreamsim import dreamsim
    except ImportError as error:
        raise ImportError(DREAMSIM_MISSING) from error
    return dreamsim


class DreamSimFeatures(ImageFeatures):
    """DreamSim's embedding (its ``embed``) of the images resized to 224 x 224 (bicubic, as its own preprocessing).
    The weights are downloaded by the package into ``cache_dir`` (default ``<torch hub dir>/dreamsim``)."""

    name = "dreamsim"

    def __init__(self, cache_dir: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build = import_dreamsim()  # before any evaluation: a missing package is a setting error
        self.cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "dreamsim")

    def _load(self, device: torch.device) -> None:
        self.model, _ = self._build(pretrained=True, device=str(device), cache_dir=self.cache_dir)
        self.preprocess = ImagePreprocessor(
            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size=(DREAMSIM_IMAGE_SIZE, DREAMSIM_IMAGE_SIZE)
        )

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        # embed squeezes a batch of one to a vector.
        return self.model.embed(self.preprocess(images)).reshape(images.shape[0], -1)


def reward_image_tower(reward_fn: Any) -> Optional[Any]:
    """The reward with a CLIP image tower that ``reward_fn`` is or contains: a CLIP-based reward (aesthetic score,
    PickScore, CLIP score: :class:`~dag_trl.rewards.ClipReward`) or HPSv2 (open_clip), itself or as the first such
    part of a :class:`~dag_trl.rewards.WeightedSumReward`; ``None`` for any other reward."""
    from .rewards import ClipReward, HPSv2Reward, WeightedSumReward

    if isinstance(reward_fn, (ClipReward, HPSv2Reward)):
        return reward_fn
    if isinstance(reward_fn, WeightedSumReward):
        towers = (reward_image_tower(part) for _, part, _ in reward_fn.parts)
        return next((tower for tower in towers if tower is not None), None)
    return None


def feature_extractor(
    spec: str,
    reward_fn: Optional[Any] = None,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: int = 32,
) -> ImageFeatureFunction:
    """The image features named by ``spec`` (``GFlowNetConfig.eval_features``: ``"pixels"``, ``"clip"``,
    ``"dino"``, ``"dreamsim"``, ``"clip:<model>"``, ``"dino:<model>"``), their towers on ``device`` (default: the
    first images') in batches of ``batch_size``. ``"clip"`` reuses ``reward_fn``'s tower when it has one
    (:func:`reward_image_tower`); ``"clip:<model>"`` always loads ``<model>``. ``"pixels"`` is
    :func:`~dag_trl.evaluation.pixel_features` itself, so its figures are those published."""
    name, model = split_eval_features(spec)
    options = {"device": device, "batch_size": batch_size}
    if name == "pixels":
        return pixel_features
    if name == "clip":
        tower = reward_image_tower(reward_fn) if model is None else None
        if tower is not None:
            return RewardTowerFeatures(tower, **options)
        return ClipImageFeatures(model or DEFAULT_CLIP_MODEL, **options)
    if name == "dino":
        return DinoImageFeatures(model or DEFAULT_DINO_MODEL, **options)
    return DreamSimFeatures(**options)
