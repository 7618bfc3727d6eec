"""What every diffusers-based family shares: loading a pipeline from the Hub or a folder, freezing what is not
trained, a LoRA (peft) on the denoiser that can be switched off for the prior, and saving that LoRA in the format the
family's own diffusers pipeline reads back with ``load_lora_weights``.

A family subclass names its diffusers pipeline class, its denoiser (``unet`` or ``transformer``) and its LoRA target
modules, and implements the sampling side of [`GFlowNetStableDiffusionPipeline`] (text conditioning, the model call,
the stochastic step).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Optional, Union

import torch

from .pipeline import GFlowNetStableDiffusionPipeline


class DiffusersGFlowNetPipeline(GFlowNetStableDiffusionPipeline):
    """A diffusers pipeline whose denoiser is trained (through a LoRA, or all of it) and whose other components (VAE,
    text encoders) stay frozen.

    Args:
        pretrained_model_name: a Hub id or a local folder written by the family's ``save_pretrained``, or an already
            loaded pipeline of the family's diffusers class (e.g. one built with random weights; quantised base models are not
            supported yet).
        pretrained_model_revision: the Hub revision (ignored for local folders).
        use_lora: train a LoRA (Hu et al., 2022, arXiv 2106.09685) on :attr:`lora_target_modules`; else the whole
            denoiser.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha; defaults to ``lora_rank`` (scale 1).
        lora_init_seed: seed of the LoRA initialisation (Gaussian ``A``, zero ``B``), drawn from a private random
            state so that the same seed gives the same initial adapter in every run; the global one is untouched.
        torch_dtype: the dtype to load the weights in (``None``: as saved). Large families load in bfloat16 so that
            they fit in memory before :meth:`prepare_for_training` places them.
        lora_target_modules: the module names (suffixes, peft's ``target_modules``) that get a LoRA; ``None``: the
            family's attention projections. Adding the UNet's resnet convolutions (``"conv1"``, ``"conv2"``) gives
            the adapter more capacity; the saved file records the targets, so ``load_lora_weights`` restores them.
    """

    # The diffusers pipeline class (its name in ``diffusers``), which loads the model and saves / reads its LoRA.
    diffusers_pipeline_class: ClassVar[str]
    # The attribute of that pipeline holding the denoiser: "unet" or "transformer".
    denoiser_name: ClassVar[str]
    # Module names (suffixes) that get a LoRA.
    lora_target_modules: ClassVar[tuple[str, ...]]
    # Whether the family's diffusers scripts convert peft's LoRA keys to diffusers' names before saving (the UNet
    # families do; transformer families save peft's names).
    lora_keys_in_diffusers_format: ClassVar[bool] = False
    # Whether the family's diffusers pipeline decodes in float32 when the VAE's config sets force_upcast (SDXL's
    # does: its VAE overflows in float16), so that float16 training keeps that VAE in float32.
    upcasts_vae_in_float16: ClassVar[bool] = False
    # Extra keyword arguments for the pipeline's from_pretrained.
    loading_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        pretrained_model_name: Union[str, os.PathLike, Any],
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: Optional[float] = None,
        lora_init_seed: int = 0,
        torch_dtype: Optional[torch.dtype] = None,
        lora_target_modules: Optional[Sequence[str]] = None,
    ):
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r} is invalid: expected an integer >= 1.")
        if lora_alpha is not None and not (
            isinstance(lora_alpha, (int, float)) and not isinstance(lora_alpha, bool) and 0 < lora_alpha < math.inf
        ):
            raise ValueError(
                f"lora_alpha={lora_alpha!r} is invalid: expected a finite number > 0 (the adapter's update is scaled "
                "by lora_alpha / lora_rank), or None for lora_rank."
            )
        if lora_target_modules is not None and (
            isinstance(lora_target_modules, str)
            or not lora_target_modules
            or not all(isinstance(name, str) and name for name in lora_target_modules)
        ):
            raise ValueError(
                f"lora_target_modules={lora_target_modules!r} is invalid: expected a non-empty list of module names "
                f"(peft's target_modules, e.g. {list(self.lora_target_modules)} + ['conv1', 'conv2'] for the UNet's "
                "resnet convolutions), or None for the family's default."
            )
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(
                f"torch_dtype={torch_dtype!r} is invalid: expected a torch.dtype such as torch.bfloat16, or None to "
                "load the weights as saved."
            )
        self.pretrained_model_revision = pretrained_model_revision
        if isinstance(pretrained_model_name, self.pipeline_class()):
            self.sd_pipeline = pretrained_model_name
            self.pretrained_model_name = str(getattr(self.sd_pipeline.config, "_name_or_path", "") or "")
            if torch_dtype is not None:
                self.sd_pipeline.to(dtype=torch_dtype)
        else:
            self.pretrained_model_name = str(pretrained_model_name)
            kwargs: dict[str, Any] = dict(self.loading_kwargs)
            if torch_dtype is not None:
                kwargs["torch_dtype"] = torch_dtype
            if not os.path.isdir(self.pretrained_model_name):
                kwargs["revision"] = pretrained_model_revision
            self.sd_pipeline = self.pipeline_class().from_pretrained(self.pretrained_model_name, **kwargs)
        self.sd_pipeline.scheduler = self.sampling_scheduler(self.sd_pipeline.scheduler)
        self._use_lora = use_lora
        self._adapter_off = False  # inside adapter_disabled()
        self.lora_rank = lora_rank
        self.lora_alpha = lora_rank if lora_alpha is None else lora_alpha
        if lora_target_modules is not None:  # this instance's choice; the class keeps the family's default
            self.lora_target_modules = tuple(lora_target_modules)

        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.denoiser.requires_grad_(not use_lora)
        if use_lora:
            from peft import LoraConfig

            lora_config = LoraConfig(
                r=lora_rank,
                lora_alpha=self.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(self.lora_target_modules),
            )
            # Fork the random state of the device the adapter is drawn on (the CPU unless an already loaded pipeline
            # was passed on a GPU), so that the global one is untouched.
            device = self.denoiser.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(lora_init_seed)
                self.denoiser.add_adapter(lora_config)

    @classmethod
    def pipeline_class(cls) -> Any:
        """The diffusers pipeline class of this family."""
        return getattr(importlib.import_module("diffusers"), cls.diffusers_pipeline_class)

    def sampling_scheduler(self, scheduler: Any) -> Any:
        """The scheduler the policy samples with, from the one saved with the model (default: that one)."""
        return scheduler

    # ------------------------------------------------------------------ components

    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoiser (a UNet or a transformer): the diffusers pipeline's ``denoiser_name`` component."""
        return getattr(self.sd_pipeline, self.denoiser_name)

    @property
    def vae(self) -> torch.nn.Module:
        return self.sd_pipeline.vae

    @property
    def scheduler(self) -> Any:
        return self.sd_pipeline.scheduler

    @property
    def use_lora(self) -> bool:
        return self._use_lora

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The pipeline's modules other than the denoiser (VAE, text encoders)."""
        return [
            module
            for name, module in self.sd_pipeline.components.items()
            if isinstance(module, torch.nn.Module) and name != self.denoiser_name
        ]

    def prepare_for_training(
        self, device: torch.device, weight_dtype: torch.dtype, gradient_checkpointing: bool = False
    ) -> None:
        """Frozen modules in ``weight_dtype`` (under float16 with the exceptions of :func:`place_frozen_module` and
        :attr:`upcasts_vae_in_float16`); the
        denoiser in ``weight_dtype`` with float32 LoRA parameters, or all float32 for full fine-tuning."""
        for module in self.frozen_modules():
            upcast = module is self.vae and self.upcasts_vae_in_float16 and self.vae.config.get("force_upcast", False)
            place_frozen_module(
                module, device, torch.float32 if upcast and weight_dtype == torch.float16 else weight_dtype
            )
        if self.use_lora:
            move_module(self.denoiser, device, weight_dtype, frozen_only=True)
            for parameter in self.get_trainable_layers():
                parameter.data = parameter.data.float()
        else:
            move_module(self.denoiser, device, torch.float32)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The pretrained denoiser: the LoRA switched off (diffusers' ``disable_adapters``), no second copy.
        Re-entrant: a nested use (e.g. a ``lora_min_timestep`` step while sampling the prior) leaves the LoRA off
        until the outermost one exits."""
        if not self.use_lora:
            raise ValueError(
                f"use_lora=False: the whole {self.denoiser_name} is trained, so there is no adapter to switch off and "
                "no pretrained prior left to score with; train a LoRA (use_lora=True) for objectives that use the "
                "prior."
            )
        if self._adapter_off:
            yield
            return
        self.denoiser.disable_adapters()
        self._adapter_off = True
        try:
            yield
        finally:
            self.denoiser.enable_adapters()
            self._adapter_off = False

    def get_trainable_layers(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.denoiser.parameters() if parameter.requires_grad]

    # ------------------------------------------------------------------ saving and loading

    def lora_state_dict(self, unet: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA weights with the key names the family's ``load_lora_weights`` reads."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet if unet is not None else self.denoiser)
        # diffusers' key conversion knows the attention projections only: a LoRA on other modules (e.g. the
        # convolutions) stays in peft's key format throughout, which load_lora_weights also reads.
        if self.lora_keys_in_diffusers_format and self.lora_target_modules == type(self).lora_target_modules:
            from diffusers.utils import convert_state_dict_to_diffusers

            state = convert_state_dict_to_diffusers(state)
        return state

    def save_pretrained(self, output_dir: Union[str, os.PathLike], unet: Optional[torch.nn.Module] = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (LoRA, read by the family pipeline's ``load_lora_weights``) or
        the whole denoiser as a diffusers ``unet/`` or ``transformer/`` folder (full fine-tuning)."""
        unet = unet if unet is not None else self.denoiser
        if self.use_lora:
            # The adapter's config (rank, alpha, targets) goes into the file's metadata, so that load_lora_weights
            # applies the trained scale alpha / rank (without it, diffusers assumes alpha = rank).
            layers = {
                f"{self.denoiser_name}_lora_layers": self.lora_state_dict(unet),
                f"{self.denoiser_name}_lora_adapter_metadata": self.denoiser.peft_config["default"].to_dict(),
            }
            self.pipeline_class().save_lora_weights(output_dir, **layers)
        else:
            unet.save_pretrained(os.path.join(output_dir, self.denoiser_name))

    def load_trained_weights(self, unet: torch.nn.Module, input_dir: str) -> None:
        """Load what :meth:`save_pretrained` wrote in ``input_dir`` into ``unet``."""
        if not self.use_lora:
            loaded = type(self.denoiser).from_pretrained(os.path.join(input_dir, self.denoiser_name))
            unet.load_state_dict(loaded.state_dict())
            return
        from peft import set_peft_model_state_dict

        loaded = self.pipeline_class().lora_state_dict(input_dir)
        lora_state = loaded[0] if isinstance(loaded, tuple) else loaded
        prefix = f"{self.denoiser_name}."
        state = {key.removeprefix(prefix): value for key, value in lora_state.items() if key.startswith(prefix)}
        if self.lora_keys_in_diffusers_format:
            from diffusers.utils import convert_unet_state_dict_to_peft

            state = convert_unet_state_dict_to_peft(state)
        result = set_peft_model_state_dict(unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(
                f"The LoRA checkpoint in {input_dir} does not fit this {self.denoiser_name}: unexpected "
                f"{unexpected[:5]}."
            )

    # ------------------------------------------------------------------ decoding

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents to float32 images in [0, 1] as the family's diffusers pipeline does:
        ``latents * latents_std / scaling_factor + latents_mean`` when the VAE config has per-channel statistics
        (Playground-style SDXL checkpoints), else ``latents / scaling_factor + shift_factor`` (the shift is 0 for
        families without one)."""
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            scaled = latents * std / config.scaling_factor + mean
        else:
            scaled = latents / config.scaling_factor
            if getattr(config, "shift_factor", None):
                scaled = scaled + config.shift_factor
        images = self.vae.decode(scaled, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def token_counts(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Tokens per prompt without truncation (special tokens included), as the trainer's length warning needs."""
    return [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, frozen_only: bool = False) -> None:
    """``module.to(device, dtype=dtype)``, naming no dtype when the module's floating-point parameters and buffers
    (with ``frozen_only``, those without gradient) already have it: diffusers' ``ModelMixin.to`` warns that modules "should
    be kept in float32" on every call that names a dtype, even with no such module, so a model loaded in the dtype it
    trains in (``torch_dtype``, as diffusers recommends) is moved without the warning."""
    tensors = [
        tensor
        for tensor in itertools.chain(module.parameters(), module.buffers())
        if tensor.is_floating_point() and not (frozen_only and tensor.requires_grad)
    ]
    if all(tensor.dtype == dtype for tensor in tensors):
        module.to(device)
    else:
        module.to(device, dtype=dtype)


def place_frozen_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module to ``device`` in ``dtype``, keeping in float32 under float16 the submodules a
    transformers model keeps there (``_keep_in_fp32_modules``, T5's ``wo``, which overflow in float16)."""
    move_module(module, device, dtype)
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.float16 and keep:
        for name, submodule in module.named_modules():
            if keep & set(name.split(".")):
                submodule.to(torch.float32)
