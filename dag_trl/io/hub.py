"""Model cards and Hub pushes for models trained with :class:`~dag_trl.GFlowNetDiffusionTrainer`.

The card's YAML metadata comes from ``huggingface_hub.ModelCardData`` and the push from ``huggingface_hub.HfApi``;
this module only decides what goes in them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from ..config import GFlowNetConfig
from ..utils import callable_name as callable_name  # moved to dag_trl.utils; importable here as before

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

HUB_TAGS = ("dag-trl", "gflownet", "diffusers", "lora", "text-to-image", "diffusers-training")
PAPER_BIBTEX = """@article{zhang2024improving,
  title   = {Improving GFlowNets for Text-to-Image Diffusion Alignment},
  author  = {Zhang, Dinghuai and Zhang, Yizhe and Gu, Jiatao and Zhang, Ruixiang and Susskind, Josh and
             Jaitly, Navdeep and Zhai, Shuangfei},
  journal = {arXiv preprint arXiv:2406.00633},
  year    = {2024}
}"""

# The settings that decide what a DAG run learns, in the order the card lists them.
CARD_HYPERPARAMETERS = (
    "num_epochs",
    "train_reward_exp",
    "train_reward_exp_anneal",
    "train_klpf",
    "train_unet_reg",
    "train_learning_rate",
    "train_flow_learning_rate",
    "train_log_z_learning_rate",
    "train_batch_size",
    "train_gradient_accumulation_steps",
    "train_timestep_fraction",
    "train_log_prob_reduction",
    "train_cfg",
    "train_clip_range",
    "train_adv_clip_max",
    "per_prompt_stat_tracking",
    "per_prompt_stat_tracking_buffer_size",
    "per_prompt_stat_tracking_min_count",
    "sample_num_steps",
    "sample_eta",
    "sample_guidance_scale",
    "sample_batch_size",
    "sample_num_batches_per_epoch",
    "mixed_precision",
    "seed",
)


class HubPushError(RuntimeError):
    """A push to the Hub failed after the model was saved locally; the message says where and how to retry."""


def is_hub_model_id(name: str) -> bool:
    """Whether ``name`` can be a Hub model id (``"name"`` or ``"owner/name"``), rather than a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def usage_snippet(
    base_model: str,
    model_path: str,
    use_lora: bool,
    pipeline_class: str = "StableDiffusionPipeline",
    denoiser: str = "unet",
    denoiser_class: str = "UNet2DConditionModel",
) -> str:
    """The diffusers code that loads the trained model on top of ``base_model`` with the family's
    ``pipeline_class``; a full fine-tune replaces the pipeline's ``denoiser`` (``unet`` or ``transformer``, of
    ``denoiser_class``). bfloat16, which every family runs in (SDXL's VAE and T5 overflow in float16)."""
    dtype = "torch.bfloat16"
    if use_lora:
        lines = [
            "import torch",
            f"from diffusers import {pipeline_class}",
            "",
            f'pipeline = {pipeline_class}.from_pretrained("{base_model}", torch_dtype={dtype}).to("cuda")',
            f'pipeline.load_lora_weights("{model_path}")',
            'image = pipeline("a photo of a cat").images[0]',
        ]
    else:
        lines = [
            "import torch",
            f"from diffusers import {pipeline_class}, {denoiser_class}",
            "",
            f'{denoiser} = {denoiser_class}.from_pretrained("{model_path}", subfolder="{denoiser}", '
            f"torch_dtype={dtype})",
            f'pipeline = {pipeline_class}.from_pretrained("{base_model}", {denoiser}={denoiser}, '
            f'torch_dtype={dtype}).to("cuda")',
            'image = pipeline("a photo of a cat").images[0]',
        ]
    return "\n".join(lines)


def create_model_card(
    config: GFlowNetConfig,
    *,
    base_model: str,
    model_path: str,
    use_lora: bool,
    reward_name: str,
    prompt_name: str,
    lora_rank: Optional[int] = None,
    final_reward: Optional[dict[str, float]] = None,
    num_processes: int = 1,
    license: Optional[str] = None,
    pipeline_class: str = "StableDiffusionPipeline",
    denoiser: str = "unet",
    denoiser_class: str = "UNet2DConditionModel",
) -> ModelCard:
    """Build the ``README.md`` model card of a training run as a ``huggingface_hub.ModelCard``.

    Args:
        config: the run's [`GFlowNetConfig`]; the objective (its name, description and the hyper-parameters only
            it reads) and the key hyper-parameters come from it.
        base_model: the Stable Diffusion checkpoint that was fine-tuned (a Hub id or a local folder; a local folder
            is named in the text but left out of the ``base_model`` metadata, which the Hub checks against its ids).
        model_path: where users load the trained model from: the Hub repository id, or the local folder.
        use_lora: whether the saved weights are a LoRA (else a full ``unet/``).
        reward_name: name of the reward function. prompt_name: name of the prompt set.
        lora_rank: the LoRA rank, listed with the hyper-parameters.
        final_reward: the trainer's ``reward_history`` entry of the last sampled epoch (``epoch``, ``reward_mean``,
            ``reward_std``), if any.
        num_processes: processes the run used (the effective batch sizes scale with it).
        license: an SPDX-like license id for the metadata, e.g. the base model's (``"creativeml-openrail-m"``).
        pipeline_class, denoiser, denoiser_class: the family's diffusers pipeline class, the attribute and class of
            its trained denoiser, for the loading snippet.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..objectives import OBJECTIVES, get_objective_class

    objective = get_objective_class(config.objective_name)
    algorithm = objective.display_name
    tags = [tag for tag in HUB_TAGS if use_lora or tag != "lora"]
    data = ModelCardData(
        base_model=base_model if is_hub_model_id(base_model) else None,
        base_model_relation="adapter" if use_lora else "finetune",
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=tags,
    )

    # Hyper-parameters that only other objectives read are left out.
    skipped = {name for other in OBJECTIVES.values() for name in other.hyperparameters} - set(
        objective.hyperparameters
    )
    if config.train_flow_learning_rate is None:
        skipped.add("train_flow_learning_rate")  # the flow network uses train_learning_rate
    rows = [f"| `{name}` | {getattr(config, name)} |" for name in CARD_HYPERPARAMETERS if name not in skipped]
    if use_lora:
        rows.append(f"| `lora_rank` | {lora_rank} |")
    rows.append(f"| processes | {num_processes} |")
    if final_reward is not None:
        reward_text = (
            f"Mean reward of the last sampled epoch (epoch {final_reward['epoch']}, all processes): "
            f"**{final_reward['reward_mean']:.4f}** (std {final_reward['reward_std']:.4f})."
        )
    else:
        reward_text = "No epoch was sampled in the session that saved this model, so no final reward is recorded."
    weights = "a LoRA" if use_lora else "a full UNet fine-tune"
    model_note = (
        f"The folder also holds the objective's own model (`{objective.model_folder}/`), so training can continue "
        "from it."
        if objective.model_folder
        else ""
    )
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if data.base_model else f"`{base_model}`"
    title = model_path.rstrip("/").split("/")[-1]
    content = f"""---
{data.to_yaml()}
---

# {title}

This is {weights} of {base_link} trained with **{algorithm}** ([{objective.paper[0]}]({objective.paper[1]})) to align
a text-to-image diffusion model to a reward, with the `dag_trl` library.

## Usage

```python
{usage_snippet(base_model, model_path, use_lora, pipeline_class, denoiser, denoiser_class)}
```

## Training

- Algorithm: {algorithm} ({objective.description})
- Reward: `{reward_name}`
- Prompts: `{prompt_name}`
- {reward_text}

| hyper-parameter | value |
| --- | --- |
{chr(10).join(rows)}

{model_note}

## Citation

```bibtex
{PAPER_BIBTEX}
```
"""
    return ModelCard(content)


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload model trained with dag_trl",
) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it; returns the commit URL.

    When the Hub refuses (no token: 401; no write access: 403; ...) or cannot be reached, raises [`HubPushError`]
    from huggingface_hub's error, adding the local folder, the command that retries the upload and, without a
    token, how to log in.
    """
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=folder, commit_message=commit_message)
    # The HTTP layer differs across huggingface_hub versions (requests, httpx, httpx2) and so do its exception
    # classes; whatever stopped the push, the user needs to know that the local save is intact.
    except Exception as error:
        login = (
            " No Hugging Face token was found: log in with `hf auth login` or set HF_TOKEN." if token is None else ""
        )
        raise HubPushError(
            f"Pushing to the Hub repository {repo_id!r} failed: {error}.{login} The model is saved in {folder!r}; "
            f"upload it later with `hf upload {repo_id} {folder}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))
