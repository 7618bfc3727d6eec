"""GFlowNetDiffusionTrainer on the tiny offline pipeline: losses on known numbers, training runs, bad input."""

import math
import random
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import PROMPTS, brightness, record_logs, tiny_config

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.objectives.losses import reward_exponent
from dag_trl.samplers.ddim import ddim_step_with_logprob
from dag_trl.trainer import configure_deepspeed, derive_seed, validate_prompt, validate_rewards
from dag_trl.trainer.state_rewards import StateRewardCache


class CyclingPrompts:
    def __init__(self):
        self.index = 0

    def __call__(self):
        self.index += 1
        return PROMPTS[self.index % len(PROMPTS)], {"index": self.index}


def make_trainer(tmp_path, tiny_sd_path, reward=brightness, use_lora=True, **overrides):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=use_lora)
    trainer = GFlowNetDiffusionTrainer(tiny_config(tmp_path, **overrides), reward, CyclingPrompts(), pipeline)
    return trainer, record_logs(trainer)


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.integration
@pytest.mark.parametrize(
    "klpf, use_lora",
    [(-1.0, True), (1.0, True), (-1.0, False), (1.0, False)],
    ids=["db-lora", "kl-lora", "db-full", "kl-full"],
)
def test_two_epochs_change_trainable_weights_only_and_log_finite_metrics(tmp_path, tiny_sd_path, klpf, use_lora):
    trainer, logged = make_trainer(
        tmp_path, tiny_sd_path, use_lora=use_lora, train_klpf=klpf, train_reward_exp_anneal="none"
    )
    pipeline = trainer.sd_pipeline
    unet_before, flow_before = snapshot(pipeline.denoiser), snapshot(trainer.unwrapped_objective_model)
    vae_before, text_before = snapshot(pipeline.vae), snapshot(pipeline.text_encoder)
    trainer.train()

    assert trainer.global_step == 4  # 2 epochs x 8 trajectories / (2 x 2) per optimiser step
    unet_after = snapshot(pipeline.denoiser)
    changed = {n for n in unet_after if not torch.equal(unet_after[n], unet_before[n])}
    if use_lora:
        assert changed and all("lora_" in n for n in changed)
        assert len(changed) == len(pipeline.get_trainable_layers())
    else:
        assert len(changed) > 0.9 * len(unet_after)
    flow_after = snapshot(trainer.unwrapped_objective_model)
    assert all(not torch.equal(flow_after[n], flow_before[n]) for n in flow_after)
    assert all(torch.equal(vae_before[n], p) for n, p in snapshot(pipeline.vae).items())
    assert all(torch.equal(text_before[n], p) for n, p in snapshot(pipeline.text_encoder).items())

    step_metrics = [values for _, values in logged if "loss_total" in values]
    assert len(step_metrics) == 4
    expected = {"loss_total", "loss_db", "loss_kl", "regulariser", "log_prob_forward", "log_prob_backward", "flow",
                "intermediate_reward", "beta", "grad_norm_unet", "grad_norm_flow"}  # fmt: skip
    for values in step_metrics:
        assert expected <= set(values)
        assert all(math.isfinite(v) for v in values.values())
    assert any(values["loss_kl"] != 0.0 for values in step_metrics) == (klpf > 0)
    epoch_metrics = [values for _, values in logged if "reward_mean" in values]
    assert len(epoch_metrics) == 2 and all(math.isfinite(v["reward_std"]) for v in epoch_metrics)


def test_first_update_starts_at_ratio_one_and_zero_regulariser(tmp_path, tiny_sd_path):
    trainer, logged = make_trainer(tmp_path, tiny_sd_path, train_klpf=1.0, num_epochs=1, train_timestep_fraction=0.5)
    trainer.train()
    first = [values for _, values in logged if "ratio" in values][0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["regulariser"] == pytest.approx(0.0, abs=1e-10)
    second = [values for _, values in logged if "ratio" in values][1]
    assert second["regulariser"] > 0  # the weights moved after the first optimiser step


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_training_recomputes_the_sampled_log_probabilities_with_the_calls_sampling_made(
    tmp_path, tiny_sd_path, guidance_scale
):
    trainer, _ = make_trainer(
        tmp_path, tiny_sd_path, sample_guidance_scale=guidance_scale, sample_num_batches_per_epoch=1
    )
    samples, _ = trainer.generate_samples(epoch=0)
    batch_rows = []
    hook = trainer.sd_pipeline.denoiser.register_forward_pre_hook(
        lambda module, inputs: batch_rows.append(len(inputs[0]))
    )
    with torch.no_grad():
        for step in range(trainer.config.sample_num_steps):
            log_probs = trainer.policy.step(
                samples.latents[:, step],
                samples.timesteps[:, step],
                samples.prompt_embeds,
                samples.latents[:, step + 1],
            )[2].log_probs
            assert torch.equal(log_probs, samples.log_probs[:, step])
    hook.remove()
    # train_cfg=True guides only where sampling did: one conditional call per row at guidance 1, two rows at 5
    rows = len(samples.log_probs)
    assert batch_rows == [rows * (1 if guidance_scale == 1.0 else 2)] * trainer.config.sample_num_steps


def test_terminal_transition_uses_the_true_reward_and_no_flow_of_the_final_state(tmp_path, tiny_sd_path):
    trainer, _ = make_trainer(tmp_path, tiny_sd_path, num_epochs=1, train_reward_exp_anneal="none")
    samples, _ = trainer.generate_samples(epoch=0)
    rows = torch.tensor([0, 1])
    last = samples.log_probs.shape[1] - 1
    steps = torch.tensor([last, last])
    beta = trainer.config.train_reward_exp

    def unused(*args):
        raise AssertionError("every state's reward is filled in by hand")

    state_rewards = StateRewardCache(samples, unused, unused, unused, batch_size=2, decode_batch_size=2)
    state_rewards.rewards.update({(0, last): torch.tensor(0.25), (1, last): torch.tensor(-0.5)})
    trainer.denoiser.train()
    batch = trainer.transition_batch(samples, rows, steps, state_rewards, beta)
    loss, _ = trainer.objective.loss(batch, trainer.objective_model)
    loss.backward()
    flow_forwards = trainer.counters.flow_forwards
    flow_grads = {n: p.grad.clone() for n, p in trainer.unwrapped_objective_model.named_parameters()}
    trainer.optimizer.zero_grad()

    # The same loss by hand: log F(x_t) = F(x_t) + beta r(x_t); log F(x_0) = beta R(x_0); a constant for the flow.
    latents = samples.latents[rows, steps]
    timesteps = samples.timesteps[rows, steps]
    embeds = samples.prompt_embeds[rows]
    negative = trainer.negative_prompt_embeds.expand(2)
    guided, _ = trainer.sd_pipeline.predict(latents, timesteps, embeds, negative, 5.0)
    step = ddim_step_with_logprob(
        trainer.sd_pipeline.scheduler, guided, timesteps, latents, prev_sample=samples.latents[rows, steps + 1]
    )
    flow_now = trainer.unwrapped_objective_model(latents, timesteps, embeds.hidden_states)
    residual = (
        flow_now + beta * torch.tensor([0.25, -0.5]) + step.log_probs - samples.backward_log_probs[rows, steps]
        - beta * samples.rewards[rows]
    )  # fmt: skip
    regulariser = ((guided - samples.model_outputs[rows, steps]) ** 2).mean(dim=(1, 2, 3))
    expected = (residual**2 + trainer.config.train_unet_reg * regulariser).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    for name, parameter in trainer.unwrapped_objective_model.named_parameters():
        torch.testing.assert_close(flow_grads[name], parameter.grad, rtol=1e-4, atol=1e-6)
    assert flow_forwards == 2  # only x_t: no flow evaluation of the terminal state


@pytest.mark.integration
def test_brightness_reward_rises_under_a_fixed_seed(tmp_path, tiny_sd_path):
    trainer, _ = make_trainer(
        tmp_path,
        tiny_sd_path,
        use_lora=False,
        num_epochs=10,
        sample_batch_size=8,
        sample_num_batches_per_epoch=1,
        train_batch_size=4,
        train_gradient_accumulation_steps=1,
        train_learning_rate=3e-3,
        train_reward_exp=1000.0,
        train_reward_exp_anneal="none",
        seed=1,
    )
    pipeline = trainer.sd_pipeline

    def mean_brightness_of_fixed_samples():
        with torch.no_grad():
            output = pipeline(
                prompt_embeds=pipeline.encode_prompt(PROMPTS * 8),
                negative_prompt_embeds=pipeline.encode_prompt([""] * 32),
                num_inference_steps=4,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(123),
            )
        return brightness(output.images, None, None)[0]

    before = mean_brightness_of_fixed_samples()
    trainer.train()
    after = mean_brightness_of_fixed_samples()
    # Same prompts and noise before and after: the paired difference isolates what training changed.
    difference = after - before
    assert difference.mean() > 0.008, (difference.mean(), difference.std() / 32**0.5)


def test_every_process_and_epoch_gets_its_own_seed():
    seeds = {derive_seed(0, process, epoch, 0) for process in range(4) for epoch in range(3)}
    assert len(seeds) == 12
    seed = derive_seed(7, 1, 2, 0)
    assert isinstance(seed, int) and 0 <= seed < 2**32  # what torch.Generator.manual_seed and numpy take
    # Each argument changes it...
    assert (
        len({seed, derive_seed(8, 1, 2, 0), derive_seed(7, 2, 2, 0), derive_seed(7, 1, 3, 0), derive_seed(7, 1, 2, 1)})
        == 5
    )
    # ...and nothing else does: not the global random states, which a resumed run does not restore.
    for global_seed in (1, 2):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        assert derive_seed(7, 1, 2, 0) == seed


@pytest.mark.integration
def test_reward_exponent_is_annealed_per_epoch(tmp_path, tiny_sd_path):
    trainer, logged = make_trainer(tmp_path, tiny_sd_path, num_epochs=4, train_reward_exp=8.0)
    trainer.train(epochs=2)
    betas = [values["beta"] for _, values in logged if "reward_mean" in values]
    assert betas == [reward_exponent(e, 4, 8.0, "linear") for e in range(2)] == [0.0, 4.0]


@pytest.mark.parametrize(
    "rewards, message",
    [
        ([1.0, 2.0], r"returned shape \(2,\) at epoch 3 for 4 prompts: expected \(4,\)"),
        (["a", "b", "c", "d"], "at epoch 3: expected a tensor, array or list of 4 numbers"),
        ([1.0, float("nan"), 0.0, float("inf")], r"NaN or inf at epoch 3 for prompt\(s\) \['p1', 'p3'\]"),
        (torch.tensor([True, False, True, True]), "dtype torch.bool at epoch 3"),
    ],
)
def test_bad_rewards_name_the_prompts_and_the_epoch(rewards, message):
    with pytest.raises(ValueError, match=message):
        validate_rewards(rewards, ["p0", "p1", "p2", "p3"], epoch=3, device=torch.device("cpu"))


def test_rewards_accept_lists_arrays_and_tensors_as_float32():
    import numpy as np

    for rewards in ([1, 2], np.array([1.0, 2.0], dtype=np.float64), torch.tensor([[1.0], [2.0]], dtype=torch.float64)):
        values = validate_rewards(rewards, ["a", "b"], epoch=0, device=torch.device("cpu"))
        assert values.dtype == torch.float32 and values.tolist() == [1.0, 2.0]


def test_reward_function_errors_surface_during_training(tmp_path, tiny_sd_path):
    def nan_reward(images, prompts, metadata):
        return torch.full((len(prompts),), float("nan")), {}

    trainer, _ = make_trainer(tmp_path, tiny_sd_path, reward=nan_reward)
    with pytest.raises(ValueError, match=r"NaN or inf at epoch 0 for prompt\(s\)"):
        trainer.train()


@pytest.mark.parametrize(
    "output, message",
    [
        ("a cat", "returned str 'a cat': expected a \\(prompt, metadata\\) tuple"),
        ((3, {}), "a prompt of type int: expected str"),
        (("a cat", ["x"]), "metadata of type list: expected dict"),
    ],
)
def test_bad_prompt_function_output(output, message):
    with pytest.raises(TypeError, match=message):
        validate_prompt(output)
    assert validate_prompt(("a cat", None)) == ("a cat", {})


def test_constructor_rejects_wrong_types_and_missing_bitsandbytes(tmp_path, tiny_sd_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))
    config = tiny_config(tmp_path)
    with pytest.raises(TypeError, match="reward_function must be callable, got int"):
        GFlowNetDiffusionTrainer(config, 42, CyclingPrompts(), pipeline)
    with pytest.raises(ValueError, match="unknown reward 'aesthetic'; known rewards: .*aesthetic_score"):
        GFlowNetDiffusionTrainer(config, "aesthetic", CyclingPrompts(), pipeline)
    with pytest.raises(TypeError, match="sd_pipeline must be a GFlowNetStableDiffusionPipeline, got str"):
        GFlowNetDiffusionTrainer(config, brightness, CyclingPrompts(), "stable-diffusion-v1-5/stable-diffusion-v1-5")
    # bitsandbytes is not installed on CPU CI machines: there, the error must say how to get it.
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(
            ImportError, match="train_use_8bit_adam=True needs bitsandbytes: `pip install bitsandbytes`"
        ):
            GFlowNetDiffusionTrainer(
                tiny_config(tmp_path, train_use_8bit_adam=True), brightness, CyclingPrompts(), pipeline
            )


def capture_gradients_at_step(trainer):
    """Record the (clipped) gradients each optimiser step applies."""
    captured = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        captured.append([p.grad.detach().clone() for group in trainer.optimizer.param_groups for p in group["params"]])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return captured


# Relative DB (DAG with the prior): summed log-densities; "nocfg" samples and trains without guidance.
RDB = dict(train_objective="rdb", train_log_prob_reduction="sum")


@pytest.mark.integration
@pytest.mark.parametrize(
    "objective, train_cfg, fraction, order",
    [
        ({"train_klpf": -1.0}, True, 1.0, "by_timestep"),
        ({"train_klpf": 1.0}, True, 1.0, "by_timestep"),
        ({"train_klpf": -1.0}, False, 1.0, "by_timestep"),
        ({"train_klpf": 1.0}, False, 0.5, "by_timestep"),
        ({"train_klpf": -1.0}, True, 0.5, "by_timestep"),
        ({"train_klpf": 1.0}, True, 1.0, "random"),
        ({"train_klpf": -1.0}, True, 0.5, "random"),
        (RDB, True, 0.5, "by_timestep"),
        ({**RDB, "sample_guidance_scale": 1.0}, False, 1.0, "random"),
    ],
    ids=[
        "db-cfg", "kl-cfg", "db-nocfg", "kl-nocfg-half", "db-cfg-half", "kl-cfg-random", "db-cfg-half-random",
        "rdb-cfg-half", "rdb-noguidance-random",
    ],
)  # fmt: skip
def test_optimised_window_equals_the_straightforward_loop(
    tmp_path, tiny_sd_path, objective, train_cfg, fraction, order
):
    from dag_trl.testing.reference_loop import reference_train_window
    from dag_trl.trainer import WorkCounters

    overrides = dict(**objective, train_cfg=train_cfg, train_timestep_fraction=fraction, train_reward_exp=10.0,
                     train_reward_exp_anneal="none", sample_num_batches_per_epoch=2,
                     train_transition_order=order)  # fmt: skip
    optimised, _ = make_trainer(tmp_path / "a", tiny_sd_path, **overrides)
    reference, _ = make_trainer(tmp_path / "b", tiny_sd_path, **overrides)
    reference.denoiser.load_state_dict(optimised.denoiser.state_dict())
    reference.objective_model.load_state_dict(optimised.objective_model.state_dict())
    if "train_objective" in objective:
        # A LoRA away from zero, so that the policy and the prior differ in the relative residual.
        with torch.no_grad():
            for a, b in zip(
                optimised.sd_pipeline.get_trainable_layers(), reference.sd_pipeline.get_trainable_layers(), strict=True
            ):
                a.add_(0.05 * torch.randn_like(a))
                b.copy_(a)
    samples, _ = optimised.generate_samples(epoch=0)
    windows = optimised.windows(samples, torch.Generator().manual_seed(0))
    assert len(windows) == 2  # the first reuses the sampling-time predictions, the second recomputes them
    # Adam's first step moves every parameter by about lr * sign(gradient), which turns round-off in near-zero
    # gradients (biases before a group norm) into lr-sized differences; SGD keeps round-off at round-off size.
    for trainer in (optimised, reference):
        trainer.optimizer = torch.optim.SGD(
            [{"params": g["params"], "lr": 0.1} for g in trainer.optimizer.param_groups]
        )
    optimised_grads = capture_gradients_at_step(optimised)
    reference_grads = capture_gradients_at_step(reference)
    reference.counters = reference_counters = WorkCounters()  # model calls are counted by the trainer's hooks
    optimised.denoiser.train()
    reference.denoiser.train()
    for window, kept in windows:
        optimised.train_window(window, kept, beta=10.0, epoch=0)
        reference_train_window(reference, window, kept, beta=10.0, epoch=0, counters=reference_counters)

    # Summed log-densities (relative DB) are the latent's size times the per-element mean, and so is their round-off.
    summed = optimised.config.train_log_prob_reduction == "sum"
    tolerance = dict(rtol=1e-3, atol=1e-5) if summed else dict(rtol=1e-4, atol=1e-6)
    for ours, theirs in zip(optimised_grads, reference_grads, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, **tolerance)
    for (name, a), (_, b) in zip(
        optimised.denoiser.named_parameters(), reference.denoiser.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(
        optimised.objective_model.named_parameters(), reference.objective_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    # Work per window: the reference decodes two states per transition; we decode each needed state at most once.
    counters = optimised.counters
    transitions = 8 * max(1, int(4 * fraction))
    assert reference_counters.vae_decodes == 2 * transitions
    assert counters.vae_decodes - 8 <= transitions + 8  # sampling decoded 8 final images
    prior_forwards = (
        transitions * (2 if optimised.trains_with_guidance else 1) if "train_objective" in objective else 0
    )
    assert reference_counters.unet_forward_no_grad == 2 * transitions + prior_forwards
    guidance_rows = 2 if optimised.config.sample_guidance_scale != 1.0 else 1
    # Relative DB also scores each sampled step under the prior (the adapter off): one more forward per step.
    sampling_forwards = 8 * 4 * guidance_rows * (2 if optimised.objective.uses_prior_log_probs else 1)
    if order == "random":  # a kept next state visited later is scored ahead, once
        assert counters.unet_forward_no_grad - sampling_forwards <= transitions
    elif fraction == 1.0:
        assert counters.unet_forward_no_grad == sampling_forwards  # nothing beyond sampling
    else:
        assert counters.unet_forward_no_grad - sampling_forwards <= transitions // 2
    assert counters.flow_forwards < reference_counters.flow_forwards == 2 * transitions
    # One forward with gradient per kept transition in both loops, of two rows under guidance.
    assert counters.unet_forward_grad == reference_counters.unet_forward_grad == transitions * (1 + train_cfg)


@pytest.mark.integration
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_keeps_frozen_weights_low_and_trainable_weights_float32(
    tmp_path, tiny_sd_path, precision, dtype
):
    trainer, logged = make_trainer(tmp_path, tiny_sd_path, mixed_precision=precision, num_epochs=1)
    pipeline = trainer.sd_pipeline
    assert pipeline.vae.dtype == pipeline.text_encoder.dtype == dtype
    frozen = {p.dtype for n, p in pipeline.denoiser.named_parameters() if "lora_" not in n}
    assert frozen == {dtype}
    assert {p.dtype for p in pipeline.get_trainable_layers()} == {torch.float32}
    assert {p.dtype for p in trainer.unwrapped_objective_model.parameters()} == {torch.float32}
    lora_before = [p.detach().clone() for p in pipeline.get_trainable_layers()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, pipeline.get_trainable_layers(), strict=True))
    step_metrics = [values for _, values in logged if "loss_total" in values]
    assert step_metrics and all(math.isfinite(v) for values in step_metrics for v in values.values())


def test_asynchronous_rewards_give_the_same_samples_and_rewards(tmp_path, tiny_sd_path):
    synchronous, _ = make_trainer(tmp_path / "sync", tiny_sd_path)
    asynchronous, _ = make_trainer(tmp_path / "async", tiny_sd_path, async_reward_computation=True)
    asynchronous.denoiser.load_state_dict(synchronous.denoiser.state_dict())
    expected, _ = synchronous.generate_samples(epoch=0)
    actual, _ = asynchronous.generate_samples(epoch=0)
    assert expected.prompts == actual.prompts
    torch.testing.assert_close(actual.latents, expected.latents)
    torch.testing.assert_close(
        actual.rewards, brightness(asynchronous.sd_pipeline.decode(actual.latents[:, -1]), None, None)[0]
    )
    torch.testing.assert_close(actual.rewards, expected.rewards)


def test_every_window_is_one_optimiser_step_whatever_the_accumulation_counter_says(tmp_path, tiny_sd_path):
    trainer, logged = make_trainer(tmp_path, tiny_sd_path, num_epochs=1)
    assert trainer.accelerator.gradient_accumulation_steps == 2 * 4  # batches per window x kept timesteps
    samples, _ = trainer.generate_samples(epoch=0)
    (window, kept), _ = trainer.windows(samples, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in trainer.objective_model.parameters()]
    trainer.accelerator.step = 5  # e.g. restored from a checkpoint of a run with another window size
    trainer.train_window(window, kept, beta=1.0, epoch=0)
    assert trainer.accelerator.sync_gradients  # the window's last backward pass closed the cycle...
    assert all(
        not torch.equal(a, b) for a, b in zip(before, trainer.objective_model.parameters(), strict=True)
    )  # ...and the step ran
    with pytest.raises(ValueError, match=r"got 1 batches x 4 kept timesteps = 4 backward passes; the config "
                                         r"accumulates 8 per optimiser step"):  # fmt: skip
        trainer.train_window(window.take(torch.arange(2)), kept[:2], 1.0, 0)


def test_deepspeed_settings_come_from_the_config(tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    config = tiny_config(tmp_path, train_max_grad_norm=0.3)  # 2 batches x 4 timesteps per optimiser step
    plugin = DeepSpeedPlugin(zero_stage=2)
    configure_deepspeed(plugin, config)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 8
    assert plugin.deepspeed_config["gradient_clipping"] == 0.3
    # Explicit values that agree are kept.
    agreeing = DeepSpeedPlugin(zero_stage=1, gradient_accumulation_steps=8, gradient_clipping=0.3)
    configure_deepspeed(agreeing, config)
    assert agreeing.deepspeed_config["gradient_accumulation_steps"] == 8


@pytest.mark.parametrize(
    "plugin_kwargs, message",
    [
        ({"zero_stage": 2, "gradient_accumulation_steps": 4},
         r"sets gradient_accumulation_steps=4, but the trainer needs 8 \(GFlowNetConfig.train_gradient_accumulation_"
         r"steps \* num_train_timesteps = 2 \* 4\): set it to \"auto\" or leave it out"),
        ({"zero_stage": 2, "gradient_clipping": 1.0},
         r"sets gradient_clipping=1.0, but the trainer needs 0.3 \(GFlowNetConfig.train_max_grad_norm\)"),
        ({"zero_stage": 3}, r"zero_optimization.stage=3 is not supported: expected 0, 1 or 2"),
    ],
)  # fmt: skip
def test_deepspeed_settings_the_trainer_cannot_honour_are_rejected(tmp_path, plugin_kwargs, message):
    from accelerate.utils import DeepSpeedPlugin

    with pytest.raises(ValueError, match=message):
        configure_deepspeed(DeepSpeedPlugin(**plugin_kwargs), tiny_config(tmp_path, train_max_grad_norm=0.3))


def send_during_epoch(trainer, epoch_to_interrupt: int, signal_name: str, times: int) -> None:
    """Make ``trainer`` receive ``signal_name`` ``times`` times at the start of epoch ``epoch_to_interrupt``, as a
    cluster's pre-emption or Ctrl-C would."""
    import os
    import signal

    if signal.getsignal(getattr(signal, signal_name)) is signal.SIG_IGN:
        pytest.skip(f"{signal_name} is ignored in this process (started in the background by a shell or nohup)")
    epoch_step = trainer.step

    def step(epoch: int, global_step: int) -> int:
        if epoch == epoch_to_interrupt:
            for _ in range(times):
                os.kill(os.getpid(), getattr(signal, signal_name))
        return epoch_step(epoch, global_step)

    trainer.step = step


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_finishes_and_checkpoints_the_epoch_that_save_freq_would_skip(
    tmp_path, tiny_sd_path, signal_name, capsys
):
    import os
    import signal

    from conftest import make_resumable_trainer, run_lock_is_free

    from dag_trl import TrainingInterrupted
    from dag_trl.trainer import list_checkpoints
    from dag_trl.trainer.checkpointing import run_lock_path, run_owner_path

    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=4, save_freq=2)
    send_during_epoch(trainer, 2, signal_name, times=1)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as error:
        trainer.train()
    # checkpoint_1 by save_freq; checkpoint_2 because of the signal (save_freq=2 skips it): epoch 2 is not lost.
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [1, 2]
    checkpoint = trainer.last_checkpoint()
    assert str(error.value) == (
        f"Training was stopped by {signal_name} after epoch 2, which it finished and checkpointed in {checkpoint!r}: "
        "resume from it with resume_from='latest'."
    )
    assert f"{signal_name} received: finishing this epoch and writing its checkpoint" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert run_lock_is_free(run_lock_path(trainer.config)) and not os.path.exists(run_owner_path(trainer.config))
    resumed = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=4, save_freq=2, resume_from="latest")
    assert resumed.first_epoch == 3
    resumed.train()
    assert [epoch for epoch, _ in list_checkpoints(trainer.checkpoint_dir)] == [1, 2, 3]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_interrupts_at_once_naming_the_checkpoint_to_resume_from(
    tmp_path, tiny_sd_path, signal_name
):
    import os

    from conftest import make_resumable_trainer, run_lock_is_free

    from dag_trl import TrainingInterrupted
    from dag_trl.trainer import list_checkpoints
    from dag_trl.trainer.checkpointing import run_lock_path, run_owner_path

    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=3)
    send_during_epoch(trainer, 1, signal_name, times=2)
    with pytest.raises(TrainingInterrupted) as error:
        trainer.train()
    [(_, checkpoint)] = list_checkpoints(trainer.checkpoint_dir)
    assert str(error.value) == (
        f"Training was interrupted ({signal_name}) during epoch 1; the last checkpoint is {checkpoint!r} (epoch 0): "
        "resume from it with resume_from='latest'."
    )
    assert run_lock_is_free(run_lock_path(trainer.config)) and not os.path.exists(run_owner_path(trainer.config))


def test_resuming_with_a_prompt_function_without_reseed_warns_that_the_resume_is_not_exact(tmp_path, tiny_sd_path):
    from conftest import make_resumable_trainer

    make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=1).train()

    def one_prompt():
        return "a cat", {}

    config = tiny_config(tmp_path, num_epochs=2, sample_num_batches_per_epoch=1, save_freq=1, resume_from="latest")
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    with pytest.warns(UserWarning, match=r"prompt function 'one_prompt' has no reseed\(seed\) method, so the resumed"):
        GFlowNetDiffusionTrainer(config, brightness, one_prompt, pipeline)


def test_deepspeed_in_fp16_refuses_summed_log_flows_but_not_bf16_mean_ones_or_rtb(tmp_path):
    from dag_trl.objectives import get_objective_class
    from dag_trl.trainer.distributed import check_deepspeed_precision

    summed = tiny_config(tmp_path, mixed_precision="fp16", train_log_prob_reduction="sum")
    with pytest.raises(
        ValueError, match=r"train_log_prob_reduction='sum' with mixed_precision='fp16' under DeepSpeed.*'bf16'"
    ):
        check_deepspeed_precision(summed, get_objective_class("dag_db")(summed))
    for config in (
        tiny_config(tmp_path, mixed_precision="bf16", train_log_prob_reduction="sum"),  # float32 flow network
        tiny_config(tmp_path, mixed_precision="fp16"),  # mean-reduced log-flows are a few nats
        tiny_config(tmp_path, mixed_precision="no", train_log_prob_reduction="sum"),
        tiny_config(
            tmp_path,
            mixed_precision="bf16",
            train_objective="rtb",
            train_log_prob_reduction="sum",
            train_reward_exp_anneal="none",
        ),  # fmt: skip
    ):
        check_deepspeed_precision(config, get_objective_class(config.objective_name)(config))


def test_steps_below_lora_min_timestep_are_sampled_and_trained_as_the_pretrained_model(tmp_path, tiny_sd_path):
    from conftest import make_resumable_trainer

    trainer = make_resumable_trainer(
        tmp_path, tiny_sd_path, train_objective="rtb", train_log_prob_reduction="sum",
        train_reward_exp_anneal="none", lora_min_timestep=300,
    )  # fmt: skip
    timesteps = trainer.sd_pipeline.set_timesteps(trainer.config.sample_num_steps).tolist()
    frozen = [t < 300 for t in timesteps]
    assert frozen == [False, False, True, True]  # 4 DDIM steps of 1000: 751, 501, 251, 1
    with torch.no_grad():
        for parameter in trainer.sd_pipeline.get_trainable_layers():
            parameter.add_(0.1 * torch.randn_like(parameter))
    samples, _ = trainer.generate_samples(epoch=0)
    difference = (samples.log_probs - samples.prior_log_probs).abs()
    assert (difference[:, 2:] == 0).all() and (difference[:, :2] > 1e-4).all()
    # 4 trajectories x (4 guided steps + the prior on the 2 steps it does not share) x 2 rows of guidance.
    assert trainer.counters.unet_forward_no_grad == 4 * (4 + 2) * 2
    # Training: the frozen steps' log-probabilities are the recorded ones and send no gradient to the LoRA.
    rows = torch.arange(4)
    for step in (0, 3):
        log_probs = trainer.policy.step(
            samples.latents[rows, step], samples.timesteps[rows, step], samples.prompt_embeds[rows],
            samples.latents[rows, step + 1],
        )[2].log_probs  # fmt: skip
        torch.testing.assert_close(log_probs, samples.log_probs[rows, step], rtol=0, atol=1e-3)
        if frozen[step]:
            assert not log_probs.requires_grad
        else:
            gradients = torch.autograd.grad(log_probs.sum(), trainer.sd_pipeline.get_trainable_layers())
            assert all(g.abs().max() > 0 for g in gradients)


@pytest.mark.parametrize("order", ["by_timestep", "random"])
def test_transition_order_puts_one_timestep_in_a_batch_or_mixes_them(tmp_path, tiny_sd_path, order):
    trainer, _ = make_trainer(
        tmp_path, tiny_sd_path, train_klpf=1.0, train_transition_order=order, sample_num_batches_per_epoch=1
    )
    seen, loss = [], trainer.objective.loss

    def recording_loss(batch, model):
        seen.append(batch.timesteps.tolist())
        return loss(batch, model)

    trainer.objective.loss = recording_loss
    samples, _ = trainer.generate_samples(epoch=0)
    for window, kept in trainer.windows(samples, torch.Generator().manual_seed(0)):
        trainer.train_window(window, kept, beta=1.0, epoch=0)
    one_timestep = [len(set(timesteps)) == 1 for timesteps in seen]
    assert len(seen) == 8  # 2 batches x 4 kept timesteps
    assert all(one_timestep) if order == "by_timestep" else not all(one_timestep)


def test_a_config_without_train_objective_says_what_it_trains_and_its_reward_calls(tmp_path):
    from dag_trl.trainer.trainer import default_objective_message

    # 4 steps, every transition kept: the 4 states x_T .. x_1 besides the final image.
    message = default_objective_message(tiny_config(tmp_path))
    assert message.startswith("train_objective is not set, so train_klpf=-1 picks DAG-DB (detailed balance)")
    assert "density proportional to exp(beta * R), not DDPO's reward maximum" in message
    assert "one-step predictions of 4 intermediate states of every trajectory" in message
    assert "up to 5 images per trajectory where DDPO calls it on 1" in message
    assert message.endswith("Set train_objective='ddpo' for TRL's DDPO, or train_objective='dag_db' to keep DAG-DB "
                            "without this message.")  # fmt: skip
    # Half the transitions kept: 2 kept states and at most their 2 successors.
    message = default_objective_message(
        tiny_config(tmp_path, train_klpf=0.5, sample_num_steps=8, train_timestep_fraction=0.25)
    )
    assert "picks DAG-KL" in message and "of 2 to 4 intermediate states" in message and "up to 5 images" in message
    # The paper's defaults, as the README's DDPO port table states them.
    assert "up to 51 images per trajectory" in default_objective_message(GFlowNetConfig())


def test_the_default_objective_is_announced_once_and_the_reward_calls_match_it(tmp_path, tiny_sd_path, caplog):
    with caplog.at_level("WARNING", logger="dag_trl.trainer.trainer"):
        trainer, _ = make_trainer(tmp_path, tiny_sd_path, sample_num_batches_per_epoch=1)
    notices = [record.getMessage() for record in caplog.records if "train_objective is not set" in record.getMessage()]
    assert len(notices) == 1 and "up to 5 images per trajectory" in notices[0]
    trainer.step(0, 0)
    # 4 trajectories: their final images and, at every transition kept, the 4 states before them.
    assert trainer.counters.reward_samples == 4 * 5
    caplog.clear()
    with caplog.at_level("WARNING", logger="dag_trl.trainer.trainer"):
        make_trainer(tmp_path / "explicit", tiny_sd_path, train_objective="dag_db")
    assert not [record for record in caplog.records if "train_objective is not set" in record.getMessage()]


def test_the_epoch_line_shows_rewards_the_main_metric_and_the_times():
    from dag_trl.trainer.trainer import epoch_line

    rewards = {"reward_mean": 0.41234, "reward_q05": 0.1, "reward_q50": 0.4, "reward_q95": 0.71, "reward_std": 0.2}
    assert epoch_line(2, 24, rewards, ("loss_total", 0.012345), 37.4, 192.6) == (
        "epoch 3/24: reward 0.412 (q05 0.100, q50 0.400, q95 0.710), loss_total 0.01235, elapsed 0:00:37, ETA 0:03:13"
    )
    assert epoch_line(0, 1, rewards, None, 3725.0, 0.0).endswith("q95 0.710), elapsed 1:02:05, ETA 0:00:00")


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_is_set_up(tmp_path, tiny_sd_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what importing a package that is not installed finds
    with pytest.raises(
        ImportError, match=r"log_with='wandb' needs the wandb package, .* `pip install 'dag_trl\[wandb\]'`"
    ):
        make_trainer(tmp_path, tiny_sd_path, log_with="wandb")
    assert not (tmp_path / "logs").exists()


@pytest.mark.integration
def test_every_epoch_logs_one_line_with_its_rewards_and_the_objectives_main_metric(tmp_path, tiny_sd_path, caplog):
    trainer, logged = make_trainer(tmp_path, tiny_sd_path, sample_num_batches_per_epoch=1, num_epochs=2)
    with caplog.at_level("INFO", logger="dag_trl.trainer.trainer"):
        trainer.train()
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("epoch ")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        rewards = trainer.reward_history[epoch]
        losses = [values["loss_total"] for _, values in logged if "loss_total" in values and values["epoch"] == epoch]
        assert line.startswith(
            f"epoch {epoch + 1}/2: reward {rewards['reward_mean']:.3f} (q05 {rewards['reward_q05']:.3f}, "
            f"q50 {rewards['reward_q50']:.3f}, q95 {rewards['reward_q95']:.3f}), "
            f"loss_total {sum(losses) / len(losses):.4g}, elapsed "
        )
    assert lines[1].endswith("ETA 0:00:00")


def test_a_lora_min_timestep_above_every_sampled_timestep_is_refused_at_construction(tmp_path, tiny_sd_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))
    largest = int(pipeline.set_timesteps(4).max())
    with pytest.raises(ValueError) as caught:
        GFlowNetDiffusionTrainer(tiny_config(tmp_path, lora_min_timestep=5000), brightness, "simple_animals", pipeline)
    assert str(caught.value) == (
        f"GFlowNetConfig.lora_min_timestep=5000 is invalid for this scheduler and sample_num_steps=4: its largest "
        f"timestep is {largest}, so no step would use the LoRA and nothing would be trained; expected an integer in "
        f"[0, {largest}] (0: the LoRA acts at every step)."
    )
    assert not (tmp_path / "logs").exists()  # refused before the run folder was set up
    trainer = GFlowNetDiffusionTrainer(
        tiny_config(tmp_path, lora_min_timestep=largest), brightness, "simple_animals", pipeline
    )
    assert trainer.config.lora_min_timestep == largest  # the first step still trains


def test_an_interrupt_cancels_the_asynchronous_reward_in_flight(tmp_path, tiny_sd_path):
    import os
    import signal
    import time

    from conftest import make_resumable_trainer

    from dag_trl import TrainingInterrupted

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background by a shell or nohup)")

    class SlowServer:
        """A reward that, at epoch 1, is interrupted twice (Ctrl-C Ctrl-C) and then waits for an answer that only
        cancel() gives."""

        def __init__(self):
            self.calls, self.cancelled = 0, threading.Event()

        def __call__(self, images, prompts, metadata):
            self.calls += 1
            if self.calls == 2:  # epoch 1's only batch
                for _ in range(2):  # apart: two pending signals of one kind are delivered once
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.5)
                self.cancelled.wait(timeout=30)
            return images.mean(dim=(1, 2, 3)), {}

        def cancel(self):
            self.cancelled.set()

    reward = SlowServer()
    trainer = make_resumable_trainer(  # DDPO: one reward call per epoch (DAG also scores intermediate states)
        tmp_path, tiny_sd_path, num_epochs=3, async_reward_computation=True, train_objective="ddpo"
    )
    trainer.reward_fn = reward
    start = time.monotonic()
    with pytest.raises(TrainingInterrupted) as error:
        trainer.train()
    assert str(error.value) == (
        f"Training was interrupted (SIGINT) during epoch 1; the last checkpoint is {trainer.last_checkpoint()!r} "
        "(epoch 0): resume from it with resume_from='latest'."
    )
    assert reward.cancelled.is_set() and time.monotonic() - start < 20
