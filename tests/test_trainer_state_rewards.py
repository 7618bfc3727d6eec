"""StateRewardCache on hand-made trajectories: which states it scores, from which model outputs, and how often it
calls the model and the scorer."""

import pytest
import torch

from dag_trl.models.pipeline import PromptEmbeddings
from dag_trl.objectives import Trajectories
from dag_trl.trainer.state_rewards import StateRewardCache

NUM_STEPS = 3


def make_window(rows: int) -> Trajectories:
    """Trajectories whose state ``(i, n)`` has latents ``10 i + n`` and whose recorded conditional output there is
    ``-(10 i + n)``, so a reward shows which output it came from."""
    states = torch.tensor([[10.0 * i + n for n in range(NUM_STEPS + 1)] for i in range(rows)])
    latents = states.reshape(rows, NUM_STEPS + 1, 1, 1, 1)
    return Trajectories(
        prompts=[f"prompt {i}" for i in range(rows)],
        metadata=[{} for _ in range(rows)],
        prompt_embeds=PromptEmbeddings(torch.zeros(rows, 2, 4)),
        latents=latents,
        timesteps=torch.tensor([[30, 20, 10]] * rows),
        log_probs=torch.zeros(rows, NUM_STEPS),
        backward_log_probs=torch.zeros(rows, NUM_STEPS),
        model_outputs=torch.zeros(rows, NUM_STEPS, 1, 1, 1),
        conditional_model_outputs=-latents[:, :NUM_STEPS].clone(),
        rewards=torch.zeros(rows),
    )


class Recorder:
    """The cache's callables: the model's conditional output is ``+latents`` (the recorded one is ``-latents``),
    ``x0_hat = output + timestep / 1000`` and the reward is ``x0_hat`` itself; every call's size is kept."""

    def __init__(self):
        self.forward_rows: list[int] = []
        self.scored_rows: list[int] = []

    def conditional_output(self, latents, timesteps, prompt_embeds):
        assert len(prompt_embeds) == len(latents)
        self.forward_rows.append(len(latents))
        return latents.clone()

    @staticmethod
    def predict_x0(outputs, timesteps, latents):
        return outputs + timesteps.reshape(-1, 1, 1, 1) / 1000

    def score(self, predictions, prompts, metadata):
        assert len(prompts) == len(metadata) == len(predictions)
        self.scored_rows.append(len(predictions))
        return predictions.reshape(-1)


def make_cache(window, batch_size=2, decode_batch_size=2):
    recorder = Recorder()
    cache = StateRewardCache(
        window, recorder.conditional_output, recorder.predict_x0, recorder.score, batch_size, decode_batch_size
    )
    return cache, recorder


def test_with_unchanged_weights_every_needed_state_comes_from_the_recorded_outputs():
    cache, recorder = make_cache(make_window(2), decode_batch_size=3)
    cache.prefill(torch.tensor([[0], [2]]), weights_unchanged=True)
    # kept (0, 0) and (1, 2), and the state (0, 1) that the first one reaches; (1, 3) is the final sample.
    assert sorted(cache.rewards) == [(0, 0), (0, 1), (1, 2)]
    assert float(cache[(0, 1)]) == pytest.approx(-1 + 0.020)  # the recorded output -(10 * 0 + 1) at timestep 20
    assert float(cache[(1, 2)]) == pytest.approx(-12 + 0.010)
    assert recorder.forward_rows == [] and recorder.scored_rows == [3]


def test_with_changed_weights_only_states_reached_and_never_left_get_a_forward_of_their_own():
    cache, recorder = make_cache(make_window(3), batch_size=2, decode_batch_size=1)
    cache.prefill(torch.tensor([[0], [1], [0]]), weights_unchanged=False)
    # The kept states are scored later from their transitions' forwards; the three reached states now.
    assert sorted(cache.rewards) == [(0, 1), (1, 2), (2, 1)]
    assert float(cache[(1, 2)]) == pytest.approx(12 + 0.010)  # the current model's output, +latents
    assert recorder.forward_rows == [2, 1] and recorder.scored_rows == [1, 1, 1]


def test_outputs_of_the_loss_forward_score_only_states_not_yet_known():
    window = make_window(2)
    cache, recorder = make_cache(window)
    cache.rewards[(0, 1)] = torch.tensor(99.0)
    states = [(0, 1), (1, 1)]
    latents = window.latents[[0, 1], [1, 1]]
    cache.add_from_outputs(states, latents, torch.tensor([20, 20]), 2 * latents)
    assert float(cache[(0, 1)]) == pytest.approx(99.0) and float(cache[(1, 1)]) == pytest.approx(22 + 0.020)
    cache.add_missing([(1, 1), (1, 2)])  # (1, 1) is known: one forward of one row
    assert recorder.forward_rows == [1] and float(cache[(1, 2)]) == pytest.approx(12 + 0.010)
