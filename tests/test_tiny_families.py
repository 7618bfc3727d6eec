"""The tiny SDXL, SD3 and FLUX pipelines of :mod:`dag_trl.testing.tiny_families`: seeded builds are bit-identical,
and each folder loads back through its family's diffusers pipeline class like a Hub checkpoint; the real-size
architectures assemble (on the meta device) into modules of the published sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dag_trl.testing.tiny_families import (
    FLUX1_DEV_ARCHITECTURE,
    SD35_MEDIUM_ARCHITECTURE,
    SDXL_BASE_ARCHITECTURE,
    TINY_FLUX,
    TINY_SD3,
    TINY_SDXL,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sdxl_pipeline,
)

BUILDERS = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}
SIZES = {"sdxl": TINY_SDXL, "sd3": TINY_SD3, "flux": TINY_FLUX}
WEIGHTED = {
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"),
    "flux": ("text_encoder", "text_encoder_2", "transformer", "vae"),
}
PROMPT = "a red circle"
# Character-level tokenizers: CLIP spells "a red circle" as <start> a</w> r e d</w> c i r c l e</w> <end>, T5 as
# ▁a ▁r e d ▁c i r c l e </s>.
CLIP_TOKENS, T5_TOKENS = 12, 11


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_families")
    return {family: build(root / family) for family, build in BUILDERS.items()}


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    return {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", BUILDERS)
def test_seeded_builds_are_bit_identical(family, built, tmp_path):
    again = BUILDERS[family](tmp_path / "again")
    other_seed = BUILDERS[family](tmp_path / "other", seed=1)
    assert json.loads((again / "model_index.json").read_text()) == json.loads(
        (built[family] / "model_index.json").read_text()
    )
    for component in WEIGHTED[family]:
        first, second = load_weights(built[family] / component), load_weights(again / component)
        assert first.keys() == second.keys(), component
        for name in first:
            assert torch.equal(first[name], second[name]), f"{component}.{name}"
        assert (built[family] / component / "config.json").read_text() == (
            again / component / "config.json"
        ).read_text()
        reseeded = load_weights(other_seed / component)
        assert any(not torch.equal(first[name], reseeded[name]) for name in first), component


def test_sdxl_loads_like_a_hub_checkpoint(built):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(built["sdxl"])
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.config.force_zeros_for_empty_prompt is True
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.in_channels == unet.out_channels == pipe.vae.config.latent_channels == TINY_SDXL.latent_channels
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == TINY_SDXL.prompt_dim
    assert pipe.text_encoder_2.config.projection_dim == TINY_SDXL.pooled_dim
    assert unet.projection_class_embeddings_input_dim == TINY_SDXL.pooled_dim + 6 * unet.addition_time_embed_dim
    assert pipe.vae.config.scaling_factor == TINY_SDXL.scaling_factor
    assert pipe.vae_scale_factor == TINY_SDXL.vae_scale_factor
    # The code under test swaps in DDIM from the saved configuration: it must be SD's DDIM.
    ddim = DDIMScheduler.from_config(pipe.scheduler.config).config
    assert (ddim.beta_schedule, ddim.beta_start, ddim.beta_end, ddim.num_train_timesteps) == (
        "scaled_linear",
        0.00085,
        0.012,
        1000,
    )
    assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.steps_offset, ddim.prediction_type) == (
        False,
        False,
        1,
        "epsilon",
    )


def test_sd3_loads_like_a_hub_checkpoint(built):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = StableDiffusion3Pipeline.from_pretrained(built["sd3"])
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.in_channels == transformer.out_channels == vae.latent_channels == TINY_SD3.latent_channels == 16
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
    assert transformer.joint_attention_dim == pipe.text_encoder_3.config.d_model == TINY_SD3.prompt_dim
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert transformer.pooled_projection_dim == pooled == TINY_SD3.pooled_dim
    assert transformer.caption_projection_dim == transformer.num_attention_heads * transformer.attention_head_dim
    assert TINY_SD3.latent_size % transformer.patch_size == 0 and TINY_SD3.latent_size // transformer.patch_size >= 2


def test_flux_loads_like_a_hub_checkpoint(built):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = FluxPipeline.from_pretrained(built["flux"])
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting
    assert (scheduler.base_shift, scheduler.max_shift, scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (
        0.5,
        1.15,
        256,
        4096,
    )
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.guidance_embeds
    assert transformer.in_channels == 4 * vae.latent_channels == 4 * TINY_FLUX.latent_channels
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model == TINY_FLUX.prompt_dim
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size == TINY_FLUX.pooled_dim
    assert TINY_FLUX.latent_size % 2 == 0


@pytest.mark.parametrize("family", BUILDERS)
def test_tokenizers_round_trip(family, built):
    from transformers import AutoTokenizer

    t5_folder = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(family)
    for folder in sorted(p.name for p in built[family].glob("tokenizer*")):
        tokenizer = AutoTokenizer.from_pretrained(built[family] / folder)
        ids = tokenizer(PROMPT).input_ids
        if folder == t5_folder:
            assert len(ids) == T5_TOKENS and ids[-1] == tokenizer.eos_token_id == 1, folder
        else:
            assert len(ids) == CLIP_TOKENS, folder
            assert tokenizer.model_max_length == SIZES[family].clip_max_length
            assert (ids[0], ids[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == PROMPT.replace(" ", "")


@pytest.mark.parametrize("family", BUILDERS)
def test_pipelines_run_end_to_end(family, built):
    sizes = SIZES[family]
    pipe = pipeline_class(family).from_pretrained(built[family])
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if sizes.max_sequence_length is None else {"max_sequence_length": sizes.max_sequence_length}
    if family == "flux":
        kwargs["guidance_scale"] = 3.5
    images = pipe(
        PROMPT,
        num_inference_steps=2,
        height=sizes.image_size,
        width=sizes.image_size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    assert images.shape == (1, 3, sizes.image_size, sizes.image_size)
    assert torch.isfinite(images).all() and images.std() > 0


# The real models' sizes in tensors of their released checkpoints (parameters and persistent buffers): SDXL base 1.0,
# SD3.5 medium (its model card's 2.5B, of which 226M are the 384x384 positional-embedding table) and FLUX.1-dev,
# with their CLIP ViT-L, OpenCLIP bigG and T5-XXL text encoders and their VAEs.
REAL = {
    "sdxl": (
        make_sdxl_pipeline,
        SDXL_BASE_ARCHITECTURE,
        {"text_encoder": 123.1e6, "text_encoder_2": 694.7e6, "unet": 2.567e9, "vae": 83.65e6},
    ),
    "sd3": (
        make_sd3_pipeline,
        SD35_MEDIUM_ARCHITECTURE,
        {
            "text_encoder": 123.7e6,
            "text_encoder_2": 694.7e6,
            "text_encoder_3": 4.762e9,
            "transformer": 2.5e9,
            "vae": 83.82e6,
        },
    ),
    "flux": (
        make_flux_pipeline,
        FLUX1_DEV_ARCHITECTURE,
        {"text_encoder": 123.1e6, "text_encoder_2": 4.762e9, "transformer": 11.90e9, "vae": 83.82e6},
    ),
}


def checkpoint_size(module: torch.nn.Module) -> int:
    """Parameters (tied ones once) and persistent floating buffers: the tensors ``save_pretrained`` writes."""
    saved = set(module.state_dict())
    buffers = sum(b.numel() for name, b in module.named_buffers() if name in saved and b.is_floating_point())
    return sum(p.numel() for p in module.parameters()) + buffers


@pytest.mark.parametrize("family", REAL)
def test_real_sizes_assemble_on_the_meta_device_with_the_published_sizes(family):
    make, architecture, published = REAL[family]
    pipe = make(architecture, device="meta", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # restored after the construction
    assert isinstance(pipe, pipeline_class(family))
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert modules.keys() == published.keys()
    for name, module in modules.items():
        assert {(t.device.type, t.dtype) for t in module.parameters()} == {("meta", torch.bfloat16)}, name
        assert not module.training, name
        assert checkpoint_size(module) == pytest.approx(published[name], rel=0.05), name
    sizes = architecture.sizes
    assert pipe.vae_scale_factor == sizes.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == sizes.latent_channels
    denoiser = (pipe.unet if family == "sdxl" else pipe.transformer).config
    if family == "sdxl":
        assert (denoiser.cross_attention_dim, denoiser.projection_class_embeddings_input_dim) == (2048, 2816)
        assert (sizes.prompt_dim, sizes.pooled_dim, denoiser.sample_size) == (2048, 1280, 128)
    else:
        assert denoiser.joint_attention_dim == sizes.prompt_dim == 4096
        assert denoiser.pooled_projection_dim == sizes.pooled_dim == (2048 if family == "sd3" else 768)
