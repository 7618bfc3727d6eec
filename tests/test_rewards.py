"""Tests of dag_trl.rewards on tiny random models of the real classes, saved and loaded like Hub checkpoints."""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import signal
import sys
import threading
import time
import types
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dag_trl.demo.shapes  # noqa: F401  (registers the demo's shapes_colour_preference reward)
from dag_trl import rewards as R
from dag_trl.rewards import clip as clip_rewards
from dag_trl.testing.images import smooth_images, to_pil
from dag_trl.testing.tiny_models import (
    VIT_DEPTH,
    VIT_IMAGE,
    build_tiny_clip,
    build_tiny_imagereward,
    tiny_blip_text_config,
)

PROMPTS = ["a cat", "a dog on a sofa", "a red car", "an owl"]


def level_difference(ours: torch.Tensor, reference: torch.Tensor, std) -> torch.Tensor:
    """Absolute difference of two normalised pixel tensors, in 8-bit grey levels."""
    return (ours - reference).abs() * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255


# ------------------------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory) -> Path:
    """Tiny CLIP folder with shortest edge 40 and crop 32, so that both resizing and cropping are exercised."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_path):
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_path).eval(), AutoProcessor.from_pretrained(tiny_clip_path)


@pytest.fixture(scope="module")
def aesthetic_mlp_file(tmp_path_factory) -> Path:
    """A random aesthetic head for the 16-dim tiny CLIP, saved like sac+logos+ava1-l14-linearMSE.pth."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(R.AestheticMLP(input_size=16).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------

GOOD = torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize(
    ("images", "prompts", "metadata", "message"),
    [
        ((GOOD * 255).to(torch.uint8), ["a", "b"], None, "floating-point tensor.*uint8"),
        (GOOD.numpy(), ["a", "b"], None, "torch.Tensor.*ndarray"),
        (GOOD * 2 - 1, ["a", "b"], None, r"values in \[0, 1\]; got min -"),
        (GOOD + 0.5, ["a", "b"], None, r"values in \[0, 1\].*max 1\.\d"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], None, "NaN"),
        (GOOD[0], ["a"], None, r"rank 4\); got shape \(3, 8, 8\)"),
        (torch.rand(2, 4, 8, 8), ["a", "b"], None, r"3 \(RGB\) channels.*\(2, 4, 8, 8\)"),
        (torch.rand(0, 3, 8, 8), [], None, "empty batch"),
        (GOOD, ["a"], None, "prompts has 1 entries but images has batch size 2"),
        (GOOD, "a cat", None, "prompts must be a list or tuple of 2 strings; got str"),
        (GOOD, ["a", 3], None, r"prompts\[1\] must be a str; got int"),
        (GOOD, ["a", "b"], [{}], "metadata has 1 entries but images has batch size 2"),
        (GOOD, ["a", "b"], {"k": 1}, "metadata must be None or a list or tuple of 2 dicts; got dict"),
    ],
)
@pytest.mark.parametrize("reward_name", ["jpeg_compressibility", "shapes_colour_preference"])
def test_bad_inputs_raise_clear_errors(images, prompts, metadata, message, reward_name):
    with pytest.raises(ValueError, match=message):
        R.get_reward_fn(reward_name)(images, prompts, metadata)


def test_model_rewards_check_inputs_before_loading_weights():
    # The checkpoint does not exist: reaching the loader would raise OSError, not the input error.
    reward = R.aesthetic_score(clip_model="/nonexistent/clip", mlp_path="/nonexistent/mlp.pth")
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        reward(torch.rand(1, 1, 8, 8), ["a"], [{}])
    assert not reward._loaded


LIBRARY_REWARDS = (
    "aesthetic_score", "clip_score", "hpsv2", "imagereward", "jpeg_compressibility", "jpeg_incompressibility",
    "pickscore", "remote_reward", "weighted_sum",
)  # fmt: skip


def test_unknown_reward_name_lists_the_known_ones():
    with pytest.raises(ValueError) as excinfo:
        R.get_reward_fn("aesthetics")
    message = str(excinfo.value)
    assert message.startswith("unknown reward 'aesthetics'; known rewards: aesthetic_score, clip_score, ")
    assert all(name in message for name in LIBRARY_REWARDS)
    assert set(LIBRARY_REWARDS) <= set(R.available_rewards())
    assert R.available_rewards() == sorted(R.available_rewards())


def test_get_reward_fn_builds_by_name_and_passes_callables_through():
    reward = R.get_reward_fn("jpeg_incompressibility", quality=50)
    assert isinstance(reward, R.JpegReward) and reward.quality == 50 and reward.sign == 1.0
    assert R.get_reward_fn(reward) is reward
    with pytest.raises(ValueError, match="cannot be applied"):
        R.get_reward_fn(reward, quality=10)


def test_get_reward_fn_names_the_accepted_keyword_arguments():
    accepted = "accepted keyword arguments: version, checkpoint, architecture, dtype, device"
    with pytest.raises(TypeError, match=f"cannot build reward 'hpsv2': .*'arch'; {accepted}$"):
        R.get_reward_fn("hpsv2", arch="ViT-B-32")
    with pytest.raises(TypeError, match="cannot build reward 'remote_reward': missing a required argument: 'url'"):
        R.get_reward_fn("remote_reward")


@pytest.mark.parametrize("name", LIBRARY_REWARDS)
def test_each_reward_name_is_its_class(name):
    # The public lowercase name, the registered factory and the class are one object: no wrapper to drift.
    factory = getattr(R, name)
    assert R.REWARDS.factory(name) is factory
    assert isinstance(factory, type) and issubclass(factory, R.RewardFunction)


def keyword_names(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


@pytest.mark.parametrize("name", R.REWARDS.names())
def test_every_registered_reward_takes_every_option_of_its_class(name):
    """Also covers rewards registered from outside the library, e.g. the demo's (imported above)."""
    factory = R.REWARDS.factory(name)
    built = factory if isinstance(factory, type) else typing.get_type_hints(factory)["return"]
    assert isinstance(built, type), f"{name}: annotate the factory's return type with the class it builds"
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
        assert keyword_names(built.__init__) <= keyword_names(factory)


# ------------------------------------------------------------------------------------------------------------------
# JPEG
# ------------------------------------------------------------------------------------------------------------------


def pil_jpeg_kb(image: Image.Image, quality: int) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def test_jpeg_sizes_match_pil_encoding_and_signs():
    torch.manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, noise, smooth_images(1, 64, 64)]).double()  # any float dtype is accepted
    expected = torch.tensor([pil_jpeg_kb(im, 95) for im in to_pil(images.float())])

    compress, info = R.jpeg_compressibility()(images, ["x"] * 3, [{}] * 3)
    incompress, _ = R.get_reward_fn("jpeg_incompressibility")(images, ("x",) * 3, None)
    assert info == {}
    assert compress.dtype == torch.float32 and compress.shape == (3,)
    torch.testing.assert_close(incompress, expected)
    torch.testing.assert_close(compress, -expected)
    assert compress[0] > compress[2] > compress[1]  # flat compresses best, noise worst

    low_quality, _ = R.JpegReward(sign=1, quality=10)(images, ["x"] * 3)
    torch.testing.assert_close(low_quality[1], torch.tensor(pil_jpeg_kb(to_pil(noise)[0], 10)))
    assert low_quality[1] < incompress[1]


def test_jpeg_rejects_bad_settings():
    with pytest.raises(ValueError, match="quality must be an integer in \\[1, 100\\]; got 0"):
        R.JpegReward(sign=-1, quality=0)
    with pytest.raises(ValueError, match="sign must be"):
        R.JpegReward(sign=2)


# ------------------------------------------------------------------------------------------------------------------
# Preprocessing against transformers' own processor
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(512, 512), (200, 300), (300, 200), (160, 160), (96, 64)])
def test_preprocessing_matches_clip_image_processor(height, width):
    """Default CLIP processor (shortest edge 224, bicubic, crop 224): down- and upsampling, both orientations."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    preprocess = R.ImagePreprocessor.from_image_processor(processor)
    images = smooth_images(2, height, width, seed=height + width)
    reference = torch.from_numpy(np.stack(processor(images=to_pil(images), return_tensors="np")["pixel_values"]))
    ours = preprocess(images)
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    levels = level_difference(ours, reference, processor.image_std)
    # PIL filters with fixed-point weights, so a few pixels land one (rarely two) grey levels away.
    assert levels.max() <= 2.0 + 1e-3
    assert levels.mean() < 0.05


def test_preprocessing_reads_settings_from_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"height": 48, "width": 40},
        do_center_crop=False,
        resample=2,
        image_mean=[0.5, 0.25, 0.1],
        image_std=[0.2, 0.3, 0.4],
    )
    preprocess = R.ImagePreprocessor.from_image_processor(processor)
    assert (preprocess.size, preprocess.crop_size, preprocess.mode) == ((48, 40), None, "bilinear")
    images = smooth_images(3, 100, 90, seed=3)
    reference = torch.from_numpy(np.stack(processor(images=to_pil(images), return_tensors="np")["pixel_values"]))
    ours = preprocess(images)
    assert ours.shape == reference.shape == (3, 3, 48, 40)
    assert level_difference(ours, reference, processor.image_std).max() <= 2.0 + 1e-3


def test_preprocessing_pads_longest_edge_like_hpsv2():
    """HPSv2's evaluation transform: scale the longest side to the model size, zero-pad to a square, normalise."""
    images = smooth_images(2, 60, 90, seed=5)
    preprocess = R.ImagePreprocessor(R.OPENAI_CLIP_MEAN, R.OPENAI_CLIP_STD, pad_longest_edge=36)
    references = []
    for image in to_pil(images):
        resized = image.resize((36, 24), resample=Image.BICUBIC)
        canvas = Image.new("RGB", (36, 36))
        canvas.paste(resized, (0, 6))
        pixels = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
        references.append(
            (pixels - torch.tensor(R.OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(R.OPENAI_CLIP_STD).view(3, 1, 1)
        )
    assert level_difference(preprocess(images), torch.stack(references), R.OPENAI_CLIP_STD).max() <= 2.0 + 1e-3


def test_preprocessing_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="resample=1 is not supported"):
        R.ImagePreprocessor(R.OPENAI_CLIP_MEAN, R.OPENAI_CLIP_STD, resample=1)
    too_big = R.ImagePreprocessor(R.OPENAI_CLIP_MEAN, R.OPENAI_CLIP_STD, shortest_edge=16, crop_size=(32, 32))
    with pytest.raises(ValueError, match="crop size \\(32, 32\\) is larger than the resized image \\(16, 16\\)"):
        too_big(torch.rand(1, 3, 20, 20))


# ------------------------------------------------------------------------------------------------------------------
# CLIP rewards
# ------------------------------------------------------------------------------------------------------------------


def reference_clip_outputs(tiny_clip, images, prompts):
    """The CLIP forward pass through transformers' own processor (PIL path), as the reference code of each score."""
    model, processor = tiny_clip
    inputs = processor(text=prompts, images=to_pil(images), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


def test_aesthetic_score_matches_reference(tiny_clip, tiny_clip_path, aesthetic_mlp_file):
    images = smooth_images(4, 64, 80)
    reward = R.get_reward_fn("aesthetic_score", clip_model=str(tiny_clip_path), mlp_path=str(aesthetic_mlp_file))
    rewards, info = reward(images, PROMPTS, [{}] * 4)

    model, processor = tiny_clip
    pixel_values = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embedding = clip_rewards.projected_features(model.get_image_features(pixel_values=pixel_values))
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        mlp = R.AestheticMLP(16).eval()
        mlp.load_state_dict(torch.load(aesthetic_mlp_file))
        expected = mlp(embedding).squeeze(-1)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,) and info == {}
    torch.testing.assert_close(rewards, expected, atol=2e-3, rtol=2e-3)
    # The processor settings come from the saved processor, not from ViT-L/14 defaults.
    assert (reward.preprocess.shortest_edge, reward.preprocess.crop_size) == (40, (32, 32))


def test_aesthetic_head_shape_mismatch_names_the_file(tiny_clip_path, tmp_path):
    wrong = tmp_path / "l14.pth"
    torch.save(R.AestheticMLP(768).state_dict(), wrong)
    reward = R.aesthetic_score(clip_model=str(tiny_clip_path), mlp_path=str(tmp_path), mlp_filename="l14.pth")
    with pytest.raises(RuntimeError, match="l14.pth|do not fit a 16-1024-128-64-16-1"):
        reward(smooth_images(1, 32, 32), ["a"])


def test_pickscore_and_clip_score_match_clip_logits(tiny_clip, tiny_clip_path):
    images = smooth_images(4, 48, 48, seed=1)
    outputs = reference_clip_outputs(tiny_clip, images, PROMPTS)
    logits = outputs.logits_per_image.diagonal()

    pick, _ = R.pickscore(str(tiny_clip_path), str(tiny_clip_path))(images, PROMPTS, [{}] * 4)
    cosine, _ = R.clip_score(str(tiny_clip_path))(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(pick, logits, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cosine, logits / tiny_clip[0].logit_scale.exp(), atol=2e-4, rtol=2e-3)
    assert cosine.abs().max() <= 1


def test_clip_rewards_load_once_and_never_use_the_pil_processor(tiny_clip_path, aesthetic_mlp_file, monkeypatch):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    loads = []
    real_load_clip = clip_rewards.load_clip
    monkeypatch.setattr(
        clip_rewards, "load_clip", lambda *args, **kwargs: loads.append(args) or real_load_clip(*args, **kwargs)
    )
    reward = R.aesthetic_score(clip_model=str(tiny_clip_path), mlp_path=str(aesthetic_mlp_file))
    images = smooth_images(8, 64, 64)
    first, _ = reward(images, PROMPTS * 2)
    model, preprocess = reward.model, reward.preprocess

    def no_pil(*args, **kwargs):
        raise AssertionError("the PIL image processor was called")

    monkeypatch.setattr(CLIPImageProcessorPil, "__call__", no_pil)
    monkeypatch.setattr(CLIPImageProcessorPil, "preprocess", no_pil)
    for _ in range(2):
        again, _ = reward(images, PROMPTS * 2)
        torch.testing.assert_close(again, first)
    assert len(loads) == 1 and reward.model is model and reward.preprocess is preprocess
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


def test_clip_reward_dtype_and_device(tiny_clip_path):
    reward = R.clip_score(str(tiny_clip_path), dtype="bfloat16", device="cpu")
    images = smooth_images(2, 32, 32)
    low, _ = reward(images, PROMPTS[:2])
    full, _ = R.clip_score(str(tiny_clip_path))(images, PROMPTS[:2])
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    assert low.dtype == torch.float32 and low.device == images.device
    torch.testing.assert_close(low, full, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="floating torch dtype"):
        R.clip_score(str(tiny_clip_path), dtype="int8")


# ------------------------------------------------------------------------------------------------------------------
# HPSv2
# ------------------------------------------------------------------------------------------------------------------


def test_hpsv2_without_open_clip_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail even where it is installed
    reward = R.hpsv2(checkpoint=str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install dag_trl\[hpsv2\]"):
        reward(smooth_images(1, 16, 16), ["a"])
    with pytest.raises(ValueError, match="unknown HPS version 'v3'; known versions: \\['v2.0', 'v2.1'\\]"):
        R.hpsv2(version="v3")


class _FakeOpenClipModel(torch.nn.Module):
    """Stand-in for an open_clip CLIP with the interface HPSv2Reward uses (open_clip is not installable here)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(3 * 16 * 16, 8)
        self.visual.image_size = (16, 16)
        self.visual.image_mean, self.visual.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.token_embedding = torch.nn.Embedding(128, 8)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(self.visual(pixels.flatten(1)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(self.token_embedding(tokens).mean(1), dim=-1)


def test_hpsv2_loads_checkpoint_and_scores_cosine(monkeypatch, tmp_path):
    def tokenize(prompts):
        return torch.tensor([[ord(c) % 128 for c in p.ljust(12)[:12]] for p in prompts])

    architectures = []
    fake = types.ModuleType("open_clip")
    fake.create_model = lambda name, pretrained=None: architectures.append(name) or _FakeOpenClipModel()
    fake.get_tokenizer = lambda name: architectures.append(name) or tokenize
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    torch.manual_seed(3)
    trained = _FakeOpenClipModel()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "HPS_v2_compressed.pt")

    images = smooth_images(3, 20, 30)
    reward = R.hpsv2(version="v2.0", checkpoint=str(tmp_path), architecture="ViT-B-32")
    rewards, _ = reward(images, PROMPTS[:3])
    assert architectures == ["ViT-B-32", "ViT-B-32"]  # the model and its tokenizer
    # The mean/std come from the model's visual config, the size from its image_size.
    assert reward.preprocess.pad_longest_edge == 16 and reward.preprocess._mean.flatten().tolist() == [0.5] * 3
    with torch.no_grad():
        expected = (trained.encode_image(reward.preprocess(images)) * trained.encode_text(tokenize(PROMPTS[:3]))).sum(
            -1
        )
    torch.testing.assert_close(rewards, expected)


# ------------------------------------------------------------------------------------------------------------------
# ImageReward
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagereward_folder(tmp_path_factory) -> Path:
    return build_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


def reference_blip_vit(state: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """BLIP's timm-style ViT written directly against the official parameter names (pre-norm blocks, eps 1e-6)."""

    def p(name):
        return state["blip.visual_encoder." + name]

    weight = p("patch_embed.proj.weight")
    x = F.conv2d(pixel_values, weight, p("patch_embed.proj.bias"), stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + p("pos_embed")
    batch, tokens, width = x.shape
    heads = width // 64
    for i in range(VIT_DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (width,), p(b + "norm1.weight"), p(b + "norm1.bias"), 1e-6)
        q, k, v = (
            F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias"))
            .reshape(batch, tokens, 3, heads, width // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1) @ v
        x = x + F.linear(
            attention.transpose(1, 2).reshape(batch, tokens, width), p(b + "attn.proj.weight"), p(b + "attn.proj.bias")
        )
        h = F.layer_norm(x, (width,), p(b + "norm2.weight"), p(b + "norm2.bias"), 1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))),
            p(b + "mlp.fc2.weight"),
            p(b + "mlp.fc2.bias"),
        )
    return F.layer_norm(x, (width,), p("norm.weight"), p("norm.bias"), 1e-6)


@pytest.mark.parametrize("max_length", [35, 4])  # the official length, and one that truncates two prompts
def test_imagereward_matches_official_architecture(imagereward_folder, max_length):
    from transformers import AutoTokenizer, BlipTextModel

    images = smooth_images(3, 40, 40, seed=2)
    prompts = ["a cat on a sofa", "a red car", "an owl"]
    folder = str(imagereward_folder)
    reward = R.imagereward(checkpoint=folder, tokenizer=folder, max_length=max_length)
    rewards, _ = reward(images, prompts, [{}] * 3)

    state = torch.load(imagereward_folder / "ImageReward.pt")
    pixel_values = reward.preprocess(images)
    assert (reward.preprocess.shortest_edge, reward.preprocess.crop_size) == (VIT_IMAGE, (VIT_IMAGE, VIT_IMAGE))
    assert reward.preprocess._std.flatten().tolist() == pytest.approx(R.OPENAI_CLIP_STD)
    with torch.no_grad():
        image_embeds = reference_blip_vit(state, pixel_values)
        torch.testing.assert_close(reward.model.vision(pixel_values=pixel_values).last_hidden_state, image_embeds)
        med_config = json.loads((imagereward_folder / "med_config.json").read_text())
        text = BlipTextModel(tiny_blip_text_config(med_config), add_pooling_layer=False).eval()
        text.load_state_dict(
            {
                k[len("blip.text_encoder.") :]: v
                for k, v in state.items()
                if k.startswith("blip.text_encoder.") and "position_ids" not in k
            }
        )
        tokens = AutoTokenizer.from_pretrained(imagereward_folder)(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        assert tokens.input_ids.shape == (3, max_length)
        features = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        ).last_hidden_state[:, 0]
        mlp = R.AestheticMLP(32).eval()
        mlp.load_state_dict({k[len("mlp.") :]: v for k, v in state.items() if k.startswith("mlp.")})
        expected = (mlp(features).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-4)


def test_imagereward_rejects_a_foreign_checkpoint(tmp_path, imagereward_folder):
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((imagereward_folder / "med_config.json").read_text())
    reward = R.imagereward(checkpoint=str(tmp_path), tokenizer=str(imagereward_folder))
    with pytest.raises(RuntimeError, match="is not an ImageReward checkpoint"):
        reward(smooth_images(1, 16, 16), ["a"])


# ------------------------------------------------------------------------------------------------------------------
# weighted_sum
# ------------------------------------------------------------------------------------------------------------------


def mean_pixel(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {"calls": 1}


def test_weighted_sum_arithmetic_and_info():
    images = smooth_images(3, 32, 32)
    jpeg = R.jpeg_incompressibility()
    combined = R.weighted_sum({jpeg: 2.0, mean_pixel: -0.5, "jpeg_compressibility": 1.0})
    rewards, info = combined(images, PROMPTS[:3], None)
    sizes, _ = jpeg(images, PROMPTS[:3])
    means = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(rewards, 2.0 * sizes - 0.5 * means - sizes)
    torch.testing.assert_close(info["jpeg_incompressibility"], sizes)
    torch.testing.assert_close(info["mean_pixel"], means)
    torch.testing.assert_close(info["jpeg_compressibility"], -sizes)
    assert info["mean_pixel/calls"] == 1


def test_weighted_sum_names_duplicates_and_rejects_bad_parts():
    images = smooth_images(2, 16, 16)
    rewards, info = R.weighted_sum([(mean_pixel, 1.0), (mean_pixel, 3.0)])(images, ["a", "b"])
    torch.testing.assert_close(rewards, 4 * images.mean(dim=(1, 2, 3)))
    assert set(info) == {"mean_pixel", "mean_pixel_2", "mean_pixel/calls", "mean_pixel_2/calls"}
    with pytest.raises(ValueError, match="at least one"):
        R.weighted_sum({})
    with pytest.raises(ValueError, match="weight of reward 'mean_pixel' must be a finite number; got nan"):
        R.weighted_sum({mean_pixel: float("nan")})
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.weighted_sum({"nope": 1.0})
    broken = R.weighted_sum({lambda images, prompts, metadata: (torch.zeros(5), {}): 1.0})
    with pytest.raises(RuntimeError, match="returned 5 values for 2 images"):
        broken(images, ["a", "b"])


# ------------------------------------------------------------------------------------------------------------------
# remote_reward against a real HTTP server on 127.0.0.1
# ------------------------------------------------------------------------------------------------------------------


class _ScoringHandler(BaseHTTPRequestHandler):
    """Scores each image by its mean 8-bit value / 255, decoding the request as a real server would."""

    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up: the point of the /slow endpoint

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        hits = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/garbage":
            return self._answer(200, b"<html>not a score</html>")
        if self.path == "/short":
            return self._answer(200, json.dumps({"scores": [1.0]}).encode())
        if self.path == "/nan":
            return self._answer(200, b'{"scores": [NaN, 1.0]}')
        if self.path == "/bad-request":
            return self._answer(400, b"missing field")
        if self.path == "/auth" and self.headers["Authorization"] != "Bearer secret":
            return self._answer(401, b"no token")
        if self.path == "/flaky" and hits == 1:
            return self._answer(503, b"warming up")
        if request["image_format"] == "png":
            arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in request["images"]]
        else:
            shape = request["shape"]
            arrays = [np.frombuffer(base64.b64decode(s), dtype=np.uint8).reshape(shape) for s in request["images"]]
        scores = [float(a.mean() / 255) for a in arrays]
        info = {"n_prompts": len(request["prompts"]), "first_metadata": request["metadata"][0]}
        self._answer(200, json.dumps({"scores": scores, "info": info}).encode())


def serve(handler_class):
    """Serve ``handler_class`` on a local port in a thread; yields its URL, then stops the server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server_url():
    yield from serve(_ScoringHandler)


@pytest.mark.parametrize("image_format", ["png", "uint8"])
def test_remote_reward_round_trip(server_url, image_format):
    images = smooth_images(3, 24, 20)
    reward = R.get_reward_fn("remote_reward", url=server_url + "/good", image_format=image_format)
    rewards, info = reward(images, PROMPTS[:3], [{"id": 7}, {}, {}])
    expected = (images * 255).round().mean(dim=(1, 2, 3)) / 255
    torch.testing.assert_close(rewards, expected)
    assert info == {"n_prompts": 3, "first_metadata": {"id": 7}}


def test_remote_reward_sends_the_extra_headers(server_url):
    images = torch.ones(1, 3, 4, 4)
    reward = R.remote_reward(server_url + "/auth", headers={"Authorization": "Bearer secret"})
    rewards, _ = reward(images, ["a"])
    torch.testing.assert_close(rewards, torch.ones(1))
    with pytest.raises(RuntimeError, match="answered HTTP 401 Unauthorized: 'no token'"):
        R.remote_reward(server_url + "/auth")(images, ["a"])


def test_remote_reward_retries_server_errors(server_url):
    rewards, _ = R.remote_reward(server_url + "/flaky", backoff=0.0)(torch.ones(2, 3, 4, 4), ["a", "b"])
    torch.testing.assert_close(rewards, torch.ones(2))
    assert _ScoringHandler.hits["/flaky"] == 2


def test_remote_reward_times_out_with_bounded_retries(server_url):
    reward = R.remote_reward(server_url + "/slow", timeout=0.2, max_retries=1, backoff=0.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{server_url}/slow failed after 2 attempts.*timed out"):
        reward(torch.rand(1, 3, 4, 4), ["a"])
    assert time.monotonic() - start < 0.9  # two 0.2 s attempts, not the server's 1 s answer
    assert _ScoringHandler.hits["/slow"] == 2


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/garbage", "answered non-JSON.*not a score"),
        ("/short", "answered 1 scores for a batch of 2"),
        ("/nan", "answered non-numeric or non-finite"),
        ("/bad-request", "answered HTTP 400 Bad Request: 'missing field'"),
    ],
)
def test_remote_reward_malformed_answers_raise(server_url, path, message):
    with pytest.raises(RuntimeError, match=f"remote reward at {server_url}{path} {message}"):
        R.remote_reward(server_url + path, backoff=0.0)(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert _ScoringHandler.hits[path] == 1  # malformed answers are not retried


def test_remote_reward_unreachable_and_bad_settings():
    # Bind and release a loopback port so that nothing listens on it.
    probe = ThreadingHTTPServer(("127.0.0.1", 0), _ScoringHandler)
    url = f"http://127.0.0.1:{probe.server_address[1]}/score"
    probe.server_close()
    with pytest.raises(RuntimeError, match=f"{url} failed after 2 attempts.*(refused|ConnectionRefusedError)"):
        R.remote_reward(url, max_retries=1, backoff=0.0)(torch.rand(1, 3, 4, 4), ["a"])
    with pytest.raises(ValueError, match="http:// or https:// URL; got 'ftp://127.0.0.1/x'"):
        R.remote_reward("ftp://127.0.0.1/x")
    with pytest.raises(ValueError, match="image_format must be 'png' or 'uint8'; got 'jpeg'"):
        R.remote_reward("http://127.0.0.1/x", image_format="jpeg")


class _TrickleHandler(BaseHTTPRequestHandler):
    """Answers a valid score one byte at a time, status line and headers included, every ``/<delay in ms>``."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"scores": [0.5]}).encode()
        answer = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        delay = int(self.path.strip("/")) / 1000
        try:
            for byte in answer:
                self.wfile.write(bytes([byte]))
                time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: the point of the test


@pytest.fixture(scope="module")
def trickle_url():
    yield from serve(_TrickleHandler)


def test_remote_reward_timeout_is_a_total_deadline(trickle_url):
    # 58 bytes, one every 50 ms: each read is far within 0.4 s, the whole answer would take ~2.9 s.
    reward = R.remote_reward(trickle_url + "/50", timeout=0.4, max_retries=0)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        reward(torch.rand(1, 3, 4, 4), ["a"])
    assert time.monotonic() - start < 1.2
    assert str(raised.value) == (
        f"remote reward at {trickle_url}/50 failed after 1 attempts (deadline 0.4s each): TimeoutError: timed out, "
        "no complete answer within the 0.4s deadline"
    )
    # A slow answer that ends within the deadline is read in full.
    rewards, info = R.remote_reward(trickle_url + "/2", timeout=2.0, max_retries=0)(torch.rand(1, 3, 4, 4), ["a"])
    assert rewards.tolist() == [0.5] and info == {}


def test_remote_reward_cancel_ends_a_request_in_flight_at_once(trickle_url):
    # The answer would take ~2.9 s (58 bytes, 50 ms apart); an interrupted training run must not wait for it.
    reward = R.remote_reward(trickle_url + "/50", timeout=30.0, max_retries=3, backoff=0.0)
    outcome = {}

    def call():
        try:
            reward(torch.rand(1, 3, 4, 4), ["a"])
        except RuntimeError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    reward.cancel()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - start < 0.5
    assert outcome["error"] == f"remote reward at {trickle_url}/50 was cancelled (training was interrupted)."
    # Later calls of the same reward work as before (here on a quick endpoint).
    reward.url = trickle_url + "/2"
    rewards, _ = reward(torch.rand(1, 3, 4, 4), ["a"])
    assert rewards.tolist() == [0.5]


@pytest.mark.parametrize("concurrent_call", [False, True])
def test_remote_reward_ctrl_c_while_waiting_ends_the_request_in_flight(trickle_url, concurrent_call):
    # The answer would take ~2.9 s; Ctrl-C in the waiting thread must end the request, not leave it running. The
    # reward's event loop stops (joining its thread) when the last call in it returns: with another call in the loop
    # (concurrent_call, here a lease taken by the test), that happens only once the test leaves it, and takes as long
    # as the interrupted request still runs.
    reward = R.remote_reward(trickle_url + "/50", timeout=30.0, max_retries=3, backoff=0.0)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with reward._portal if concurrent_call else contextlib.nullcontext():
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                reward(torch.rand(1, 3, 4, 4), ["a"])
        assert time.monotonic() - start < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not reward._in_flight


@pytest.mark.parametrize(
    ("scores", "problems"),
    [
        ("[1e308, 0.5]", r"scores\[0\]: 1e\+308 \(float32 overflow\)"),
        ("[0.5, 1" + "0" * 400 + "]", r"scores\[1\]: ~1e400 \(float32 overflow\)"),
        ("[-1e39, NaN]", r"scores\[0\]: -1e\+39 \(float32 overflow\); scores\[1\]: NaN"),
        ('[1e400, "0.5"]', r"scores\[0\]: inf; scores\[1\]: a str, not a number"),
        ("[null, true]", r"scores\[0\]: None; scores\[1\]: a bool, not a number"),
    ],
)
def test_remote_scores_beyond_float32_are_named_like_nan(scores, problems):
    reward = R.remote_reward("http://127.0.0.1:9/score")
    with pytest.raises(RuntimeError) as raised:
        reward.decode_response(f'{{"scores": {scores}}}'.encode(), 2)
    assert raised.match(
        rf"^remote reward at http://127.0.0.1:9/score answered non-numeric or non-finite scores \({problems}\): each "
        r"must be a finite number within float32's range \(\|score\| <= 3.4e\+38\): '\{\"scores\": "
    )
    assert reward.decode_response(b'{"scores": [3e38, -2]}', 2) == ([3e38, -2.0], {})


@pytest.mark.parametrize(
    "name, repositories",
    [
        ("aesthetic_score", ["openai/clip-vit-large-patch14", "camenduru/improved-aesthetic-predictor"]),
        ("clip_score", ["openai/clip-vit-large-patch14"]),
    ],
)
def test_an_offline_scorer_names_its_hub_repositories_and_how_to_fetch_them(name, repositories, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as raised:
        R.get_reward_fn(name).load()
    message = str(raised.value)
    assert message.startswith(f"reward {name!r} could not load its weights (OSError: ")
    commands = "; ".join(f"`hf download {repo}`" for repo in repositories)
    assert message.endswith(
        f"They come from the Hub repositories {repositories}, which must be in the Hub cache when the Hub cannot be "
        f"reached (HF_HUB_OFFLINE=1, or no network): download them beforehand where it can ({commands}), or pass "
        "local folders instead."
    )
