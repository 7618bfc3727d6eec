"""Model cards and Hub pushes: card metadata and text, the exact files pushed, failures after a safe local save."""

from __future__ import annotations

import importlib
import os

import pytest
from conftest import PROMPTS, brightness, files_under, tiny_config
from huggingface_hub import HfApi, ModelCard

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.hub import HUB_TAGS, PAPER_BIBTEX, HubPushError, create_model_card
from dag_trl.prompts import PromptList

LORA_FILES = {
    "README.md",
    "pytorch_lora_weights.safetensors",
    "flow/config.json",
    "flow/diffusion_pytorch_model.safetensors",
}


@pytest.fixture
def trainer(tmp_path, tiny_sd_path) -> GFlowNetDiffusionTrainer:
    """A LoRA trainer (one optimiser step per epoch) with a named prompt set, not trained yet."""
    config = tiny_config(
        tmp_path, num_epochs=1, sample_num_batches_per_epoch=1, exp_name="dag-test", hub_model_id="me/dag-test"
    )
    pipeline = DefaultGFlowNetStableDiffusionPipeline(str(tiny_sd_path), lora_rank=2)
    return GFlowNetDiffusionTrainer(config, brightness, PromptList(PROMPTS, name="shapes"), pipeline)


@pytest.fixture
def recorded_push(monkeypatch):
    """Record create_repo / upload_folder calls (the two requests a push makes) instead of sending them."""
    from huggingface_hub.hf_api import RepoUrl

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        # Like the Hub, put a bare name in the namespace of the token's owner ("me").
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        # The folder's content at upload time is what the Hub would receive.
        calls.append(("upload_folder", repo_id, kwargs, files_under(folder_path), folder_path))
        return f"https://huggingface.co/{repo_id}/commit/0123abc"

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_card_metadata_and_text_of_a_trained_lora(trainer, tmp_path):
    trainer.train()
    trainer.save_pretrained(tmp_path / "out", repo_id="me/dag-test")
    assert files_under(tmp_path / "out") == LORA_FILES

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.tags == list(HUB_TAGS)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model_relation == "adapter"
    # The tiny base model is a local folder, not a Hub id: named in the text, kept out of the checked metadata.
    assert card.data.base_model is None
    assert f"`{trainer.sd_pipeline.pretrained_model_name}`" in card.text

    final = trainer.reward_history[-1]
    assert f"(epoch 0, all processes): **{final['reward_mean']:.4f}** (std {final['reward_std']:.4f})" in card.text
    assert "- Reward: `brightness`" in card.text
    assert "- Prompts: `shapes`" in card.text
    assert "**DAG-DB**" in card.text
    assert "| `train_reward_exp` | 10.0 |" in card.text
    assert "| `sample_num_steps` | 4 |" in card.text
    assert "| `lora_rank` | 2 |" in card.text
    assert "train_clip_range" not in card.text  # a DAG-KL setting, meaningless for DAG-DB
    assert f'StableDiffusionPipeline.from_pretrained("{trainer.sd_pipeline.pretrained_model_name}"' in card.text
    assert 'pipeline.load_lora_weights("me/dag-test")' in card.text
    assert PAPER_BIBTEX in card.text and "arXiv:2406.00633" in card.text


def test_card_of_a_dag_kl_full_finetune_from_a_hub_base_model():
    config = GFlowNetConfig(train_klpf=1.0, train_flow_learning_rate=1e-3, exp_name="x")
    card = create_model_card(
        config,
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        model_path="me/full",
        use_lora=False,
        reward_name="aesthetic_score",
        prompt_name="imagenet_animals",
        license="creativeml-openrail-m",
    )
    reloaded = ModelCard(str(card))  # what the Hub parses back
    assert reloaded.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert reloaded.data.base_model_relation == "finetune"
    assert reloaded.data.license == "creativeml-openrail-m"
    assert reloaded.data.tags == [tag for tag in HUB_TAGS if tag != "lora"]
    text = reloaded.text
    assert "**DAG-KL**" in text and "| `train_klpf` | 1.0 |" in text and "| `train_clip_range` | 0.0001 |" in text
    assert "| `train_flow_learning_rate` | 0.001 |" in text
    assert "lora_rank" not in text
    assert 'UNet2DConditionModel.from_pretrained("me/full", subfolder="unet"' in text
    assert "[stable-diffusion-v1-5/stable-diffusion-v1-5](https://huggingface.co/stable-diffusion-v1-5/" in text
    assert "No epoch was sampled" in text


def test_push_to_hub_uploads_exactly_the_saved_files(trainer, recorded_push, tmp_path):
    url = trainer.push_to_hub(output_dir=tmp_path / "push", private=True)

    assert url == "https://huggingface.co/me/dag-test/commit/0123abc"
    (create, repo_id, create_kwargs), upload = recorded_push
    assert create == "create_repo" and repo_id == "me/dag-test"  # config.hub_model_id
    assert create_kwargs == {"private": True, "exist_ok": True}
    assert upload[0] == "upload_folder" and upload[1] == "me/dag-test"
    assert upload[3] == LORA_FILES == files_under(tmp_path / "push")
    card = ModelCard.load(tmp_path / "push" / "README.md")
    assert card.data.tags == list(HUB_TAGS)
    assert 'pipeline.load_lora_weights("me/dag-test")' in card.text


def test_train_pushes_at_the_end_when_configured(trainer, recorded_push, monkeypatch):
    monkeypatch.setattr(trainer.config, "push_to_hub", True)
    monkeypatch.setattr(trainer.config, "hub_model_id", None)
    trainer.train()
    assert [call[:2] for call in recorded_push] == [("create_repo", "dag-test"), ("upload_folder", "me/dag-test")]
    folder = recorded_push[1][4]
    assert folder == os.path.join(trainer.config.logdir, "hub", "dag-test")
    assert recorded_push[1][3] == LORA_FILES
    # The card pushed is the trained model's: it records the epoch's reward.
    mean = trainer.reward_history[-1]["reward_mean"]
    assert f"**{mean:.4f}**" in ModelCard.load(os.path.join(folder, "README.md")).text


def test_push_refuses_a_non_empty_folder_before_writing(trainer, recorded_push, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="the folder is not empty, and every file in it would be uploaded"):
        trainer.push_to_hub("me/x", output_dir=tmp_path / "busy")
    assert files_under(tmp_path / "busy") == {"notes.txt"} and recorded_push == []


def test_push_without_a_token_fails_after_the_local_save(trainer, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)

    def unexpected(*args, **kwargs):
        raise AssertionError("no request may be sent without a token")

    monkeypatch.setattr(HfApi, "create_repo", unexpected)
    folder = tmp_path / "kept"
    with pytest.raises(HubPushError, match="no Hugging Face token found") as error:
        trainer.push_to_hub("me/dag-test", output_dir=folder)
    assert f"The model is saved in {str(folder)!r}" in str(error.value)
    assert f"`hf upload me/dag-test {folder}`" in str(error.value)
    assert files_under(folder) == LORA_FILES


@pytest.fixture
def hub_answers_403(monkeypatch):
    """Serve every Hub request with 403 through huggingface_hub's own HTTP client (a mock transport)."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    # httpx, or httpx2 in huggingface_hub 2.x: whichever library the installed version builds its client from.
    http = importlib.import_module(type(_http.get_session()).__module__.split(".")[0])
    requests = []

    def handler(request):
        requests.append((request.method, str(request.url)))
        return http.Response(403, json={"error": "You don't have the rights to create a model under this namespace"})

    monkeypatch.setenv("HF_TOKEN", "hf_read_only_token")
    huggingface_hub.set_client_factory(lambda: http.Client(transport=http.MockTransport(handler)))
    yield requests
    huggingface_hub.set_client_factory(_http.default_client_factory)


def test_push_refused_by_the_hub_raises_with_context_after_the_local_save(trainer, hub_answers_403, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    folder = tmp_path / "kept"
    with pytest.raises(HubPushError, match="Pushing to the Hub repository 'someone/else' failed") as error:
        trainer.push_to_hub("someone/else", output_dir=folder)
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert error.value.__cause__.response.status_code == 403
    assert "You don't have the rights" in str(error.value)
    # create_repo(exist_ok=True) asks whether the repository exists after a refused creation; nothing is uploaded.
    assert hub_answers_403[0] == ("POST", "https://huggingface.co/api/repos/create")
    assert all(method in ("POST", "GET") and "upload" not in url for method, url in hub_answers_403)
    assert files_under(folder) == LORA_FILES
