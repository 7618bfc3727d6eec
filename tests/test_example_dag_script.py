"""``examples/scripts/dag.py``: the library's API in one script (arguments -> pipeline -> trainer -> train -> save),
run as it is on the built-in shapes model."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_example():
    """The example script as a module (its ``main`` runs only when called)."""
    spec = importlib.util.spec_from_file_location("dag_example", REPO / "examples" / "scripts" / "dag.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_without_a_config_the_builtin_models_packaged_recipe_sets_the_defaults():
    example = load_example()
    script_args, config = example.parse_arguments(["--num_epochs", "3"])
    assert (script_args.pretrained_model, script_args.reward, script_args.prompts) == (
        "builtin:shapes",
        "shapes_colour_preference",
        "shapes",
    )
    # The recipe's CPU schedule (the paper's defaults are 50 steps and bf16), under the flag.
    assert (config.sample_num_steps, config.mixed_precision, config.num_epochs) == (20, "no", 3)
    assert script_args.output_dir == "runs/dag-example"  # the script's own, not dag-trl train's
    # Another model starts from the paper's settings.
    _, config = example.parse_arguments(["--pretrained_model", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
    assert (config.sample_num_steps, config.mixed_precision) == (50, "bf16")


@pytest.mark.integration
def test_one_epoch_on_the_builtin_model_saves_a_lora_that_loads_back_as_the_trained_denoiser(
    tmp_path, shapes_model_path
):
    from diffusers import StableDiffusionPipeline

    output_dir = tmp_path / "model"
    trainer = load_example().main(
        ["--num_epochs", "1", "--sample_num_steps", "4", "--sample_batch_size", "4",
         "--sample_num_batches_per_epoch", "1", "--train_batch_size", "2", "--train_gradient_accumulation_steps", "2",
         "--train_reward_exp_anneal", "none", "--log_with", "none", "--logdir", str(tmp_path / "logs"),
         "--output_dir", str(output_dir)]
    )  # fmt: skip
    assert len(trainer.reward_history) == 1 and (output_dir / "flow" / "config.json").is_file()

    pipeline = StableDiffusionPipeline.from_pretrained(shapes_model_path)
    unet = pipeline.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                          generator=generator)  # fmt: skip
    context = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([901, 401])
    with torch.no_grad():
        pretrained = unet(latents, timesteps, encoder_hidden_states=context).sample
        trained = trainer.accelerator.unwrap_model(trainer.denoiser)(latents, timesteps, encoder_hidden_states=context)
        pipeline.load_lora_weights(str(output_dir))
        loaded = pipeline.unet(latents, timesteps, encoder_hidden_states=context).sample
    assert (trained.sample - pretrained).abs().max() > 1e-5  # one epoch moved the LoRA away from the identity
    torch.testing.assert_close(loaded, trained.sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", sorted((REPO / "examples" / "recipes").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_recipe_parses_with_the_scripts_arguments(recipe):
    import yaml

    settings = yaml.safe_load(recipe.read_text())
    script_args, config = load_example().parse_arguments(["--config", str(recipe), "--num_epochs", "2"])
    assert script_args.pretrained_model == settings["pretrained_model"] and config.num_epochs == 2
    assert (script_args.reward_kwargs, script_args.pipeline_kwargs) == (
        settings["reward_kwargs"],
        settings.get("pipeline_kwargs", {}),
    )
