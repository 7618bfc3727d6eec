"""Trackers: wandb (offline), TensorBoard and trackio files hold the expected scalars and the sample grid; grid
layout; run names."""

from __future__ import annotations

import glob
import json
import os
import struct
import types

import pytest
import torch
from conftest import make_resumable_trainer

from dag_trl.io.tracking import (
    grid_caption,
    log_image_samples,
    tracker_config,
    tracker_image_grid,
    tracker_init_kwargs,
)

pytestmark = pytest.mark.integration


STEP_SCALARS = {
    "loss_total", "loss_db", "loss_kl", "regulariser", "log_prob_forward", "log_prob_backward", "flow",
    "intermediate_reward", "ratio", "grad_norm_unet", "grad_norm_flow", "beta", "epoch",
}  # fmt: skip
EPOCH_SCALARS = {"reward_mean", "reward_std"}
COUNTERS = {
    "counters/unet_forward_grad", "counters/unet_forward_no_grad", "counters/vae_decodes", "counters/reward_calls",
    "counters/reward_samples", "counters/flow_forwards",
}  # fmt: skip
# 4 tiles of 16 x 16 in a 2 x 2 grid with 2 pixels of padding between and around them.
GRID_SIDE = 2 * (16 + 2) + 2


def read_wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline ``run-<id>.wandb`` file: LevelDB-log framing (32 KiB blocks of records with
    a 7-byte header: crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    with open(run_file, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    position, pending, rows = 7, b"", []  # 7 bytes: magic, version
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})  # fmt: skip
    return rows


def test_tensorboard_writes_scalars_and_the_sample_grid(tmp_path, tiny_sd_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_resumable_trainer(tmp_path, tiny_sd_path, num_epochs=1, save_freq=100, log_with="tensorboard")
    trainer.train()
    trainer.accelerator.end_training()

    events = EventAccumulator(str(tmp_path / "logs" / "dag_trl"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert STEP_SCALARS | EPOCH_SCALARS | COUNTERS <= scalars
    [reward_mean] = events.Scalars("reward_mean")
    assert reward_mean.step == 0
    assert reward_mean.value == pytest.approx(trainer.reward_history[0]["reward_mean"])
    assert [event.step for event in events.Scalars("loss_total")] == [0]  # one optimiser step
    [grid] = events.Images("samples")
    assert (grid.step, grid.height, grid.width) == (0, GRID_SIDE, GRID_SIDE)
    [caption] = events.Tensors("samples/prompts/text_summary")
    assert caption.tensor_proto.string_val[0].decode().startswith("0: ")


def test_evaluation_images_before_and_during_training_reach_tensorboard(tmp_path, tiny_sd_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_resumable_trainer(
        tmp_path, tiny_sd_path, num_epochs=2, save_freq=100, log_with="tensorboard", eval_freq=1, eval_num_samples=4
    )
    trainer.train()
    trainer.accelerator.end_training()

    events = EventAccumulator(str(tmp_path / "logs" / "dag_trl"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    grids = events.Images("eval/samples")
    # Before training, then after each epoch (one optimiser step each), as the evaluation history says.
    assert [grid.step for grid in grids] == [0, 1, 2] and len(trainer.evaluation_history) == 3
    # The last grid is the current weights' samples for the fixed prompts and noise, pixel for pixel (PNG).
    prompts, _ = trainer.evaluation_prompts()
    expected = tracker_image_grid(trainer.sample_images(prompts, trainer.config.eval_seed))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string))), expected)
    [*_, caption] = events.Tensors("eval/samples/prompts/text_summary")
    assert caption.tensor_proto.string_val[0].decode().startswith(f"0: {prompts[0]} (reward ")


def test_wandb_offline_writes_scalars_and_the_sample_grid(tmp_path, tiny_sd_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_resumable_trainer(
        tmp_path,
        tiny_sd_path,
        num_epochs=1,
        save_freq=100,
        log_with="wandb",
        run_name="colour-run",
        tracker_kwargs={"wandb": {"dir": str(tmp_path / "wandb")}},
    )
    assert trainer.accelerator.get_tracker("wandb", unwrap=True).name == "colour-run"
    trainer.train()
    trainer.accelerator.end_training()
    wandb.teardown()  # the offline run file is written by wandb's service process: wait for it to flush

    [run_file] = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = read_wandb_history(run_file)
    logged = set().union(*rows)
    assert STEP_SCALARS | EPOCH_SCALARS | COUNTERS <= logged
    first = next(row for row in rows if "reward_mean" in row)
    assert first["_step"] == 0
    assert first["reward_mean"] == pytest.approx(trainer.reward_history[0]["reward_mean"])
    assert first["samples/_type"] == "image-file"
    assert (first["samples/width"], first["samples/height"]) == (GRID_SIDE, GRID_SIDE)
    assert first["samples/caption"].startswith("0: ")
    run_folder = os.path.dirname(run_file)
    assert os.path.isfile(os.path.join(run_folder, "files", first["samples/path"]))


def test_tracker_image_grid_places_tiles_row_major_with_padding():
    images = torch.stack([torch.full((3, 4, 6), (i + 1) / 10) for i in range(5)])
    grid = tracker_image_grid(images, padding=1)
    # 5 tiles: 3 columns, 2 rows, each tile 4 x 6 with 1 pixel of padding around.
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype.name == "uint8"
    for index in range(5):
        top, left = 1 + (index // 3) * 5, 1 + (index % 3) * 7
        assert (grid[top : top + 4, left : left + 6] == round((index + 1) / 10 * 255)).all()
    assert (grid[0] == 0).all() and (grid[:, 0] == 0).all()
    assert (grid[6:10, 15:21] == 0).all()  # the sixth cell is empty
    assert tracker_image_grid(torch.rand(20, 3, 2, 2), padding=0).shape == (8, 8, 3)  # at most 16 tiles: 4 x 4


def test_runs_are_named_in_wandb_and_trackio_unless_the_tracker_kwargs_name_them():
    user_kwargs = {"wandb": {"entity": "me", "name": "mine"}, "tensorboard": {"flush_secs": 5}}
    assert tracker_init_kwargs(user_kwargs, "run-1") == {
        "wandb": {"entity": "me", "name": "mine"},
        "tensorboard": {"flush_secs": 5},
        "trackio": {"name": "run-1"},
    }
    assert user_kwargs["wandb"] == {"entity": "me", "name": "mine"} and "trackio" not in user_kwargs
    assert tracker_init_kwargs({}, "run-2") == {"wandb": {"name": "run-2"}, "trackio": {"name": "run-2"}}


def test_grid_caption_and_tracker_config():
    assert (
        grid_caption(["a cat", "a dog"], torch.tensor([0.5, -1.25]))
        == "0: a cat (reward 0.5)\n1: a dog (reward -1.25)"
    )
    assert tracker_config({"a": [1, 2], "b": None, "c": {"k": 1}, "d": 1.5, "e": True, "f": "x"}) == {
        "a": "[1, 2]", "b": "None", "c": '{"k": 1}', "d": 1.5, "e": True, "f": "x",
    }  # fmt: skip


def test_trackio_writes_scalars_and_the_captioned_sample_grid(tmp_path, tiny_sd_path):
    import sqlite3
    from pathlib import Path

    from PIL import Image

    store = Path(os.environ["TRACKIO_DIR"])  # trackio's local store (SQLite + media files), set in conftest
    project = f"dag-test-{tmp_path.name}"  # one database per test run, should the store be shared
    trainer = make_resumable_trainer(
        tmp_path, tiny_sd_path, num_epochs=1, save_freq=100, log_with="trackio", run_name="colour-run",
        tracker_project_name=project,
    )  # fmt: skip
    trainer.train()
    trainer.accelerator.end_training()

    with sqlite3.connect(store / f"{project}.db") as database:
        rows = [(run, step, json.loads(metrics))
                for run, step, metrics in database.execute("select run_name, step, metrics from metrics")]  # fmt: skip
    assert {run for run, _, _ in rows} == {"colour-run"}
    logged = set().union(*(metrics for _, _, metrics in rows))
    assert STEP_SCALARS | EPOCH_SCALARS | COUNTERS <= logged
    first = next(metrics for _, step, metrics in rows if "reward_mean" in metrics)
    assert first["reward_mean"] == pytest.approx(trainer.reward_history[0]["reward_mean"])
    [(step, samples)] = [(step, metrics["samples"]) for _, step, metrics in rows if "samples" in metrics]
    assert step == 0 and samples["_type"] == "trackio.image"
    assert samples["caption"].startswith("0: ") and samples["caption"].count("\n") == 3  # one line per tile
    with Image.open(store / "media" / samples["file_path"]) as grid:
        assert grid.size == (GRID_SIDE, GRID_SIDE)


def test_trackers_without_image_support_get_no_sample_grid():
    data = [[torch.rand(2, 3, 16, 16), ["a cat", "a dog"], [{}, {}], torch.tensor([1.0, 2.0]), {}]]
    other = types.SimpleNamespace(name="mlflow", log=lambda *args, **kwargs: pytest.fail("nothing to log"))
    log_image_samples(data, 5, other)
    log_image_samples(data, 5, None)
