"""The example recipes and accelerate configs: TrlParser reads every recipe into valid arguments at the paper's
settings, the reward and prompt names exist, and accelerate accepts the launch configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from dag_trl.cli import parse_arguments
from dag_trl.prompts import PROMPTS, available_prompt_fns
from dag_trl.rewards import available_rewards, get_reward_fn

EXAMPLES = Path(__file__).parent.parent / "examples"
RECIPES = {
    "sd15_aesthetic": ("aesthetic_score", "simple_animals"),
    "sd15_imagereward": ("imagereward", "drawbench"),
    "sd15_hpsv2": ("hpsv2", "hpd"),
    "sd15_compressibility": ("jpeg_compressibility", "imagenet_all"),
}
# The paper's Stable Diffusion 1.5 settings (Zhang et al. 2024, and the authors' config/sd.yaml).
PAPER = dict(
    sample_num_steps=50, sample_eta=1.0, sample_guidance_scale=5.0, sample_batch_size=16,
    sample_num_batches_per_epoch=4, train_batch_size=8, train_gradient_accumulation_steps=4,
    train_learning_rate=3e-4, train_flow_learning_rate=3e-4, train_reward_exp=100.0,
    train_reward_exp_anneal="linear", train_unet_reg=1.0, train_klpf=-1.0, num_epochs=100, mixed_precision="bf16",
)  # fmt: skip


# The other families' recipes: the model each names and the family class its model_index.json selects.
FAMILY_RECIPES = {
    "sdxl_aesthetic": ("stabilityai/stable-diffusion-xl-base-1.0", "DefaultGFlowNetStableDiffusionXLPipeline"),
    "sd35_medium_aesthetic": ("stabilityai/stable-diffusion-3.5-medium", "DefaultGFlowNetStableDiffusion3Pipeline"),
    "flux_dev_aesthetic": ("black-forest-labs/FLUX.1-dev", "DefaultGFlowNetFluxPipeline"),
}


# The single-GPU SD1.5 recipe: the paper's settings but for the batch sizes that fit one 24 GB card.
SINGLE_GPU_RECIPE = "sd15_aesthetic_1gpu"


def test_every_recipe_is_listed():
    listed = sorted([*RECIPES, *FAMILY_RECIPES, SINGLE_GPU_RECIPE])
    assert sorted(path.stem for path in (EXAMPLES / "recipes").glob("*.yaml")) == listed


@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_family_recipe_parses_and_its_pipeline_kwargs_are_the_family_s(name):
    import dag_trl.models as models
    from dag_trl.models import FlowMatchingGFlowNetPipeline

    model, family_name = FAMILY_RECIPES[name]
    script_args, config = parse_arguments(["--config", str(EXAMPLES / "recipes" / f"{name}.yaml")])
    assert script_args.pretrained_model == model and script_args.output_dir == f"runs/{name}"
    assert config.mixed_precision == "bf16" and config.train_gradient_checkpointing is True
    family = getattr(models, family_name)
    accepted = set(inspect.signature(family.__init__).parameters)
    if issubclass(family, FlowMatchingGFlowNetPipeline):
        accepted |= set(inspect.signature(FlowMatchingGFlowNetPipeline.__init__).parameters)
    assert set(script_args.pipeline_kwargs) <= accepted
    assert script_args.pipeline_kwargs["torch_dtype"] == "bfloat16"
    if family_name == "DefaultGFlowNetFluxPipeline":  # guidance-distilled: no classifier-free guidance on top
        assert config.sample_guidance_scale == 1.0
    get_reward_fn(script_args.reward, **script_args.reward_kwargs)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_at_the_paper_settings_and_takes_overrides(name):
    reward, prompts = RECIPES[name]
    script_args, config = parse_arguments(
        ["--config", str(EXAMPLES / "recipes" / f"{name}.yaml"), "--num_epochs", "3"]
    )

    assert (script_args.reward, script_args.prompts) == (reward, prompts)
    assert script_args.pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert script_args.use_lora is True and script_args.lora_rank == 4
    assert script_args.output_dir == f"runs/{name}" and config.exp_name == name
    assert {field: getattr(config, field) for field in PAPER} == {**PAPER, "num_epochs": 3}  # the override wins
    assert reward in available_rewards() and prompts in available_prompt_fns()
    # The keyword arguments are ones the factories take (building a model reward loads nothing before its first call;
    # a prompt set would download its prompts, so only its signature is checked).
    get_reward_fn(reward, **script_args.reward_kwargs)
    inspect.signature(PROMPTS.factory(prompts)).bind(**script_args.prompt_kwargs)


def test_single_gpu_recipe_keeps_the_papers_per_process_sizes_in_smaller_batches():
    script_args, config = parse_arguments(
        ["--config", str(EXAMPLES / "recipes" / f"{SINGLE_GPU_RECIPE}.yaml"), "--train_gradient_checkpointing", "true"]
    )
    assert (script_args.reward, script_args.prompts) == ("aesthetic_score", "simple_animals")
    assert script_args.pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert script_args.output_dir == f"runs/{SINGLE_GPU_RECIPE}" and config.exp_name == SINGLE_GPU_RECIPE
    batch_sizes = {
        "sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size", "train_gradient_accumulation_steps"
    }  # fmt: skip
    assert {field: getattr(config, field) for field in set(PAPER) - batch_sizes} == {
        field: value for field, value in PAPER.items() if field not in batch_sizes
    }
    # 64 trajectories per epoch and 32 per optimiser step, as one of the paper's 8 processes, with half its train
    # batch (the memory estimate in the recipe's header) and twice its accumulation.
    assert (config.samples_per_epoch, config.trajectories_per_step) == (16 * 4, 8 * 4)
    assert (config.sample_batch_size, config.train_batch_size, config.train_gradient_accumulation_steps) == (8, 4, 8)
    assert config.objective_name == "dag_db" and config.train_decode_batch_size is None
    assert config.train_gradient_checkpointing is True  # the flag its header suggests for smaller cards wins
    get_reward_fn(script_args.reward, **script_args.reward_kwargs)


def test_hpsv2_recipe_names_all_four_hpd_styles():
    script_args, _ = parse_arguments(["--config", str(EXAMPLES / "recipes" / "sd15_hpsv2.yaml")])
    assert script_args.prompt_kwargs == {"styles": ["photo", "paintings", "anime", "concept-art"]}
    assert script_args.reward_kwargs == {"version": "v2.1"}


@pytest.mark.parametrize(
    "name, distributed_type, num_processes",
    [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 8), ("deepspeed_zero2", "DEEPSPEED", 8)],
)
def test_accelerate_configs_load(name, distributed_type, num_processes):
    from accelerate.commands.config.config_args import ClusterConfig

    path = EXAMPLES / "accelerate_configs" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == (distributed_type, num_processes)
    # The precision is the recipe's (GFlowNetConfig.mixed_precision); the launcher must not impose another.
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "no"
    if config.deepspeed_config:
        # ZeRO-2; batch size, accumulation and clipping are left to the trainer (configure_deepspeed).
        assert config.deepspeed_config["zero_stage"] == 2
        assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(config.deepspeed_config)
