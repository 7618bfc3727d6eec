"""Two CPU processes (accelerate launch) train the tiny pipeline.

DDP (gloo): own prompts and noise per process, gathered rewards, one gradient all-reduce per optimiser step,
identical parameters, one writer. DeepSpeed ZeRO-2 (the shipped launch config): the trainer fills DeepSpeed's batch,
accumulation and clipping settings, steps once per window, reaches DDP's parameters, and resumes exactly.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import files_under
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


TESTS = Path(__file__).parent
DEEPSPEED_CONFIG = TESTS.parent / "examples" / "accelerate_configs" / "deepspeed_zero2.yaml"
# 2 processes x (imports + one tiny epoch) on a shared 2-core machine; far above a normal run's 30-60 s.
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    launch_arguments: list[str],
    script: str,
    script_arguments: list[str],
    workdir: Path,
    env_overrides: dict,
    expect_failure: bool = False,
) -> str:
    """``accelerate launch`` two processes of ``tests/<script>``; fail with their stderr if they fail (or, with
    ``expect_failure``, if they succeed). Returns their stderr."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launch_arguments, "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        str(TESTS / script), *script_arguments,
    ]  # fmt: skip
    # No user accelerate config may change the launch; the library must be importable from this checkout.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", **env_overrides)
    env["ACCELERATE_CONFIG_FILE"] = str(workdir / "no_accelerate_config.yaml")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0 and "address already in use" in result.stderr.lower():
        # free_port() releases the port before torchrun binds it; another process may take it in between.
        command[command.index("--main_process_port") + 1] = str(free_port())
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (result.returncode != 0) == expect_failure, result.stderr[-5000:]
    return result.stderr


def load_ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{i}.pt", weights_only=False) for i in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_sd_path) -> Path:
    """One epoch of tests/distributed_script.py on two gloo DDP processes; returns its output folder."""
    output = tmp_path_factory.mktemp("ddp")
    # accelerate 1.x launches several CPU processes only through torchrun (`--multi_gpu`; `--cpu` with
    # --num_processes 2 starts one process unless MPI is set up); ACCELERATE_USE_CPU makes them gloo CPU workers.
    launch(
        ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        "distributed_script.py",
        [str(tiny_sd_path), str(output)],
        output,
        {"ACCELERATE_USE_CPU": "true"},
    )
    return output


def test_two_processes_train_one_epoch(ddp_run):
    tmp_path = ddp_run
    ranks = load_ranks(ddp_run)
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


def launch_deepspeed(
    tiny_sd_path, output: Path, use_lora: bool, epochs: int, resume_from: str = "", precision: str = ""
) -> list[dict]:
    """tests/deepspeed_script.py on two processes under the shipped ZeRO-2 launch config; returns what each saw."""
    output.mkdir()
    # The launch config as users run it; DeepSpeed's CPU accelerator stands in for the GPUs.
    launch(
        ["--config_file", str(DEEPSPEED_CONFIG)],
        "deepspeed_script.py",
        [
            str(tiny_sd_path),
            str(output),
            "lora" if use_lora else "full",
            str(epochs),
            *([resume_from] if resume_from else []),
        ],
        output,
        {"DS_ACCELERATOR": "cpu", "DEEPSPEED_SCRIPT_PRECISION": precision},
    )
    return load_ranks(output)


def test_deepspeed_zero2_steps_once_per_window_matches_ddp_and_resumes_exactly(tmp_path, tiny_sd_path, ddp_run):
    straight = launch_deepspeed(tiny_sd_path, tmp_path / "straight", use_lora=True, epochs=2)
    for rank in straight:
        assert rank["distributed_type"] == "DistributedType.DEEPSPEED" and rank["zero_stage"] == 2
        assert rank["num_processes"] == 2
        # Filled from the GFlowNetConfig: batches of train_batch_size=2, 2 batches x 4 timesteps per step, clip 0.9.
        assert rank["deepspeed"] == {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 8,
            "gradient_clipping": 0.9,
        }
        # One optimiser step per epoch's window, taken in the window's 8th backward pass.
        assert rank["steps_after_backward"] == [0] * 7 + [1] + [1] * 7 + [2]
        assert [set(m) & {"grad_norm", "grad_norm_unet"} for m in rank["step_metrics"]] == [{"grad_norm"}] * 2
    first, second = straight
    for epoch in (0, 1):
        for group in ("unet", "flow"):
            ours, theirs = (
                first["parameters_after_epoch"][epoch][group],
                second["parameters_after_epoch"][epoch][group],
            )
            assert ours.keys() == theirs.keys() and ours
            assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    # Same samples, same averaged gradient (no clipping at these norms): the step lands where DDP's did.
    assert first["step_metrics"][0]["grad_norm"] < 0.9
    ddp = load_ranks(ddp_run)[0]
    for group in ("unet", "flow"):
        reached = first["parameters_after_epoch"][0][group]
        expected = {name.removeprefix("module."): value for name, value in ddp[group].items()}
        assert reached.keys() == expected.keys()
        for name in reached:
            torch.testing.assert_close(reached[name], expected[name], rtol=0, atol=1e-7, msg=name)

    # The checkpoint: DeepSpeed's model and per-process optimiser shards, without the frozen base UNet, next to
    # the portable LoRA and flow network and the trainer state.
    checkpoint = tmp_path / "straight" / "logs" / "checkpoints" / "checkpoint_0"
    expected_files = {"pytorch_lora_weights.safetensors", "flow/diffusion_pytorch_model.safetensors",
                      "trainer_state.json", "pytorch_model/mp_rank_00_model_states.pt",
                      "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # fmt: skip
    assert expected_files <= files_under(checkpoint)
    module_state = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    trained_names = {f"unet.{n}" for n in first["parameters_after_epoch"][0]["unet"]} | {
        f"objective_model.{n}" for n in first["parameters_after_epoch"][0]["flow"]
    }
    assert set(module_state["module"]) == trained_names
    lora = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert len(lora) == len(first["parameters_after_epoch"][0]["unet"])

    # Resuming after epoch 0 in a new launch reproduces epoch 1 bit for bit (optimiser shards included).
    resumed = launch_deepspeed(
        tiny_sd_path, tmp_path / "resumed", use_lora=True, epochs=2, resume_from=str(checkpoint)
    )
    for rank in resumed:
        assert rank["first_epoch"] == 2 and list(rank["parameters_after_epoch"]) == [1]
        assert rank["steps_after_backward"] == [1] * 7 + [2]
        for group in ("unet", "flow"):
            ours, theirs = rank["parameters_after_epoch"][1][group], first["parameters_after_epoch"][1][group]
            assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_deepspeed_in_bf16_trains_a_float32_flow_network_with_summed_log_flows_and_resumes_exactly(
    tmp_path, tiny_sd_path
):
    straight = launch_deepspeed(tiny_sd_path, tmp_path / "straight", use_lora=True, epochs=2, precision="bf16-sum")
    first, second = straight
    for epoch in (0, 1):
        # The flow network the loss calls is float32 (not the engine's 16-bit copy), and its averaged gradient
        # leaves both processes with the same weights, as the engine's LoRA.
        assert set(first["parameters_after_epoch"][epoch]["flow_used"].values()) == {torch.float32}
        for group in ("unet", "flow"):
            ours, theirs = (
                first["parameters_after_epoch"][epoch][group],
                second["parameters_after_epoch"][epoch][group],
            )
            assert ours and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert all("grad_norm_flow" in metrics for metrics in first["step_metrics"])
    epoch_0 = first["parameters_after_epoch"][0]["flow"]
    assert any(not torch.equal(epoch_0[n], v) for n, v in first["parameters_after_epoch"][1]["flow"].items())

    # The float32 flow network and its optimiser are saved with the engine's checkpoint and restored exactly.
    checkpoint = tmp_path / "straight" / "logs" / "checkpoints" / "checkpoint_0"
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= set(os.listdir(checkpoint))
    resumed = launch_deepspeed(
        tiny_sd_path, tmp_path / "resumed", use_lora=True, epochs=2, resume_from=str(checkpoint), precision="bf16-sum"
    )
    for rank in resumed:
        assert rank["first_epoch"] == 2 and list(rank["parameters_after_epoch"]) == [1]
        for group in ("unet", "flow"):
            ours, theirs = rank["parameters_after_epoch"][1][group], first["parameters_after_epoch"][1][group]
            assert all(torch.equal(ours[name], theirs[name]) for name in theirs), group


def test_deepspeed_stops_on_a_non_finite_loss_before_its_backward_pass(tmp_path, tiny_sd_path):
    output = tmp_path / "run"
    output.mkdir()
    stderr = launch(
        ["--config_file", str(DEEPSPEED_CONFIG)],
        "deepspeed_script.py",
        [str(tiny_sd_path), str(output), "lora", "2"],  # beta is annealed from 0: epoch 1 trains at beta 10
        output,
        {"DS_ACCELERATOR": "cpu", "DEEPSPEED_SCRIPT_REWARD": "huge"},
        expect_failure=True,
    )
    checkpoint = output / "logs" / "checkpoints" / "checkpoint_0"
    assert re.search(
        r"TrainingDivergedError: Training diverged at epoch 1, optimiser window 0: the loss is (inf|nan)\. .*"
        rf"beta=10\. Nothing non-finite was applied or saved\. The last checkpoint, '{re.escape(str(checkpoint))}'",
        stderr,
    ), stderr[-3000:]
    assert sorted(os.listdir(checkpoint.parent)) == ["checkpoint_0"]  # the good checkpoint is kept, none added


def test_deepspeed_full_finetune_checkpoints_the_whole_unet_and_resumes_exactly(tmp_path, tiny_sd_path):
    straight = launch_deepspeed(tiny_sd_path, tmp_path / "straight", use_lora=False, epochs=2)
    first = straight[0]["parameters_after_epoch"]
    checkpoint = tmp_path / "straight" / "logs" / "checkpoints" / "checkpoint_0"
    # Every UNet parameter is trained, so DeepSpeed's module state holds all of them, and unet/ is the portable copy.
    module_state = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {name for name in module_state["module"] if name.startswith("unet.")} == {
        f"unet.{name}" for name in first[0]["unet"]
    }
    assert "unet/diffusion_pytorch_model.safetensors" in files_under(checkpoint)
    resumed = launch_deepspeed(
        tiny_sd_path, tmp_path / "resumed", use_lora=False, epochs=2, resume_from=str(checkpoint)
    )
    for group in ("unet", "flow"):
        ours, theirs = resumed[0]["parameters_after_epoch"][1][group], first[1][group]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert any(not torch.equal(first[0]["unet"][n], first[1]["unet"][n]) for n in first[0]["unet"])  # epoch 1 trained
