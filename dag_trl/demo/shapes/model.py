"""Building, verifying, caching and loading the shapes model, and sampling from it.

:func:`build_shapes_model` is seeded and takes a few minutes on two CPU cores; :func:`get_shapes_model` returns the
copy shipped in the package (``dag_trl/demo/assets``) or a cached build (verified by checksums), and rebuilds it
when it is missing or corrupt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...models.from_scratch import assemble_sd_pipeline, make_sd_modules, write_tiny_clip_tokenizer
from .analysis import prompt_adherence
from .data import IMAGE_SIZE, ShapesDataset, all_full_prompts
from .training import (
    LATENT_SIZE,
    SHAPES_ARCHITECTURE,
    ShapesBuildConfig,
    prompt_token_table,
    train_unet,
    train_vae,
)

logger = logging.getLogger(__name__)

# Bump when the data, architecture or training code changes, so that cached builds made by older code are rebuilt.
BUILD_FORMAT_VERSION = 1
MARKER_FILE = "dag_trl_shapes.json"
# The default build, shipped in the package so that the main job and the tests need not spend minutes building it.
PACKAGED_SEED = 0
PACKAGED_MODEL = Path(__file__).resolve().parents[1] / "assets" / f"shapes-seed{PACKAGED_SEED}"
CACHE_ENV_VAR = "DAG_TRL_CACHE"


def config_hash(seed: int, config: ShapesBuildConfig) -> str:
    """Hex digest identifying a build: the format version, the seed and every field of ``config``."""
    payload = json.dumps(
        {"format_version": BUILD_FORMAT_VERSION, "seed": seed, **dataclasses.asdict(config)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def sample_images(
    pipeline: Any,
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one image per prompt with ``pipeline``: a float tensor ``(B, 3, H, W)`` in [0, 1] on the CPU.

    Image ``i`` starts from its own generator seeded with ``seed + i``, so it does not depend on ``batch_size`` and
    the same ``(prompts, seed)`` before and after fine-tuning start from the same noise.
    """
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.device
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device=device).manual_seed(seed + start + j) for j in range(len(chunk))]
        output = pipeline(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


class ShapesModelError(RuntimeError):
    """A shapes model folder is missing, incomplete, corrupt or from a different build configuration."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shapes_model(
    path: str | os.PathLike, seed: int | None = None, config: ShapesBuildConfig | None = None
) -> dict[str, Any]:
    """Check that ``path`` holds a complete, unmodified shapes model and return its build record.

    The record (``MARKER_FILE``, written last by :func:`build_shapes_model`) lists every file with its size and
    SHA-256, so a truncated or missing weight file or ``model_index.json`` is caught here, with a message saying
    what to do, instead of deep inside diffusers. With ``config``, the build must also have used it and ``seed``.
    Raises :class:`ShapesModelError`.
    """
    path = Path(path)
    remedy = (
        f"delete {path} and rebuild it (get_shapes_model(rebuild=True), or "
        f"python -m dag_trl.demo.shapes build --output {path} --overwrite)."
    )
    if not path.is_dir():
        raise ShapesModelError(f"no shapes model at {path}: the folder does not exist.")
    try:
        record = json.loads((path / MARKER_FILE).read_text())
    except FileNotFoundError:
        raise ShapesModelError(
            f"{path} is not a complete shapes model: its build record {MARKER_FILE} is missing (an interrupted "
            f"build, or not a folder written by build_shapes_model); {remedy}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShapesModelError(f"the build record {path / MARKER_FILE} is unreadable ({error}); {remedy}") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "model_index.json" not in files:
        raise ShapesModelError(f"the build record {path / MARKER_FILE} lists no model files; {remedy}")
    if config is not None and record.get("config_hash") != config_hash(0 if seed is None else seed, config):
        raise ShapesModelError(
            f"the shapes model at {path} was built with a different seed, configuration or version of dag_trl; {remedy}"
        )
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise ShapesModelError(f"the shapes model at {path} is incomplete: {name} is missing; {remedy}")
        size = file.stat().st_size
        if size != expected.get("size") or _sha256(file) != expected.get("sha256"):
            raise ShapesModelError(
                f"the shapes model at {path} is corrupt: {name} has {size} bytes and a different checksum than the "
                f"{expected.get('size')} bytes written by the build (truncated or modified); {remedy}"
            )
    return record


def load_shapes_pipeline(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Verify the shapes model at ``path`` (:func:`verify_shapes_model`) and load it as a ``StableDiffusionPipeline``.

    ``kwargs`` go to ``StableDiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype``).
    """
    from diffusers import StableDiffusionPipeline

    verify_shapes_model(path)
    return StableDiffusionPipeline.from_pretrained(path, **kwargs)


def _count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _build_into(path: Path, seed: int, config: ShapesBuildConfig, progress: bool) -> dict[str, Any]:
    """Train the three models, save the pipeline into the empty folder ``path``, measure adherence, and write the
    build record last (its presence marks a finished build). Returns the record."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = ShapesDataset(config.dataset_size, seed)
    # The vocabulary files go where save_pretrained puts the tokenizer: transformers 5 loads tokenizer.json, which
    # save_pretrained adds, and transformers 4's slow CLIPTokenizer reads these two files.
    tokenizer_dir = write_tiny_clip_tokenizer(
        path / "tokenizer", SHAPES_ARCHITECTURE.max_tokens, SHAPES_ARCHITECTURE.tokenizer_words
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    modules = make_sd_modules(SHAPES_ARCHITECTURE, len(tokenizer))
    vae, text_encoder, unet = modules.vae, modules.text_encoder, modules.unet

    pixels = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    train_vae(vae, pixels, config, generator, progress)
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])
    # Like Stable Diffusion's 0.18215: scale latents to unit variance, which the noise schedule assumes.
    vae.register_to_config(scaling_factor=round(1.0 / float(means.std()), 5))
    latents = means * vae.config.scaling_factor

    train_unet(unet, text_encoder, latents, prompt_token_table(dataset, tokenizer), config, generator, progress)
    assemble_sd_pipeline(modules, tokenizer).save_pretrained(path)

    # Measure the saved files, not the models in memory, so that the number describes what users load.
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    prompts = all_full_prompts()
    images = sample_images(
        pipeline, prompts, seed, config.eval_inference_steps, config.eval_guidance_scale, progress=progress
    )
    files = sorted(p for p in path.rglob("*") if p.is_file())
    record = {
        "format_version": BUILD_FORMAT_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "config_hash": config_hash(seed, config),
        "image_size": IMAGE_SIZE,
        "latent_size": LATENT_SIZE,
        "parameters": {
            "vae": _count_parameters(vae),
            "text_encoder": _count_parameters(text_encoder),
            "unet": _count_parameters(unet),
        },
        "adherence": prompt_adherence(images, prompts),
        "build_seconds": round(time.perf_counter() - start, 1),
        "files": {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (path / MARKER_FILE).write_text(json.dumps(record, indent=2))
    return record


def build_shapes_model(
    output_dir: str | os.PathLike,
    seed: int = 0,
    config: ShapesBuildConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the shapes text-to-image model and save it as a ``StableDiffusionPipeline`` in ``output_dir``.

    Seeded and reproducible (for the same machine, library versions and thread count): data, initialisation and
    training noise all derive from ``seed``; training runs on at most two threads. The folder is built under a
    temporary name next to ``output_dir`` and renamed into place when complete, so an interrupted build never leaves
    a folder that looks finished. An existing non-empty ``output_dir`` is replaced only with ``overwrite``. The
    build record (``MARKER_FILE``) holds the configuration, parameter counts, file checksums and the measured prompt
    adherence.
    """
    config = ShapesBuildConfig() if config is None else config
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    # mkdtemp makes the folder private (0700); the published model should be readable like any other folder.
    staging.chmod(0o755)
    threads = torch.get_num_threads()
    # These models are too small to gain from more than two threads, which only contend with other work (set
    # OMP_NUM_THREADS=1 on a busy machine: spinning threads then slow the build down several times).
    torch.set_num_threads(min(2, threads))
    try:
        _build_into(staging, seed, config, progress)
        previous = None
        if output_dir.exists():
            previous = output_dir.with_name(f".{output_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            os.rename(output_dir, previous)
        os.rename(staging, output_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def default_cache_dir() -> Path:
    """``$DAG_TRL_CACHE`` if set, else ``~/.cache/dag_trl``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "dag_trl")


def get_shapes_model(
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    seed: int = 0,
    config: ShapesBuildConfig | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the shapes model for ``(seed, config)``, building it first when needed.

    The default build (seed 0, default configuration) ships inside the package (5.5 MB, ``dag_trl/demo/assets``),
    written by exactly this build; it is used when its checksums verify.

    The cache lives in ``cache_dir`` (default :func:`default_cache_dir`) under a name that includes a hash of the
    build configuration. A cached folder that fails :func:`verify_shapes_model` (missing, interrupted, truncated or
    modified files, another configuration) is rebuilt with a warning; ``rebuild=True`` rebuilds unconditionally.
    Raises :class:`ShapesModelError` when the cache folder cannot be written.
    """
    config = ShapesBuildConfig() if config is None else config
    if not rebuild and seed == PACKAGED_SEED and config == ShapesBuildConfig():
        try:
            verify_shapes_model(PACKAGED_MODEL, seed, config)
            return PACKAGED_MODEL
        except ShapesModelError as error:
            logger.warning("The shapes model shipped with dag_trl is unusable (%s) Using the cache instead.", error)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"shapes-seed{seed}-{config_hash(seed, config)[:12]}"
    if not rebuild:
        try:
            verify_shapes_model(target, seed, config)
            return target
        except ShapesModelError as error:
            if target.exists():
                logger.warning("%s Rebuilding it.", error)
    logger.info("Building the shapes model into %s (about 7 minutes on 2 idle CPU cores).", target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return build_shapes_model(target, seed, config, progress=progress, overwrite=True)
    except PermissionError as error:
        raise ShapesModelError(
            f"cannot write the shapes model cache in {root} ({error}); set ${CACHE_ENV_VAR} or pass cache_dir."
        ) from None
