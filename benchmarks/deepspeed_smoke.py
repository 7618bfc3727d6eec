"""A DeepSpeed ZeRO-2 smoke run of the trainer at SD1.5 size (random weights, no Hub), on however many GPUs
``accelerate launch`` starts.

    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 1 \
        --mixed_precision bf16 benchmarks/deepspeed_smoke.py --output DIR [--resume] [--full] [--epochs 2]

It builds the SD1.5 architecture of ``benchmark_training.py --setting sd15-gpu`` (UNet 320/640/1280/1280, CLIP
ViT-L/14 text encoder, 512 px) with random weights, trains DAG-DB on a mean-brightness reward for ``--epochs``
epochs with a checkpoint after each (``--resume``: a second launch continues from the latest checkpoint for one more
epoch), and prints per epoch the wall time, the peak CUDA memory of this process and the mean reward, then the
checkpoints and whether the trained weights are finite. A smoke run: one run's numbers, not a benchmark's medians.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_training import PROMPTS, build_sd15  # noqa: E402

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer  # noqa: E402
from dag_trl.prompts import PromptList  # noqa: E402


def brightness(images: torch.Tensor, prompts: tuple, metadata: tuple) -> tuple[torch.Tensor, dict]:
    return images.mean(dim=(1, 2, 3)), {}


def make_trainer(args: argparse.Namespace, model_path: Path, logdir: Path, epochs: int, resume_from: str | None):
    config = GFlowNetConfig(
        num_epochs=epochs,
        sample_num_steps=args.steps,
        sample_batch_size=args.sample_batch_size,
        sample_num_batches_per_epoch=1,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=1,
        train_timestep_fraction=args.timestep_fraction,
        train_reward_exp=10.0,
        train_reward_exp_anneal="none",
        logdir=str(logdir),
        save_freq=1,
        resume_from=resume_from,
        # Without CUDA (a CPU check of this script), accelerate picks no process-group backend for DeepSpeed.
        accelerator_kwargs={}
        if torch.cuda.is_available()
        else {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]},
    )
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(model_path), use_lora=not args.full)
    return GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="smoke", seed=0), pipeline)


def timed_epochs(trainer: GFlowNetDiffusionTrainer) -> list[dict]:
    """Train, recording each epoch's wall time, peak memory and metrics through the trainer's ``step``."""
    records = []
    step = trainer.step
    device = trainer.accelerator.device

    def recording_step(epoch: int, global_step: int) -> int:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        global_step = step(epoch, global_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        records.append(
            {
                "epoch": epoch,
                "seconds": round(time.perf_counter() - start, 2),
                "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
                "reward_mean": round(trainer.reward_history[-1]["reward_mean"], 4),
            }
        )
        return global_step

    trainer.step = recording_step
    trainer.train()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="run folder (the model is built there once)")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint, one more epoch")
    parser.add_argument("--full", action="store_true", help="fine-tune the whole UNet instead of a LoRA")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sample-batch-size", type=int, default=4)
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--timestep-fraction", type=float, default=0.5)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()

    root = Path(args.output)
    model_path, logdir = root / "model", root / "logs"
    if not (model_path / "model_index.json").exists():
        build_sd15(model_path, args)
    epochs = args.epochs + 1 if args.resume else args.epochs
    trainer = make_trainer(args, model_path, logdir, epochs, "latest" if args.resume else None)
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None:
        sys.exit("not launched under DeepSpeed: use accelerate launch --config_file deepspeed_zero2.yaml")
    records = timed_epochs(trainer)
    trained = [p for p in trainer.denoiser.parameters() if p.requires_grad]
    finite = all(torch.isfinite(p.float()).all().item() for p in trained)
    if trainer.accelerator.is_main_process:
        print(
            f"DeepSpeed ZeRO-{plugin.deepspeed_config['zero_optimization']['stage']}, "
            f"{trainer.accelerator.num_processes} process(es), mixed precision {trainer.config.mixed_precision}, "
            f"{'full UNet' if args.full else 'LoRA'}, {sum(p.numel() for p in trained) / 1e6:.2f}M trained "
            f"parameters, {args.steps} steps, sample {args.sample_batch_size}, train batch {args.train_batch_size}, "
            f"timestep fraction {args.timestep_fraction}, {args.resolution} px; torch {torch.__version__} on "
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
        )
        if args.resume:
            print(f"  resumed at epoch {records[0]['epoch'] if records else None}")
        for record in records:
            print(f"  epoch {record}")
        checkpoints = sorted(str(p.relative_to(logdir)) for p in logdir.rglob("checkpoint_*") if p.is_dir())
        print(f"  checkpoints: {checkpoints}; trained weights finite: {finite}")
        if not finite or not all(math.isfinite(r["reward_mean"]) for r in records):
            sys.exit("non-finite weights or rewards")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
