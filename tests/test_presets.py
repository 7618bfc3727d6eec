"""Model presets (:mod:`dag_trl.presets`): the registry the command line finds them in, and their recipes."""

import yaml

from dag_trl.cli import parse_arguments, resolve_model
from dag_trl.presets import PRESETS, ModelPreset, get_preset


def write_recipes(folder) -> ModelPreset:
    """A preset of a model ``test:tiny`` whose recipe ``tiny.yaml`` has an RTB file beside it."""
    (folder / "tiny.yaml").write_text(
        yaml.safe_dump({"reward": "jpeg_compressibility", "prompts": "simple_animals", "num_epochs": 5, "seed": 4})
    )
    (folder / "tiny_rtb.yaml").write_text(yaml.safe_dump({"num_epochs": 9}))
    return ModelPreset(
        model="test:tiny", resolve=lambda cache_dir: f"{cache_dir}/tiny-model", recipes=folder, recipe="tiny.yaml"
    )


def test_the_recipe_of_an_objective_goes_over_the_presets_recipe(tmp_path):
    preset = write_recipes(tmp_path)
    base = {"reward": "jpeg_compressibility", "prompts": "simple_animals", "num_epochs": 5, "seed": 4}
    assert preset.recipe_settings() == base
    assert preset.recipe_settings("rtb") == {**base, "num_epochs": 9}
    assert preset.recipe_settings("dag_kl") == base  # no tiny_dag_kl.yaml


def test_the_shapes_preset_is_found_by_its_id_and_other_models_are_not_presets():
    preset = get_preset("builtin:shapes")
    assert preset.model == "builtin:shapes" and "builtin:shapes" in PRESETS.names()
    assert preset.recipe_settings()["reward"] == "shapes_colour_preference"
    assert preset.recipe_settings("rtb")["lora_min_timestep"] == 150  # shapes_recipe_rtb.yaml
    assert get_preset("stable-diffusion-v1-5/stable-diffusion-v1-5") is None


def test_a_registered_preset_gives_the_command_its_recipe_and_its_model_folder(tmp_path, monkeypatch):
    preset = write_recipes(tmp_path)
    # Registries take a name once; the test's registration goes with the test.
    monkeypatch.setitem(PRESETS._factories, preset.model, lambda: preset)
    arguments = ["--pretrained_model", "test:tiny", "--cache_dir", "/models", "--seed", "6"]
    script_args, config = parse_arguments(arguments)
    assert (script_args.reward, script_args.prompts, config.num_epochs, config.seed) == (
        "jpeg_compressibility",
        "simple_animals",
        5,
        6,
    )
    assert resolve_model(script_args) == "/models/tiny-model"
    _, config = parse_arguments([*arguments, "--train_objective", "rtb", "--train_reward_exp", "3"])
    assert config.num_epochs == 9
