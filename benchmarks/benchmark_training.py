"""The straightforward DAG loop against the trainer's optimised one, side by side on the same samples; and the memory,
work counters and time per call of every objective's training window.

    python benchmarks/benchmark_training.py --setting tiny-cpu [--repeats 3]
    python benchmarks/benchmark_training.py --setting sd15-gpu [--sample-batches 2] [--mixed-precision bf16]
    python benchmarks/benchmark_training.py --setting sd15-gpu --objective {dag_db,dag_kl,rtb,ddpo,kl_pg,rdb,all}
    python benchmarks/benchmark_training.py --setting sd15-gpu --device cpu --objective rtb --steps 2 \
        --sample-batch-size 1 --sample-batches 1 --train-batch-size 1 --accumulation 1 --mixed-precision no
    python benchmarks/benchmark_training.py --setting {sdxl,sd3,flux}-cpu     # tiny families, a smoke run
    python benchmarks/benchmark_training.py --setting {sdxl,sd35,flux}-gpu    # real sizes, random weights [--resolution]

Each repeat samples one epoch once (``trainer.generate_samples``), cuts it into windows (``trainer.windows``) and
trains on those windows twice from the same starting weights and optimiser state: once with the product loop
(``GFlowNetDiffusionTrainer.train_window``) and once with the per-transition oracle of the tests
(:mod:`dag_trl.testing.reference_loop`). Both loops therefore see identical data, so their difference is the
training loop alone; the sampling phase is common to both and is counted in each one's whole-epoch time. The loops
alternate which runs first from repeat to repeat, and the figures reported are medians over repeats.

Settings:

- ``tiny-cpu``: the test suite's tiny pipeline (:data:`dag_trl.testing.tiny_models.TINY_SD`), a mean-brightness
  reward; about a minute on two CPU cores.
- ``sd15-gpu``: an SD1.5-architecture pipeline with random weights built from configs in code (no Hub), the paper's
  batch sizes (sample 16, train 8, 50 steps, accumulation 4) and, as the reward, a randomly initialised CLIP
  ViT-L/14 image tower with the LAION aesthetic head on 224 px images: the cost of the aesthetic scorer.
- ``sdxl-cpu``, ``sd3-cpu``, ``flux-cpu``: smoke runs of the other families at the tests' tiny sizes
  (:mod:`dag_trl.testing.tiny_families`: 16 px images), 4 steps, 4 trajectories, one repeat, a mean-brightness
  reward; well under a minute each on one CPU thread. They take the GPU settings' code path (a pipeline assembled in
  memory and handed to the family's class), so they check it without a GPU.
- ``sdxl-gpu``, ``sd35-gpu``, ``flux-gpu``: the real architectures with random weights, assembled in memory
  directly on the GPU in bfloat16 (:data:`~dag_trl.testing.tiny_families.SDXL_BASE_ARCHITECTURE`: 2.6B UNet and
  CLIP-L + bigG; :data:`~dag_trl.testing.tiny_families.SD35_MEDIUM_ARCHITECTURE`: 2.2B MMDiT-X, CLIP-L + bigG +
  T5-XXL; :data:`~dag_trl.testing.tiny_families.FLUX1_DEV_ARCHITECTURE`: 11.9B transformer, CLIP-L + T5-XXL), with
  character-level tokenizers at the real maximum lengths (77 CLIP tokens; 256 T5 tokens for SD3.5, 512 for FLUX).
  Short runs, meant to take two to three minutes each on one H200 including the build: 1024 px (SDXL, SD3.5) or 512 px (FLUX, through
  ``--resolution``), 10 steps, 2 trajectories, train batch 2, gradient checkpointing, bf16, brightness reward, one
  repeat; guidance 5 for SDXL and SD3.5 (trained with guidance), FLUX.1-dev's distilled guidance 3.5 and no true
  classifier-free guidance.

Every setting is DAG-DB unless ``--klpf`` is positive (DAG-KL) or ``--objective`` names another objective (with the
settings that objective requires, e.g. summed log-densities for RTB, kl_pg and rdb). The straightforward loop
implements the DAG family only (DAG-DB, DAG-KL, relative DB); the other objectives are measured with the product loop
alone (``--loops optimised``, their default), which is what their memory and time are. ``--objective all`` runs the
script once per objective, each in a process of its own (so that each peak is its own), and prints one table.
Objectives that train whole trajectories (RTB) have no warm-up transition-batch.

Besides the phase times, the script times each call of the denoiser (with and without gradient), the VAE decoder,
the objective's model and the reward with forward hooks (on CUDA synchronised around each call): the "time per call"
figures; the backward passes are the rest of the training phase. ``--json`` writes all of it to a file. Each setting has a pipeline factory: SD1 settings
save the pipeline to a temporary folder and load it with ``DefaultGFlowNetStableDiffusionPipeline``; the other
families assemble the diffusers pipeline in memory (nothing multi-GB is written) and pass the object to their family's
class.

Peak memory is CUDA's ``max_memory_allocated`` on a GPU; on CPU it is the process's peak resident set size (VmHWM)
after resetting it through ``/proc/self/clear_refs`` before each phase, or, where that is not possible, getrusage's
lifetime maximum RSS, which can only grow. It is reported for the set-up (building the models, before the first
reset), the sampling phase and each loop's training phase.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer  # noqa: E402
from dag_trl.models import (  # noqa: E402
    DefaultGFlowNetFluxPipeline,
    DefaultGFlowNetStableDiffusion3Pipeline,
    DefaultGFlowNetStableDiffusionXLPipeline,
    DiffusersGFlowNetPipeline,
    FlowMatchingGFlowNetPipeline,
)
from dag_trl.objectives import Trajectories  # noqa: E402
from dag_trl.testing.reference_loop import reference_train_window  # noqa: E402
from dag_trl.testing.tiny_families import (  # noqa: E402
    FLUX1_DEV_ARCHITECTURE,
    SD35_MEDIUM_ARCHITECTURE,
    SDXL_BASE_ARCHITECTURE,
    TINY_FLUX_ARCHITECTURE,
    TINY_SD3_ARCHITECTURE,
    TINY_SDXL_ARCHITECTURE,
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sdxl_pipeline,
)
from dag_trl.testing.tiny_models import SDArchitecture, build_tiny_sd_pipeline  # noqa: E402
from dag_trl.trainer import OBJECTIVES, WorkCounters, get_objective_class  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a cat on a mat", "a mountain lake at dawn"]
LOOPS = ("straightforward", "optimised")
# The objectives the straightforward loop (dag_trl.testing.reference_loop) implements: the DAG family, which scores
# intermediate states. The others are measured with the product loop only.
REFERENCE_OBJECTIVES = ("dag_db", "dag_kl", "rdb")
# The UNet, VAE and text encoder widths of runwayml/stable-diffusion-v1-5 (860M, 84M and 123M parameters), with a
# character-level tokenizer; its image_size is the --resolution.
SD15_ARCHITECTURE = SDArchitecture(
    image_size=512,
    vae_block_out_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_decoder_gain=1.0,
    text_hidden_size=768,
    text_intermediate_size=3072,
    text_num_layers=12,
    text_num_heads=12,
    text_vocab_size=49408,
    max_tokens=77,
    unet_block_out_channels=(320, 640, 1280, 1280),
    unet_layers_per_block=2,
    unet_down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    unet_up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    unet_attention_head_dim=8,
    norm_num_groups=32,
)


@dataclass
class PhaseResult:
    """One loop's training phase in one repeat."""

    seconds: float
    peak_memory_mib: float
    memory_rise_mib: float
    counters: WorkCounters
    calls: dict[str, CallTimes]


@dataclass
class Setting:
    """Defaults that differ between the settings."""

    config: dict[str, Any]
    # Returns the pipeline to train, given a temporary folder it may write to and the arguments.
    pipeline_factory: Callable[[Path, argparse.Namespace], DiffusersGFlowNetPipeline]
    reward: str
    device: str
    mixed_precision: str
    repeats: int
    threads: int | None
    # The --resolution default (the SD1 settings' 512; SD1.5 reads it, tiny SD has its own 16 px).
    resolution: int = 512
    gradient_checkpointing: bool = False


# ---------------------------------------------------------------------------------------------- pipelines and rewards


def build_tiny(path: Path, args: argparse.Namespace) -> Path:
    return build_tiny_sd_pipeline(path)


def build_sd15(path: Path, args: argparse.Namespace) -> Path:
    """Save an SD1.5-architecture ``StableDiffusionPipeline`` with random weights, built offline from configs."""
    architecture = dataclasses.replace(SD15_ARCHITECTURE, image_size=args.resolution)
    return build_tiny_sd_pipeline(path, architecture=architecture)


def saved_sd_pipeline(builder: Callable[[Path, argparse.Namespace], Path]) -> Callable:
    """The SD1 settings' factory: ``builder`` saves a ``StableDiffusionPipeline`` into the folder, which
    ``DefaultGFlowNetStableDiffusionPipeline`` loads like a Hub checkpoint."""

    def factory(folder: Path, args: argparse.Namespace) -> DiffusersGFlowNetPipeline:
        model_path = builder(folder / "model", args)
        return DefaultGFlowNetStableDiffusionPipeline(str(model_path), lora_rank=args.lora_rank)

    return factory


def weight_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The dtype the trainer keeps frozen weights in under ``--mixed-precision`` (None: float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)


def in_memory_pipeline(
    family: type[DiffusersGFlowNetPipeline], make: Callable, architecture: Any, **kwargs
) -> Callable:
    """A factory that assembles ``make(architecture)`` (a ``make_*_pipeline`` of
    :mod:`dag_trl.testing.tiny_families`) with random weights directly on the run's device in the mixed-precision
    dtype, and hands the diffusers pipeline to ``family``. ``--resolution`` is SDXL's image size (its UNet's sample
    size) and the rectified-flow families' ``resolution``; they read ``architecture.max_sequence_length`` T5 tokens.
    """

    def factory(folder: Path, args: argparse.Namespace) -> DiffusersGFlowNetPipeline:
        start = time.perf_counter()
        family_kwargs = dict(kwargs, lora_rank=args.lora_rank)
        if issubclass(family, FlowMatchingGFlowNetPipeline):
            sizes = architecture
            family_kwargs.update(resolution=args.resolution, max_sequence_length=architecture.max_sequence_length)
        else:
            sizes = dataclasses.replace(architecture, image_size=args.resolution)
        dtype = weight_dtype(args)
        diffusers_pipeline = make(sizes, seed=0, device=args.device, dtype=dtype)
        synchronise(torch.device(args.device))
        counts = ", ".join(
            f"{name} {sum(p.numel() for p in module.parameters()) / 1e6:,.1f}M"
            for name, module in diffusers_pipeline.components.items()
            if isinstance(module, torch.nn.Module)
        )
        print(
            f"assembled {type(diffusers_pipeline).__name__} with random weights on {args.device} in "
            f"{dtype or torch.float32} in {time.perf_counter() - start:.1f} s: {counts} parameters",
            flush=True,
        )
        return family(diffusers_pipeline, **family_kwargs)

    return factory


def brightness_reward(args: argparse.Namespace, device: torch.device) -> Callable:
    def reward(images: torch.Tensor, prompts: tuple, metadata: tuple) -> tuple[torch.Tensor, dict]:
        return images.mean(dim=(1, 2, 3)), {}

    return reward


def clip_aesthetic_reward(args: argparse.Namespace, device: torch.device) -> Callable:
    """The aesthetic scorer's computation with random weights: CLIP ViT-L/14 image tower at 224 px (the real
    reward's on-device preprocessing included) and the LAION MLP head on the normalised embedding."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dag_trl.rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AestheticMLP, ImagePreprocessor

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    torch.manual_seed(1)
    tower = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    )
    tower = tower.eval().requires_grad_(False).to(device, dtype)
    head = AestheticMLP(768).eval().requires_grad_(False).to(device)
    preprocess = ImagePreprocessor(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, shortest_edge=224, crop_size=(224, 224))

    @torch.no_grad()
    def reward(images: torch.Tensor, prompts: tuple, metadata: tuple) -> tuple[torch.Tensor, dict]:
        embeddings = tower(pixel_values=preprocess(images.to(device)).to(dtype)).image_embeds.float()
        return head(embeddings / embeddings.norm(dim=-1, keepdim=True)).squeeze(-1), {}

    return reward


REWARDS = {"brightness": brightness_reward, "clip-aesthetic": clip_aesthetic_reward}
SETTINGS = {
    "tiny-cpu": Setting(
        config=dict(
            sample_num_steps=10,
            sample_batch_size=4,
            sample_num_batches_per_epoch=4,
            train_batch_size=2,
            train_gradient_accumulation_steps=2,
            flow_block_out_channels=[8, 16],
            flow_attention_heads=2,
            flow_time_embedding_dim=8,
        ),
        pipeline_factory=saved_sd_pipeline(build_tiny),
        reward="brightness",
        device="cpu",
        mixed_precision="no",
        repeats=3,
        threads=1,
    ),
    "sd15-gpu": Setting(
        config=dict(
            sample_num_steps=50,
            sample_batch_size=16,
            sample_num_batches_per_epoch=2,
            train_batch_size=8,
            train_gradient_accumulation_steps=4,
        ),
        pipeline_factory=saved_sd_pipeline(build_sd15),
        reward="clip-aesthetic",
        device="cuda",
        mixed_precision="bf16",
        repeats=1,
        threads=None,
    ),
}
# The other families' CPU smoke runs at the tiny sizes: one window of 4 trajectories of 4 steps.
FAMILY_CPU_CONFIG = dict(
    sample_num_steps=4,
    sample_batch_size=2,
    sample_num_batches_per_epoch=2,
    train_batch_size=2,
    train_gradient_accumulation_steps=2,
    flow_block_out_channels=[8, 16],
    flow_attention_heads=2,
    flow_time_embedding_dim=8,
)
# Their GPU runs at the real sizes: one window of 2 trajectories of 10 steps.
FAMILY_GPU_CONFIG = dict(
    sample_num_steps=10,
    sample_batch_size=2,
    sample_num_batches_per_epoch=1,
    train_batch_size=2,
    train_gradient_accumulation_steps=1,
)
# FLUX.1-dev is guidance-distilled: no true classifier-free guidance (its recipes' sample_guidance_scale).
FLUX_GUIDANCE = dict(sample_guidance_scale=1.0)
FAMILIES = {
    "sdxl": (
        DefaultGFlowNetStableDiffusionXLPipeline,
        make_sdxl_pipeline,
        TINY_SDXL_ARCHITECTURE,
        SDXL_BASE_ARCHITECTURE,
        {},
    ),
    "sd3": (
        DefaultGFlowNetStableDiffusion3Pipeline,
        make_sd3_pipeline,
        TINY_SD3_ARCHITECTURE,
        SD35_MEDIUM_ARCHITECTURE,
        {},
    ),
    "flux": (
        DefaultGFlowNetFluxPipeline,
        make_flux_pipeline,
        TINY_FLUX_ARCHITECTURE,
        FLUX1_DEV_ARCHITECTURE,
        FLUX_GUIDANCE,
    ),
}
for _name, (_family, _make, _tiny, _real, _extra) in FAMILIES.items():
    SETTINGS[f"{_name}-cpu"] = Setting(
        config={**FAMILY_CPU_CONFIG, **_extra},
        pipeline_factory=in_memory_pipeline(_family, _make, _tiny),
        reward="brightness",
        device="cpu",
        mixed_precision="no",
        repeats=1,
        threads=1,
        resolution=_tiny.image_size,
    )
    SETTINGS[f"{'sd35' if _name == 'sd3' else _name}-gpu"] = Setting(
        config={**FAMILY_GPU_CONFIG, **_extra},
        pipeline_factory=in_memory_pipeline(_family, _make, _real),
        reward="brightness",
        device="cuda",
        mixed_precision="bf16",
        repeats=1,
        threads=None,
        resolution=512 if _name == "flux" else 1024,
        gradient_checkpointing=True,
    )


# ---------------------------------------------------------------------------------------------- measurement


class PeakMemory:
    """Peak memory of one phase, and how far it rose above the level at the phase's start: CUDA's allocator peak,
    or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.resettable_rss = False
        self.start_mib = 0.0
        # The peak so far (building the models), before the first reset.
        self.before_mib = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else self._lifetime_peak_rss_mib()
        if not self.cuda:
            try:
                self._clear_refs()
                self.resettable_rss = True
            except OSError:
                pass

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated, reset per phase; rise = peak - memory_allocated at the start"
        if self.resettable_rss:
            return (
                "peak RSS (VmHWM of /proc/self/status), reset per phase via /proc/self/clear_refs; "
                "rise = peak - RSS at the start"
            )
        return "getrusage ru_maxrss: the process's lifetime peak RSS, which cannot be reset (later phases include earlier)"

    @staticmethod
    def _clear_refs() -> None:
        # Writing 5 resets the kernel's peak-RSS counter (VmHWM) of this process to its current RSS.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    @staticmethod
    def _status_mib(key: str) -> float:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
        elif self.resettable_rss:
            self._clear_refs()
            self.start_mib = self._status_mib("VmRSS")
        else:
            self.start_mib = self.peak_mib()

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.resettable_rss:
            return self._status_mib("VmHWM")
        return self._lifetime_peak_rss_mib()

    @staticmethod
    def _lifetime_peak_rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class CallTimes:
    """Wall time of one kind of call within a phase: how many calls, how many samples (batch rows) they took, and
    their total seconds (the forward pass only for modules; a backward pass is not a call)."""

    calls: int = 0
    samples: int = 0
    seconds: float = 0.0

    def per_call_ms(self) -> float | None:
        return 1000 * self.seconds / self.calls if self.calls else None


class CallTimer:
    """Times the denoiser's forward calls (with and without gradient), the VAE decoder's, the objective's model's
    and the reward's, through forward hooks and a wrapper: the figures behind "time per call". On CUDA each timed
    call synchronises before and after (a few microseconds against an SD-sized forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, CallTimes] = {}
        self._starts: dict[int, float] = {}
        self._lock = threading.Lock()  # the trainer may score state rewards in threads of its own

    def reset(self) -> None:
        self.times = {}

    def _add(self, name: str, samples: int, seconds: float) -> None:
        with self._lock:
            times = self.times.setdefault(name, CallTimes())
            times.calls += 1
            times.samples += samples
            times.seconds += seconds

    def watch(self, name: str, module: torch.nn.Module | None) -> None:
        """Time ``module``'s forward calls as ``name`` (``name/grad`` and ``name/no_grad`` for the denoiser)."""
        if module is None:
            return

        def before(module: torch.nn.Module, inputs: tuple) -> None:
            synchronise(self.device)
            self._starts[id(module)] = time.perf_counter()

        def after(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            synchronise(self.device)
            seconds = time.perf_counter() - self._starts.pop(id(module))
            first = output if torch.is_tensor(output) else output[0]
            key = f"{name}/{'grad' if torch.is_grad_enabled() else 'no_grad'}" if name == "denoiser" else name
            self._add(key, first.shape[0], seconds)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def wrap_reward(self, reward: Callable) -> Callable:
        def timed(images: torch.Tensor, prompts: tuple, metadata: tuple) -> tuple[torch.Tensor, dict]:
            start = time.perf_counter()
            result = reward(images, prompts, metadata)
            self._add("reward", images.shape[0], time.perf_counter() - start)
            return result

        return timed


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TrainingState:
    """The trainable weights, optimiser state and weights version, to start both loops from the same point."""

    def __init__(self, trainer: GFlowNetDiffusionTrainer) -> None:
        self.parameters = [p.detach().clone() for p in self._trainable(trainer)]
        self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.weights_version = trainer.weights_version

    @staticmethod
    def _trainable(trainer: GFlowNetDiffusionTrainer) -> list[torch.nn.Parameter]:
        objective_parameters = trainer.objective_model.parameters() if trainer.objective_model is not None else ()
        return [p for p in itertools.chain(trainer.denoiser.parameters(), objective_parameters) if p.requires_grad]

    def restore(self, trainer: GFlowNetDiffusionTrainer) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self._trainable(trainer), self.parameters, strict=True):
                parameter.copy_(saved)
        trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.weights_version = self.weights_version


def run_loop(name: str, trainer: GFlowNetDiffusionTrainer, windows: list, beta: float, epoch: int) -> WorkCounters:
    """Train on every window with one loop; returns the training phase's work counters."""
    trainer.counters = WorkCounters()
    trainer.denoiser.train()
    if trainer.objective_model is not None:
        trainer.objective_model.train()
    for window, kept in windows:
        if name == "optimised":
            trainer.train_window(window, kept, beta, epoch)
        else:
            reference_train_window(trainer, window, kept, beta, epoch, trainer.counters)
    return trainer.counters


def warmup_window(
    trainer: GFlowNetDiffusionTrainer, window: tuple[Trajectories, torch.Tensor]
) -> tuple[Trajectories, torch.Tensor]:
    """The first training batch of ``window`` with one kept transition per trajectory (train it inside
    :func:`one_backward_per_step`)."""
    samples, kept = window
    rows = torch.arange(min(trainer.config.train_batch_size, kept.shape[0]))
    return samples.take(rows), kept[rows, :1]


@contextlib.contextmanager
def one_backward_per_step(trainer: GFlowNetDiffusionTrainer):
    """Let the trainer step after a single backward pass, as the warm-up window has: the config and accelerate's
    accumulation count say so while inside; afterwards both are restored."""
    config, accumulation = trainer.config, trainer.accelerator.gradient_accumulation_steps
    # max(1, int(steps * fraction)) keeps one timestep even where round-off puts the product just under 1.
    trainer.config = dataclasses.replace(
        config, train_gradient_accumulation_steps=1, train_timestep_fraction=1 / config.sample_num_steps
    )
    trainer.accelerator.gradient_accumulation_steps = 1
    try:
        yield
    finally:
        trainer.config = config
        trainer.accelerator.gradient_accumulation_steps = accumulation


def timed_phase(
    name: str,
    trainer: GFlowNetDiffusionTrainer,
    windows: list,
    beta: float,
    epoch: int,
    memory: PeakMemory,
    timer: CallTimer,
) -> PhaseResult:
    device = trainer.accelerator.device
    memory.reset()
    timer.reset()
    start = time.perf_counter()
    counters = run_loop(name, trainer, windows, beta, epoch)
    synchronise(device)
    seconds = time.perf_counter() - start
    peak = memory.peak_mib()
    return PhaseResult(seconds, peak, peak - memory.start_mib, counters, copy.deepcopy(timer.times))


# ---------------------------------------------------------------------------------------------- driver


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="tiny-cpu")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: the setting's")
    parser.add_argument("--repeats", type=int, help="timed repeats (default: 3 tiny-cpu, else 1)")
    parser.add_argument("--steps", type=int, help="DDIM steps per trajectory")
    parser.add_argument("--sample-batch-size", type=int)
    parser.add_argument("--sample-batches", type=int, help="sampling batches per epoch")
    parser.add_argument("--train-batch-size", type=int)
    parser.add_argument("--accumulation", type=int, help="train batches per optimiser step (window)")
    parser.add_argument("--timestep-fraction", type=float, default=1.0)
    parser.add_argument("--decode-batch-size", type=int, help="train_decode_batch_size (default: the config's)")
    parser.add_argument(
        "--klpf",
        type=float,
        help="train_klpf: without --objective, <= 0 (the default) picks DAG-DB and > 0 DAG-KL; --objective dag_kl "
        "defaults to 1.0",
    )
    parser.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES) + ["all"],
        help="train_objective (default: by --klpf); all: each objective in a process of its own, one after the other, "
        "then a table of their memory and times",
    )
    parser.add_argument(
        "--loops",
        choices=["both", "optimised"],
        help="both: the straightforward loop beside the product's (default for "
        + ", ".join(REFERENCE_OBJECTIVES)
        + ", the only ones it implements); optimised: the product loop only (the default for the other objectives)",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="default: on for the *-gpu settings of SDXL, SD3.5 and FLUX, else off",
    )
    parser.add_argument(
        "--disable-cudnn-attention",
        action="store_true",
        help="torch.backends.cuda.enable_cudnn_sdp(False): torch 2.11's cuDNN attention backward failed on FLUX (H200)",
    )
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument(
        "--resolution",
        type=int,
        help="image size of sd15-gpu (multiple of 64; default 512) and of the SDXL, SD3 and FLUX settings (default: "
        "1024 sdxl-gpu and sd35-gpu, 512 flux-gpu, 16 for the tiny ones); tiny-cpu ignores it",
    )
    parser.add_argument("--reward", choices=["brightness", "clip-aesthetic"], help="default: per setting")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for tiny-cpu, whose networks are too small to split: on a shared machine "
        "a second thread waits for a core held by another process, which made a tiny UNet forward 100x slower)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed transition-batch of each loop")
    return parser.parse_args()


def make_config(args: argparse.Namespace, setting: Setting, logdir: str) -> GFlowNetConfig:
    overrides = {
        "sample_num_steps": args.steps,
        "sample_batch_size": args.sample_batch_size,
        "sample_num_batches_per_epoch": args.sample_batches,
        "train_batch_size": args.train_batch_size,
        "train_gradient_accumulation_steps": args.accumulation,
        "train_decode_batch_size": args.decode_batch_size,
    }
    values = dict(setting.config)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if args.objective is not None:
        # What the objective cannot train without (e.g. summed log-densities for RTB, kl_pg and rdb), unless set below.
        values.update(
            {key: value for key, (value, _) in get_objective_class(args.objective).required_settings.items()}
        )
    values.update(
        mixed_precision=args.mixed_precision,
        train_gradient_checkpointing=args.gradient_checkpointing,
        train_timestep_fraction=args.timestep_fraction,
        train_klpf=args.klpf,
        train_objective=args.objective,
        train_reward_exp=10.0,
        train_reward_exp_anneal="none",
        logdir=logdir,
        save_freq=10**9,
        accelerator_kwargs={"cpu": True} if args.device == "cpu" else {},
    )
    return GFlowNetConfig(**values)


def prompt_function() -> Callable[[], tuple[str, dict]]:
    counter = itertools.count()

    def next_prompt() -> tuple[str, dict]:
        index = next(counter)
        return PROMPTS[index % len(PROMPTS)], {"index": index}

    return next_prompt


def describe_machine(device: torch.device) -> str:
    import diffusers
    import transformers

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{hardware}; load average {load}\npython {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe_calls(calls: dict[str, CallTimes]) -> str:
    return "; ".join(
        f"{name} {times.calls} calls of {times.samples // max(times.calls, 1)} samples, {times.per_call_ms():.0f} ms each"
        for name, times in sorted(calls.items())
    )


def report(
    config: GFlowNetConfig,
    loops: tuple[str, ...],
    sampling: list[float],
    sampling_counters: WorkCounters,
    sampling_calls: dict[str, CallTimes],
    results: dict[str, list[PhaseResult]],
    memory: PeakMemory,
    peaks: dict[str, float],
) -> dict[str, Any]:
    """Print the measurements and return them as a JSON-serialisable dict."""
    trajectories = config.sample_batch_size * config.sample_num_batches_per_epoch
    kept = max(1, int(config.sample_num_steps * config.train_timestep_fraction))
    transitions = trajectories * kept
    # One transition-batch is one backward: train_batch_size transitions (the unit of the per-step figures below).
    transition_batches = -(-trajectories // config.train_batch_size) * kept
    sample_seconds = statistics.median(sampling)
    print(
        f"\n{trajectories} trajectories x {kept} kept transitions = {transitions} transitions per epoch, "
        f"{transition_batches} transition-batches of {config.train_batch_size}; medians of {len(sampling)} repeat(s)"
    )
    print(f"sampling phase (shared): {sample_seconds:.2f} s; counters {asdict(sampling_counters)}")
    print(f"  timed calls: {describe_calls(sampling_calls)}")
    header = f"{'loop':<16}{'sampling s':>11}{'training s':>11}{'epoch s':>9}{'ms/t-batch':>11}{'trans/s':>9}"
    print(header + f"{'peak MiB':>10}{'rise MiB':>10}")
    measured: dict[str, Any] = {
        "objective": config.objective_name,
        "sampling_seconds": sample_seconds,
        "sampling_counters": asdict(sampling_counters),
        "sampling_calls": {name: asdict(times) for name, times in sampling_calls.items()},
        "peak_memory_mib": dict(peaks),
        "peak_memory_method": memory.method,
        "loops": {},
    }
    for name in loops:
        train = statistics.median(r.seconds for r in results[name])
        peak = max(r.peak_memory_mib for r in results[name])
        rise = max(r.memory_rise_mib for r in results[name])
        measured["loops"][name] = {
            "training_seconds": train,
            "peak_memory_mib": peak,
            "memory_rise_mib": rise,
            "counters": asdict(results[name][-1].counters),
            "calls": {call: asdict(times) for call, times in results[name][-1].calls.items()},
        }
        print(
            f"{name:<16}{sample_seconds:>11.2f}{train:>11.2f}{sample_seconds + train:>9.2f}"
            f"{1000 * train / transition_batches:>11.1f}{transitions / train:>9.1f}{peak:>10.0f}{rise:>10.0f}"
        )
    print("training-phase counters (per epoch, in samples) and timed calls (last repeat):")
    for name in loops:
        print(f"  {name:<16}{asdict(results[name][-1].counters)}")
        print(f"  {'':<16}{describe_calls(results[name][-1].calls)}")
    print("training times per repeat: " + "; ".join(f"{n} {[round(r.seconds, 2) for r in results[n]]}" for n in loops))
    print(f"peak memory: {memory.method}")
    print("peak memory per phase (MiB): " + ", ".join(f"{phase} {value:.0f}" for phase, value in peaks.items()))
    if len(loops) == 2:
        reference = measured["loops"]["straightforward"]["training_seconds"]
        optimised = measured["loops"]["optimised"]["training_seconds"]
        print(f"speed-up, training phase: {reference / optimised:.2f}x")
        print(f"speed-up, whole epoch:    {(sample_seconds + reference) / (sample_seconds + optimised):.2f}x")
    return measured


def run_every_objective(args: argparse.Namespace) -> None:
    """``--objective all``: the script again for each objective, one after the other (each in a fresh process, so
    that every peak is its own), then one table. Later arguments win in argparse, so each run appends its own."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dag-trl-bench-all-") as folder:
        for name in sorted(OBJECTIVES):
            output = Path(folder) / f"{name}.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--objective", name, "--json", str(output)]
            print(f"\n==== {name}: {' '.join(command[1:])}", flush=True)
            returncode = subprocess.call(command)
            rows.append((name, json.loads(output.read_text()) if output.exists() else None, returncode))
    print(
        f"\n{'objective':<10}{'set-up MiB':>11}{'sampling MiB':>13}{'training MiB':>13}{'sampling s':>11}{'training s':>11}"
    )
    summary = {}
    for name, measured, returncode in rows:
        if measured is None:
            print(f"{name:<10} failed (exit {returncode})")
            continue
        summary[name] = measured
        peaks, optimised = measured["peak_memory_mib"], measured["loops"]["optimised"]
        print(
            f"{name:<10}{peaks['set-up']:>11.0f}{peaks['sampling']:>13.0f}{optimised['peak_memory_mib']:>13.0f}"
            f"{measured['sampling_seconds']:>11.1f}{optimised['training_seconds']:>11.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def main() -> None:
    args = parse_arguments()
    if args.objective == "all":
        run_every_objective(args)
        return
    setting = SETTINGS[args.setting]
    args.mixed_precision = args.mixed_precision or setting.mixed_precision
    repeats = args.repeats or setting.repeats
    args.threads = args.threads or setting.threads
    args.device = setting.device if args.device == "auto" else args.device
    args.resolution = args.resolution or setting.resolution
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = setting.gradient_checkpointing
    if args.klpf is None:
        args.klpf = 1.0 if args.objective == "dag_kl" else -1.0
    objective = args.objective or ("dag_kl" if args.klpf > 0 else "dag_db")
    if args.loops is None:
        args.loops = "both" if objective in REFERENCE_OBJECTIVES else "optimised"
    if args.loops == "both" and objective not in REFERENCE_OBJECTIVES:
        sys.exit(
            f"--loops both needs the straightforward loop, which implements {', '.join(REFERENCE_OBJECTIVES)} only; "
            f"--objective {objective} takes --loops optimised."
        )
    loops = LOOPS if args.loops == "both" else ("optimised",)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"--setting {args.setting} needs a CUDA device and none is visible to torch {torch.__version__}. "
            "Run it on a GPU machine, or add --device cpu (with e.g. --steps 2 --sample-batch-size 2 "
            "--sample-batches 1 --resolution 128 --mixed-precision no) for a slow check of the code path"
            + (
                "."
                if args.setting == "sd15-gpu"
                else "; for SDXL, SD3 and FLUX the tiny sdxl-cpu, sd3-cpu and flux-cpu settings check it in seconds."
            )
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.disable_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    with tempfile.TemporaryDirectory(prefix="dag-trl-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        pipeline = setting.pipeline_factory(tmp, args)
        config = make_config(args, setting, str(tmp / "logs"))
        reward_choice = args.reward or setting.reward
        timer = CallTimer(torch.device(args.device))
        reward = timer.wrap_reward(REWARDS[reward_choice](args, torch.device(args.device)))
        trainer = GFlowNetDiffusionTrainer(config, reward, prompt_function(), pipeline)
        device = trainer.accelerator.device
        timer.watch("denoiser", trainer.sd_pipeline.unet)
        timer.watch("vae_decoder", getattr(trainer.sd_pipeline.vae, "decoder", trainer.sd_pipeline.vae))
        timer.watch("objective_model", trainer.objective_model)
        print(f"setting {args.setting} on {device}: {describe_machine(device)}")
        print(
            f"reward {reward_choice}, mixed precision {config.mixed_precision}, gradient checkpointing "
            f"{config.train_gradient_checkpointing}, LoRA rank {args.lora_rank}, steps {config.sample_num_steps}, "
            f"sample {config.sample_batch_size} x {config.sample_num_batches_per_epoch}, train batch "
            f"{config.train_batch_size}, accumulation {config.train_gradient_accumulation_steps}, decode batch "
            f"{config.train_decode_batch_size}, resolution {args.resolution}, "
            f"{get_objective_class(config.objective_name).display_name} ({config.objective_name}), loops "
            f"{', '.join(loops)}; set-up {time.perf_counter() - start:.1f} s"
        )

        # The warm-up trains one transition per trajectory, which an objective that balances whole trajectories
        # (RTB) refuses.
        warms_up = "train_timestep_fraction" not in get_objective_class(config.objective_name).required_settings
        if not (warms_up or args.no_warmup):
            print(f"no warm-up: {config.objective_name} trains whole trajectories only")
        memory = PeakMemory(device)
        # Before the first reset: the peak of building the pipeline, the reward and the trainer.
        peaks = {"set-up": memory.before_mib}
        beta = config.train_reward_exp
        sampling: list[float] = []
        results: dict[str, list[PhaseResult]] = {name: [] for name in loops}
        sampling_counters = WorkCounters()
        sampling_calls: dict[str, CallTimes] = {}
        for repeat in range(repeats):
            trainer.counters = WorkCounters()
            trainer.denoiser.eval()
            memory.reset()
            timer.reset()
            start = time.perf_counter()
            samples, _ = trainer.generate_samples(epoch=repeat)
            trainer.objective.prepare_samples(samples, trainer.accelerator)  # e.g. DDPO's advantages, as step() does
            synchronise(device)
            sampling.append(time.perf_counter() - start)
            peaks["sampling"] = max(peaks.get("sampling", 0.0), memory.peak_mib())
            sampling_counters, sampling_calls = trainer.counters, copy.deepcopy(timer.times)
            windows = trainer.windows(samples, torch.Generator().manual_seed(repeat))
            state = TrainingState(trainer)
            if repeat == 0 and not args.no_warmup and warms_up:
                # One untimed transition-batch of each loop first: allocator growth and kernel selection are not loop
                # cost, and a whole window of the GPU setting would take minutes.
                for name in loops:
                    state.restore(trainer)
                    with one_backward_per_step(trainer):
                        run_loop(name, trainer, [warmup_window(trainer, windows[0])], beta, repeat)
            # Alternate the order so neither loop always runs on a warmer (or more fragmented) process.
            for name in loops if repeat % 2 else loops[::-1]:
                state.restore(trainer)
                results[name].append(timed_phase(name, trainer, windows, beta, repeat, memory, timer))
                peaks[f"training ({name})"] = max(r.peak_memory_mib for r in results[name])
                print(f"repeat {repeat}: {name} training {results[name][-1].seconds:.2f} s", flush=True)
            print(f"repeat {repeat}: sampling {sampling[-1]:.2f} s", flush=True)
        measured = report(config, loops, sampling, sampling_counters, sampling_calls, results, memory, peaks)
        measured.update(
            setting=args.setting,
            device=str(device),
            machine=describe_machine(device),
            mixed_precision=config.mixed_precision,
            gradient_checkpointing=config.train_gradient_checkpointing,
            resolution=args.resolution,
            config={
                key: getattr(config, key)
                for key in (
                    "sample_num_steps",
                    "sample_batch_size",
                    "sample_num_batches_per_epoch",
                    "train_batch_size",
                    "train_gradient_accumulation_steps",
                )
            },
        )
        if args.json:
            args.json.write_text(json.dumps(measured, indent=2))
        print(f"load average at the end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
