"""Evaluation during training at ``eval_freq``: fixed prompts and noise, so that successive evaluations differ only by
the weights; mixed into :class:`GFlowNetDiffusionTrainer`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..evaluation import diversity, kernel_distance, reward_statistics
from ..evaluation_features import diversity_distance, feature_extractor
from ..io.tracking import log_image_grid

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import GFlowNetConfig
    from ..models.pipeline import GFlowNetStableDiffusionPipeline

EvaluationHook = Callable[[torch.Tensor, list, list, torch.Tensor], dict[str, Any]]
ImageFeatures = Callable[[torch.Tensor], torch.Tensor]


def evaluation_image_features(
    config: GFlowNetConfig, image_features: Optional[ImageFeatures], reward_function: Callable, device: torch.device
) -> ImageFeatures:
    """The evaluation's ``images -> (B, F)`` features: the trainer's ``image_features`` argument if given, else those
    ``config.eval_features`` names (:func:`~dag_trl.evaluation_features.feature_extractor`, on ``device``)."""
    if image_features is not None:
        return image_features
    return feature_extractor(config.eval_features, reward_function, device=device)


class EvaluationMixin:
    """``evaluate()``: sample ``eval_num_samples`` images for fixed prompts and noise with the training sampler, and
    report the reward's mean, standard deviation and quantiles, the per-prompt diversity and the kernel distance from
    the pretrained model's samples for the same prompts and noise (LoRA runs: the adapter switched off), both on the
    ``image_features`` (``eval_features``), plus what the ``evaluation_hook`` adds; the images go to every tracker as
    ``eval/samples``."""

    config: GFlowNetConfig
    accelerator: Accelerator
    sd_pipeline: GFlowNetStableDiffusionPipeline
    prompt_fn: Callable
    reward_fn: Callable
    image_features: Callable[[torch.Tensor], torch.Tensor]
    evaluation_hook: Optional[EvaluationHook]
    evaluation_history: list[dict[str, Any]]

    def evaluation_prompts(self) -> tuple[list[str], list[dict]]:
        """The fixed evaluation prompts: ``eval_num_samples`` draws of the prompt function after
        ``reseed(eval_seed)`` (the trainer reseeds it again before each epoch's draws), or plain draws if it cannot
        be reseeded. Drawn once and kept."""
        if getattr(self, "_evaluation_prompts", None) is None:
            reseed = getattr(self.prompt_fn, "reseed", None)
            if callable(reseed):
                reseed(self.config.eval_seed)
            pairs = [self.prompt_fn() for _ in range(self.config.eval_num_samples)]
            self._evaluation_prompts = ([prompt for prompt, _ in pairs], [metadata for _, metadata in pairs])
        return self._evaluation_prompts

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Evaluate the current weights after ``epoch`` trained epochs; logs ``eval/...`` to the trackers, appends to
        ``evaluation_history`` and returns the entry (on every process)."""
        start = time.perf_counter()
        prompts, metadata = self.evaluation_prompts()
        reference = self._prior_evaluation_features if self.sd_pipeline.use_lora else None
        measured = self.evaluate_prompts(prompts, metadata, reference_features=reference)
        images, rewards = measured.pop("images"), measured.pop("rewards")
        result: dict[str, Any] = {"epoch": epoch, **measured, "seconds": time.perf_counter() - start}
        self.evaluation_history.append(result)
        self.accelerator.log(flat_scalars(result, "eval"), step=self.global_step)
        if self.accelerator.is_main_process:
            # The same prompts and noise every time: successive grids show what training changed.
            for tracker in self.accelerator.trackers:
                log_image_grid(tracker, "eval/samples", images, prompts, rewards, self.global_step)
        return result

    @torch.no_grad()
    def evaluate_prompts(
        self,
        prompts: list[str],
        metadata: list[dict],
        seed: Optional[int] = None,
        reference_features: Optional[Callable[[], torch.Tensor]] = None,
        use_evaluation_hook: bool = True,
    ) -> dict[str, Any]:
        """Sample ``prompts`` with the training sampler from the noise of ``seed`` (default ``eval_seed``) and measure
        them, logging and recording nothing: :meth:`evaluate`'s measurement, and that of ``dag-trl train``'s report
        before and after training.

        Returns ``"images"`` ``(B, 3, H, W)`` and ``"rewards"`` ``(B,)`` (CPU tensors), ``"reward_<statistic>"``
        (:func:`~dag_trl.evaluation.reward_statistics`), ``"diversity"``, ``"prior_kernel_distance"`` from the
        features that ``reference_features()`` returns (when given) and the ``evaluation_hook``'s entries (unless
        ``use_evaluation_hook`` is false, for a caller that runs the hook itself)."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        images = self.sample_images(prompts, self.config.eval_seed if seed is None else seed)
        rewards, _ = self.reward_fn(images, tuple(prompts), tuple(metadata))
        rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).cpu()
        features = self.image_features(images)
        result: dict[str, Any] = {"images": images, "rewards": rewards}
        result.update({f"reward_{name}": value for name, value in reward_statistics(rewards).items()})
        result["diversity"] = diversity(features, prompts, distance=diversity_distance(self.image_features))
        if reference_features is not None:
            result["prior_kernel_distance"] = kernel_distance(reference_features(), features)
        if use_evaluation_hook and self.evaluation_hook is not None:
            result.update(self.evaluation_hook(images, prompts, metadata, rewards))
        if was_training:
            self.denoiser.train()
        return result

    def _prior_evaluation_features(self) -> torch.Tensor:
        """The features of the pretrained model's samples (the adapter switched off) for the evaluation prompts and
        noise, sampled once."""
        if getattr(self, "_prior_features", None) is None:
            prompts, _ = self.evaluation_prompts()
            self._prior_features = self.image_features(self.sample_images(prompts, self.config.eval_seed, prior=True))
        return self._prior_features


def flat_scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a nested dict under ``prefix/key/subkey`` names, for the trackers (``None`` left out)."""
    scalars: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            scalars.update(flat_scalars(value, f"{prefix}/{name}"))
        elif isinstance(value, (int, float)):
            scalars[f"{prefix}/{name}"] = value
    return scalars
