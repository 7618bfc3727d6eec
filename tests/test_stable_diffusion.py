"""DefaultGFlowNetStableDiffusionPipeline on a tiny Stable Diffusion saved and loaded like a Hub checkpoint."""

import logging

import pytest
import torch

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetStableDiffusionPipeline
from dag_trl.samplers.ddim import ddim_step_with_logprob


@pytest.fixture(scope="module")
def lora_pipeline(tiny_sd_path):
    return DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))


def sample(pipeline, prompts, steps=4, guidance=5.0, seed=0, reduction="mean"):
    with torch.no_grad():
        embeds = pipeline.encode_prompt(prompts)
        negative = pipeline.encode_prompt([""] * len(prompts))
        return (
            pipeline(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                num_inference_steps=steps,
                guidance_scale=guidance,
                eta=1.0,
                generator=torch.Generator().manual_seed(seed),
                log_prob_reduction=reduction,
            ),
            embeds,
            negative,
        )


def test_loads_with_ddim_frozen_vae_and_text_encoder_and_lora_on_attention(lora_pipeline):
    assert isinstance(lora_pipeline, GFlowNetStableDiffusionPipeline)
    assert lora_pipeline.denoiser is lora_pipeline.unet is lora_pipeline.sd_pipeline.unet  # TRL's names
    assert type(lora_pipeline.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in lora_pipeline.vae.parameters())
    assert not any(p.requires_grad for p in lora_pipeline.text_encoder.parameters())
    trainable = [n for n, p in lora_pipeline.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] if not n.split(".lora_")[0].endswith("to_out.0") else "to_out.0"
               for n in trainable}  # fmt: skip
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    ranks = {p.shape[0] for n, p in lora_pipeline.denoiser.named_parameters() if "lora_A" in n}
    assert ranks == {4}
    assert len(lora_pipeline.get_trainable_layers()) == len(trainable)


def test_full_unet_training_without_lora_and_custom_rank(tiny_sd_path):
    full = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=False)
    assert all(p.requires_grad for p in full.denoiser.parameters())
    assert not any("lora" in n for n, _ in full.denoiser.named_parameters())
    ranked = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_rank=2)
    assert {p.shape[0] for n, p in ranked.denoiser.named_parameters() if "lora_A" in n} == {2}
    with pytest.raises(ValueError, match="lora_rank=0 is invalid"):
        DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_rank=0)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"lora_alpha": -3}, "lora_alpha=-3 is invalid: expected a finite number > 0 (the adapter's update is scaled by "
         "lora_alpha / lora_rank), or None for lora_rank."),
        ({"lora_alpha": float("nan")}, "lora_alpha=nan is invalid: expected a finite number > 0"),
        ({"torch_dtype": 16}, "torch_dtype=16 is invalid: expected a torch.dtype such as torch.bfloat16, or None to "
         "load the weights as saved."),
    ],
)  # fmt: skip
def test_a_negative_lora_alpha_or_a_dtype_that_is_not_one_is_refused_before_loading(arguments, message):
    # Checked before the model loads: the folder does not even exist. -3 used to train with the update negated.
    with pytest.raises(ValueError) as caught:
        DefaultGFlowNetStableDiffusionPipeline("no-such-model", **arguments)
    assert str(caught.value).startswith(message)


def test_lora_initialisation_follows_its_seed_and_leaves_the_global_random_state(tiny_sd_path):
    def lora_down_weights(pipeline):
        return {n: p.detach().clone() for n, p in pipeline.denoiser.named_parameters() if "lora_A" in n}

    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    first = lora_down_weights(DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_init_seed=3))
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(2)  # another global state must not change the adapter
    again = lora_down_weights(DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_init_seed=3))
    other = lora_down_weights(DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_init_seed=4))
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def test_sampling_records_consistent_trajectories(lora_pipeline):
    output, embeds, negative = sample(lora_pipeline, ["a red circle", "a blue square"], steps=4)
    assert output.images.shape == (2, 3, 16, 16)
    assert 0.0 <= output.images.min() and output.images.max() <= 1.0
    assert output.latents.shape == (2, 5, 4, 8, 8) and output.latents.dtype == torch.float32
    assert output.log_probs.shape == output.backward_log_probs.shape == (2, 4)
    assert output.noise_preds.shape == output.conditional_noise_preds.shape == (2, 4, 4, 8, 8)
    assert output.timesteps.tolist() == [751, 501, 251, 1]
    # Recomputing each step on the stored latents gives the stored values exactly: the PPO ratio is 1.
    with torch.no_grad():
        for k, t in enumerate(output.timesteps):
            guided, conditional = lora_pipeline.predict(output.latents[:, k], t, embeds, negative, 5.0)
            torch.testing.assert_close(guided, output.noise_preds[:, k], rtol=0, atol=0)
            torch.testing.assert_close(conditional, output.conditional_noise_preds[:, k], rtol=0, atol=0)
            step = ddim_step_with_logprob(
                lora_pipeline.scheduler, guided, t, output.latents[:, k], prev_sample=output.latents[:, k + 1]
            )
            torch.testing.assert_close(step.log_probs, output.log_probs[:, k], rtol=0, atol=0)
            torch.testing.assert_close(step.backward_log_probs, output.backward_log_probs[:, k], rtol=0, atol=0)
    # The final image is the VAE decode of the last latent.
    torch.testing.assert_close(lora_pipeline.decode(output.latents[:, -1]), output.images)


def test_same_seed_same_trajectory_other_seed_other_trajectory(lora_pipeline):
    first, _, _ = sample(lora_pipeline, ["a red circle"], seed=3)
    again, _, _ = sample(lora_pipeline, ["a red circle"], seed=3)
    other, _, _ = sample(lora_pipeline, ["a red circle"], seed=4)
    assert torch.equal(first.latents, again.latents)
    assert not torch.allclose(first.latents, other.latents)


def test_guidance_combines_unconditional_and_conditional(lora_pipeline):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        embeds = lora_pipeline.encode_prompt(["a cat", "a dog"])
        negative = lora_pipeline.encode_prompt(["", ""])
        guided, conditional = lora_pipeline.predict(latents, torch.tensor([501, 1]), embeds, negative, 3.0)
        unconditional, _ = lora_pipeline.predict(latents, torch.tensor([501, 1]), negative, None, 1.0)
        alone, same = lora_pipeline.predict(latents, torch.tensor([501, 1]), embeds, None, 3.0)
    torch.testing.assert_close(conditional, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, same)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)


def test_v_prediction_pipeline_x0_hat(tiny_sd_v_prediction_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_v_prediction_path))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a = pipeline.scheduler.alphas_cumprod[501]
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(
        pipeline.predict_original_sample(velocity, torch.tensor([501]), noisy), x0, rtol=1e-4, atol=1e-4
    )


def test_a_nested_adapter_disabled_keeps_the_lora_off_until_the_outermost_exits(tiny_sd_path):
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path))
    pipeline.set_timesteps(4)
    with torch.no_grad():
        for parameter in pipeline.get_trainable_layers():
            parameter.add_(0.5)
    latents, embeds = torch.randn(1, 4, 8, 8), pipeline.encode_prompt(["a red circle"])

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return pipeline.predict(latents, pipeline.scheduler.timesteps[0], embeds, None, 1.0)[0]

    with_lora = predict()
    with pipeline.adapter_disabled():
        prior = predict()
        with pipeline.adapter_disabled():  # e.g. a lora_min_timestep step while sampling the prior
            pass
        assert torch.equal(predict(), prior)
    assert torch.equal(predict(), with_lora) and not torch.equal(prior, with_lora)


class KeptRecords(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("loaded_in, trained_in", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_weights_loaded_in_their_training_dtype_are_placed_without_diffusers_float32_warning(
    tiny_sd_path, loaded_in, trained_in
):
    # diffusers' ModelMixin.to warns about modules "that should be kept in float32" whenever a dtype is named, even
    # when it lists none.
    records = KeptRecords()
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addHandler(records)
    try:
        pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), use_lora=True, torch_dtype=loaded_in)
        pipeline.prepare_for_training(torch.device("cpu"), trained_in)
    finally:
        diffusers_logger.removeHandler(records)
    assert not [message for message in records.messages if "should be kept in float32" in message]
    frozen = [p for module in (pipeline.denoiser, pipeline.vae) for p in module.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {trained_in}
    assert {p.dtype for p in pipeline.get_trainable_layers()} == {torch.float32}
