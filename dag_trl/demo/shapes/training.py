"""How the shapes model is made: its architecture, its training budget, and the two training stages.

A latent diffusion model (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models") in
diffusers' ``StableDiffusionPipeline`` layout: an ``AutoencoderKL`` (32x32x3 images to 8x8x4 latents), a word-level
``CLIPTokenizer`` and a two-layer ``CLIPTextModel``, and a ``UNet2DConditionModel`` trained jointly with the text
encoder on the standard epsilon-prediction objective (``DDPMScheduler`` with Stable Diffusion's ``scaled_linear``
betas). Training also uses partial prompts and the empty prompt (for classifier-free guidance), so that an
under-specified prompt samples a spread of the attributes it leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...models.from_scratch import SD_NOISE_SCHEDULE, SDArchitecture
from .data import COLOUR_NAMES, IMAGE_SIZE, SHAPES, ShapesDataset

LATENT_CHANNELS = 4
TEXT_HIDDEN_SIZE = 64
MAX_PROMPT_TOKENS = 16
# Each prompt word is one token, so the text encoder needs no capacity to read words from characters. The order
# fixes the tokenizer's merges and token ids, hence the shipped model's files.
TOKENIZER_WORDS: tuple[str, ...] = ("a", "an", "on", "shape", "background", *SHAPES, *COLOUR_NAMES)

SHAPES_ARCHITECTURE = SDArchitecture(
    image_size=IMAGE_SIZE,
    latent_channels=LATENT_CHANNELS,
    # Three blocks: two 2x downsamplings, 32x32 pixels to 8x8 latents; no attention, which shapes do not need.
    vae_block_out_channels=(16, 32, 32),
    vae_mid_block_attention=False,
    # Trained from scratch: the initialisation stays as drawn.
    vae_decoder_gain=1.0,
    text_hidden_size=TEXT_HIDDEN_SIZE,
    text_intermediate_size=2 * TEXT_HIDDEN_SIZE,
    max_tokens=MAX_PROMPT_TOKENS,
    tokenizer_words=TOKENIZER_WORDS,
    unet_block_out_channels=(32, 64),
    unet_down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    unet_attention_head_dim=8,
    # The order of the shipped build (seed 0): another order draws other initial weights.
    init_order=("vae", "text_encoder", "unet"),
)
LATENT_SIZE = SHAPES_ARCHITECTURE.latent_size


@dataclass(frozen=True)
class ShapesBuildConfig:
    """Training budget of :func:`build_shapes_model`; the defaults take about 7 minutes on two idle CPU cores.

    Smaller values (e.g. a few steps) give a quick, useless model with the same files, for tests of the plumbing.
    """

    dataset_size: int = 8192
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    # Small: the latents only need to be smooth enough for diffusion, not a prior-matched code.
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    # Fraction of training prompts that are empty (what classifier-free guidance's unconditional branch sees) and
    # fully specified; the rest name a random strict subset of the attributes.
    empty_prompt_probability: float = 0.1
    full_prompt_probability: float = 0.5
    # Adherence measured at the end of the build: every fully specified prompt, once, with DDIM and guidance.
    eval_inference_steps: int = 20
    eval_guidance_scale: float = 5.0


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of ``steps``, then cosine decay to 10%: short runs need the high rate early."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(
    vae: Any, pixels: torch.Tensor, config: ShapesBuildConfig, generator: torch.Generator, progress: bool
) -> None:
    """Fit ``vae`` to ``pixels`` (``(N, 3, H, W)`` in [-1, 1]): reconstruction MSE of posterior samples plus KL."""
    # Start the posterior almost deterministic (std about 0.05 instead of 1): with unit noise on latents of unit
    # scale, reconstructions stay blurry for far longer than the build can afford; the KL term still trains it.
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] -= 6.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, config.vae_steps)
    bar = tqdm(range(config.vae_steps), desc="shapes model: VAE", disable=not progress)
    for _ in bar:
        batch = pixels[torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        # Decoding posterior samples, not means, makes the decoder tolerate the small latent errors of diffusion.
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()


def prompt_token_table(dataset: ShapesDataset, tokenizer: Any) -> torch.Tensor:
    """Token ids ``(N, 9, L)``: for image ``i``, entry ``k < 8`` names the attributes in bitmask ``k`` (1: shape,
    2: colour, 4: background; 7 is the full prompt) and entry 8 is the empty prompt."""
    variants = [
        [dataset.prompt(i, *(bool(k & bit) for bit in (1, 2, 4))) for k in range(8)] + [""]
        for i in range(len(dataset))
    ]
    # Tokenize each distinct prompt once (there are a few hundred), then index.
    distinct = sorted({prompt for row in variants for prompt in row})
    ids = tokenizer(distinct, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt")
    position = {prompt: j for j, prompt in enumerate(distinct)}
    return ids.input_ids[torch.tensor([[position[prompt] for prompt in row] for row in variants])]


def train_unet(
    unet: Any,
    text_encoder: Any,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    config: ShapesBuildConfig,
    generator: torch.Generator,
    progress: bool,
) -> None:
    """Train ``unet`` and ``text_encoder`` jointly on the epsilon-prediction objective (Ho et al. 2020)."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**SD_NOISE_SCHEDULE)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_learning_rate, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, config.unet_steps)
    # Prompt variant per sample: 8 = empty, 7 = full, otherwise a strict subset (bitmask 0-6) of the attributes.
    variant_probabilities = torch.tensor(
        [(1.0 - config.empty_prompt_probability - config.full_prompt_probability) / 7] * 7
        + [config.full_prompt_probability, config.empty_prompt_probability]
    )
    bar = tqdm(range(config.unet_steps), desc="shapes model: UNet + text encoder", disable=not progress)
    for _ in bar:
        index = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        variant = torch.multinomial(
            variant_probabilities, config.unet_batch_size, replacement=True, generator=generator
        )
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prompt_embeds = text_encoder(tokens[index, variant])[0]
        loss = F.mse_loss(unet(noisy, timesteps, prompt_embeds).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.eval()
    text_encoder.eval()
