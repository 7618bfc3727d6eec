"""Command line of the shapes model: ``python -m dag_trl.demo.shapes build --output DIR [--seed 0]`` builds it into
``DIR``; ``python -m dag_trl.demo.shapes get`` prints the cached model's folder, building it first when needed;
``python -m dag_trl.demo.shapes base-samples`` writes the base-sample table of the tilted-target evaluation
(:mod:`dag_trl.demo.shapes.target`) for the packaged recipe's sampler, and ``python -m dag_trl.demo.shapes
repeated-starts`` the repeated-start table of its conditional target and memory figure.
"""

from __future__ import annotations

import argparse
import logging
import time
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


def _recipe_trainer(folder: str) -> Any:
    """A trainer on the shipped model with the packaged recipe (its sampler: steps, eta, guidance, prompts), logging
    nowhere, writing only into ``folder``."""
    from ...cli import build_trainer, parse_arguments

    script_args, config = parse_arguments(["--output_dir", folder])
    config.log_with, config.logdir = None, folder
    return build_trainer(script_args, config, script_args.reward, script_args.prompts)


def write_base_sample_table(num_samples: int, seed: int, output: Path | None = None) -> Path:
    """Sample the shipped model with the packaged recipe's training sampler for the ``"shape"`` prompts (in turn)
    and write the table of prompts, rewards and attributes that :func:`~dag_trl.demo.shapes.target.target_distance`
    reads."""
    import json
    import tempfile

    from .target import TARGET_PROMPTS, base_sample_table, table_path

    with tempfile.TemporaryDirectory() as folder:
        trainer = _recipe_trainer(folder)
        prompts = [TARGET_PROMPTS[i % len(TARGET_PROMPTS)] for i in range(num_samples)]
        table = base_sample_table(trainer, prompts, seed)
    settings = table["settings"]
    path = output or table_path(settings["num_steps"], settings["eta"], settings["guidance_scale"])
    path.write_text(json.dumps(table))
    return path


def write_repeated_start_table(num_starts: int, num_continuations: int, seed: int, output: Path | None = None) -> Path:
    """Sample the shipped model with the packaged recipe's sampler from ``num_starts`` starting noises (the
    ``"shape"`` prompts in turn), ``num_continuations`` times each, and write the table that the conditional target
    (:func:`~dag_trl.demo.shapes.target.conditional_target_distance`) and the memory figure read.

    Resumable: each block of :data:`~dag_trl.demo.shapes.target.REPEATED_START_BLOCK` starts is appended to
    ``<output>.partial.jsonl`` when done, and a rerun with the same settings skips the blocks found there; the
    table is the same whether or not the run was interrupted."""
    import json
    import tempfile

    from .target import (
        REPEATED_START_BLOCK,
        encode_repeated_start_table,
        repeated_start_block,
        repeated_start_table_path,
    )

    if num_starts < REPEATED_START_BLOCK or num_starts % REPEATED_START_BLOCK:
        raise ValueError(
            f"--num-starts {num_starts} is invalid: expected a positive multiple of {REPEATED_START_BLOCK}."
        )
    if num_continuations < 2:
        raise ValueError(f"--num-continuations {num_continuations} is invalid: expected an integer >= 2.")
    with tempfile.TemporaryDirectory() as folder:
        trainer = _recipe_trainer(folder)
        config = trainer.config
        settings = {
            "num_steps": config.sample_num_steps,
            "eta": config.sample_eta,
            "guidance_scale": config.sample_guidance_scale,
            "negative_prompt": config.negative_prompts,
            "seed": seed,
            "num_continuations": num_continuations,
        }
        path = output or repeated_start_table_path(settings["num_steps"], settings["eta"], settings["guidance_scale"])
        partial = path.with_name(path.name + ".partial.jsonl")
        done: dict[int, dict[str, Any]] = {}
        if partial.exists():
            for line in partial.read_text().splitlines():
                entry = json.loads(line)
                if entry["settings"] == settings:
                    done[entry["block"]] = entry
        logging.getLogger(__name__).info(
            "repeated starts: %d of %d blocks already sampled in %s",
            len([b for b in done if b < num_starts // REPEATED_START_BLOCK]),
            num_starts // REPEATED_START_BLOCK,
            partial,
        )
        for block in range(num_starts // REPEATED_START_BLOCK):
            if block in done:
                continue
            start = time.perf_counter()
            done[block] = {"settings": settings, **repeated_start_block(trainer, block, num_continuations, seed)}
            with partial.open("a") as handle:
                handle.write(json.dumps(done[block]) + "\n")
            logging.getLogger(__name__).info(
                "repeated starts: block %d of %d in %.0f s",
                block + 1,
                num_starts // REPEATED_START_BLOCK,
                time.perf_counter() - start,
            )
    blocks = [done[block] for block in range(num_starts // REPEATED_START_BLOCK)]
    path.write_text(json.dumps(encode_repeated_start_table(settings, blocks)))
    partial.unlink()
    return path


def describe_targets(betas: Sequence[float]) -> list[str]:
    """Lines describing, from the shipped tables of the packaged recipe's sampler, the base sampler's memory figure
    and, at each ``beta``, the marginal and conditional tilts' rewards and rewarded colours (the ``"shape"`` prompts
    equally often)."""
    from ...cli import parse_arguments
    from ...evaluation import start_tilt_estimate
    from .target import ATTRIBUTES, TARGET_PROMPTS, load_repeated_start_table, load_table, target_figures

    _, config = parse_arguments([])
    settings = (config.sample_num_steps, config.sample_eta, config.sample_guidance_scale)
    table, repeated = load_table(*settings), load_repeated_start_table(*settings)
    if table is None or repeated is None:
        raise SystemExit(
            f"no base-sample tables for the recipe's sampler {settings}: run base-samples and repeated-starts."
        )
    num_starts, num_continuations = repeated["reward"].shape
    memory = target_figures(None, repeated, TARGET_PROMPTS, 0.0)["memory"]
    lines = [
        f"tables: {len(table['prompts'])} independent base samples; {num_starts} starts x {num_continuations} "
        f"continuations (steps {settings[0]}, eta {settings[1]:g}, guidance {settings[2]:g})",
        f"memory (share of the within-prompt reward variance that x_T explains): {memory['base']:.3f} "
        f"(+-{memory['base_se']:.3f})",
        # Such starts count as reward 0 in the conditional tilt at any beta: its estimate's floor for large beta.
        f"starts with no continuation of reward >= 0.5: {(repeated['reward'].max(axis=1) < 0.5).mean():.3f}",
    ]
    colours = {"shape_colour": repeated["shape_colour"]}
    for beta in betas:
        figures = target_figures(table, repeated, TARGET_PROMPTS, beta)
        estimates = {
            name: start_tilt_estimate(
                repeated["reward"], repeated["prompts"], beta, target, colours, ATTRIBUTES, jackknife=jackknife
            )
            for name, target, jackknife in (
                ("conditional", "conditional", True),
                ("conditional, plain", "conditional", False),
                ("marginal, same table", "marginal", True),
            )
        }
        parts = [f"marginal {figures['marginal']['reward']:.3f} (+-{figures['marginal']['reward_se']:.3f})"]
        for name, estimate in estimates.items():
            shares = estimate["distribution"]["shape_colour"]
            parts.append(
                f"{name} {estimate['reward']:.3f} (+-{estimate['reward_se']:.3f}; red {shares['red']:.3f}, "
                f"yellow {shares['yellow']:.3f})"
            )
        lines.append(f"beta {beta:g}: tilted reward " + "; ".join(parts))
    return lines


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
    repeated = commands.add_parser(
        "repeated-starts", help="sample the base model K times from each of M starting noises (conditional target)"
    )
    repeated.add_argument("--num-starts", type=int, default=576, help="M, a multiple of 16")
    repeated.add_argument("--num-continuations", type=int, default=16, help="K")
    repeated.add_argument("--seed", type=int, default=0)
    repeated.add_argument("--output", type=Path, default=None, help="default: the package's assets folder")
    targets = commands.add_parser("targets", help="the tilted targets' rewards and the memory figure from the tables")
    targets.add_argument("--beta", type=float, nargs="+", default=[3.0, 100.0])
    for command in (table, repeated):
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "targets":
        print("\n".join(describe_targets(args.beta)))
        return
    if args.command in ("base-samples", "repeated-starts"):
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "base-samples":
            path = write_base_sample_table(args.num_samples, args.seed, args.output)
        else:
            path = write_repeated_start_table(args.num_starts, args.num_continuations, args.seed, args.output)
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
