"""Two CPU processes (accelerate launch, gloo DDP) train one epoch of the tiny pipeline: own prompts and noise per
process, gathered rewards, one gradient all-reduce per optimiser step, identical parameters, one writer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_script.py")
# 2 processes x (imports + one tiny epoch) on a shared 2-core machine; far above a normal run's 30-60 s.
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_one_epoch(tmp_path, tiny_sd_path):
    # accelerate 1.x launches several CPU processes only through torchrun (`--multi_gpu`; `--cpu` with
    # --num_processes 2 starts one process unless MPI is set up); ACCELERATE_USE_CPU makes them gloo CPU workers.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        str(SCRIPT), str(tiny_sd_path), str(tmp_path),
    ]  # fmt: skip
    # No user accelerate config may change the launch; the library must be importable from this checkout.
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env["ACCELERATE_CONFIG_FILE"] = str(tmp_path / "no_accelerate_config.yaml")
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0 and "address already in use" in result.stderr.lower():
        # free_port() releases the port before torchrun binds it; another process may take it in between.
        command[command.index("--main_process_port") + 1] = str(free_port())
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]

    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    first, second = ranks
    assert first["num_processes"] == second["num_processes"] == 2
    # Each process samples its own prompts and noise.
    assert first["prompts"] != second["prompts"]
    assert not torch.allclose(first["noise"], second["noise"])
    # Epoch rewards are gathered from both processes before logging.
    everything = torch.cat([first["rewards"], second["rewards"]])
    assert everything.shape == (8,)
    for rank in ranks:
        assert rank["reward_history"][0]["reward_mean"] == pytest.approx(everything.mean().item(), rel=1e-6)
        assert rank["reward_history"][0]["reward_std"] == pytest.approx(everything.std().item(), rel=1e-6)
    # One optimiser step: 2 batches x 4 transitions = 8 backward passes, gradients all-reduced on the last only.
    assert first["backwards"] == second["backwards"] == 8
    assert first["synced_at"] == second["synced_at"] == [8]
    # After the step both processes hold the same weights.
    for group in ("unet", "flow"):
        assert first[group].keys() == second[group].keys() and first[group]
        for name in first[group]:
            assert torch.equal(first[group][name], second[group][name]), name
    # Only the main process writes: its checkpoint (through the temporary folder) and save_pretrained's output.
    checkpoint = tmp_path / "logs" / "checkpoints" / "checkpoint_0"
    assert first["flow_writes"] == [str(checkpoint) + ".tmp/flow", str(tmp_path / "final" / "flow")]
    assert second["flow_writes"] == []
    assert sorted(os.listdir(tmp_path / "logs" / "checkpoints")) == ["checkpoint_0"]
    # One LoRA and flow network, accelerate's optimiser state, and each process's RNG states.
    expected = {"pytorch_lora_weights.safetensors", "trainer_state.json", "optimizer.bin", "random_states_0.pkl",
                "random_states_1.pkl", "flow"}  # fmt: skip
    assert expected <= set(os.listdir(checkpoint))
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
