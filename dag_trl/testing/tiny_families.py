"""Tiny random SDXL, SD3 and FLUX pipelines, built offline and saved like Hub checkpoints.

Each builder writes a folder that the family's own diffusers pipeline class loads back with ``from_pretrained(path)``
exactly as it loads a Hub checkpoint, with the real module classes and the real configuration keys (SDXL's
``text_time`` added conditioning, SD3's and FLUX's 16-channel VAEs with a scaling and a shift factor, their
flow-matching schedulers), only a few thousand times smaller:

* :func:`build_tiny_sdxl_pipeline`: ``StableDiffusionXLPipeline``, sizes in :data:`TINY_SDXL`.
* :func:`build_tiny_sd3_pipeline`: ``StableDiffusion3Pipeline``, sizes in :data:`TINY_SD3`; call it with
  ``max_sequence_length=TINY_SD3.max_sequence_length`` (32; the pipeline's default, 256, works but pads the T5
  prompt to 256 tokens).
* :func:`build_tiny_flux_pipeline`: ``FluxPipeline``, sizes in :data:`TINY_FLUX`; call it with
  ``max_sequence_length=TINY_FLUX.max_sequence_length`` (32; the default is 512).

Every family makes 16x16 images through a VAE with one downsampling (8x8 latents). The CLIP tokenizers spell text
character by character (:func:`~dag_trl.testing.tiny_models.write_tiny_clip_tokenizer`, 24 tokens), the T5
tokenizer (:func:`write_tiny_t5_tokenizer`) too, with a word-start marker, so ``"a red circle"`` is 12 CLIP tokens
(with the start and end tokens) and 11 T5 tokens (with ``</s>``).

Every builder is seeded and bit-reproducible: before each module is constructed, torch's global generator is seeded
from ``seed`` and the module's fixed index in :data:`COMPONENT_ORDER`, and the weights are saved as safetensors.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tiny_models import SD_NOISE_SCHEDULE, write_tiny_clip_tokenizer

# The pipelines' components that hold weights, in the order of their seeds: the weights of ``name`` are drawn right
# after ``torch.manual_seed(seed * 100 + COMPONENT_ORDER.index(name))``.
COMPONENT_ORDER: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")


@dataclass(frozen=True)
class TinyFamilySizes:
    """The sizes of one tiny family's pipeline, for code and tests that build inputs for it.

    ``prompt_embeds`` of ``encode_prompt`` are ``(batch, prompt_length, prompt_dim)`` and the pooled prompt
    embeddings ``(batch, pooled_dim)``.
    """

    image_size: int
    latent_channels: int
    # Pixels per latent: 2 ** (len(vae.config.block_out_channels) - 1).
    vae_scale_factor: int
    # The CLIP tokenizers' model_max_length (and the CLIP text encoders' max_position_embeddings).
    clip_max_length: int
    # The ``max_sequence_length`` to call SD3 and FLUX with (T5 tokens); None for SDXL, which has no T5.
    max_sequence_length: int | None
    prompt_length: int
    prompt_dim: int
    pooled_dim: int
    scaling_factor: float
    shift_factor: float | None

    @property
    def latent_size(self) -> int:
        """Height and width of the (unpacked) latents."""
        return self.image_size // self.vae_scale_factor


_CLIP_MAX_LENGTH = 24
_T5_MAX_LENGTH = 32

# CLIP widths: (hidden size, projection dim) of each text encoder. The two encoders of SDXL and SD3 have different
# widths, like the real ones (CLIP ViT-L and bigG), so that mixing them up fails loudly.
_SDXL_CLIP = ((16, None), (24, 16))
_SD3_CLIP = ((16, 16), (24, 24))
_SD3_T5_WIDTH = 48  # > 16 + 24: the concatenated CLIP embeddings are zero-padded to the T5 width, as in SD3.
_FLUX_CLIP_WIDTH = 16
_FLUX_T5_WIDTH = 32
_SDXL_ADDITION_TIME_EMBED_DIM = 8

TINY_SDXL = TinyFamilySizes(
    image_size=16,
    latent_channels=4,
    vae_scale_factor=2,
    clip_max_length=_CLIP_MAX_LENGTH,
    max_sequence_length=None,
    prompt_length=_CLIP_MAX_LENGTH,
    prompt_dim=_SDXL_CLIP[0][0] + _SDXL_CLIP[1][0],
    pooled_dim=_SDXL_CLIP[1][1],
    scaling_factor=0.13025,
    shift_factor=None,
)
TINY_SD3 = TinyFamilySizes(
    image_size=16,
    latent_channels=16,
    vae_scale_factor=2,
    clip_max_length=_CLIP_MAX_LENGTH,
    max_sequence_length=_T5_MAX_LENGTH,
    prompt_length=_CLIP_MAX_LENGTH + _T5_MAX_LENGTH,
    prompt_dim=_SD3_T5_WIDTH,
    pooled_dim=_SD3_CLIP[0][1] + _SD3_CLIP[1][1],
    scaling_factor=1.5305,
    shift_factor=0.0609,
)
TINY_FLUX = TinyFamilySizes(
    image_size=16,
    latent_channels=16,
    vae_scale_factor=2,
    clip_max_length=_CLIP_MAX_LENGTH,
    max_sequence_length=_T5_MAX_LENGTH,
    prompt_length=_T5_MAX_LENGTH,
    prompt_dim=_FLUX_T5_WIDTH,
    pooled_dim=_FLUX_CLIP_WIDTH,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)

TINY_SDXL_IMAGE_SIZE = TINY_SDXL.image_size
TINY_SD3_IMAGE_SIZE = TINY_SD3.image_size
TINY_FLUX_IMAGE_SIZE = TINY_FLUX.image_size
TINY_SD3_MAX_SEQUENCE_LENGTH = TINY_SD3.max_sequence_length
TINY_FLUX_MAX_SEQUENCE_LENGTH = TINY_FLUX.max_sequence_length

# SDXL base's scheduler_config.json: an Euler scheduler that keeps the DDIM/PNDM keys (clip_sample,
# set_alpha_to_one, ...) of SD's, so that ``DDIMScheduler.from_config`` of it is SD's DDIM.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD_NOISE_SCHEDULE,
    "clip_sample": False,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def write_tiny_t5_tokenizer(path: Path, model_max_length: int = _T5_MAX_LENGTH) -> Path:
    """Write a unigram T5 tokenizer into ``path`` that ``T5TokenizerFast.from_pretrained(path)`` loads; returns
    ``path``.

    The vocabulary is ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), lowercase letters and digits, and the letters
    after the word-start marker ``\u2581``: lowercase text tokenizes character by character, ``"a red circle"`` as
    ``\u2581a \u2581r e d \u2581c i r c l e </s>`` (11 tokens).
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -1.0) for c in string.ascii_lowercase + string.digits]
    vocab += [("\u2581" + c, -1.5) for c in string.ascii_lowercase] + [("\u2581", -2.0)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(path)
    return path


def _seeded(seed: int, component: str) -> None:
    torch.manual_seed(seed * 100 + COMPONENT_ORDER.index(component))


def _clip_tokenizer(path: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path, _CLIP_MAX_LENGTH))


def _t5_tokenizer(path: Path) -> Any:
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(path, _T5_MAX_LENGTH))


def _clip_text_encoder(vocab_size: int, hidden_size: int, projection_dim: int | None) -> Any:
    """A 2-layer CLIP text encoder; with a projection (``CLIPTextModelWithProjection``) when ``projection_dim``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _t5_encoder(vocab_size: int, d_model: int) -> Any:
    """A 2-layer T5 v1.1-style (gated GELU) encoder of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _vae(sizes: TinyFamilySizes, quant_convs: bool) -> Any:
    """An ``AutoencoderKL`` with one downsampling; SD3's and FLUX's have no quant / post-quant convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=8,
        sample_size=sizes.image_size,
        scaling_factor=sizes.scaling_factor,
        shift_factor=sizes.shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def build_tiny_sdxl_pipeline(path: Path, seed: int = 0) -> Path:
    """Build a random ``StableDiffusionXLPipeline`` and ``save_pretrained`` it to ``path``; returns ``path``.

    :data:`TINY_SDXL`: 16x16 images, 4x8x8 latents; a ``CLIPTextModel`` of width 16 and a
    ``CLIPTextModelWithProjection`` of width 24 with a 16-wide projection (prompt embeddings ``(B, 24, 40)``, pooled
    ``(B, 16)``); a 2-block UNet with SDXL's ``text_time`` added conditioning (``addition_time_embed_dim=8``, so
    ``projection_class_embeddings_input_dim = 16 + 6 * 8``); SDXL base's Euler scheduler configuration;
    ``force_zeros_for_empty_prompt=True``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    path = Path(path)
    sizes = TINY_SDXL
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = _clip_tokenizer(path / "tokenizer_2")
    (width_1, _), (width_2, projection_dim) = _SDXL_CLIP
    _seeded(seed, "text_encoder")
    text_encoder = _clip_text_encoder(len(tokenizer), width_1, None)
    _seeded(seed, "text_encoder_2")
    text_encoder_2 = _clip_text_encoder(len(tokenizer_2), width_2, projection_dim)
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=sizes.latent_size,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=width_1 + width_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=projection_dim + 6 * _SDXL_ADDITION_TIME_EMBED_DIM,
        norm_num_groups=8,
    )
    _seeded(seed, "vae")
    vae = _vae(sizes, quant_convs=True)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd3_pipeline(path: Path, seed: int = 0) -> Path:
    """Build a random ``StableDiffusion3Pipeline`` and ``save_pretrained`` it to ``path``; returns ``path``.

    :data:`TINY_SD3`: 16x16 images, 16x8x8 latents (4x4 patches of 2x2); two ``CLIPTextModelWithProjection`` of
    widths 16 and 24 (projections 16 and 24: pooled ``(B, 40)``), a T5 encoder of width 48 (the CLIP embeddings are
    padded to it: prompt embeddings ``(B, 24 + max_sequence_length, 48)``); a 2-layer ``SD3Transformer2DModel``
    (4 heads of 8); a VAE with SD3's scaling and shift factors (1.5305, 0.0609); a
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. Call the pipeline with ``max_sequence_length=32``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    sizes = TINY_SD3
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = _clip_tokenizer(path / "tokenizer_2")
    tokenizer_3 = _t5_tokenizer(path / "tokenizer_3")
    (width_1, projection_1), (width_2, projection_2) = _SD3_CLIP
    _seeded(seed, "text_encoder")
    text_encoder = _clip_text_encoder(len(tokenizer), width_1, projection_1)
    _seeded(seed, "text_encoder_2")
    text_encoder_2 = _clip_text_encoder(len(tokenizer_2), width_2, projection_2)
    _seeded(seed, "text_encoder_3")
    text_encoder_3 = _t5_encoder(len(tokenizer_3), _SD3_T5_WIDTH)
    _seeded(seed, "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=sizes.latent_size,
        patch_size=2,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_SD3_T5_WIDTH,
        caption_projection_dim=32,  # = num_attention_heads * attention_head_dim, as in SD3
        pooled_projection_dim=sizes.pooled_dim,
        pos_embed_max_size=16,
    )
    _seeded(seed, "vae")
    vae = _vae(sizes, quant_convs=False)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux_pipeline(path: Path, seed: int = 0) -> Path:
    """Build a random ``FluxPipeline`` and ``save_pretrained`` it to ``path``; returns ``path``.

    :data:`TINY_FLUX`: 16x16 images, 16x8x8 latents packed into 16 tokens of 64 (2x2 patches); a ``CLIPTextModel``
    of width 16 (its pooled output: ``(B, 16)``), a T5 encoder of width 32 (prompt embeddings
    ``(B, max_sequence_length, 32)``); a ``FluxTransformer2DModel`` with 1 double-stream and 1 single-stream block,
    2 heads of 16, ``axes_dims_rope=(4, 6, 6)`` and guidance embedding (FLUX.1-dev); a VAE with FLUX's scaling and
    shift factors (0.3611, 0.1159); a ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic shifting. Call the
    pipeline with ``max_sequence_length=32``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    sizes = TINY_FLUX
    tokenizer = _clip_tokenizer(path / "tokenizer")
    tokenizer_2 = _t5_tokenizer(path / "tokenizer_2")
    _seeded(seed, "text_encoder")
    text_encoder = _clip_text_encoder(len(tokenizer), _FLUX_CLIP_WIDTH, None)
    _seeded(seed, "text_encoder_2")
    text_encoder_2 = _t5_encoder(len(tokenizer_2), _FLUX_T5_WIDTH)
    _seeded(seed, "transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * sizes.latent_channels,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_FLUX_T5_WIDTH,
        pooled_projection_dim=_FLUX_CLIP_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    _seeded(seed, "vae")
    vae = _vae(sizes, quant_convs=False)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path
