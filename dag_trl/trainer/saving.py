"""Saving a trained model, its model card and Hub pushes; mixed into :class:`GFlowNetDiffusionTrainer`."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional, Union

from ..io.hub import create_model_card, push_folder_to_hub
from ..utils import callable_name
from .divergence import TrainingDivergedError, how_to_go_on, lora_update_ratios, weights_problem

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import GFlowNetConfig
    from ..models.pipeline import GFlowNetStableDiffusionPipeline
    from ..objectives import Objective

MODEL_CARD_NAME = "README.md"


def family_names(pipeline: GFlowNetStableDiffusionPipeline) -> dict[str, str]:
    """The diffusers pipeline class, denoiser attribute and denoiser class of a diffusers-based family, for the model
    card's loading snippet (empty for other pipelines: the card then shows Stable Diffusion's)."""
    pipeline_class = getattr(pipeline, "diffusers_pipeline_class", None)
    if pipeline_class is None:
        return {}
    return {
        "pipeline_class": pipeline_class,
        "denoiser": pipeline.denoiser_name,
        "denoiser_class": type(pipeline.denoiser).__name__,
    }


class SavingMixin:
    """``save_pretrained``, ``push_to_hub`` and the model card of the trainer's current weights."""

    config: GFlowNetConfig
    accelerator: Accelerator
    sd_pipeline: GFlowNetStableDiffusionPipeline
    objective: Objective

    @property
    def reward_name(self) -> str:
        """Name of the reward function, for the model card (its ``name``, ``__name__`` or class name)."""
        return callable_name(self.reward_fn)

    @property
    def prompt_name(self) -> str:
        """Name of the prompt function, for the model card (its ``name``, ``__name__`` or class name)."""
        return callable_name(self.prompt_fn)

    def create_model_card(self, model_path: str, license: Optional[str] = None):
        """The ``README.md`` model card of the current weights (a ``huggingface_hub.ModelCard``); ``model_path`` is
        the Hub repository or local folder that the card's loading snippet points at."""
        pipeline = self.sd_pipeline
        return create_model_card(
            self.config,
            base_model=getattr(pipeline, "pretrained_model_name", "unknown"),
            model_path=model_path,
            use_lora=pipeline.use_lora,
            reward_name=self.reward_name,
            prompt_name=self.prompt_name,
            lora_rank=getattr(pipeline, "lora_rank", None),
            final_reward=self.reward_history[-1] if self.reward_history else None,
            num_processes=self.accelerator.num_processes,
            license=license,
            **family_names(pipeline),
        )

    def save_pretrained(
        self, output_dir: Union[str, os.PathLike], repo_id: Optional[str] = None, license: Optional[str] = None
    ) -> None:
        """Save the trained LoRA in diffusers format (``pytorch_lora_weights.safetensors``; ``unet/`` for full
        fine-tuning), the objective's own model (DAG's flow network, ``flow/``) and a model card (``README.md``)
        into ``output_dir``.

        Only the main process writes; call it on every process (it does not wait for the others). ``repo_id`` is
        the Hub repository the card's loading snippet names (default: ``output_dir``).
        """
        if not self.accelerator.is_main_process:
            return
        output_dir = os.fspath(output_dir)
        problem = self.weights_health_problem()
        if problem is not None:
            raise TrainingDivergedError(
                f"Refusing to write {output_dir!r}: {problem}. The earlier checkpoints are kept. "
                f"{how_to_go_on(self.last_checkpoint())}"
            )
        os.makedirs(output_dir, exist_ok=True)
        self._save_trained_weights(output_dir)
        card = self.create_model_card(repo_id or output_dir, license=license)
        card.save(os.path.join(output_dir, MODEL_CARD_NAME))

    def weights_health_problem(self) -> Optional[str]:
        """What fails the weights health check (:func:`~dag_trl.trainer.divergence.weights_problem`: finite
        trainable parameters, LoRA updates within ``MAX_LORA_UPDATE_RATIO`` of their frozen weights, finite outputs of
        the fixed probe, :meth:`health_probe`), or ``None``. Checked before any checkpoint or model is written."""
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        ratios = lora_update_ratios(denoiser) if self.sd_pipeline.use_lora else {}
        return weights_problem(self.trainable_parameters(), ratios, self.health_probe)

    def _save_trained_weights(self, output_dir: str) -> None:
        """The denoiser's trained weights (diffusers LoRA or ``unet/``) and the objective's model (``flow/``); the
        callers have checked their health."""
        self.sd_pipeline.save_pretrained(output_dir, unet=self.accelerator.unwrap_model(self.denoiser))
        if self.unwrapped_objective_model is not None:
            self.unwrapped_objective_model.save_pretrained(os.path.join(output_dir, self.objective.model_folder))

    def push_to_hub(
        self,
        repo_id: Optional[str] = None,
        *,
        output_dir: Optional[Union[str, os.PathLike]] = None,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        license: Optional[str] = None,
        commit_message: str = "Upload model trained with dag_trl",
    ) -> Optional[str]:
        """Save with :meth:`save_pretrained`, then upload exactly that folder to the Hub repository ``repo_id``.

        ``repo_id`` defaults to ``config.hub_model_id``, else ``config.exp_name`` (in the token owner's namespace).
        The folder is ``output_dir``, which must be empty or absent so that nothing else is uploaded, or by default
        ``<logdir>/hub/<repo_id with "/" as "--">``, emptied first. Only the main process saves and pushes; it
        returns the commit URL, the other processes ``None``. If the push fails (no token, no write access, no network), the local
        save is kept and a [`~dag_trl.io.hub.HubPushError`] says where it is.
        """
        repo_id = repo_id or self.config.hub_model_id or self.config.exp_name
        if not self.accelerator.is_main_process:
            return None
        if output_dir is None:
            output_dir = os.path.join(self.config.logdir, "hub", repo_id.replace("/", "--"))
            shutil.rmtree(output_dir, ignore_errors=True)
        output_dir = os.fspath(output_dir)
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            raise ValueError(
                f"push_to_hub(output_dir={output_dir!r}): the folder is not empty, and every file in it would be "
                "uploaded. Pass an empty or new folder, or leave output_dir unset."
            )
        self.save_pretrained(output_dir, repo_id=repo_id, license=license)
        return push_folder_to_hub(output_dir, repo_id, token=token, private=private, commit_message=commit_message)
