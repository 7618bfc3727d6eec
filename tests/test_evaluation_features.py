"""The evaluation's image features by name (``dag_trl.evaluation_features``): tiny random CLIP and DINOv2 towers saved
like Hub checkpoints and loaded through the same ``from_pretrained`` path a Hub id takes, checked against
transformers' own processors; the reward's tower reused; DreamSim's glue and its missing-package error; the
features in a trainer's evaluation."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, brightness, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer
from dag_trl import rewards as R
from dag_trl.evaluation import diversity, kernel_distance, pixel_features
from dag_trl.evaluation_features import (
    DEFAULT_CLIP_MODEL,
    ClipImageFeatures,
    DinoImageFeatures,
    RewardTowerFeatures,
    diversity_distance,
    feature_extractor,
    reward_image_tower,
)
from dag_trl.prompts import PromptList
from dag_trl.testing.images import smooth_images, to_pil
from dag_trl.testing.tiny_models import build_tiny_clip, build_tiny_dinov2

TINY_CLIP_PROJECTION = 16  # build_tiny_clip's projection_dim
TINY_DINO_WIDTH = 24  # build_tiny_dinov2's hidden_size


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def tiny_dino_path(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="module")
def aesthetic_mlp_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(R.AestheticMLP(input_size=TINY_CLIP_PROJECTION).state_dict(), path)
    return path


def test_pixels_are_the_published_pixel_features_compared_by_euclidean_distance():
    assert feature_extractor("pixels") is pixel_features
    assert diversity_distance(pixel_features) == "euclidean"
    assert diversity_distance(lambda images: images.flatten(1)) == "euclidean"  # any user function, as before


def test_clip_features_are_the_projected_image_embedding_of_transformers_own_processing(tiny_clip_path):
    from transformers import AutoProcessor, CLIPModel

    images = smooth_images(3, 48, 64)
    features = feature_extractor(f"clip:{tiny_clip_path}")(images)
    model, processor = CLIPModel.from_pretrained(tiny_clip_path).eval(), AutoProcessor.from_pretrained(tiny_clip_path)
    pixel_values = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = R.clip.projected_features(model.get_image_features(pixel_values=pixel_values))
    assert features.shape == (3, TINY_CLIP_PROJECTION) and features.dtype == torch.float32
    # Unnormalised, as KID takes features; the torch preprocessing is within about a grey level of PIL's.
    assert not torch.allclose(features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(features, expected, atol=2e-3, rtol=2e-3)


def test_dino_features_are_the_cls_token_of_transformers_own_processing(tiny_dino_path):
    from transformers import AutoImageProcessor, AutoModel

    images = smooth_images(3, 48, 64)
    extractor = feature_extractor(f"dino:{tiny_dino_path}")
    features = extractor(images)
    model, processor = (
        AutoModel.from_pretrained(tiny_dino_path).eval(),
        AutoImageProcessor.from_pretrained(tiny_dino_path),
    )
    pixel_values = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).last_hidden_state[:, 0]
    assert isinstance(extractor, DinoImageFeatures) and diversity_distance(extractor) == "cosine"
    assert features.shape == (3, TINY_DINO_WIDTH)
    # The processor's resize, crop and ImageNet statistics, not CLIP's defaults.
    assert (extractor.preprocess.shortest_edge, extractor.preprocess.crop_size) == (40, (32, 32))
    assert extractor.preprocess._mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    torch.testing.assert_close(features, expected, atol=2e-3, rtol=2e-3)


def test_clip_reuses_the_rewards_tower_and_gives_the_features_of_the_same_checkpoint(
    tiny_clip_path, aesthetic_mlp_file
):
    reward = R.get_reward_fn("aesthetic_score", clip_model=str(tiny_clip_path), mlp_path=str(aesthetic_mlp_file))
    images = smooth_images(2, 40, 40, seed=3)
    extractor = feature_extractor("clip", reward)
    assert isinstance(extractor, RewardTowerFeatures) and extractor.reward is reward
    features = extractor(images)
    assert extractor.reward.model is reward.model  # loaded once, shared with the reward
    torch.testing.assert_close(features, feature_extractor(f"clip:{tiny_clip_path}")(images), rtol=0, atol=0)
    # Inside a weighted sum too; "clip:<model>" loads that model whatever the reward.
    assert reward_image_tower(R.weighted_sum({brightness: 1.0, reward: 0.5})) is reward
    assert isinstance(feature_extractor(f"clip:{tiny_clip_path}", reward), ClipImageFeatures)


def test_clip_without_a_reward_tower_loads_vit_l14_and_names_the_download_when_offline():
    extractor = feature_extractor("clip", brightness)
    assert isinstance(extractor, ClipImageFeatures) and extractor.model_name_or_path == DEFAULT_CLIP_MODEL
    assert reward_image_tower(R.get_reward_fn("jpeg_compressibility")) is None
    with pytest.raises(OSError) as raised:
        feature_extractor("dino:no-such-user/no-such-dinov2")(torch.rand(2, 3, 8, 8))
    message = str(raised.value)
    assert message.startswith("eval_features='dino:no-such-user/no-such-dinov2' could not load its weights (OSError: ")
    assert message.endswith(
        "They come from the Hub repositories ['no-such-user/no-such-dinov2'], which must be in the Hub cache when the "
        "Hub cannot be reached (HF_HUB_OFFLINE=1, or no network): download them beforehand where it can "
        "(`hf download no-such-user/no-such-dinov2`), or pass local folders instead."
    )


def test_features_run_in_batches_and_come_back_on_the_images_device(tiny_dino_path):
    images = smooth_images(5, 32, 32, seed=1)
    whole = feature_extractor(f"dino:{tiny_dino_path}", batch_size=8)(images)
    torch.testing.assert_close(feature_extractor(f"dino:{tiny_dino_path}", batch_size=2)(images), whole)


DREAMSIM_MISSING = (
    "eval_features='dreamsim' needs the dreamsim package, which dag_trl does not install: `pip install dreamsim`."
)


def test_dreamsim_without_its_package_is_refused_naming_the_install(monkeypatch):
    from dag_trl import GFlowNetConfig

    monkeypatch.setitem(sys.modules, "dreamsim", None)  # `import dreamsim` raises ImportError
    with pytest.raises(ImportError, match=f"^{re.escape(DREAMSIM_MISSING)}$"):
        feature_extractor("dreamsim")
    with pytest.raises(ImportError) as raised:
        GFlowNetConfig(eval_features="dreamsim")
    assert str(raised.value) == DREAMSIM_MISSING


def test_dreamsim_embeds_224_pixel_images_in_0_1(monkeypatch, tmp_path):
    """DreamSim's own preprocessing is a bicubic resize to 224 x 224 and ``ToTensor`` ([0, 1]); its ``embed``
    squeezes a batch of one. A stand-in package records what it is given and embeds by the channel means."""
    seen = {}

    class StandInModel:
        def embed(self, images):
            seen.setdefault("shapes", []).append(tuple(images.shape))
            return images.mean(dim=(2, 3)).squeeze()

    def build(pretrained, device, cache_dir):
        seen["build"] = (pretrained, device, cache_dir)
        return StandInModel(), None

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=build))
    extractor = feature_extractor("dreamsim", device="cpu")
    # Constant images: a resize keeps the colour, so the channel means are the colours (k / 255 exactly).
    colours = torch.tensor([[51.0, 102.0, 204.0], [0.0, 255.0, 153.0]]) / 255
    images = colours[:, :, None, None].expand(2, 3, 40, 56)
    torch.testing.assert_close(extractor(images), colours, rtol=0, atol=1e-6)
    assert extractor(images[:1]).shape == (1, 3)
    assert seen["shapes"] == [(2, 3, 224, 224), (1, 3, 224, 224)]
    assert seen["build"][:2] == (True, "cpu") and seen["build"][2].endswith("dreamsim")
    assert diversity_distance(extractor) == "cosine"


# ------------------------------------------------------------------------------------------------------------------
# In the trainer's evaluation (eval_features)
# ------------------------------------------------------------------------------------------------------------------


def evaluating_trainer(tmp_path, tiny_sd_path, **overrides):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    config = tiny_config(tmp_path, eval_num_samples=6, eval_seed=7, sample_num_batches_per_epoch=1, **overrides)
    return GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, seed=0), pipeline)


@pytest.mark.parametrize("kind, width", [("clip", TINY_CLIP_PROJECTION), ("dino", TINY_DINO_WIDTH)])
def test_an_evaluation_measures_diversity_and_distance_on_the_named_tower(
    tmp_path, tiny_sd_path, tiny_clip_path, tiny_dino_path, kind, width
):
    model_path = tiny_clip_path if kind == "clip" else tiny_dino_path
    trainer = evaluating_trainer(tmp_path, tiny_sd_path, eval_features=f"{kind}:{model_path}")
    result = trainer.evaluate(epoch=0)

    # Recomputed from the same prompts and noise with a tower loaded on its own.
    prompts, _ = trainer.evaluation_prompts()
    reference = feature_extractor(f"{kind}:{model_path}")
    features = reference(trainer.sample_images(prompts, seed=7))
    prior_features = reference(trainer.sample_images(prompts, seed=7, prior=True))
    assert features.shape == (6, width) and trainer.image_features(trainer.sample_images(prompts, 7)).shape[1] == width
    assert result["diversity"] == pytest.approx(diversity(features, prompts, distance="cosine"), abs=1e-6)
    assert result["diversity"] != pytest.approx(diversity(features, prompts), abs=1e-3)  # not the Euclidean one
    assert result["prior_kernel_distance"] == pytest.approx(kernel_distance(prior_features, features), abs=1e-6)


def test_pixels_by_default_and_image_features_or_eval_features_not_both(tmp_path, tiny_sd_path, tiny_clip_path):
    assert evaluating_trainer(tmp_path / "default", tiny_sd_path).image_features is pixel_features
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    config = tiny_config(tmp_path, eval_features=f"clip:{tiny_clip_path}")
    with pytest.raises(ValueError) as raised:
        GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS), pipeline, image_features=pixel_features)
    assert str(raised.value) == (
        f"GFlowNetConfig.eval_features='clip:{tiny_clip_path}' and the image_features argument both choose the "
        "evaluation's features: give one of them."
    )
