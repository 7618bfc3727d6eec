"""Model cards and Hub pushes: card metadata and text, the exact files pushed, failures after a safe local save."""

from __future__ import annotations

import base64
import importlib
import json
import os
from pathlib import Path

import pytest
from conftest import PROMPTS, brightness, files_under, tiny_config
from huggingface_hub import ModelCard

from dag_trl import DefaultGFlowNetStableDiffusionPipeline, GFlowNetConfig, GFlowNetDiffusionTrainer
from dag_trl.io.hub import HUB_TAGS, PAPER_BIBTEX, HubPushError, create_model_card
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


class FakeHub:
    """The Hub endpoints a push uses, answered in-process: huggingface_hub's own HTTP client sends every request to
    this handler (a mock transport), so create_repo and upload_folder run unchanged down to the HTTP layer.

    Records each request, the repositories created and each commit's files (decoded from its NDJSON payload).
    ``refuse_with = (status, message)`` answers every request with that error instead.
    """

    def __init__(self, http):
        self.http = http
        self.requests: list[tuple[str, str, str | None]] = []
        self.created: list[dict] = []
        self.commits: list[tuple[str, dict[str, bytes]]] = []
        self.refuse_with: tuple[int, str] | None = None

    def __call__(self, request):
        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub 2.x looks this up once per process; not part of a push
            return self.http.Response(404, json={})
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if self.refuse_with is not None:
            status, message = self.refuse_with
            return self.http.Response(status, json={"error": message})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(body)
            # Like the Hub, put a bare name in the namespace of the token's owner ("me").
            namespace = body.get("organization") or "me"
            return self.http.Response(200, json={"url": f"https://huggingface.co/{namespace}/{body['name']}"})
        if path == "/api/validate-yaml":
            return self.http.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self.http.Response(200, json={"files": modes})
        if path.endswith("/commit/main"):
            repo_id = path.removeprefix("/api/models/").removesuffix("/commit/main")
            operations = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            files = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in operations
                     if op["key"] == "file"}  # fmt: skip
            self.commits.append((repo_id, files))
            url = f"https://huggingface.co/{repo_id}/commit/0123abc"
            return self.http.Response(200, json={"commitUrl": url, "commitOid": "0123abc"})
        return self.http.Response(404, json={"error": f"not served by the fake Hub: {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    """A :class:`FakeHub` behind huggingface_hub's HTTP client, with a token in HF_TOKEN."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    # httpx, or httpx2 in huggingface_hub 2.x: whichever library the installed version builds its client from.
    http = importlib.import_module(type(_http.get_session()).__module__.split(".")[0])
    hub = FakeHub(http)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    huggingface_hub.set_client_factory(lambda: http.Client(transport=http.MockTransport(hub)))
    yield hub
    huggingface_hub.set_client_factory(_http.default_client_factory)


def read_files(folder) -> dict[str, bytes]:
    return {name: (Path(folder) / name).read_bytes() for name in files_under(folder)}


@pytest.mark.integration
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


def test_push_to_hub_uploads_exactly_the_saved_files(trainer, fake_hub, tmp_path):
    url = trainer.push_to_hub(output_dir=tmp_path / "push", private=True)

    assert url == "https://huggingface.co/me/dag-test/commit/0123abc"
    [created] = fake_hub.created  # config.hub_model_id, private as asked (the field's name depends on the version)
    assert (created["name"], created["organization"]) == ("dag-test", "me")
    assert created.get("visibility") == "private" or created.get("private") is True
    assert all(auth == "Bearer hf_test_token" for _, _, auth in fake_hub.requests)
    [(repo_id, pushed)] = fake_hub.commits
    assert repo_id == "me/dag-test"
    assert set(pushed) == LORA_FILES and pushed == read_files(tmp_path / "push")  # byte for byte
    card = ModelCard(pushed["README.md"].decode())
    assert card.data.tags == list(HUB_TAGS)
    assert 'pipeline.load_lora_weights("me/dag-test")' in card.text


def test_train_pushes_at_the_end_when_configured(trainer, fake_hub, monkeypatch):
    monkeypatch.setattr(trainer.config, "push_to_hub", True)
    monkeypatch.setattr(trainer.config, "hub_model_id", None)
    trainer.train()
    # The bare exp_name goes into the token owner's namespace.
    assert [(body["name"], body.get("organization")) for body in fake_hub.created] == [("dag-test", None)]
    [(repo_id, pushed)] = fake_hub.commits
    assert repo_id == "me/dag-test"
    folder = os.path.join(trainer.config.logdir, "hub", "dag-test")
    assert set(pushed) == LORA_FILES and pushed == read_files(folder)
    # The card pushed is the trained model's: it records the epoch's reward.
    mean = trainer.reward_history[-1]["reward_mean"]
    assert f"**{mean:.4f}**" in ModelCard(pushed["README.md"].decode()).text


def test_push_refuses_a_non_empty_folder_before_writing(trainer, fake_hub, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="the folder is not empty, and every file in it would be uploaded"):
        trainer.push_to_hub("me/x", output_dir=tmp_path / "busy")
    assert files_under(tmp_path / "busy") == {"notes.txt"} and fake_hub.requests == []


def test_push_without_a_token_fails_with_the_hubs_error_after_the_local_save(trainer, fake_hub, monkeypatch, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    fake_hub.refuse_with = (401, "Invalid username or password.")
    folder = tmp_path / "kept"
    with pytest.raises(HubPushError, match="Pushing to the Hub repository 'me/dag-test' failed") as error:
        trainer.push_to_hub("me/dag-test", output_dir=folder)
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert error.value.__cause__.response.status_code == 401
    message = str(error.value)
    assert "Invalid username or password." in message
    assert "No Hugging Face token was found: log in with `hf auth login` or set HF_TOKEN." in message
    assert f"The model is saved in {str(folder)!r}" in message and f"`hf upload me/dag-test {folder}`" in message
    assert fake_hub.requests[0] == ("POST", "/api/repos/create", None)  # sent without credentials
    assert fake_hub.commits == [] and files_under(folder) == LORA_FILES


def test_push_refused_by_the_hub_raises_with_context_after_the_local_save(trainer, fake_hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    fake_hub.refuse_with = (403, "You don't have the rights to create a model under this namespace")
    folder = tmp_path / "kept"
    with pytest.raises(HubPushError, match="Pushing to the Hub repository 'someone/else' failed") as error:
        trainer.push_to_hub("someone/else", output_dir=folder)
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert error.value.__cause__.response.status_code == 403
    assert "You don't have the rights" in str(error.value)
    assert "No Hugging Face token" not in str(error.value)
    # create_repo(exist_ok=True) asks whether the repository exists after a refused creation; nothing is uploaded.
    assert fake_hub.requests[0] == ("POST", "/api/repos/create", "Bearer hf_test_token")
    assert fake_hub.commits == [] and all("/commit/" not in path for _, path, _ in fake_hub.requests)
    assert files_under(folder) == LORA_FILES
