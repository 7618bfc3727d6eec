"""A small, real text-to-image model of coloured shapes, built offline on CPU, and the tools to measure it.

The main job must show DAG working end to end on a machine without a GPU or Hub access, so the demo builds its own
latent diffusion model on synthetic data and saves it as a diffusers ``StableDiffusionPipeline``:

* :mod:`~dag_trl.demo.shapes.data`: 32x32 images of one shape (circle, square or triangle) in one of seven colours
  on a background of another colour, with prompts such as ``"a red circle on a blue background"``, and partial
  prompts (``"a circle"``) under which the model samples a spread of the attributes left out.
* :mod:`~dag_trl.demo.shapes.prompts`: :class:`ShapePrompts`, the prompt sets for fine-tuning.
* :mod:`~dag_trl.demo.shapes.analysis`: :func:`analyse_images` names the shape, its colour and the background of
  generated images; :func:`prompt_adherence`, :func:`colour_distribution` and :func:`shape_distribution` build on it.
* :mod:`~dag_trl.demo.shapes.reward`: :func:`colour_preference_reward`, which DAG reshapes the colour spread with.
* :mod:`~dag_trl.demo.shapes.training` and :mod:`~dag_trl.demo.shapes.model`: the architecture and training, and
  :func:`build_shapes_model`, :func:`verify_shapes_model`, :func:`get_shapes_model` (the copy shipped in the
  package, or a verified cached build).

* :mod:`~dag_trl.demo.shapes.preset`: the ``dag-trl train`` preset ``builtin:shapes`` (the model, its packaged
  recipe and its report figures).

Importing this package registers the preset (:data:`dag_trl.presets.PRESETS`), the reward ``shapes_colour_preference``
(:data:`dag_trl.rewards.REWARDS`) and the prompt set ``shapes`` (:data:`dag_trl.prompts.PROMPTS`), so that
``get_reward_fn`` and ``get_prompt_fn`` know them.

Command line: ``python -m dag_trl.demo.shapes build --output DIR [--seed 0]`` or ``python -m dag_trl.demo.shapes get``
(see :mod:`~dag_trl.demo.shapes.cli`).
"""

from .analysis import (
    ShapeAnalysis,
    analyse_images,
    colour_distribution,
    prompt_adherence,
    shape_distribution,
)
from .cli import main
from .data import (
    COLOUR_NAMES,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ShapesDataset,
    ShapeSpec,
    all_full_prompts,
    make_prompt,
    parse_prompt,
    render,
    sample_specs,
)
from .model import (
    CACHE_ENV_VAR,
    MARKER_FILE,
    PACKAGED_MODEL,
    PACKAGED_SEED,
    ShapesModelError,
    build_shapes_model,
    config_hash,
    default_cache_dir,
    get_shapes_model,
    load_shapes_pipeline,
    sample_images,
    verify_shapes_model,
)
from .preset import SHAPES_MODEL  # importing it registers the preset, the reward and the prompt set
from .prompts import PROMPT_SETS, ShapePrompts
from .reward import (
    DEFAULT_COLOUR_PREFERENCE,
    REWARD_TEMPERATURE,
    ShapesColourPreference,
    colour_preference_reward,
    make_colour_preference_reward,
)
from .training import LATENT_SIZE, MAX_PROMPT_TOKENS, SHAPES_ARCHITECTURE, ShapesBuildConfig

__all__ = [
    "CACHE_ENV_VAR",
    "COLOURS",
    "COLOUR_NAMES",
    "DEFAULT_COLOUR_PREFERENCE",
    "IMAGE_SIZE",
    "LATENT_SIZE",
    "MARKER_FILE",
    "MAX_PROMPT_TOKENS",
    "PACKAGED_MODEL",
    "PACKAGED_SEED",
    "PROMPT_SETS",
    "REWARD_TEMPERATURE",
    "SHAPES",
    "SHAPES_ARCHITECTURE",
    "SHAPES_MODEL",
    "ShapeAnalysis",
    "ShapePrompts",
    "ShapeSpec",
    "ShapesBuildConfig",
    "ShapesColourPreference",
    "ShapesDataset",
    "ShapesModelError",
    "all_full_prompts",
    "analyse_images",
    "build_shapes_model",
    "colour_distribution",
    "colour_preference_reward",
    "config_hash",
    "default_cache_dir",
    "get_shapes_model",
    "load_shapes_pipeline",
    "main",
    "make_colour_preference_reward",
    "make_prompt",
    "parse_prompt",
    "prompt_adherence",
    "render",
    "sample_images",
    "sample_specs",
    "shape_distribution",
    "verify_shapes_model",
]
