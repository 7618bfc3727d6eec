"""One epoch of the tiny pipeline on every process of an ``accelerate launch``; each process dumps what it saw.

Run by tests/test_distributed.py as ``accelerate launch --multi_gpu --num_processes 2 ... distributed_script.py
<tiny_sd_path> <output_dir>`` with ``ACCELERATE_USE_CPU=true`` (gloo on the CPU). Writes ``<output_dir>/rank<i>.pt``
with the process's prompts, initial noise and rewards, its parameters after training, which backward passes
synchronised gradients, and where it wrote the flow network; the main process also writes ``<output_dir>/final``
with ``save_pretrained`` (called on every process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import brightness, tiny_config  # noqa: E402

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer  # noqa: E402
from dag_trl.prompts import PromptList  # noqa: E402

# Many prompts, so that two processes drawing 4 each from their own seeds are all but certain to differ.
PROMPTS = [f"a photo of the letter {letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]


def main(tiny_sd_path: str, output_dir: str) -> None:
    config = tiny_config(
        Path(output_dir),
        num_epochs=1,
        sample_num_batches_per_epoch=1,  # 4 trajectories per process, one optimiser step
        save_freq=1,
    )
    pipeline = DefaultGFlowNetStableDiffusionPipeline(tiny_sd_path)
    trainer = GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="letters", seed=0), pipeline)
    rank = trainer.accelerator.process_index

    seen = {}
    generate = trainer.generate_samples

    def recording_generate(epoch):
        samples, data = generate(epoch)
        seen.update(prompts=list(samples.prompts), noise=samples.latents[:, 0].clone(), rewards=samples.rewards)
        return samples, data

    trainer.generate_samples = recording_generate

    # Which backward passes (numbered from 1) all-reduce gradients: DDP calls the comm hook once per bucket.
    backwards, synced = [0], []
    backward = trainer.accelerator.backward

    def counting_backward(loss, **kwargs):
        backwards[0] += 1
        return backward(loss, **kwargs)

    def counting_allreduce(state, bucket):
        synced.append(backwards[0])
        return allreduce_hook(state, bucket)

    trainer.accelerator.backward = counting_backward
    for model in (trainer.denoiser, trainer.objective_model):
        model.register_comm_hook(dist.group.WORLD, counting_allreduce)

    # Checkpoints and save_pretrained both write the flow network through this method.
    writes = []
    flow = trainer.unwrapped_objective_model
    save_flow = flow.save_pretrained
    flow.save_pretrained = lambda folder, **kwargs: (writes.append(os.fspath(folder)), save_flow(folder, **kwargs))

    trainer.train()
    trainer.save_pretrained(os.path.join(output_dir, "final"))
    torch.save(
        {
            "num_processes": trainer.accelerator.num_processes,
            "prompts": seen["prompts"],
            "noise": seen["noise"],
            "rewards": seen["rewards"].cpu(),
            "reward_history": trainer.reward_history,
            "unet": {n: p.detach().cpu() for n, p in trainer.denoiser.named_parameters() if p.requires_grad},
            "flow": {n: p.detach().cpu() for n, p in trainer.unwrapped_objective_model.named_parameters()},
            "backwards": backwards[0],
            "synced_at": sorted(set(synced)),
            "flow_writes": writes,
        },
        os.path.join(output_dir, f"rank{rank}.pt"),
    )
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
