"""Align a text-to-image diffusion model with a reward by DAG (Zhang et al., 2024, arXiv 2406.00633): dag_trl's API in
one script, from the arguments to the saved (and, if asked, pushed) LoRA.

    python examples/scripts/dag.py                          # the built-in shapes model, offline on CPU
    python examples/scripts/dag.py --num_epochs 4 --train_objective rtb --train_log_prob_reduction sum \\
        --train_reward_exp 3 --train_reward_exp_anneal none --train_timestep_fraction 1
    accelerate launch examples/scripts/dag.py --config examples/recipes/sd15_aesthetic.yaml
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/scripts/dag.py \\
        --config examples/recipes/sd15_aesthetic.yaml --use_lora false       # ZeRO-2 full fine-tuning
    python examples/scripts/dag.py --config recipe.yaml --push_to_hub true --hub_model_id me/my-model

Every GFlowNetConfig field is a flag (`python examples/scripts/dag.py --help`; the `*_kwargs` take a JSON object); a
`--config` YAML file (the recipes in examples/recipes/) sets any of them, and flags override it. Without `--config` or `--pretrained_model`, the built-in shapes model trains with its
packaged CPU-sized recipe. `dag-trl train` runs the same training and adds a before / after report (images, reward
curve, summary.json).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from trl import TrlParser

from dag_trl import GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.cli import accept_json_objects, pipeline_keyword_arguments
from dag_trl.models import pipeline_family
from dag_trl.presets import get_preset
from dag_trl.prompts import get_prompt_fn
from dag_trl.rewards import get_reward_fn

BUILTIN_MODEL = "builtin:shapes"


@dataclass
class ScriptArguments:
    """The script's own options; the training settings are the [`GFlowNetConfig`] fields."""

    pretrained_model: str = field(
        default=BUILTIN_MODEL,
        metadata={"help": "Hub id or folder of an SD 1.x/2.x, SDXL, SD3 or FLUX.1 model, or a preset id."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA (else the whole denoiser)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    pipeline_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Further arguments of the model family, e.g. torch_dtype."}
    )
    reward: str = field(default="shapes_colour_preference", metadata={"help": "Reward name (see available_rewards)."})
    reward_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Arguments of the reward."})
    prompts: str = field(default="shapes", metadata={"help": "Prompt set name (see available_prompt_fns)."})
    prompt_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Arguments of the prompt set."})
    output_dir: str = field(default="runs/dag-example", metadata={"help": "Where the trained model is saved."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Cache folder of a preset's model."})


def parse_arguments(argv: Optional[Sequence[str]] = None) -> tuple[ScriptArguments, GFlowNetConfig]:
    """The script's options and the training config from ``argv`` (default: the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((ScriptArguments, GFlowNetConfig))
    accept_json_objects(parser)
    if not any(argument.startswith(("--config", "--pretrained_model")) for argument in argv):
        # The built-in model's packaged recipe (a CPU-sized schedule) replaces the paper's defaults, which are sized
        # for Stable Diffusion on a GPU; the report options of dag-trl train in it do not apply here.
        recipe = get_preset(BUILTIN_MODEL).recipe_settings()
        names = {f.name for dataclass_type in (ScriptArguments, GFlowNetConfig) for f in fields(dataclass_type)}
        parser.set_defaults(
            **{name: value for name, value in recipe.items() if name in names and name != "output_dir"}
        )
    return parser.parse_args_and_config(argv)


def main(argv: Optional[Sequence[str]] = None) -> GFlowNetDiffusionTrainer:
    script_args, config = parse_arguments(argv)

    # The model: a preset's id resolves to its folder (the shapes model is shipped in the package); the family
    # (SD 1.x/2.x, SDXL, SD3, FLUX.1) is read from the folder's model_index.json.
    preset = get_preset(script_args.pretrained_model)
    model = preset.resolve(script_args.cache_dir) if preset is not None else script_args.pretrained_model
    family = pipeline_family(model, script_args.pretrained_revision)
    pipeline = family(
        model,
        pretrained_model_revision=script_args.pretrained_revision,
        use_lora=script_args.use_lora,
        lora_rank=script_args.lora_rank,
        lora_init_seed=config.seed,
        **pipeline_keyword_arguments(script_args.pipeline_kwargs, family),  # checked; a dtype's name made a dtype
    )

    # The reward scores the final images (and DAG's intermediate predictions); the prompt function draws one
    # (prompt, metadata) pair per call. Both are found by name in their registries.
    reward_fn = get_reward_fn(script_args.reward, **script_args.reward_kwargs)
    prompt_fn = get_prompt_fn(script_args.prompts, **script_args.prompt_kwargs)

    trainer = GFlowNetDiffusionTrainer(config, reward_fn, prompt_fn, pipeline)
    # Checkpoints go to config.logdir every save_freq epochs; with --push_to_hub true, train() ends by pushing the
    # model to --hub_model_id (trainer.push_to_hub()).
    trainer.train()

    # The LoRA in diffusers' format (pipeline.load_lora_weights reads it), DAG's flow network and a model card.
    trainer.save_pretrained(script_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
