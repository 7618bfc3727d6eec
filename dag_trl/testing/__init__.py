"""Helpers for the tests and benchmarks, like ``diffusers.utils.testing_utils``; not used by the training library.

* :mod:`dag_trl.testing.tiny_models`: randomly initialised models of the real classes, built offline in seconds and
  saved like Hub checkpoints: a Stable Diffusion pipeline of any size (tiny for the tests, SD1.5's for a benchmark,
  the shapes demo's before training) and the CLIP and ImageReward towers of the model-based rewards.
* :mod:`dag_trl.testing.tiny_families`: tiny random SDXL, SD3 and FLUX pipelines (the real classes and config keys),
  saved like Hub checkpoints, for the model-family tests.
* :mod:`dag_trl.testing.images`: deterministic test images.
* :mod:`dag_trl.testing.reference_loop`: the straightforward DAG training window, the oracle the trainer's optimised
  loop is tested and benchmarked against.
* :mod:`dag_trl.testing.gaussian_toy`: an all-Gaussian diffusion (exact noise predictor, the trainer's DDIM-eta step,
  linear reward) whose marginal and conditional reward tilts are closed form, to check what the tilted-target
  objectives converge to (``python -m dag_trl.testing.gaussian_toy`` prints the measured numbers).
"""
