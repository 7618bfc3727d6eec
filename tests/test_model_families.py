"""The SDXL, SD3 and FLUX families on tiny random models built offline: the family is read from model_index.json,
the flow-matching step's log-probabilities equal independent closed forms, every objective trains through the same
trainer, the saved LoRA round-trips through the family's own diffusers pipeline, and resume is exact."""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import pytest
import torch
from conftest import brightness, tiny_config

from dag_trl import GFlowNetDiffusionTrainer
from dag_trl.models import (
    DefaultGFlowNetFluxPipeline,
    DefaultGFlowNetStableDiffusion3Pipeline,
    DefaultGFlowNetStableDiffusionPipeline,
    DefaultGFlowNetStableDiffusionXLPipeline,
    pipeline_family,
)
from dag_trl.prompts import PromptList
from dag_trl.testing.tiny_families import (
    TINY_FLUX,
    TINY_SD3,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)

FAMILIES = {
    "sdxl": (build_tiny_sdxl_pipeline, DefaultGFlowNetStableDiffusionXLPipeline, {}),
    "sd3": (
        build_tiny_sd3_pipeline,
        DefaultGFlowNetStableDiffusion3Pipeline,
        {"max_sequence_length": TINY_SD3.max_sequence_length},
    ),
    "flux": (
        build_tiny_flux_pipeline,
        DefaultGFlowNetFluxPipeline,
        {"max_sequence_length": TINY_FLUX.max_sequence_length, "resolution": TINY_FLUX.image_size},
    ),
}
FLOW_FAMILIES = ("sd3", "flux")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cat"]


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory) -> dict[str, str]:
    return {name: str(build(tmp_path_factory.mktemp(name))) for name, (build, _, _) in FAMILIES.items()}


def make_pipeline(family: str, family_paths: dict, **overrides):
    _, cls, kwargs = FAMILIES[family]
    return cls(family_paths[family], **{**kwargs, **overrides})


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if "lora_" in name}


# ---------------------------------------------------------------------------------------------- picking the family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_read_from_model_index(family, family_paths):
    assert pipeline_family(family_paths[family]) is FAMILIES[family][1]


def test_sd_family_and_an_unknown_pipeline_class(tmp_path, tiny_sd_path):
    assert pipeline_family(str(tiny_sd_path)) is DefaultGFlowNetStableDiffusionPipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"names the pipeline 'KandinskyPipeline', which has no model family.*Flux"):
        pipeline_family(str(tmp_path))


# ---------------------------------------------------------------------------------------------- the flow step


def normal_log_density(value: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Summed over the sample, float64."""
    return (-((value - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def rectified_flow_posterior(x_t, velocity, t, s, eta):
    """DDIM with eta for x_t = (1 - t) x0 + t eps, written from the definitions in float64: mean and std of
    P_F(x_s | x_t), and scale and std of P_B(x_t | x_s)."""
    t_c, s_c = max(t, 1e-4), max(s, 1e-4)
    x0, eps = x_t - t * velocity, x_t + (1 - t) * velocity
    alpha_t, sigma_t, alpha_s, sigma_s = 1 - t_c, t_c, 1 - s_c, s_c
    scale = alpha_t / alpha_s
    noising_variance = sigma_t**2 - scale**2 * sigma_s**2
    posterior_variance = noising_variance * sigma_s**2 / sigma_t**2
    std = eta * math.sqrt(posterior_variance)
    mean = alpha_s * x0 + math.sqrt(max(sigma_s**2 - std**2, 0.0)) * eps
    return mean, std, scale, math.sqrt(noising_variance)


def flow_grpo_reference(x_t, velocity, t, s, sigma_max, level):
    """Flow-GRPO's SDE step (arXiv 2505.05470, eq. 9, as its sampler writes it): mean and std of x_s."""
    noise = math.sqrt(t / (1 - (sigma_max if t == 1 else t))) * level
    dt = s - t
    mean = x_t * (1 + noise**2 / (2 * t) * dt) + velocity * (1 + noise**2 * (1 - t) / (2 * t)) * dt
    return mean, noise * math.sqrt(-dt)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("ddim", 0.4), ("flow_grpo", 1.0)])
def test_flow_step_log_probabilities_equal_the_closed_forms(family, sampler, eta, family_paths):
    pipeline = make_pipeline(family, family_paths, sampler=sampler)
    timesteps = pipeline.set_timesteps(4)
    sigmas = pipeline.scheduler.sigmas.double()
    generator = torch.Generator().manual_seed(0)
    shape = (2, pipeline.latent_channels, 8, 8)
    for index in range(4):  # the first step starts at t = 1, the last ends at t = 0 (clamped)
        x_t = torch.randn(shape, generator=generator, dtype=torch.float64)
        velocity = torch.randn(shape, generator=generator, dtype=torch.float64)
        step = pipeline.scheduler_step(
            velocity.float(), timesteps[index], x_t.float(), eta=eta, generator=generator, log_prob_reduction="sum"
        )
        t, s = sigmas[index].item(), sigmas[index + 1].item()
        x_s = step.latents.double()
        _, _, scale, backward_std = rectified_flow_posterior(x_t, velocity, t, s, eta)
        if sampler == "ddim":
            mean, std, _, _ = rectified_flow_posterior(x_t, velocity, t, s, eta)
        else:
            mean, std = flow_grpo_reference(x_t, velocity, t, s, sigmas[1].item(), pipeline.noise_level)
            s_c = max(s, 0.0)
            scale, backward_std = (1 - t) / (1 - s_c), math.sqrt(t**2 - ((1 - t) / (1 - s_c)) ** 2 * s_c**2)
        expected_forward = normal_log_density(x_s, mean, std)
        expected_backward = normal_log_density(x_t, scale * x_s, backward_std)
        torch.testing.assert_close(step.log_probs.double(), expected_forward, rtol=2e-5, atol=2e-2)
        torch.testing.assert_close(step.backward_log_probs.double(), expected_backward, rtol=2e-5, atol=2e-2)
        # the sample is the mean plus std times standard normal noise: its standardised residual has unit scale
        residual = ((x_s - mean) / std).flatten()
        assert 0.8 < residual.std().item() < 1.2
        x0_hat = x_t - t * velocity  # the DAG forward-looking term's state prediction
        torch.testing.assert_close(step.pred_original_sample.double(), x0_hat, rtol=1e-5, atol=1e-5)
        predicted = pipeline.predict_original_sample(velocity.float(), timesteps[index].expand(2), x_t.float())
        torch.testing.assert_close(predicted.double(), x0_hat, rtol=1e-5, atol=1e-5)


def test_flow_grpo_refuses_an_eta_and_dag_warns_on_samplers_without_detailed_balance(tmp_path, family_paths):
    pipeline = make_pipeline("sd3", family_paths, sampler="flow_grpo")
    with pytest.raises(ValueError, match=r"sample_eta=0.5 is invalid with sampler='flow_grpo'.*noise_level=0.7"):
        pipeline.check_sampler(4, 0.5)
    prompts = PromptList(PROMPTS, seed=0)
    with pytest.warns(UserWarning, match=r"detailed balance.*sample_eta=1.0 and sampler='flow_grpo'"):
        GFlowNetDiffusionTrainer(tiny_config(tmp_path / "dag"), brightness, prompts, pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        GFlowNetDiffusionTrainer(tiny_config(tmp_path / "ddpo", train_objective="ddpo"), brightness, prompts, pipeline)
    with pytest.raises(ValueError, match=r"sampler='euler' is invalid: expected one of \('ddim', 'flow_grpo'\)"):
        make_pipeline("flux", family_paths, sampler="euler")
    with pytest.raises(ValueError, match=r"resolution=18 is invalid: expected a positive multiple of 4"):
        make_pipeline("flux", family_paths, resolution=18)


def test_sdxl_empty_negative_prompt_is_zeros_as_in_diffusers(family_paths):
    pipeline = make_pipeline("sdxl", family_paths)
    empty, other = pipeline.encode_negative_prompt(""), pipeline.encode_negative_prompt("blurry")
    assert not empty.hidden_states.any() and not empty.pooled.any()
    assert other.hidden_states.abs().sum() > 0 and other.pooled.abs().sum() > 0
    side = float(pipeline.resolution)
    assert empty.extra["time_ids"].tolist() == [[side, side, 0.0, 0.0, side, side]]


def test_flux_conditions_on_its_distilled_guidance(family_paths):
    outputs = []
    for scale in (1.0, 3.5):
        pipeline = make_pipeline("flux", family_paths, guidance_embedding_scale=scale)
        pipeline.set_timesteps(4)
        embeds = pipeline.encode_prompt(["a red circle"])
        latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        guided, conditional = pipeline.predict(latents, pipeline.scheduler.timesteps[1], embeds, None, 1.0)
        assert torch.equal(guided, conditional)
        outputs.append(conditional)
    assert not torch.allclose(outputs[0], outputs[1])


# ---------------------------------------------------------------------------------------------- training


OBJECTIVES = {
    "dag_db": {"train_reward_exp_anneal": "none"},
    "dag_kl": {"train_klpf": 1.0, "train_reward_exp_anneal": "none"},
    "rtb": {
        "train_objective": "rtb",
        "train_timestep_fraction": 1.0,
        "train_log_prob_reduction": "sum",
        "train_reward_exp_anneal": "none",
        "train_reward_exp": 3.0,
    },
    "ddpo": {"train_objective": "ddpo"},
}


def family_trainer(folder, family, family_paths, num_epochs=1, **overrides):
    pipeline = make_pipeline(family, family_paths)
    settings = {"num_epochs": num_epochs, "sample_num_steps": 3, "sample_num_batches_per_epoch": 1, **overrides}
    config = tiny_config(folder, **settings)
    return GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="shapes", seed=0), pipeline)


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_epoch_of_every_objective_moves_the_lora(tmp_path, family, objective, family_paths):
    trainer = family_trainer(tmp_path, family, family_paths, **OBJECTIVES[objective])
    before = lora_parameters(trainer.sd_pipeline.denoiser)
    trainer.train()
    after = lora_parameters(trainer.sd_pipeline.denoiser)
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(value).all() for value in after.values())
    assert math.isfinite(trainer.reward_history[-1]["reward_mean"])
    if trainer.objective.uses_state_rewards:  # the flow network conditions on the family's pooled embedding
        assert (
            trainer.unwrapped_objective_model.config.pooled_embedding_dim == trainer.sd_pipeline.pooled_embedding_dim
        )
    final_images = trainer.config.sample_batch_size * trainer.config.sample_num_batches_per_epoch
    if trainer.objective.uses_state_rewards:  # DAG scored x0_hat of intermediate states, from the velocity
        assert trainer.counters.vae_decodes > final_images
    else:
        assert trainer.counters.vae_decodes == final_images


def assert_saved_lora_round_trips(path, family: str, family_paths: dict, **overrides) -> None:
    """A LoRA with random weights, saved, gives the same denoiser in the family's diffusers pipeline (its own
    ``load_lora_weights``) and loads back bit-identical through ``load_trained_weights``."""
    trained = make_pipeline(family, family_paths, lora_alpha=8, **overrides)  # scale alpha / rank = 2, in the file
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in trained.get_trainable_layers():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    trained.save_pretrained(path)
    assert os.path.exists(path / "pytorch_lora_weights.safetensors")

    plain = make_pipeline(family, family_paths, use_lora=False)
    plain.sd_pipeline.load_lora_weights(str(path))  # the family's own diffusers loader
    timesteps = trained.set_timesteps(4)
    plain.set_timesteps(4)
    embeds = trained.encode_prompt(["a red circle", "a cat"])
    latents = trained.initial_latents(2, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        ours, _ = trained.predict(latents, timesteps[1], embeds, None, 1.0)
        theirs, _ = plain.predict(latents, timesteps[1], embeds, None, 1.0)
        with trained.adapter_disabled():
            prior, _ = trained.predict(latents, timesteps[1], embeds, None, 1.0)
    assert torch.equal(theirs, ours)  # the same peft layers with the same weights and scale
    assert not torch.allclose(prior, ours)  # the LoRA changes the output: the round trip is not vacuous

    reloaded = make_pipeline(family, family_paths, **overrides)
    reloaded.load_trained_weights(reloaded.denoiser, str(path))
    for name, value in lora_parameters(trained.denoiser).items():
        assert torch.equal(lora_parameters(reloaded.denoiser)[name], value)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_gives_the_same_denoiser_in_the_family_diffusers_pipeline(tmp_path, family, family_paths):
    assert_saved_lora_round_trips(tmp_path, family, family_paths)


def test_lora_on_the_unet_convolutions_trains_and_round_trips(tmp_path, family_paths):
    family_default = FAMILIES["sdxl"][1].lora_target_modules
    targets = [*family_default, "conv1", "conv2"]
    pipeline = make_pipeline("sdxl", family_paths, lora_target_modules=targets)
    adapted = {name.rsplit(".lora_", 1)[0] for name in lora_parameters(pipeline.denoiser)}
    convolutions = {name for name, module in pipeline.denoiser.named_modules() if name.endswith(("conv1", "conv2"))}
    assert convolutions and convolutions <= adapted  # every resnet convolution carries an adapter
    assert FAMILIES["sdxl"][1].lora_target_modules == family_default  # the class keeps its own
    assert_saved_lora_round_trips(tmp_path, "sdxl", family_paths, lora_target_modules=targets)


@pytest.mark.parametrize("targets", ["conv1", [], ["to_q", ""]])
def test_invalid_lora_target_modules_are_refused(family_paths, targets):
    with pytest.raises(ValueError, match=rf"lora_target_modules={re.escape(repr(targets))} is invalid: expected a"):
        make_pipeline("sdxl", family_paths, lora_target_modules=targets)


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_one_epoch_reproduces_the_uninterrupted_run(tmp_path, family, family_paths):
    settings = dict(num_epochs=2, save_freq=1)
    straight = family_trainer(tmp_path / "straight", family, family_paths, **settings)
    straight.train()
    interrupted = family_trainer(tmp_path / "resumed", family, family_paths, **settings)
    interrupted.train(epochs=1)
    del interrupted
    resumed = family_trainer(tmp_path / "resumed", family, family_paths, resume_from="latest", **settings)
    assert resumed.first_epoch == 1
    resumed.train()
    for name, value in lora_parameters(straight.sd_pipeline.denoiser).items():
        assert torch.equal(lora_parameters(resumed.sd_pipeline.denoiser)[name], value), name
    flow_straight = straight.unwrapped_objective_model.state_dict()
    for name, value in resumed.unwrapped_objective_model.state_dict().items():
        assert torch.equal(value, flow_straight[name]), name
    assert resumed.reward_history == straight.reward_history


def test_an_already_loaded_diffusers_pipeline_is_used_as_it_is(family_paths):
    from diffusers import StableDiffusion3Pipeline

    loaded = StableDiffusion3Pipeline.from_pretrained(family_paths["sd3"])
    pipeline = make_pipeline("sd3", {"sd3": loaded})
    assert pipeline.sd_pipeline is loaded and pipeline.denoiser is loaded.transformer
    assert pipeline.pretrained_model_name == family_paths["sd3"]
    assert any("lora_" in name for name, _ in loaded.transformer.named_parameters())


def test_cli_picks_the_family_from_the_model_folder_with_its_pipeline_kwargs(tmp_path, family_paths):
    from dag_trl.cli import build_trainer, parse_arguments, pipeline_keyword_arguments

    recipe = tmp_path / "recipe.yaml"  # the *_kwargs dicts come from YAML
    recipe.write_text(
        f"pretrained_model: {family_paths['sd3']}\n"
        "pipeline_kwargs: {max_sequence_length: 16, sampler: flow_grpo, torch_dtype: float32}\n"
    )
    argv = ["--config", str(recipe)]
    argv += ["--train_objective", "ddpo", "--sample_num_steps", "3", "--logdir", str(tmp_path / "logs")]
    script_args, config = parse_arguments(argv)
    trainer = build_trainer(script_args, config, brightness, PromptList(PROMPTS, seed=0))
    pipeline = trainer.sd_pipeline
    assert type(pipeline) is DefaultGFlowNetStableDiffusion3Pipeline
    assert (pipeline.sampler, pipeline.max_sequence_length) == ("flow_grpo", 16)
    assert pipeline_keyword_arguments({"torch_dtype": "bfloat16", "resolution": 16}) == {
        "torch_dtype": torch.bfloat16,
        "resolution": 16,
    }
    with pytest.raises(ValueError, match=r"pipeline_kwargs.torch_dtype='bf16' is invalid: expected a torch dtype"):
        pipeline_keyword_arguments({"torch_dtype": "bf16"})
    with pytest.raises(ValueError) as caught:  # YAML `torch_dtype: 16` used to load in float32 after a warning
        pipeline_keyword_arguments({"torch_dtype": 16})
    assert str(caught.value) == (
        "pipeline_kwargs.torch_dtype=16 is invalid: expected a torch dtype name such as 'bfloat16', 'float16' or "
        "'float32'."
    )
    with pytest.raises(
        ValueError, match=r"pipeline_kwargs.sampler is not an argument of DefaultGFlowNetStableDiff.*XL"
    ):
        pipeline_keyword_arguments({"sampler": "ddim"}, DefaultGFlowNetStableDiffusionXLPipeline)
    with pytest.raises(ValueError, match=r"pipeline_kwargs.lora_rank is set by the script's own --lora_rank"):
        pipeline_keyword_arguments({"lora_rank": 8}, DefaultGFlowNetFluxPipeline)
    accepted = pipeline_keyword_arguments(
        {"guidance_embedding_scale": 2.0, "noise_level": 0.5}, DefaultGFlowNetFluxPipeline
    )
    assert accepted == {"guidance_embedding_scale": 2.0, "noise_level": 0.5}


@pytest.mark.integration
@pytest.mark.parametrize("family", FLOW_FAMILIES)
@pytest.mark.parametrize("objective", ["dag_db", "dag_kl"])
def test_optimised_window_equals_the_straightforward_loop_on_flow_families(tmp_path, family, objective, family_paths):
    from test_trainer import capture_gradients_at_step

    from dag_trl.testing.reference_loop import reference_train_window
    from dag_trl.trainer import WorkCounters

    settings = dict(OBJECTIVES[objective], sample_num_batches_per_epoch=2, sample_guidance_scale=3.0)
    optimised = family_trainer(tmp_path / "a", family, family_paths, **settings)
    reference = family_trainer(tmp_path / "b", family, family_paths, **settings)
    reference.objective_model.load_state_dict(optimised.objective_model.state_dict())
    samples, _ = optimised.generate_samples(epoch=0)
    windows = optimised.windows(samples, torch.Generator().manual_seed(0))
    for trainer in (optimised, reference):  # SGD keeps round-off at round-off size (see test_trainer)
        trainer.optimizer = torch.optim.SGD(
            [{"params": g["params"], "lr": 0.1} for g in trainer.optimizer.param_groups]
        )
    optimised_grads, reference_grads = capture_gradients_at_step(optimised), capture_gradients_at_step(reference)
    for window, kept in windows:
        optimised.train_window(window, kept, beta=10.0, epoch=0)
        reference_train_window(reference, window, kept, beta=10.0, epoch=0, counters=WorkCounters())
    assert len(optimised_grads) == len(reference_grads) == 2
    for ours, theirs in zip(optimised_grads, reference_grads, strict=True):
        # float32 round-off of other batch compositions: up to 3e-4 relative
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gradient_checkpointing_trains_the_same_lora(tmp_path, family, family_paths):
    results = []
    for checkpointing in (False, True):
        trainer = family_trainer(
            tmp_path / str(checkpointing), family, family_paths, train_gradient_checkpointing=checkpointing
        )
        assert trainer.sd_pipeline.denoiser.is_gradient_checkpointing is checkpointing
        trainer.train()
        results.append(lora_parameters(trainer.sd_pipeline.denoiser))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_the_cli_trains_a_flux_model_end_to_end_and_its_lora_loads_in_diffusers(tmp_path, family_paths):
    import yaml
    from diffusers import FluxPipeline

    from dag_trl.cli import parse_arguments, run

    recipe = {
        "pretrained_model": family_paths["flux"],
        "pipeline_kwargs": {"max_sequence_length": TINY_FLUX.max_sequence_length, "resolution": TINY_FLUX.image_size},
        "reward": "jpeg_compressibility", "prompts": "simple_animals", "prompt_kwargs": {"seed": 3},
        "num_epochs": 2, "sample_num_steps": 3, "sample_batch_size": 4, "sample_num_batches_per_epoch": 1,
        "train_batch_size": 2, "train_gradient_accumulation_steps": 2, "sample_guidance_scale": 1.0,
        "mixed_precision": "no", "flow_block_out_channels": [8, 16], "flow_attention_heads": 2, "eval_num_images": 4,
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = run(*parse_arguments(["--config", str(tmp_path / "recipe.yaml")]))
    assert summary["epochs"] == 2 and summary["algorithm"] == "DAG-DB"
    assert -10 < summary["after"]["reward_mean"] < 0  # minus the JPEG size in kB of 16x16 images
    model = tmp_path / "run" / "model"
    assert (model / "flow" / "config.json").is_file()
    pipeline = FluxPipeline.from_pretrained(family_paths["flux"])
    pipeline.load_lora_weights(str(model))
    images = pipeline(
        "a cat", num_inference_steps=2, height=16, width=16, max_sequence_length=32, output_type="pt"
    ).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())


SCHEDULERS = {  # the tiny models' own (SD3: static shift 3; FLUX.1-dev: dynamic), FLUX.1-schnell's, a dynamic SD3
    "sd3-static": ("sd3", {}),
    "sd3-dynamic": ("sd3", {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.16}),
    "flux-dev": ("flux", {}),
    "flux-schnell": ("flux", {"use_dynamic_shifting": False, "shift": 1.0}),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_schedule_is_the_family_pipelines_own(name, family_paths):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    family, overrides = SCHEDULERS[name]
    loaded = DiffusionPipeline.from_pretrained(family_paths[family])
    loaded.scheduler = FlowMatchEulerDiscreteScheduler.from_config(loaded.scheduler.config, **overrides)
    seen = {}

    def capture(pipeline, step, timestep, callback_kwargs):
        seen["sigmas"] = pipeline.scheduler.sigmas.clone()
        return callback_kwargs

    size = FAMILIES[family][2].get("resolution", TINY_SD3.image_size)
    loaded("a cat", num_inference_steps=4, height=size, width=size, max_sequence_length=32, output_type="latent",
           callback_on_step_end=capture)  # fmt: skip
    ours = make_pipeline(family, {family: loaded})
    ours.set_timesteps(4)
    assert torch.equal(ours.scheduler.sigmas, seen["sigmas"])
    if name == "flux-schnell":  # four evenly spaced steps, none wasted near t = 0
        torch.testing.assert_close(ours.scheduler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("use_lora", [True, False])
def test_model_card_loads_with_the_family_pipeline(tmp_path, family_paths, use_lora):
    trainer = family_trainer(tmp_path, "sd3", family_paths, train_objective="ddpo")
    trainer.sd_pipeline._use_lora = use_lora  # only the card's snippet is read here
    text = trainer.create_model_card("me/sd3-ddpo").text
    assert f'StableDiffusion3Pipeline.from_pretrained("{family_paths["sd3"]}"' in text
    if use_lora:
        assert 'pipeline.load_lora_weights("me/sd3-ddpo")' in text
    else:
        assert 'transformer = SD3Transformer2DModel.from_pretrained("me/sd3-ddpo", subfolder="transformer"' in text
        assert "transformer=transformer" in text


def test_float16_keeps_an_upcast_vae_and_t5_s_float32_layers_as_diffusers_does(family_paths):
    sdxl = make_pipeline("sdxl", family_paths)
    sdxl.vae.register_to_config(force_upcast=True)
    sdxl.prepare_for_training(torch.device("cpu"), torch.float16)
    assert sdxl.vae.dtype == torch.float32  # SDXL's VAE overflows in float16; diffusers decodes it upcast
    pipeline = make_pipeline("sd3", family_paths)
    pipeline.vae.register_to_config(force_upcast=True)
    pipeline.prepare_for_training(torch.device("cpu"), torch.float16)
    assert pipeline.vae.dtype == torch.float16  # SD3's pipeline decodes in the VAE's dtype
    t5 = pipeline.sd_pipeline.text_encoder_3
    dtypes = {name: parameter.dtype for name, parameter in t5.named_parameters()}
    assert {dtypes[name] for name in dtypes if ".wo." in name} == {torch.float32}  # transformers' keep-in-fp32
    assert {dtypes[name] for name in dtypes if ".wo." not in name} == {torch.float16}
    assert pipeline.sd_pipeline.text_encoder.dtype == torch.float16
    assert {p.dtype for p in pipeline.get_trainable_layers()} == {torch.float32}


def test_decode_applies_per_channel_latent_statistics_like_diffusers(family_paths):
    pipeline = make_pipeline("sdxl", family_paths)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    pipeline.vae.register_to_config(latents_mean=mean, latents_std=std)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scale = pipeline.vae.config.scaling_factor
    expected_input = latents * torch.tensor(std).view(1, 4, 1, 1) / scale + torch.tensor(mean).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = (pipeline.vae.decode(expected_input).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(pipeline.decode(latents), expected)


def test_a_scheduler_without_betas_is_refused_by_name(family_paths):
    from diffusers import EDMEulerScheduler, StableDiffusionXLPipeline

    loaded = StableDiffusionXLPipeline.from_pretrained(family_paths["sdxl"])
    loaded.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match=r"its scheduler \(EDMEulerScheduler\) has no beta schedule"):
        make_pipeline("sdxl", {"sdxl": loaded})


def test_a_missing_local_model_folder_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    from dag_trl.models import pipeline_family

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as raised:
        pipeline_family("./missing_folder")
    assert str(raised.value) == (
        f"pretrained model './missing_folder' is not a folder that exists (looked for '{tmp_path / 'missing_folder'}'); "
        "pass a model folder written by save_pretrained, or a Hub id ('name' or 'owner/name')."
    )
    with pytest.raises(OSError, match=r"^pretrained model 'nobody/no-such-model' is not a local folder, and its "):
        pipeline_family("nobody/no-such-model")
