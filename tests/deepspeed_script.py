"""Train the tiny pipeline under DeepSpeed on every process of an ``accelerate launch``; each process dumps what it
saw.

Run by tests/test_distributed.py with examples/accelerate_configs/deepspeed_zero2.yaml and 2 CPU processes as
``deepspeed_script.py <tiny_sd_path> <output_dir> <lora|full> <epochs> [<resume_from>]``: trains a LoRA or the whole
UNet up to ``<epochs>`` epochs with a
checkpoint after each, and writes ``<output_dir>/rank<i>.pt`` with the DeepSpeed settings the trainer filled in, the
engine's optimiser-step count after every backward pass, the step and epoch metrics, and the trained parameters after
every epoch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import brightness, tiny_config  # noqa: E402

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetDiffusionTrainer  # noqa: E402
from dag_trl.prompts import PromptList  # noqa: E402

PROMPTS = [f"a photo of the letter {letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]


def main(tiny_sd_path: str, output_dir: str, use_lora: bool, epochs: int, resume_from: str | None) -> None:
    # DEEPSPEED_SCRIPT_PRECISION=bf16-sum: bfloat16 with summed log-probabilities (the flow network stays float32).
    precision = {}
    if os.environ.get("DEEPSPEED_SCRIPT_PRECISION") == "bf16-sum":
        precision = {"mixed_precision": "bf16", "train_log_prob_reduction": "sum"}
    config = tiny_config(
        Path(output_dir),
        **precision,
        num_epochs=epochs,
        sample_num_batches_per_epoch=1,  # 4 trajectories per process, one optimiser step per epoch
        save_freq=1,
        train_max_grad_norm=0.9,  # not accelerate's DeepSpeed default (1.0), so that the test sees it was applied
        resume_from=resume_from,
        # Without CUDA, accelerate picks no process-group backend for DeepSpeed; name the CPU one.
        accelerator_kwargs={"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]},
    )
    pipeline = DefaultGFlowNetStableDiffusionPipeline(tiny_sd_path, use_lora=use_lora)
    reward = brightness
    if os.environ.get("DEEPSPEED_SCRIPT_REWARD") == "huge":  # finite rewards whose differences overflow the loss

        def reward(images, prompts, metadata):
            return images.mean(dim=(1, 2, 3)) * 1e30, {}

    trainer = GFlowNetDiffusionTrainer(config, reward, PromptList(PROMPTS, name="letters", seed=0), pipeline)
    engine = trainer.prepared_models[0]

    steps_after_backward = []
    backward = trainer.accelerator.backward

    def recording_backward(loss, **kwargs):
        result = backward(loss, **kwargs)
        steps_after_backward.append(engine.global_steps)
        return result

    trainer.accelerator.backward = recording_backward
    step_metrics = []
    train_window = trainer.train_window

    def recording_train_window(*args, **kwargs):
        step_metrics.append(train_window(*args, **kwargs))
        return step_metrics[-1]

    trainer.train_window = recording_train_window
    parameters_after_epoch = {}
    step = trainer.step

    def recording_step(epoch, global_step):
        global_step = step(epoch, global_step)
        parameters_after_epoch[epoch] = {
            "unet": {n: p.detach().cpu().clone() for n, p in trainer.denoiser.named_parameters() if p.requires_grad},
            "flow": {n: p.detach().cpu().clone() for n, p in trainer.unwrapped_objective_model.named_parameters()},
            "flow_used": {n: p.dtype for n, p in trainer.objective_model.named_parameters()},
        }
        return global_step

    trainer.step = recording_step

    trainer.train()
    deepspeed_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    torch.save(
        {
            "num_processes": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "deepspeed": {
                key: deepspeed_config[key]
                for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
            },
            "zero_stage": deepspeed_config["zero_optimization"]["stage"],
            "first_epoch": trainer.first_epoch,
            "steps_after_backward": steps_after_backward,
            "step_metrics": step_metrics,
            "reward_history": trainer.reward_history,
            "parameters_after_epoch": parameters_after_epoch,
        },
        os.path.join(output_dir, f"rank{trainer.accelerator.process_index}.pt"),
    )
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "lora", int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
