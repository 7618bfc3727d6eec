"""The two extension seams are real: an objective and a model family that exist only in this file train through the
unchanged trainer, with the gradient the objective defines."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
from conftest import tiny_config

from dag_trl import GFlowNetDiffusionTrainer, PromptEmbeddings
from dag_trl.models.pipeline import GFlowNetStableDiffusionPipeline
from dag_trl.objectives import OBJECTIVES, Objective, TransitionBatch
from dag_trl.samplers.ddim import ddim_step_with_logprob, original_sample_and_noise

PIXELS = 4  # the toy family denoises 3 x 4 x 4 images directly: no VAE, no text encoder
EMBEDDING_DIM = 6


class PixelDenoiser(torch.nn.Module):
    """A per-pixel linear denoiser conditioned on a prompt vector and the timestep."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 3, kernel_size=1)
        self.text = torch.nn.Linear(EMBEDDING_DIM, 3)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = (timestep.float() / 1000).reshape(-1, 1, 1, 1)
        return self.mix(sample) * (1 + scale) + self.text(text.mean(dim=1))[:, :, None, None]


class PixelPipeline(GFlowNetStableDiffusionPipeline):
    """A model family that exists only in this test: pixel-space diffusion with a bag-of-letters text encoder."""

    def __init__(self):
        from diffusers import DDIMScheduler

        torch.manual_seed(0)
        self._denoiser = PixelDenoiser()
        self.scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser

    @property
    def use_lora(self) -> bool:
        return False

    @property
    def latent_channels(self) -> int:
        return 3

    @property
    def prompt_embedding_dim(self) -> int:
        return EMBEDDING_DIM

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeddings:
        letters = torch.tensor([[prompt.count(c) for c in "aeiost"] for prompt in prompts], dtype=torch.float32)
        return PromptEmbeddings(letters[:, None, :])

    def set_timesteps(self, num_inference_steps: int, device=None) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def initial_latents(self, batch_size, generator, device, height=None, width=None) -> torch.Tensor:
        return torch.randn((batch_size, 3, PIXELS, PIXELS), generator=generator).to(device)

    def predict(self, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, denoiser=None):
        denoiser = self.denoiser if denoiser is None else denoiser
        timesteps = torch.as_tensor(timesteps).reshape(-1).expand(latents.shape[0])
        conditional = denoiser(latents, timesteps, prompt_embeds.hidden_states).float()
        if negative_prompt_embeds is None:
            return conditional, conditional
        unconditional = denoiser(latents, timesteps, negative_prompt_embeds.hidden_states).float()
        return unconditional + guidance_scale * (conditional - unconditional), conditional

    def scheduler_step(self, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None,
                       log_prob_reduction="mean"):  # fmt: skip
        return ddim_step_with_logprob(
            self.scheduler, model_output, timestep, sample, eta=eta, prev_sample=prev_sample, generator=generator,
            log_prob_reduction=log_prob_reduction,
        )  # fmt: skip

    def predict_original_sample(self, model_output, timesteps, latents) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps).reshape(-1).expand(latents.shape[0])
        alpha_prod = self.scheduler.alphas_cumprod[timesteps.long()]
        return original_sample_and_noise(model_output, latents, alpha_prod, "epsilon")[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def prepare_for_training(self, device, weight_dtype, gradient_checkpointing) -> None:
        self._denoiser.to(device, dtype=torch.float32)

    def get_trainable_layers(self) -> list[torch.nn.Parameter]:
        return list(self._denoiser.parameters())

    def save_pretrained(self, output_dir, unet: Optional[torch.nn.Module] = None) -> None:
        torch.save((unet or self._denoiser).state_dict(), os.path.join(output_dir, "pixel_denoiser.pt"))

    def load_trained_weights(self, unet: torch.nn.Module, input_dir: str) -> None:
        unet.load_state_dict(torch.load(os.path.join(input_dir, "pixel_denoiser.pt")))


def test_the_first_names_are_aliases_of_the_family_neutral_ones():
    import dag_trl
    from dag_trl.samplers import ddim, gaussian

    assert ddim.DDIMStepOutput is gaussian.GaussianStepOutput is gaussian.StepOutput
    assert dag_trl.DDIMStepOutput is dag_trl.StepOutput is gaussian.StepOutput
    assert dag_trl.ddim_step_with_logprob is ddim.ddim_step_with_logprob

    pipeline = PixelPipeline()
    assert pipeline.unet is pipeline.denoiser
    other = PixelDenoiser()  # drawn after the pipeline's, so other weights
    latents = torch.randn(2, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(0))
    inputs = (latents, 501, pipeline.encode_prompt(["a cat", "otis"]), pipeline.encode_prompt(["", ""]), 3.0)
    assert not torch.equal(pipeline.predict(*inputs)[0], pipeline.predict(*inputs, denoiser=other)[0])
    for module in (None, other):
        new, first = pipeline.predict(*inputs, denoiser=module), pipeline.predict_noise(*inputs, unet=module)
        assert all(torch.equal(a, b) for a, b in zip(new, first, strict=True))

    # A family written against the first names (``unet``, ``predict_noise``) is complete and answers to the new ones.
    namespace = {key: value for key, value in vars(PixelPipeline).items() if key not in ("denoiser", "predict")}
    namespace["unet"] = vars(PixelPipeline)["denoiser"]

    def predict_noise(self, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, unet=None):
        return PixelPipeline.predict(
            self, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale, denoiser=unet
        )

    namespace["predict_noise"] = predict_noise
    first_names = type("FirstNamesPipeline", (GFlowNetStableDiffusionPipeline,), namespace)()
    assert first_names.denoiser is first_names.unet is first_names._denoiser
    for module in (None, other):
        new, first = first_names.predict(*inputs, denoiser=module), pipeline.predict(*inputs, denoiser=module)
        assert all(torch.equal(a, b) for a, b in zip(new, first, strict=True))


def reinforce_loss(rewards: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch-mean baseline: ``-mean((R - mean R) * log P_F)``."""
    return -((rewards - rewards.mean()) * log_prob).mean()


class ToyReinforce(Objective):
    """An objective that exists only in this test: no model of its own, no intermediate rewards."""

    name = "toy_reinforce"
    display_name = "Toy-REINFORCE"
    description = "REINFORCE with a batch-mean baseline"

    def loss(self, batch: TransitionBatch, model: Optional[torch.nn.Module]) -> tuple[torch.Tensor, dict[str, float]]:
        assert model is None and batch.state_rewards is None
        loss = reinforce_loss(batch.final_rewards, batch.log_prob_forward)
        ratio = torch.exp(batch.log_prob_forward - batch.sampled_log_prob)
        return loss, {"loss": loss.item(), "ratio": ratio.mean().item()}


def redness(images, prompts, metadata):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3)), {}


@pytest.fixture
def toy_objective(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, ToyReinforce.name, ToyReinforce)


def make_toy_trainer(tmp_path, **overrides) -> GFlowNetDiffusionTrainer:
    settings = dict(train_objective="toy_reinforce", train_max_grad_norm=1e9, train_timestep_fraction=0.5)
    settings.update(overrides)
    config = tiny_config(tmp_path, **settings)
    prompts = iter(["a cat", "a toast", "a seat", "otis"] * 1000)
    return GFlowNetDiffusionTrainer(config, redness, lambda: (next(prompts), {}), PixelPipeline())


def test_toy_objective_and_toy_family_train_with_the_objectives_gradient(tmp_path, toy_objective):
    trainer = make_toy_trainer(tmp_path)
    samples, _ = trainer.generate_samples(epoch=0)
    assert trainer.counters.vae_decodes == 8 and trainer.counters.reward_samples == 8  # final samples only
    window, kept = trainer.windows(samples, torch.Generator().manual_seed(0))[0]
    assert trainer.unet is trainer.denoiser  # the prepared denoiser under its first name
    trainer.denoiser.train()
    metrics = trainer.train_window(window, kept, beta=1.0, epoch=0)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6)  # first window: the sampling weights
    assert trainer.counters.flow_forwards == 0 and trainer.counters.vae_decodes == 8  # no state rewards decoded

    # The oracle: the same window's loss from the sampled trajectories and a fresh copy of the initial weights.
    oracle = PixelPipeline()
    oracle.set_timesteps(trainer.config.sample_num_steps)
    config = trainer.config
    kept = torch.sort(kept, dim=1, descending=True).values
    negative = oracle.encode_prompt([config.negative_prompts])
    total = 0.0
    for start in range(0, kept.shape[0], config.train_batch_size):
        rows = torch.arange(start, start + config.train_batch_size)
        for column in range(kept.shape[1]):
            steps = kept[rows, column]
            latents = window.latents[rows, steps]
            guided, _ = oracle.predict(
                latents, window.timesteps[rows, steps], oracle.encode_prompt([window.prompts[i] for i in rows]),
                negative.expand(len(rows)), config.sample_guidance_scale,
            )  # fmt: skip
            step = ddim_step_with_logprob(
                oracle.scheduler, guided, window.timesteps[rows, steps], latents,
                prev_sample=window.latents[rows, steps + 1],
            )  # fmt: skip
            total = total + reinforce_loss(window.rewards[rows], step.log_probs) / config.backward_passes_per_step
    total.backward()
    beta1 = config.train_adam_beta1
    for parameter, expected in zip(
        trainer.sd_pipeline.get_trainable_layers(), oracle.get_trainable_layers(), strict=True
    ):
        first_moment = trainer.optimizer.state[parameter]["exp_avg"] / (1 - beta1)
        torch.testing.assert_close(first_moment, expected.grad, rtol=1e-4, atol=1e-7)


def test_toy_family_checkpoints_and_resumes_through_its_own_save_format(tmp_path, toy_objective):
    trainer = make_toy_trainer(tmp_path, num_epochs=2, save_freq=1)
    trainer.train(epochs=1)
    checkpoint = os.path.join(trainer.checkpoint_dir, "checkpoint_0")
    assert sorted(name for name in os.listdir(checkpoint) if not name.startswith("random_states")) == [
        "optimizer.bin",
        "pixel_denoiser.pt",
        "trainer_state.json",
    ]
    trainer.train()
    resumed = make_toy_trainer(tmp_path, num_epochs=2, save_freq=1, resume_from=checkpoint)
    resumed.train()
    for a, b in zip(
        trainer.sd_pipeline.get_trainable_layers(), resumed.sd_pipeline.get_trainable_layers(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_objective_name_that_no_one_registered_is_refused_naming_the_accepted_values(tmp_path):
    with pytest.raises(ValueError, match=r"train_objective='toy_reinforce' is invalid: expected one of \['dag_db'"):
        tiny_config(tmp_path, train_objective="toy_reinforce")
