"""Align a diffusion model (SD 1.x/2.x, SDXL, SD3/3.5, FLUX) with DAG (Zhang et al., 2024) from a YAML recipe and/or command-line flags.

    python examples/scripts/dag.py                                        # offline shapes model on CPU
    accelerate launch examples/scripts/dag.py --config examples/recipes/sd15_aesthetic.yaml
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml examples/scripts/dag.py \
        --config examples/recipes/sd15_aesthetic.yaml --use_lora false       # ZeRO-2 full fine-tuning
    python examples/scripts/dag.py --config recipe.yaml --num_epochs 10   # flags override the YAML

Every GFlowNetConfig field is a flag (the *_kwargs dicts take a JSON object, e.g.
``--pipeline_kwargs '{"torch_dtype": "bfloat16"}'``); see `python examples/scripts/dag.py --help`.
"""

from dag_trl.demo.cli import parse_arguments, run

if __name__ == "__main__":
    script_args, config = parse_arguments()
    run(script_args, config)
