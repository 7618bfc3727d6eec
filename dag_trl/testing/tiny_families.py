"""Random SDXL, SD3 and FLUX pipelines of any size, assembled in memory or saved like Hub checkpoints.

Each family's sizes are a frozen dataclass whose defaults are the tests' tiny model: the real module classes and
the real configuration keys (SDXL's ``text_time`` added conditioning, SD3's and FLUX's 16-channel VAEs with a
scaling and a shift factor, their flow-matching schedulers), only a few thousand times smaller. Constants hold the
real architectures' sizes, from the public model configs:

* :class:`SDXLArchitecture` (tiny: :data:`TINY_SDXL_ARCHITECTURE`; SDXL base 1.0: :data:`SDXL_BASE_ARCHITECTURE`),
  assembled by :func:`make_sdxl_pipeline` into a ``StableDiffusionXLPipeline``; :func:`build_tiny_sdxl_pipeline`
  saves one.
* :class:`SD3Architecture` (tiny: :data:`TINY_SD3_ARCHITECTURE`; SD3.5 medium: :data:`SD35_MEDIUM_ARCHITECTURE`),
  :func:`make_sd3_pipeline` (``StableDiffusion3Pipeline``), :func:`build_tiny_sd3_pipeline`. Call the pipeline
  with ``max_sequence_length=architecture.max_sequence_length`` (tiny: 32; the pipeline's default, 256, works but pads
  the T5 prompt to 256 tokens).
* :class:`FluxArchitecture` (tiny: :data:`TINY_FLUX_ARCHITECTURE`; FLUX.1-dev: :data:`FLUX1_DEV_ARCHITECTURE`),
  :func:`make_flux_pipeline` (``FluxPipeline``), :func:`build_tiny_flux_pipeline`. Call it with
  ``max_sequence_length=architecture.max_sequence_length`` (tiny: 32; the default is 512).

:data:`TINY_SDXL`, :data:`TINY_SD3` and :data:`TINY_FLUX` are the tiny models' :class:`TinyFamilySizes` (the shapes
of their inputs and outputs); every architecture has its own in :attr:`~SDXLArchitecture.sizes`.

The tiny families make 16x16 images through a VAE with one downsampling (8x8 latents). The CLIP tokenizers spell
text character by character (:func:`~dag_trl.testing.tiny_models.write_tiny_clip_tokenizer`), the T5 tokenizer
(:func:`write_tiny_t5_tokenizer`) too, with a word-start marker, so ``"a red circle"`` is 12 CLIP tokens (with the
start and end tokens) and 11 T5 tokens (with ``</s>``). The real-size architectures keep these tokenizers (with the
real models' maximum lengths) and give the text encoders the real vocabulary sizes, of which the character-level
tokenizers use the first ids only.

Every pipeline is seeded: before each module is constructed, torch's global generator is seeded from ``seed`` and the
module's fixed index in :data:`COMPONENT_ORDER`, so that the disk builders (CPU, float32, safetensors) are
bit-reproducible. The
``make_*_pipeline`` functions take a ``device`` and a ``dtype`` and construct every module directly there (the
default device and dtype are set around the construction), so that a multi-billion-parameter model never exists in
float32 on the CPU; ``device="meta"`` gives the modules' shapes without any memory.
"""

from __future__ import annotations

import contextlib
import string
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .tiny_models import SD_NOISE_SCHEDULE, write_tiny_clip_tokenizer

# The pipelines' components that hold weights, in the order of their seeds: the weights of ``name`` are drawn right
# after ``torch.manual_seed(seed * 100 + COMPONENT_ORDER.index(name))``.
COMPONENT_ORDER: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")


@dataclass(frozen=True)
class TinyFamilySizes:
    """The sizes of one family's pipeline, for code and tests that build inputs for it (the tiny ones are
    :data:`TINY_SDXL`, :data:`TINY_SD3` and :data:`TINY_FLUX`; any architecture's are its ``sizes``).

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
    max_sequence_length: Optional[int]
    prompt_length: int
    prompt_dim: int
    pooled_dim: int
    scaling_factor: float
    shift_factor: Optional[float]

    @property
    def latent_size(self) -> int:
        """Height and width of the (unpacked) latents."""
        return self.image_size // self.vae_scale_factor


# ---------------------------------------------------------------------------------------------- module sizes


@dataclass(frozen=True)
class CLIPTextSizes:
    """A CLIP text encoder: a ``CLIPTextModelWithProjection`` when ``projection_dim`` is set, else a
    ``CLIPTextModel``. Its ``max_position_embeddings`` is the family's ``clip_max_length``."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    projection_dim: Optional[int] = None
    hidden_act: str = "quick_gelu"
    # None: the tokenizer's vocabulary size.
    vocab_size: Optional[int] = None


@dataclass(frozen=True)
class T5EncoderSizes:
    """A T5 v1.1-style (gated GELU) encoder, ``T5EncoderModel``."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # None: the tokenizer's vocabulary size.
    vocab_size: Optional[int] = None


@dataclass(frozen=True)
class VAESizes:
    """An ``AutoencoderKL`` with one ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` per entry of
    ``block_out_channels``, each but the last halving the resolution."""

    block_out_channels: tuple[int, ...] = (8, 16)
    layers_per_block: int = 1
    norm_num_groups: int = 8

    @property
    def scale_factor(self) -> int:
        """Pixels per latent."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SDXLUNetSizes:
    """SDXL's ``UNet2DConditionModel``; its cross-attention width and added-embedding input follow from the text
    encoders (:class:`SDXLArchitecture`). As in diffusers' configs, ``attention_head_dim`` is the number of heads of
    each block."""

    block_out_channels: tuple[int, ...] = (16, 32)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    transformer_layers_per_block: tuple[int, ...] = (1, 1)
    addition_time_embed_dim: int = 8
    norm_num_groups: int = 8


@dataclass(frozen=True)
class SD3TransformerSizes:
    """SD3's ``SD3Transformer2DModel`` (MMDiT; SD3.5 medium's MMDiT-X has ``dual_attention_layers`` and
    ``qk_norm``); its joint-attention and pooled widths follow from the text encoders (:class:`SD3Architecture`)."""

    num_layers: int = 2
    attention_head_dim: int = 8
    num_attention_heads: int = 4
    # = num_attention_heads * attention_head_dim, as in SD3.
    caption_projection_dim: int = 32
    pos_embed_max_size: int = 16
    patch_size: int = 2
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None


@dataclass(frozen=True)
class FluxTransformerSizes:
    """FLUX's ``FluxTransformer2DModel``; ``sum(axes_dims_rope) == attention_head_dim``. Its joint-attention and
    pooled widths follow from the text encoders (:class:`FluxArchitecture`)."""

    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, ...] = (4, 6, 6)
    guidance_embeds: bool = True


# ---------------------------------------------------------------------------------------------- family sizes

_CLIP_MAX_LENGTH = 24
_T5_MAX_LENGTH = 32


def _tiny_clip(hidden_size: int, projection_dim: Optional[int] = None) -> CLIPTextSizes:
    """A 2-layer, 2-head CLIP text encoder with an MLP twice as wide."""
    return CLIPTextSizes(hidden_size, 2 * hidden_size, 2, 2, projection_dim)


def _tiny_t5(d_model: int) -> T5EncoderSizes:
    """A 2-layer T5 encoder with 4 heads of 8, an MLP twice as wide and 8 relative-position buckets."""
    return T5EncoderSizes(
        d_model, 8, 2 * d_model, 2, 4, relative_attention_num_buckets=8, relative_attention_max_distance=32
    )


@dataclass(frozen=True)
class SDXLArchitecture:
    """The sizes of an SDXL pipeline (``StableDiffusionXLPipeline``); the defaults are the tiny one.

    ``text_encoder`` is a ``CLIPTextModel`` (no projection), ``text_encoder_2`` a ``CLIPTextModelWithProjection``
    whose projection is the pooled embedding. The two have different widths, like the real ones (CLIP ViT-L and
    OpenCLIP bigG), so that mixing them up fails loudly. The UNet's ``cross_attention_dim`` is the sum of their
    widths and its ``projection_class_embeddings_input_dim`` is ``pooled + 6 * addition_time_embed_dim``.
    """

    image_size: int = 16
    clip_max_length: int = _CLIP_MAX_LENGTH
    text_encoder: CLIPTextSizes = field(default_factory=lambda: _tiny_clip(16))
    text_encoder_2: CLIPTextSizes = field(default_factory=lambda: _tiny_clip(24, 16))
    unet: SDXLUNetSizes = field(default_factory=SDXLUNetSizes)
    vae: VAESizes = field(default_factory=VAESizes)
    latent_channels: int = 4
    scaling_factor: float = 0.13025

    def __post_init__(self) -> None:
        if self.text_encoder.projection_dim is not None or self.text_encoder_2.projection_dim is None:
            raise ValueError("SDXL's text_encoder has no projection and its text_encoder_2 has one.")

    @property
    def sizes(self) -> TinyFamilySizes:
        return TinyFamilySizes(
            image_size=self.image_size,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae.scale_factor,
            clip_max_length=self.clip_max_length,
            max_sequence_length=None,
            prompt_length=self.clip_max_length,
            prompt_dim=self.text_encoder.hidden_size + self.text_encoder_2.hidden_size,
            pooled_dim=self.text_encoder_2.projection_dim,
            scaling_factor=self.scaling_factor,
            shift_factor=None,
        )


@dataclass(frozen=True)
class SD3Architecture:
    """The sizes of an SD3 / SD3.5 pipeline (``StableDiffusion3Pipeline``); the defaults are the tiny one.

    Two ``CLIPTextModelWithProjection`` (their projections concatenated: the pooled embedding) and a T5 encoder at
    least as wide as the two CLIP widths together (the concatenated CLIP token states are zero-padded to the T5 width
    and joined with the T5 states: prompt embeddings ``(B, clip_max_length + max_sequence_length, t5 width)``).
    ``max_sequence_length`` is the T5 tokenizer's maximum length and the one to call the pipeline with.
    """

    image_size: int = 16
    clip_max_length: int = _CLIP_MAX_LENGTH
    max_sequence_length: int = _T5_MAX_LENGTH
    text_encoder: CLIPTextSizes = field(default_factory=lambda: _tiny_clip(16, 16))
    text_encoder_2: CLIPTextSizes = field(default_factory=lambda: _tiny_clip(24, 24))
    # 48 > 16 + 24: the concatenated CLIP embeddings are zero-padded to the T5 width, as in SD3.
    text_encoder_3: T5EncoderSizes = field(default_factory=lambda: _tiny_t5(48))
    transformer: SD3TransformerSizes = field(default_factory=SD3TransformerSizes)
    vae: VAESizes = field(default_factory=VAESizes)
    latent_channels: int = 16
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self) -> None:
        if self.text_encoder.projection_dim is None or self.text_encoder_2.projection_dim is None:
            raise ValueError("SD3's two CLIP text encoders have projections (their pooled embeddings).")
        if self.text_encoder_3.d_model < self.text_encoder.hidden_size + self.text_encoder_2.hidden_size:
            raise ValueError("SD3's T5 width must be at least the two CLIP widths together (they are padded to it).")

    @property
    def sizes(self) -> TinyFamilySizes:
        return TinyFamilySizes(
            image_size=self.image_size,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae.scale_factor,
            clip_max_length=self.clip_max_length,
            max_sequence_length=self.max_sequence_length,
            prompt_length=self.clip_max_length + self.max_sequence_length,
            prompt_dim=self.text_encoder_3.d_model,
            pooled_dim=self.text_encoder.projection_dim + self.text_encoder_2.projection_dim,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )


@dataclass(frozen=True)
class FluxArchitecture:
    """The sizes of a FLUX.1 pipeline (``FluxPipeline``); the defaults are the tiny one.

    A ``CLIPTextModel`` whose pooled output is the pooled embedding and a T5 encoder whose token states are the
    prompt embeddings ``(B, max_sequence_length, t5 width)``; the transformer reads 2x2-packed latents
    (``in_channels = 4 * latent_channels``).
    """

    image_size: int = 16
    clip_max_length: int = _CLIP_MAX_LENGTH
    max_sequence_length: int = _T5_MAX_LENGTH
    text_encoder: CLIPTextSizes = field(default_factory=lambda: _tiny_clip(16))
    text_encoder_2: T5EncoderSizes = field(default_factory=lambda: _tiny_t5(32))
    transformer: FluxTransformerSizes = field(default_factory=FluxTransformerSizes)
    vae: VAESizes = field(default_factory=VAESizes)
    latent_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        if self.text_encoder.projection_dim is not None:
            raise ValueError("FLUX's CLIP text encoder has no projection: its pooled output is the pooled embedding.")
        if sum(self.transformer.axes_dims_rope) != self.transformer.attention_head_dim:
            raise ValueError("FLUX's axes_dims_rope must sum to attention_head_dim.")

    @property
    def sizes(self) -> TinyFamilySizes:
        return TinyFamilySizes(
            image_size=self.image_size,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae.scale_factor,
            clip_max_length=self.clip_max_length,
            max_sequence_length=self.max_sequence_length,
            prompt_length=self.max_sequence_length,
            prompt_dim=self.text_encoder_2.d_model,
            pooled_dim=self.text_encoder.hidden_size,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )


TINY_SDXL_ARCHITECTURE = SDXLArchitecture()
TINY_SD3_ARCHITECTURE = SD3Architecture()
TINY_FLUX_ARCHITECTURE = FluxArchitecture()

TINY_SDXL = TINY_SDXL_ARCHITECTURE.sizes
TINY_SD3 = TINY_SD3_ARCHITECTURE.sizes
TINY_FLUX = TINY_FLUX_ARCHITECTURE.sizes

TINY_SDXL_IMAGE_SIZE = TINY_SDXL.image_size
TINY_SD3_IMAGE_SIZE = TINY_SD3.image_size
TINY_FLUX_IMAGE_SIZE = TINY_FLUX.image_size
TINY_SD3_MAX_SEQUENCE_LENGTH = TINY_SD3.max_sequence_length
TINY_FLUX_MAX_SEQUENCE_LENGTH = TINY_FLUX.max_sequence_length

# ---------------------------------------------------------------------------------------------- the real sizes
# From the public model configs; the tokenizers stay the character-level ones (with the real maximum lengths), the
# vocabulary sizes of the embedding tables are the real ones.

# openai/clip-vit-large-patch14's text tower (SD1, SDXL's text_encoder, FLUX's text_encoder): 123M parameters.
CLIP_L_TEXT = CLIPTextSizes(768, 3072, 12, 12, vocab_size=49408)
# The same with its 768-wide projection (SD3's text_encoder): 124M.
CLIP_L_TEXT_WITH_PROJECTION = CLIPTextSizes(768, 3072, 12, 12, projection_dim=768, vocab_size=49408)
# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's and SD3's text_encoder_2): 695M.
OPENCLIP_BIGG_TEXT = CLIPTextSizes(1280, 5120, 32, 20, projection_dim=1280, hidden_act="gelu", vocab_size=49408)
# google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX's text_encoder_2): 4.76B.
T5_XXL_ENCODER = T5EncoderSizes(4096, 64, 10240, 24, 64, vocab_size=32128)
# The 8x VAEs of SD1, SDXL (4 latent channels) and SD3, FLUX (16): 84M.
SD_VAE = VAESizes(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

# stabilityai/stable-diffusion-xl-base-1.0's UNet: 2.57B.
SDXL_BASE_UNET = SDXLUNetSizes(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    addition_time_embed_dim=256,
    norm_num_groups=32,
)
# stabilityai/stable-diffusion-3.5-medium's MMDiT-X: 2.47B.
SD35_MEDIUM_TRANSFORMER = SD3TransformerSizes(
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    caption_projection_dim=1536,
    pos_embed_max_size=384,
    patch_size=2,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev's transformer: 11.9B.
FLUX1_DEV_TRANSFORMER = FluxTransformerSizes(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=True,
)

SDXL_BASE_ARCHITECTURE = SDXLArchitecture(
    image_size=1024,
    clip_max_length=77,
    text_encoder=CLIP_L_TEXT,
    text_encoder_2=OPENCLIP_BIGG_TEXT,
    unet=SDXL_BASE_UNET,
    vae=SD_VAE,
)
SD35_MEDIUM_ARCHITECTURE = SD3Architecture(
    image_size=1024,
    clip_max_length=77,
    max_sequence_length=256,
    text_encoder=CLIP_L_TEXT_WITH_PROJECTION,
    text_encoder_2=OPENCLIP_BIGG_TEXT,
    text_encoder_3=T5_XXL_ENCODER,
    transformer=SD35_MEDIUM_TRANSFORMER,
    vae=SD_VAE,
)
FLUX1_DEV_ARCHITECTURE = FluxArchitecture(
    image_size=1024,
    clip_max_length=77,
    max_sequence_length=512,
    text_encoder=CLIP_L_TEXT,
    text_encoder_2=T5_XXL_ENCODER,
    transformer=FLUX1_DEV_TRANSFORMER,
    vae=SD_VAE,
)

# ---------------------------------------------------------------------------------------------- schedulers

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


# ---------------------------------------------------------------------------------------------- tokenizers


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


@contextlib.contextmanager
def _tokenizer_folder(folder: Optional[Path]) -> Iterator[Path]:
    """``folder``, or a temporary folder removed on leaving (loaded tokenizers keep nothing open)."""
    if folder is not None:
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="dag-trl-tokenizers-") as temporary:
        yield Path(temporary)


def _clip_tokenizer(path: Path, model_max_length: int) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path, model_max_length))


def _t5_tokenizer(path: Path, model_max_length: int) -> Any:
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(path, model_max_length))


# ---------------------------------------------------------------------------------------------- modules

DeviceLike = Union[str, torch.device, None]


def _seeded_modules(
    seed: int, device: DeviceLike, dtype: Optional[torch.dtype], factories: dict[str, Callable[[], Any]]
) -> dict[str, Any]:
    """Build each module of ``factories`` in their order, on ``device`` in ``dtype``, right after seeding torch's
    global generator with ``seed * 100 + COMPONENT_ORDER.index(name)``, then place it (eval mode)."""
    modules = {}
    with constructing_on(device, dtype):
        for name, factory in factories.items():
            torch.manual_seed(seed * 100 + COMPONENT_ORDER.index(name))
            modules[name] = factory()
    return {name: _placed(module, device, dtype) for name, module in modules.items()}


@contextlib.contextmanager
def constructing_on(device: DeviceLike = None, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Construct modules directly on ``device`` and in ``dtype`` (a floating dtype): torch's default device and
    default dtype are set inside, and restored on leaving. ``None`` leaves each as it is."""
    previous_dtype = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _placed(module: torch.nn.Module, device: DeviceLike, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """``module`` in eval mode (as ``from_pretrained`` returns modules: no dropout), on ``device`` and in ``dtype``:
    the floating tensors that the module created with an explicit dtype (SD3's positional embedding table) are cast
    too; a module that is already there is left alone."""
    tensors = [*module.parameters(), *module.buffers()]
    misplaced = device is not None and any(t.device != torch.empty(0, device=device).device for t in tensors)
    miscast = dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    if misplaced or miscast:
        module.to(device=device, dtype=dtype)
    return module.eval()


def make_clip_text_encoder(sizes: CLIPTextSizes, vocab_size: int, max_position_embeddings: int) -> Any:
    """A freshly initialised CLIP text encoder (with a projection when ``sizes.projection_dim``), on torch's default
    device and dtype; ``sizes.vocab_size`` overrides ``vocab_size``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=sizes.vocab_size or vocab_size,
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_heads,
        num_hidden_layers=sizes.num_layers,
        max_position_embeddings=max_position_embeddings,
        projection_dim=sizes.projection_dim or sizes.hidden_size,
        hidden_act=sizes.hidden_act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if sizes.projection_dim else CLIPTextModel(config)


def make_t5_encoder(sizes: T5EncoderSizes, vocab_size: int) -> Any:
    """A freshly initialised T5 v1.1-style (gated GELU) encoder, on torch's default device and dtype;
    ``sizes.vocab_size`` overrides ``vocab_size``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=sizes.vocab_size or vocab_size,
        d_model=sizes.d_model,
        d_kv=sizes.d_kv,
        d_ff=sizes.d_ff,
        num_layers=sizes.num_layers,
        num_heads=sizes.num_heads,
        relative_attention_num_buckets=sizes.relative_attention_num_buckets,
        relative_attention_max_distance=sizes.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def make_vae(
    sizes: VAESizes,
    latent_channels: int,
    image_size: int,
    scaling_factor: float,
    shift_factor: Optional[float],
    quant_convs: bool,
) -> Any:
    """A freshly initialised ``AutoencoderKL``; SD3's and FLUX's have no quant / post-quant convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(sizes.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.block_out_channels),
        block_out_channels=sizes.block_out_channels,
        layers_per_block=sizes.layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=sizes.norm_num_groups,
        sample_size=image_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def make_sdxl_unet(architecture: SDXLArchitecture) -> Any:
    """A freshly initialised SDXL ``UNet2DConditionModel`` with ``text_time`` added conditioning."""
    from diffusers import UNet2DConditionModel

    a, unet = architecture, architecture.unet
    return UNet2DConditionModel(
        sample_size=a.sizes.latent_size,
        in_channels=a.latent_channels,
        out_channels=a.latent_channels,
        down_block_types=unet.down_block_types,
        up_block_types=unet.up_block_types,
        block_out_channels=unet.block_out_channels,
        layers_per_block=unet.layers_per_block,
        attention_head_dim=unet.attention_head_dim,
        transformer_layers_per_block=unet.transformer_layers_per_block,
        use_linear_projection=True,
        cross_attention_dim=a.text_encoder.hidden_size + a.text_encoder_2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=unet.addition_time_embed_dim,
        projection_class_embeddings_input_dim=a.text_encoder_2.projection_dim + 6 * unet.addition_time_embed_dim,
        norm_num_groups=unet.norm_num_groups,
    )


def make_sd3_transformer(architecture: SD3Architecture) -> Any:
    """A freshly initialised ``SD3Transformer2DModel``."""
    from diffusers import SD3Transformer2DModel

    a, transformer = architecture, architecture.transformer
    return SD3Transformer2DModel(
        sample_size=a.sizes.latent_size,
        patch_size=transformer.patch_size,
        in_channels=a.latent_channels,
        out_channels=a.latent_channels,
        num_layers=transformer.num_layers,
        attention_head_dim=transformer.attention_head_dim,
        num_attention_heads=transformer.num_attention_heads,
        joint_attention_dim=a.text_encoder_3.d_model,
        caption_projection_dim=transformer.caption_projection_dim,
        pooled_projection_dim=a.sizes.pooled_dim,
        pos_embed_max_size=transformer.pos_embed_max_size,
        dual_attention_layers=transformer.dual_attention_layers,
        qk_norm=transformer.qk_norm,
    )


def make_flux_transformer(architecture: FluxArchitecture) -> Any:
    """A freshly initialised ``FluxTransformer2DModel`` over 2x2-packed latents."""
    from diffusers import FluxTransformer2DModel

    a, transformer = architecture, architecture.transformer
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * a.latent_channels,
        out_channels=None,
        num_layers=transformer.num_layers,
        num_single_layers=transformer.num_single_layers,
        attention_head_dim=transformer.attention_head_dim,
        num_attention_heads=transformer.num_attention_heads,
        joint_attention_dim=a.text_encoder_2.d_model,
        pooled_projection_dim=a.text_encoder.hidden_size,
        guidance_embeds=transformer.guidance_embeds,
        axes_dims_rope=transformer.axes_dims_rope,
    )


# ---------------------------------------------------------------------------------------------- pipelines


def make_sdxl_pipeline(
    architecture: SDXLArchitecture = TINY_SDXL_ARCHITECTURE,
    seed: int = 0,
    device: DeviceLike = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer_folder: Optional[Path] = None,
) -> Any:
    """A random ``StableDiffusionXLPipeline`` of ``architecture``, assembled in memory with its modules constructed
    on ``device`` in ``dtype`` (``None``: torch's defaults), in eval mode. The tokenizers are written to
    ``tokenizer_folder`` (subfolders ``tokenizer*``, as a saved pipeline has them) and loaded from there; ``None``: a
    temporary folder. The same holds for :func:`make_sd3_pipeline` and :func:`make_flux_pipeline`.

    Character-level CLIP tokenizers (``model_max_length = clip_max_length``); a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` (prompt embeddings ``(B, clip_max_length, width_1 + width_2)``, pooled: the
    projection); a UNet with SDXL's ``text_time`` added conditioning; SDXL base's Euler scheduler configuration;
    ``force_zeros_for_empty_prompt=True``; no watermarker.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    a = architecture
    with _tokenizer_folder(tokenizer_folder) as folder:
        tokenizer = _clip_tokenizer(folder / "tokenizer", a.clip_max_length)
        tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2", a.clip_max_length)
    modules = _seeded_modules(seed, device, dtype, {
        "text_encoder": lambda: make_clip_text_encoder(a.text_encoder, len(tokenizer), a.clip_max_length),
        "text_encoder_2": lambda: make_clip_text_encoder(a.text_encoder_2, len(tokenizer_2), a.clip_max_length),
        "unet": lambda: make_sdxl_unet(a),
        "vae": lambda: make_vae(a.vae, a.latent_channels, a.image_size, a.scaling_factor, None, quant_convs=True),
    })  # fmt: skip
    return StableDiffusionXLPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def make_sd3_pipeline(
    architecture: SD3Architecture = TINY_SD3_ARCHITECTURE,
    seed: int = 0,
    device: DeviceLike = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer_folder: Optional[Path] = None,
) -> Any:
    """A random ``StableDiffusion3Pipeline`` of ``architecture``, assembled in memory with its modules constructed
    on ``device`` in ``dtype`` (``None``: torch's defaults), in eval mode.

    Character-level CLIP and T5 tokenizers; two ``CLIPTextModelWithProjection`` and a T5 encoder; an
    ``SD3Transformer2DModel``; a VAE with SD3's scaling and shift factors (1.5305, 0.0609) and no quant convolutions;
    a ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. Call the pipeline with
    ``max_sequence_length=architecture.max_sequence_length``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    a = architecture
    with _tokenizer_folder(tokenizer_folder) as folder:
        tokenizer = _clip_tokenizer(folder / "tokenizer", a.clip_max_length)
        tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2", a.clip_max_length)
        tokenizer_3 = _t5_tokenizer(folder / "tokenizer_3", a.max_sequence_length)
    modules = _seeded_modules(seed, device, dtype, {
        "text_encoder": lambda: make_clip_text_encoder(a.text_encoder, len(tokenizer), a.clip_max_length),
        "text_encoder_2": lambda: make_clip_text_encoder(a.text_encoder_2, len(tokenizer_2), a.clip_max_length),
        "text_encoder_3": lambda: make_t5_encoder(a.text_encoder_3, len(tokenizer_3)),
        "transformer": lambda: make_sd3_transformer(a),
        "vae": lambda: make_vae(
            a.vae, a.latent_channels, a.image_size, a.scaling_factor, a.shift_factor, quant_convs=False
        ),
    })  # fmt: skip
    return StableDiffusion3Pipeline(
        **modules,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
    )


def make_flux_pipeline(
    architecture: FluxArchitecture = TINY_FLUX_ARCHITECTURE,
    seed: int = 0,
    device: DeviceLike = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer_folder: Optional[Path] = None,
) -> Any:
    """A random ``FluxPipeline`` of ``architecture``, assembled in memory with its modules constructed on ``device``
    in ``dtype`` (``None``: torch's defaults), in eval mode.

    Character-level CLIP and T5 tokenizers; a ``CLIPTextModel`` (its pooled output is the pooled embedding) and a
    T5 encoder; a ``FluxTransformer2DModel`` (with guidance embedding when ``guidance_embeds``, as FLUX.1-dev); a VAE
    with FLUX's scaling and shift factors (0.3611, 0.1159) and no quant convolutions; a
    ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic shifting. Call the pipeline with
    ``max_sequence_length=architecture.max_sequence_length``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    a = architecture
    with _tokenizer_folder(tokenizer_folder) as folder:
        tokenizer = _clip_tokenizer(folder / "tokenizer", a.clip_max_length)
        tokenizer_2 = _t5_tokenizer(folder / "tokenizer_2", a.max_sequence_length)
    modules = _seeded_modules(seed, device, dtype, {
        "text_encoder": lambda: make_clip_text_encoder(a.text_encoder, len(tokenizer), a.clip_max_length),
        "text_encoder_2": lambda: make_t5_encoder(a.text_encoder_2, len(tokenizer_2)),
        "transformer": lambda: make_flux_transformer(a),
        "vae": lambda: make_vae(
            a.vae, a.latent_channels, a.image_size, a.scaling_factor, a.shift_factor, quant_convs=False
        ),
    })  # fmt: skip
    return FluxPipeline(
        **modules,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )


def build_tiny_sdxl_pipeline(
    path: Path, seed: int = 0, architecture: SDXLArchitecture = TINY_SDXL_ARCHITECTURE
) -> Path:
    """:func:`make_sdxl_pipeline` saved with ``save_pretrained`` (safetensors) to ``path``; returns ``path``.

    :data:`TINY_SDXL`: 16x16 images, 4x8x8 latents; a ``CLIPTextModel`` of width 16 and a
    ``CLIPTextModelWithProjection`` of width 24 with a 16-wide projection (prompt embeddings ``(B, 24, 40)``, pooled
    ``(B, 16)``); a 2-block UNet with SDXL's ``text_time`` added conditioning (``addition_time_embed_dim=8``, so
    ``projection_class_embeddings_input_dim = 16 + 6 * 8``); SDXL base's Euler scheduler configuration;
    ``force_zeros_for_empty_prompt=True``.
    """
    path = Path(path)
    make_sdxl_pipeline(architecture, seed, tokenizer_folder=path).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd3_pipeline(path: Path, seed: int = 0, architecture: SD3Architecture = TINY_SD3_ARCHITECTURE) -> Path:
    """:func:`make_sd3_pipeline` saved with ``save_pretrained`` (safetensors) to ``path``; returns ``path``.

    :data:`TINY_SD3`: 16x16 images, 16x8x8 latents (4x4 patches of 2x2); two ``CLIPTextModelWithProjection`` of
    widths 16 and 24 (projections 16 and 24: pooled ``(B, 40)``), a T5 encoder of width 48 (the CLIP embeddings are
    padded to it: prompt embeddings ``(B, 24 + max_sequence_length, 48)``); a 2-layer ``SD3Transformer2DModel``
    (4 heads of 8); a VAE with SD3's scaling and shift factors (1.5305, 0.0609); a
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. Call the pipeline with ``max_sequence_length=32``.
    """
    path = Path(path)
    make_sd3_pipeline(architecture, seed, tokenizer_folder=path).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_flux_pipeline(
    path: Path, seed: int = 0, architecture: FluxArchitecture = TINY_FLUX_ARCHITECTURE
) -> Path:
    """:func:`make_flux_pipeline` saved with ``save_pretrained`` (safetensors) to ``path``; returns ``path``.

    :data:`TINY_FLUX`: 16x16 images, 16x8x8 latents packed into 16 tokens of 64 (2x2 patches); a ``CLIPTextModel``
    of width 16 (its pooled output: ``(B, 16)``), a T5 encoder of width 32 (prompt embeddings
    ``(B, max_sequence_length, 32)``); a ``FluxTransformer2DModel`` with 1 double-stream and 1 single-stream block,
    2 heads of 16, ``axes_dims_rope=(4, 6, 6)`` and guidance embedding (FLUX.1-dev); a VAE with FLUX's scaling and
    shift factors (0.3611, 0.1159); a ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic shifting. Call the
    pipeline with ``max_sequence_length=32``.
    """
    path = Path(path)
    make_flux_pipeline(architecture, seed, tokenizer_folder=path).save_pretrained(path, safe_serialization=True)
    return path
