"""Command line of the shapes model: ``python -m dag_trl.demo.shapes build --output DIR [--seed 0]`` builds it into
``DIR``; ``python -m dag_trl.demo.shapes get`` prints the cached model's folder, building it first when needed;
``python -m dag_trl.demo.shapes base-samples`` writes the base-sample table of the tilted-target evaluation
(:mod:`dag_trl.demo.shapes.target`) for the packaged recipe's sampler.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import all_full_prompts
from .model import CACHE_ENV_VAR, ShapesModelError, build_shapes_model, get_shapes_model, verify_shapes_model


def _format_adherence(adherence: Mapping[str, Any]) -> str:
    """``"colour 99.2% of 126, ..."``: each measured attribute's adherence and the number of prompts naming it."""
    return ", ".join(
        f"{attribute} {adherence[attribute]:.1%} of {adherence[f'n_{attribute}']}"
        for attribute in ("colour", "background", "shape")
        if adherence.get(attribute) is not None
    )


def write_base_sample_table(num_samples: int, seed: int, output: Path | None = None) -> Path:
    """Sample the shipped model with the packaged recipe's training sampler for the ``"shape"`` prompts (in turn)
    and write the table of prompts, rewards and attributes that :func:`~dag_trl.demo.shapes.target.target_distance`
    reads."""
    import json
    import tempfile

    from ..cli import build_trainer, parse_arguments
    from .target import TARGET_PROMPTS, base_sample_table, table_path

    with tempfile.TemporaryDirectory() as folder:
        script_args, config = parse_arguments(["--output_dir", folder])
        config.log_with, config.logdir = None, folder
        trainer = build_trainer(script_args, config, script_args.reward, script_args.prompts)
        prompts = [TARGET_PROMPTS[i % len(TARGET_PROMPTS)] for i in range(num_samples)]
        table = base_sample_table(trainer, prompts, seed)
    settings = table["settings"]
    path = output or table_path(settings["num_steps"], settings["eta"], settings["guidance_scale"])
    path.write_text(json.dumps(table))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``build --output DIR [--seed S] [--overwrite]`` or ``get [--cache-dir DIR] [--rebuild]``."""
    parser = argparse.ArgumentParser(
        prog="python -m dag_trl.demo.shapes", description="Build or find the offline shapes text-to-image model."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the shapes model into a folder")
    build.add_argument("--output", required=True, type=Path, help="folder to write the pipeline into")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    get = commands.add_parser("get", help="print the cached model's folder, building it first if needed")
    get.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV_VAR} or ~/.cache/dag_trl")
    get.add_argument("--seed", type=int, default=0)
    get.add_argument("--rebuild", action="store_true", help="rebuild even if a valid cached model exists")
    table = commands.add_parser("base-samples", help="sample the base model for the tilted-target evaluation")
    table.add_argument("--num-samples", type=int, default=4096)
    table.add_argument("--seed", type=int, default=0)
    table.add_argument("--output", type=Path, default=None, help="default: the package's assets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "base-samples":
        path = write_base_sample_table(args.num_samples, args.seed, args.output)
        print(f"base-sample table: {path}")
        return
    try:
        if args.command == "build":
            path = build_shapes_model(args.output, seed=args.seed, overwrite=args.overwrite)
        else:
            path = get_shapes_model(args.cache_dir, rebuild=args.rebuild, seed=args.seed)
        record = verify_shapes_model(path)
    except (ShapesModelError, FileExistsError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"shapes model: {path}")
    print(f"built in {record['build_seconds']:.0f} s; parameters: {record['parameters']}")
    print(f"prompt adherence on all {len(all_full_prompts())} full prompts: {_format_adherence(record['adherence'])}")
