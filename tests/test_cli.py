"""The ``dag-trl train`` entry point (:mod:`dag_trl.cli`): recipes, presets, overrides, outputs, bad input; runs never
mix: ``--overwrite`` removes the earlier run's report, checkpoints and logs, a folder that a live run writes is
refused, and a resume with no epoch left says so before loading the model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import another_run_holding, files_under, run_lock_is_free
from PIL import Image

from dag_trl import cli
from dag_trl.cli import BUILTIN_MODEL, ScriptArguments, check_output_dir, format_summary, parse_arguments, run

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "reward": "jpeg_compressibility",
    "prompts": "simple_animals",
    "prompt_kwargs": {"seed": 3},
    "num_epochs": 3,
    "sample_num_steps": 4,
    "sample_batch_size": 4,
    "sample_num_batches_per_epoch": 1,
    "train_batch_size": 2,
    "train_gradient_accumulation_steps": 2,
    "mixed_precision": "no",
    "flow_block_out_channels": [8, 16],
    "flow_attention_heads": 2,
    "eval_num_images": 6,
}


def test_builtin_model_without_config_uses_the_packaged_recipe_and_flags_override_it():
    script_args, config = parse_arguments([])
    assert script_args.pretrained_model == BUILTIN_MODEL and script_args.reward == "shapes_colour_preference"
    assert config.num_epochs == 24 and config.sample_num_steps == 20 and config.mixed_precision == "no"
    _, config = parse_arguments(["--num_epochs", "3", "--train_klpf", "0.5"])
    assert config.num_epochs == 3 and config.objective_name == "dag_kl" and config.sample_num_steps == 20
    # Any other model starts from the paper's settings.
    script_args, config = parse_arguments(["--pretrained_model", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
    assert config.num_epochs == 100 and config.sample_num_steps == 50 and config.mixed_precision == "bf16"


def test_rtb_on_the_builtin_model_adds_its_own_recipe_under_the_flags():
    script_args, config = parse_arguments(["--train_objective", "rtb"])
    assert (config.train_reward_exp, config.lora_min_timestep, config.train_gradient_accumulation_steps) == (
        3.0,
        150,
        1,
    )
    assert script_args.output_dir == "runs/rtb" and config.sample_num_steps == 20  # the shapes recipe below it
    assert config.train_log_prob_reduction == "sum"  # RTB's required setting
    _, config = parse_arguments(["--train_objective", "rtb", "--lora_min_timestep", "0", "--train_reward_exp", "5"])
    assert (config.lora_min_timestep, config.train_reward_exp) == (0, 5.0)
    assert parse_arguments(["--train_klpf", "1"])[1].lora_min_timestep == 0  # other objectives: the shapes recipe only


def test_the_recipes_tracker_can_be_turned_off_from_the_command_line():
    assert parse_arguments([])[1].log_with == "tensorboard"
    assert parse_arguments(["--log_with", "none"])[1].log_with is None
    assert parse_arguments(["--log_with", "None"])[1].log_with is None


def test_a_config_file_for_the_builtin_model_goes_on_top_of_the_packaged_recipe(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"num_epochs": 5, "train_klpf": 0.5}))
    _, config = parse_arguments(["--config", str(recipe), "--seed", "3"])
    # The file's settings, the flag, and the packaged recipe's CPU sizes and precision for the rest.
    assert (config.num_epochs, config.objective_name, config.seed) == (5, "dag_kl", 3)
    assert config.sample_num_steps == 20 and config.mixed_precision == "no" and config.sample_batch_size == 16
    recipe.write_text(
        yaml.safe_dump({"num_epochs": 5, "pretrained_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    )
    _, config = parse_arguments(["--config", str(recipe)])
    assert config.num_epochs == 5 and config.sample_num_steps == 50 and config.mixed_precision == "bf16"


def test_the_former_module_re_exports_the_command():
    from dag_trl.demo import cli as former

    for name in ("ScriptArguments", "parse_arguments", "run", "main", "build_trainer", "BUILTIN_MODEL"):
        assert getattr(former, name) is getattr(cli, name), name


@pytest.mark.integration
def test_the_command_runs_end_to_end_from_yaml_with_a_cli_override(tmp_path, tiny_sd_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "pretrained_model": str(tiny_sd_path)}))
    output_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-m", "dag_trl.cli", "train", "--config", str(recipe), "--num_epochs", "2",
         "--output_dir", str(output_dir)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and len(summary["reward_history"]) == 2  # the CLI override won over the YAML's 3
    assert summary["reward"] == "jpeg_compressibility" and summary["algorithm"] == "DAG-DB"
    for name in ("before", "after"):
        assert -10 < summary[name]["reward_mean"] < 0  # minus the JPEG size in kB of 16x16 images
    assert "mean reward before" in completed.stdout and "mean reward after" in completed.stdout
    for name in ("before.png", "after.png"):
        with Image.open(output_dir / name) as image:
            image.verify()
        with Image.open(output_dir / name) as image:
            assert image.format == "PNG" and image.size == (6 * 128, 128 + 28)  # 6 tiles, one row of up to 8
    with Image.open(output_dir / "reward_curve.png") as image:
        assert image.format == "PNG"
    assert (output_dir / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert (output_dir / "model" / "flow" / "config.json").is_file()
    assert sorted(os.listdir(output_dir / "logs" / "checkpoints")) == ["checkpoint_0", "checkpoint_1"]


def test_existing_output_dir_is_not_overwritten_without_the_flag_unless_the_run_resumes(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    _, config = parse_arguments([])
    with pytest.raises(SystemExit, match="exists and is not empty: pass --overwrite"):
        check_output_dir(ScriptArguments(output_dir=str(tmp_path)), config)
    check_output_dir(ScriptArguments(output_dir=str(tmp_path), overwrite=True), config)
    check_output_dir(ScriptArguments(output_dir=str(tmp_path / "new")), config)
    _, resuming = parse_arguments(["--resume_from", "latest"])
    check_output_dir(ScriptArguments(output_dir=str(tmp_path)), resuming)


def test_unknown_names_fail_before_any_model_is_loaded(tmp_path):
    _, config = parse_arguments(["--pretrained_model", str(tmp_path / "no-model"), "--num_epochs", "1"])
    script_args = ScriptArguments(pretrained_model=str(tmp_path / "no-model"), reward="aesthetics",
                                  output_dir=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(ValueError, match="unknown reward 'aesthetics'; known rewards: .*aesthetic_score"):
        run(script_args, config)
    script_args.reward, script_args.prompts = "jpeg_compressibility", "animals"
    with pytest.raises(ValueError, match="unknown prompt set 'animals'"):
        run(script_args, config)
    script_args.prompts = "simple_animals"
    config.resume_from = "latest"
    with pytest.raises(ValueError, match=r"resume_from='latest' found no checkpoint under '.*out/logs/checkpoints'"):
        run(script_args, config)
    assert not (tmp_path / "out").exists()


def test_an_evaluation_of_one_image_is_refused_when_the_arguments_are_parsed():
    # It used to train the whole run, then fail in kernel_distance before writing the report or the model.
    with pytest.raises(ValueError) as caught:
        parse_arguments(["--eval_num_images", "1"])
    assert str(caught.value) == (
        "eval_num_images=1 is invalid: expected an integer >= 2 (the distance from the pretrained model's samples "
        "compares sets of at least 2 images)."
    )
    with pytest.raises(ValueError, match=r"^GFlowNetConfig.eval_num_samples=1 is invalid: expected an integer >= 2"):
        parse_arguments(["--eval_freq", "1", "--eval_num_samples", "1"])
    assert parse_arguments(["--eval_num_images", "2"])[0].eval_num_images == 2


def test_keyword_arguments_must_be_json_objects():
    assert ScriptArguments(reward_kwargs='{"quality": 80}').reward_kwargs == {"quality": 80}
    with pytest.raises(ValueError, match="reward_kwargs='{quality: 80}' is not valid JSON"):
        ScriptArguments(reward_kwargs="{quality: 80}")
    with pytest.raises(ValueError, match=r"prompt_kwargs=\[1\] is invalid: expected a JSON object"):
        ScriptArguments(prompt_kwargs=[1])


def test_every_keyword_arguments_flag_takes_a_json_object_on_the_command_line():
    script_args, config = parse_arguments(
        ["--pipeline_kwargs", '{"torch_dtype": "bfloat16"}', "--reward_kwargs", '{"quality": 80}',
         "--prompt_kwargs", '{"seed": 3}', "--tracker_kwargs", '{"wandb": {"entity": "me"}}',
         "--accelerator_kwargs", '{"step_scheduler_with_optimizer": false}',
         "--project_kwargs", '{"total_limit": 3}']
    )  # fmt: skip
    assert script_args.pipeline_kwargs == {"torch_dtype": "bfloat16"}
    assert (script_args.reward_kwargs, script_args.prompt_kwargs) == ({"quality": 80}, {"seed": 3})
    assert config.tracker_kwargs == {"wandb": {"entity": "me"}}
    assert config.accelerator_kwargs == {"step_scheduler_with_optimizer": False}
    assert config.project_kwargs == {"total_limit": 3}
    # The = form, and a recipe's value under a command-line one.
    assert parse_arguments(["--project_kwargs={}"])[1].project_kwargs == {}


@pytest.mark.parametrize("name", ["pipeline_kwargs", "tracker_kwargs", "project_kwargs"])
def test_a_keyword_arguments_flag_that_is_not_a_json_object_is_refused_naming_the_flag(name, capsys):
    with pytest.raises(SystemExit):
        parse_arguments([f"--{name}", "{torch_dtype: bfloat16}"])
    error = capsys.readouterr().err
    assert f"argument --{name}" in error and f"{name}='{{torch_dtype: bfloat16}}' is not valid JSON" in error
    with pytest.raises(SystemExit):
        parse_arguments([f"--{name}", "[1, 2]"])
    error = capsys.readouterr().err
    assert f"{name}='[1, 2]' is invalid: expected a JSON object" in error


def without_tensorboard(monkeypatch):
    """Make tensorboard (and tensorboardX, which accelerate also takes) look uninstalled."""
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)


def test_a_tracker_the_user_names_without_its_package_fails_before_the_model_loads(tmp_path, monkeypatch):
    without_tensorboard(monkeypatch)
    monkeypatch.setattr(cli, "build_trainer", lambda *args: pytest.fail("the model was loaded"))
    script_args, config = parse_arguments(["--output_dir", str(tmp_path / "out"), "--log_with", "tensorboard"])
    message = (
        "GFlowNetConfig.log_with='tensorboard' needs the tensorboard package, which is not installed, so the run would "
        "log nothing: `pip install 'dag_trl[tensorboard]'`, or choose another tracker (log_with=None, --log_with "
        "none: no tracker)."
    )
    with pytest.raises(ImportError) as error:
        run(script_args, config)
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_the_packaged_recipe_falls_back_to_no_tracker_with_one_warning_when_tensorboard_is_missing(
    monkeypatch, caplog
):
    assert parse_arguments([])[1].log_with == "tensorboard"
    without_tensorboard(monkeypatch)
    with caplog.at_level("WARNING", logger="dag_trl.cli"):
        _, config = parse_arguments(["--num_epochs", "3"])
    assert config.log_with is None and config.num_epochs == 3
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning == (
        "The built-in recipe logs to tensorboard, which is not installed: this run reports on the console and in "
        "--output_dir only (`pip install 'dag_trl[tensorboard]'` for tensorboard logs)."
    )


def test_summary_text_reports_before_after_and_colour_shift():
    summary = {
        "algorithm": "DAG-DB", "pretrained_model": "builtin:shapes", "epochs": 2, "reward": "r", "prompts": "p",
        "before": {"reward_mean": 0.25, "reward_std": 0.1, "colour_distribution": {"red": 0.25, "blue": 0.75},
                   "adherence_full_prompts": {"colour": 0.9}, "diversity": 2.5},
        "after": {"reward_mean": 0.75, "reward_std": 0.2, "colour_distribution": {"red": 0.5, "blue": 0.5},
                  "adherence_full_prompts": {"colour": 0.85}, "diversity": 1.25, "prior_kernel_distance": 0.0312},
    }  # fmt: skip
    text = format_summary(summary)
    assert "diversity (mean pairwise pixel distance per prompt): 2.500 -> 1.250" in text
    assert "kernel distance of the samples after vs before: 0.0312" in text
    assert "mean reward before: 0.2500" in text and "mean reward after:  0.7500" in text
    assert "red 0.25->0.50, blue 0.75->0.50" in text
    assert "prompt adherence after (full prompts): colour 0.85" in text


@pytest.mark.integration
def test_main_job_on_the_builtin_shapes_model_shortened(tmp_path, shapes_model_path):
    output_dir = tmp_path / "main-job"
    script_args, config = parse_arguments(
        ["--output_dir", str(output_dir), "--num_epochs", "2", "--sample_num_steps", "6", "--eval_num_images", "8",
         "--log_with", "tensorboard", "--eval_memory_starts", "6", "--eval_memory_continuations", "2"]
    )  # fmt: skip
    summary = run(script_args, config)
    assert script_args.pretrained_model == BUILTIN_MODEL and len(summary["reward_history"]) == 2
    assert summary["before"]["memory"]["starts"] == 6 and -1 < summary["after"]["memory"]["memory"] <= 1
    for name in ("before", "after"):
        result = summary[name]
        assert sum(result["colour_distribution"].values()) == pytest.approx(1.0)
        with Image.open(output_dir / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (8 * 128, 128 + 28)
    assert json.loads((output_dir / "summary.json").read_text())["after"] == summary["after"]
    with Image.open(output_dir / "reward_curve.png") as image:
        assert image.format == "PNG" and image.size == (600, 400)
    assert {"pytorch_lora_weights.safetensors", "flow", "README.md"} <= set(os.listdir(output_dir / "model"))
    event_files = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files, sorted(str(p) for p in (output_dir / "logs").rglob("*"))


def test_rtb_chosen_on_the_command_line_or_in_a_config_file_gets_its_required_settings(tmp_path):
    _, config = parse_arguments(["--train_objective", "rtb", "--train_reward_exp", "3"])
    assert (config.train_log_prob_reduction, config.train_reward_exp_anneal, config.train_timestep_fraction) == (
        "sum",
        "none",
        1.0,
    )
    recipe = tmp_path / "rtb.yaml"
    recipe.write_text(yaml.safe_dump({"train_objective": "rtb", "train_reward_exp": 3.0, "num_epochs": 2}))
    _, config = parse_arguments(["--config", str(recipe)])
    assert config.objective_name == "rtb" and config.train_log_prob_reduction == "sum" and config.num_epochs == 2
    # A setting the user gives explicitly is kept, and the config refuses it with the reason.
    with pytest.raises(ValueError, match=r"train_log_prob_reduction='mean' is invalid with train_objective='rtb'"):
        parse_arguments(["--train_objective", "rtb", "--train_log_prob_reduction", "mean"])


# ------------------------------------------------------------------------------------------------------------------
# Runs never mix
# ------------------------------------------------------------------------------------------------------------------

# The tiny recipe without its epoch count (each test sets it) and with a two-image evaluation.
RUN_MIXING_RECIPE = {**{key: value for key, value in TINY_RECIPE.items() if key != "num_epochs"}, "eval_num_images": 2}


def earlier_run(output_dir, tracker_project_name: str) -> None:
    """The files a finished run of ten epochs leaves in ``output_dir``, and a file of the user's."""
    report = ["before.png", "after.png", "reward_curve.png", "summary.json", "model/pytorch_lora_weights.safetensors"]
    for name in report:
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text("earlier run")
    for epoch in range(5, 10):
        checkpoint = output_dir / "logs" / "checkpoints" / f"checkpoint_{epoch}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": epoch}))
    (output_dir / "logs" / tracker_project_name).mkdir()
    (output_dir / "logs" / tracker_project_name / "events.out.tfevents.1").write_text("earlier run")
    (output_dir / "notes.txt").write_text("mine")


def test_overwrite_removes_the_earlier_runs_report_checkpoints_and_logs_only(tmp_path, capsys):
    _, config = parse_arguments([])
    output_dir = tmp_path / "run"
    earlier_run(output_dir, config.tracker_project_name)
    check_output_dir(ScriptArguments(output_dir=str(output_dir), overwrite=True), config)
    assert files_under(output_dir) == {"notes.txt"}
    removed = [str(output_dir / name) for name in ("before.png", "after.png", "reward_curve.png", "summary.json")]
    removed += [str(output_dir / "model"), str(output_dir / "logs" / "checkpoints")]
    removed += [str(output_dir / "logs" / config.tracker_project_name)]
    assert capsys.readouterr().out == f"--overwrite: removed the earlier run's {', '.join(removed)}\n"
    assert config.logdir == "logs"  # the caller's config is unchanged


def test_a_folder_that_a_live_run_writes_is_refused_and_nothing_is_removed(tmp_path):
    _, config = parse_arguments([])
    output_dir = tmp_path / "run"
    earlier_run(output_dir, config.tracker_project_name)
    with another_run_holding(output_dir / "logs") as other:
        before = files_under(output_dir)
        for resume_from in ("", "latest"):
            config.resume_from = resume_from
            with pytest.raises(SystemExit) as caught:
                check_output_dir(ScriptArguments(output_dir=str(output_dir), overwrite=True), config)
            assert str(caught.value) == (
                f"Another run (pid {other.pid} on '{socket.gethostname()}') is writing to '{output_dir / 'logs'}': "
                "two runs in one folder prune and resume each other's checkpoints. Wait for it to end (its lock ends "
                "with its process), or use another logdir (project_dir)."
            )
        assert files_under(output_dir) == before


@pytest.mark.integration
def test_overwrite_over_a_longer_run_then_resume_latest(tmp_path, tiny_sd_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RUN_MIXING_RECIPE, "pretrained_model": str(tiny_sd_path)}))
    output_dir = tmp_path / "run"
    checkpoints = output_dir / "logs" / "checkpoints"

    def dag_trl_train(*flags):
        return run(*parse_arguments(["--config", str(recipe), "--output_dir", str(output_dir), *flags]))

    dag_trl_train("--num_epochs", "3")
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    summary = dag_trl_train("--num_epochs", "1", "--overwrite", "true")
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0"]  # the earlier run's epochs 1 and 2 are gone
    assert len(summary["reward_history"]) == 1
    assert json.loads((output_dir / "summary.json").read_text())["epochs"] == 1
    assert run_lock_is_free(output_dir / "logs" / "run.lock")  # released when training ended

    with pytest.raises(SystemExit) as caught:
        dag_trl_train("--num_epochs", "1", "--resume_from", "latest")
    assert str(caught.value) == (
        f"--resume_from latest is '{checkpoints / 'checkpoint_0'}', saved after epoch 0, and --num_epochs 1 ends "
        "there: there is no epoch left to train. Pass --num_epochs above 1 to train further."
    )
    summary = dag_trl_train("--num_epochs", "2", "--resume_from", "latest")
    assert [entry["epoch"] for entry in summary["reward_history"]] == [0, 1]
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1"]


# ------------------------------------------------------------------------------------------------------------------
# Failures at the end of a run are found before it, or lose nothing
# ------------------------------------------------------------------------------------------------------------------


def test_an_output_dir_that_cannot_be_written_fails_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    script_args, config = parse_arguments(["--output_dir", str(blocker / "run"), "--pretrained_model", "missing"])
    with pytest.raises(SystemExit, match=r"--output_dir '.*a-file/run' is not writable \(.*\): choose another"):
        run(script_args, config)


def test_an_invalid_hub_repository_id_fails_when_the_arguments_are_parsed(tmp_path):
    arguments = ["--pretrained_model", "missing", "--push_to_hub", "true", "--hub_model_id", "me/not a repo id"]
    with pytest.raises(ValueError, match=r"hub_model_id='me/not a repo id' is invalid: expected a valid Hub repo"):
        parse_arguments(arguments)
    with pytest.raises(ValueError, match=r"exp_name='two words' is invalid: expected a valid Hub repository id"):
        parse_arguments(["--pretrained_model", "missing", "--push_to_hub", "true", "--exp_name", "two words"])


@pytest.mark.integration
def test_a_failed_push_keeps_the_report_and_model_and_says_how_to_push(tmp_path, tiny_sd_path, monkeypatch):
    from dag_trl import GFlowNetDiffusionTrainer, HubPushError

    def offline_push(self, *args, **kwargs):
        raise HubPushError("Pushing to the Hub failed (no network); push the local save with `hf upload ...`.")

    monkeypatch.setattr(GFlowNetDiffusionTrainer, "push_to_hub", offline_push)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RUN_MIXING_RECIPE, "pretrained_model": str(tiny_sd_path), "num_epochs": 1}))
    output_dir = tmp_path / "run"
    arguments = ["--config", str(recipe), "--output_dir", str(output_dir), "--push_to_hub", "true"]
    with pytest.raises(SystemExit) as error:
        run(*parse_arguments(arguments))
    assert str(error.value).startswith(f"The run finished and its report and model are in {str(output_dir)!r}.")
    assert "hf upload" in str(error.value)
    for name in (
        "before.png",
        "after.png",
        "reward_curve.png",
        "summary.json",
        "model/pytorch_lora_weights.safetensors",
    ):
        assert (output_dir / name).is_file(), name


@pytest.mark.integration
def test_a_part_of_the_report_that_fails_is_named_and_the_rest_is_written(tmp_path, tiny_sd_path, monkeypatch):
    def broken_distance(*args):
        raise ValueError("kernel_distance needs at least 2 samples per set, got 1 and 1.")

    monkeypatch.setattr(cli, "kernel_distance", broken_distance)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RUN_MIXING_RECIPE, "pretrained_model": str(tiny_sd_path), "num_epochs": 1}))
    output_dir = tmp_path / "run"
    failure = "ValueError: kernel_distance needs at least 2 samples per set, got 1 and 1."
    with pytest.warns(UserWarning) as record:
        summary = run(*parse_arguments(["--config", str(recipe), "--output_dir", str(output_dir)]))
    assert f"The report leaves out after.prior_kernel_distance: it failed with {failure}" in [
        str(w.message) for w in record
    ]
    assert summary["failed_parts"] == {"after.prior_kernel_distance": failure}
    written = json.loads((output_dir / "summary.json").read_text())
    assert written["failed_parts"] == summary["failed_parts"] and "prior_kernel_distance" not in written["after"]
    assert f"left out of the report: after.prior_kernel_distance ({failure})" in format_summary(written)
    for name in ("before.png", "after.png", "reward_curve.png", "model/pytorch_lora_weights.safetensors"):
        assert (output_dir / name).is_file(), name


def test_memory_figure_of_a_sampler_whose_reward_only_its_start_decides():
    from types import SimpleNamespace

    from dag_trl.cli import memory_figure

    def images_of_starts(prompts, seed, prior=False, initial_latents=None):
        return initial_latents.expand(-1, 3, 2, 2)  # the image is the start: the later noise changes nothing

    trainer = SimpleNamespace(
        sd_pipeline=SimpleNamespace(initial_latents=lambda n, generator, device: torch.randn(n, 1, 1, 1, generator=generator)),
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        sample_images=images_of_starts,
        reward_fn=lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}),
    )  # fmt: skip
    script_args = ScriptArguments(eval_memory_starts=4, eval_memory_continuations=3)
    figure = memory_figure(trainer, ["a", "b", "a"], script_args, seed=0)
    assert figure["memory"] == pytest.approx(1.0) and (figure["starts"], figure["continuations"]) == (4, 3)
    script_args.eval_memory_starts = 3
    with pytest.raises(
        ValueError, match=r"eval_memory_starts=3 is invalid for 2 distinct evaluation prompts: .* at least 4"
    ):
        memory_figure(trainer, ["a", "b", "a"], script_args, seed=0)
    with pytest.raises(ValueError, match=r"eval_memory_continuations=1 is invalid: expected an integer >= 2"):
        ScriptArguments(eval_memory_continuations=1)
