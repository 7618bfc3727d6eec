"""The flow network F_phi(x_t, t, c) of DAG: a text-conditional, encoder-only UNet with a scalar output."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block


class FlowNetwork(ModelMixin, ConfigMixin):
    r"""Log-flow estimator :math:`F_\phi(x_t, t, c)` of DAG (Zhang et al., 2024, section 4).

    The encoder half of a conditional UNet (Ronneberger et al., 2015; Rombach et al., 2022): a sinusoidal timestep
    embedding and its MLP, a 3x3 input convolution, down blocks (cross-attention over the prompt embedding in all
    but the last), each followed by a stride-2 downsample, then global average pooling and a linear head to one
    scalar per sample. With the default widths ``(64, 128, 256, 256)`` and a 768-wide text encoder (SD 1.x) it has
    about 6.5M parameters. A ``ModelMixin``, so ``save_pretrained`` / ``from_pretrained`` write and read
    safetensors plus a config.

    Args:
        in_channels: latent channels (4 for Stable Diffusion).
        cross_attention_dim: width of the text encoder's hidden states (768 for SD 1.x, 1024 for SD 2.x).
        block_out_channels: widths of the down blocks.
        layers_per_block: resnet layers per down block.
        attention_heads: heads of every cross-attention layer.
        time_embedding_dim: width of the sinusoidal embedding; its MLP outputs 4x this width.
        norm_num_groups: group-norm groups; ``None`` picks the largest divisor of all widths up to 32.
        pooled_embedding_dim: width of a pooled prompt embedding (SDXL, SD3, FLUX), added to the timestep embedding
            through a linear layer, as those families' denoisers do; ``None`` (SD 1.x / 2.x): no pooled input.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        cross_attention_dim: int = 768,
        block_out_channels: Sequence[int] = (64, 128, 256, 256),
        layers_per_block: int = 1,
        attention_heads: int = 8,
        time_embedding_dim: int = 64,
        norm_num_groups: int | None = None,
        pooled_embedding_dim: int | None = None,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        if norm_num_groups is None:
            norm_num_groups = math.gcd(*block_out_channels, 32)
        temb_dim = 4 * time_embedding_dim
        self.time_proj = Timesteps(time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, temb_dim)
        self.pooled_embedding = (
            None if pooled_embedding_dim is None else torch.nn.Linear(pooled_embedding_dim, temb_dim)
        )
        self.conv_in = torch.nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = torch.nn.ModuleList()
        input_channels = block_out_channels[0]
        for index, output_channels in enumerate(block_out_channels):
            is_last = index == len(block_out_channels) - 1
            self.down_blocks.append(
                get_down_block(
                    "DownBlock2D" if is_last else "CrossAttnDownBlock2D",
                    num_layers=layers_per_block,
                    in_channels=input_channels,
                    out_channels=output_channels,
                    temb_channels=temb_dim,
                    add_downsample=True,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=attention_heads,
                    downsample_padding=1,
                    attention_head_dim=output_channels // attention_heads,
                )
            )
            input_channels = output_channels
        self.head = torch.nn.Linear(block_out_channels[-1], 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-flow of each state: ``sample`` (B, C, H, W), ``timestep`` (B,) or scalar, ``encoder_hidden_states``
        (B, L, D), ``pooled`` (B, D') when the network was built with ``pooled_embedding_dim`` (else ignored).
        Returns a float32 tensor of shape (B,).

        Runs in the weights' dtype even inside an autocast region (accelerate wraps prepared models in one under
        mixed precision): with summed log-probabilities the log-flows reach hundreds of nats (about -900 on the
        shapes model), where bfloat16's spacing is 4 nats, so the network and the loss use float32 weights."""
        with torch.autocast(sample.device.type, enabled=False):
            return self._forward(sample, timestep, encoder_hidden_states, pooled)

    def _forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        embedding = self.time_embedding(self.time_proj(timestep).to(dtype))
        if self.pooled_embedding is not None:
            if pooled is None:
                raise ValueError(
                    "This flow network was built with pooled_embedding_dim="
                    f"{self.config.pooled_embedding_dim} and needs the pooled prompt embedding."
                )
            embedding = embedding + self.pooled_embedding(pooled.to(dtype))
        hidden = self.conv_in(sample.to(dtype))
        text = encoder_hidden_states.to(dtype)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, _ = block(hidden, temb=embedding, encoder_hidden_states=text)
            else:
                hidden, _ = block(hidden, temb=embedding)
        pooled = hidden.mean(dim=(2, 3))
        return self.head(pooled).squeeze(-1).float()
