"""Trajectories: taking rows and concatenating batches keep every field's rows together, extras included."""

import dataclasses

import pytest
import torch

from dag_trl.models.pipeline import PromptEmbeddings
from dag_trl.objectives import Trajectories

NUM_STEPS = 3


def make_trajectories(rows: int, offset: int = 0, prior: bool = False, **extras: torch.Tensor) -> Trajectories:
    """``rows`` trajectories whose every field holds its row number (plus ``offset``), so rows can be traced."""
    ids = torch.arange(offset, offset + rows, dtype=torch.float32)

    def per_row(*shape: int) -> torch.Tensor:
        return ids.reshape(-1, *[1] * len(shape)).expand(rows, *shape).clone()

    return Trajectories(
        prompts=[f"prompt {i}" for i in range(offset, offset + rows)],
        metadata=[{"row": i} for i in range(offset, offset + rows)],
        prompt_embeds=PromptEmbeddings(per_row(2, 5), pooled=per_row(4), extra={"time_ids": per_row(6)}),
        latents=per_row(NUM_STEPS + 1, 1, 2, 2),
        timesteps=per_row(NUM_STEPS).long(),
        log_probs=-per_row(NUM_STEPS),
        backward_log_probs=-2 * per_row(NUM_STEPS),
        model_outputs=3 * per_row(NUM_STEPS, 1, 2, 2),
        conditional_model_outputs=4 * per_row(NUM_STEPS, 1, 2, 2),
        rewards=ids.clone(),
        prior_log_probs=-5 * per_row(NUM_STEPS) if prior else None,
        prior_means=6 * per_row(NUM_STEPS, 1, 2, 2) if prior else None,
        prior_kls=7 * per_row(NUM_STEPS) if prior else None,
        extras=dict(extras),
    )


def assert_same(actual: Trajectories, expected: Trajectories) -> None:
    for item in dataclasses.fields(Trajectories):
        a, b = getattr(actual, item.name), getattr(expected, item.name)
        if isinstance(a, PromptEmbeddings):
            assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.pooled, b.pooled)
            assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)
        elif isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), item.name
        elif torch.is_tensor(a):
            assert torch.equal(a, b), item.name
        else:
            assert a == b, item.name


@pytest.mark.parametrize("prior", [False, True])
def test_cat_of_takes_over_a_partition_is_the_permuted_original(prior):
    samples = make_trajectories(7, prior=prior, advantages=torch.arange(7.0) * 10, per_step=torch.rand(7, NUM_STEPS))
    order = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    parts = [samples.take(order[start : start + 3]) for start in range(0, 7, 3)]  # windows of 3, 3 and 1
    assert [len(part) for part in parts] == [3, 3, 1]
    assert_same(Trajectories.cat(parts), samples.take(order))
    # ...and take(order) is the permutation itself: row i of it is original row order[i] in every field.
    permuted = samples.take(order)
    assert permuted.prompts == [f"prompt {i}" for i in order.tolist()]
    assert torch.equal(permuted.latents[:, -1, 0, 0, 0], order.float())
    assert torch.equal(permuted.prompt_embeds.extra["time_ids"][:, 0], order.float())
    assert torch.equal(permuted.extras["advantages"], order.float() * 10)
    assert torch.equal(permuted.extras["per_step"], samples.extras["per_step"][order])
    assert (permuted.prior_kls is None) == (not prior)


def test_cat_puts_batches_one_after_the_other():
    first, second = make_trajectories(2), make_trajectories(3, offset=2)
    joined = Trajectories.cat([first, second])
    assert_same(joined, make_trajectories(5))
    assert joined.num_steps == NUM_STEPS


def test_extras_added_to_a_take_do_not_reach_the_original():
    samples = make_trajectories(4)
    window = samples.take(torch.tensor([2, 0]))
    window.extras["rtb_delta"] = torch.ones(2)
    assert samples.extras == {}


def test_cat_refuses_batches_that_recorded_different_fields():
    with pytest.raises(
        ValueError, match=r"^Trajectories.cat: prior_log_probs is recorded in 1 of 2 batches; expected"
    ):
        Trajectories.cat([make_trajectories(2, prior=True), make_trajectories(2)])
    with pytest.raises(
        ValueError,
        match=r"^Trajectories.cat: batches have different extras, \['advantages'\] and \[\]; expected the same",
    ):
        Trajectories.cat([make_trajectories(2, advantages=torch.zeros(2)), make_trajectories(2)])
    with pytest.raises(ValueError, match="needs at least one batch"):
        Trajectories.cat([])


def test_a_field_with_another_number_of_rows_is_refused_by_name():
    samples = make_trajectories(3)
    with pytest.raises(ValueError, match=r"^Trajectories.rewards has 2 rows for 3 prompts: expected one per prompt.$"):
        dataclasses.replace(samples, rewards=torch.zeros(2))
    with pytest.raises(ValueError, match=r"^Trajectories.extras\['advantages'\] has 4 rows for 3 prompts"):
        dataclasses.replace(samples, extras={"advantages": torch.zeros(4)})
