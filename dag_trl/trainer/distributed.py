"""Distributed set-up that accelerate leaves to the script: DeepSpeed's single engine module and its config."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import GFlowNetConfig


class TrainableModules(torch.nn.Module):
    """The denoiser and the objective's own model (DAG's flow network, if any) as one module, for engines that take
    a single model (DeepSpeed).

    The trainer calls ``unet`` (the denoiser) and ``objective_model`` directly; the container has no ``forward`` of
    its own. The attribute names prefix the engine checkpoint's parameter names, so they stay as written.
    """

    def __init__(self, unet: torch.nn.Module, objective_model: Optional[torch.nn.Module]):
        super().__init__()
        self.unet = unet
        self.objective_model = objective_model


def configure_deepspeed(plugin: Any, config: GFlowNetConfig) -> None:
    """Fill a DeepSpeed config's batch, accumulation and clipping entries from ``config``, before ``prepare``.

    ``plugin`` is accelerate's ``DeepSpeedPlugin`` (from ``accelerate launch --config_file ...`` or
    ``accelerator_kwargs``). Entries that are ``"auto"`` or absent get the trainer's values: one micro-batch is
    ``train_batch_size`` transitions, an optimiser step accumulates ``config.backward_passes_per_step`` of them,
    and ``train_max_grad_norm`` clips the global norm of all trained parameters together. An explicit
    different value, and ZeRO stage 3 (which shards the parameters the trainer calls directly), raise
    ``ValueError`` when the trainer is constructed, before anything is moved to the device or trained.
    """
    deepspeed_config = plugin.deepspeed_config
    stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"DeepSpeed zero_optimization.stage={stage!r} is not supported: expected 0, 1 or 2 (ZeRO-3 shards the "
            "parameters, and the trainer calls the UNet and the flow network outside the engine)."
        )
    required = {
        "train_micro_batch_size_per_gpu": (config.train_batch_size, "GFlowNetConfig.train_batch_size"),
        "gradient_accumulation_steps": (
            config.backward_passes_per_step,
            f"GFlowNetConfig.train_gradient_accumulation_steps * num_train_timesteps = "
            f"{config.train_gradient_accumulation_steps} * {config.num_train_timesteps}",
        ),
        "gradient_clipping": (config.train_max_grad_norm, "GFlowNetConfig.train_max_grad_norm"),
    }
    for key, (value, source) in required.items():
        current = deepspeed_config.get(key, "auto")
        if current == "auto":
            deepspeed_config[key] = value
        elif current != value:
            raise ValueError(
                f"The DeepSpeed config sets {key}={current!r}, but the trainer needs {value!r} ({source}): "
                'set it to "auto" or leave it out.'
            )


def check_deepspeed_precision(config: GFlowNetConfig, objective: Any) -> None:
    """Refuse fp16 DeepSpeed with summed log-probabilities for objectives with a flow network (DAG): under fp16 the
    engine trains a 16-bit copy of it (its loss scale applies to every network it backpropagates), whose log-flows
    reach hundreds of nats at a spacing of several nats. Under bf16 the trainer keeps the flow network outside the
    engine in float32; outside DeepSpeed it always keeps float32 weights."""
    if config.mixed_precision == "fp16" and config.train_log_prob_reduction == "sum" and objective.uses_state_rewards:
        raise ValueError(
            f"train_log_prob_reduction='sum' with mixed_precision='fp16' under DeepSpeed is refused for "
            f"train_objective={config.objective_name!r}: DeepSpeed trains a 16-bit copy of the flow network under "
            "fp16, which cannot hold summed log-flows (hundreds of nats) to a nat. Use mixed_precision='bf16' (the "
            "flow network then stays float32), train_log_prob_reduction='mean', or DDP."
        )
