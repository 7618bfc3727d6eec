"""The package as users install it: every third-party module the library imports is a declared dependency, the version
has one source, and a built wheel (not the editable checkout) carries what ``dag-trl train`` needs: the shapes model,
its recipes and its base-sample table."""

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import dag_trl

REPO = Path(__file__).resolve().parents[1]
# Left out of the copy the wheel is built from: build outputs (a stale build/ folder would put deleted files into the
# wheel) and local state.
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "runs",
               "logs", "wandb")  # fmt: skip


def declared_requirements() -> dict[str, set[str]]:
    """The distribution names of ``install_requires`` and of each extra in ``setup.cfg``, normalised (PEP 503)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")

    def names(lines: str) -> set[str]:
        found = set()
        for line in re.split(r"[\n;]", lines):
            line = line.split("#")[0].strip()
            if line:
                found.add(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", line).group(0)).lower())
        return found

    requirements = {"install_requires": names(setup["options"]["install_requires"])}
    for extra, lines in setup["options.extras_require"].items():
        requirements[extra] = names(lines)
    return requirements


def imported_top_level_modules() -> set[str]:
    """The top-level names of every ``import`` in ``dag_trl/`` (absolute imports only)."""
    modules = set()
    for path in (REPO / "dag_trl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_third_party_module_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared = set().union(*declared_requirements().values())
    undeclared = {}
    for module in sorted(imported_top_level_modules() - set(sys.stdlib_module_names) - {"dag_trl", "__future__"}):
        if module not in distributions:
            # Not installed here: an optional dependency imported where it is used (e.g. bitsandbytes) must still be
            # named somewhere in setup.cfg or the error that asks for it.
            continue
        names = {re.sub(r"[-_.]+", "-", name).lower() for name in distributions[module]}
        if not names & declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not declared in setup.cfg: {undeclared}"
    assert "pyyaml" in declared_requirements()["install_requires"]  # the CLI reads recipes with it


def test_the_version_is_written_once_and_setup_cfg_reads_it():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: dag_trl.__version__"
    assignment = re.compile(r"^__version__\s*=", re.MULTILINE)
    written = [path for path in (REPO / "dag_trl").rglob("*.py") if assignment.search(path.read_text())]
    assert written == [REPO / "dag_trl" / "__init__.py"]
    for name in ("setup.cfg", "pyproject.toml"):
        assert dag_trl.__version__ not in (REPO / name).read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", dag_trl.__version__)


def test_license_typing_marker_changelog_and_contributing_guide_exist():
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Copyright 2026 The dag_trl authors" in (REPO / "LICENSE").read_text()
    assert (REPO / "dag_trl" / "py.typed").is_file()
    assert "## [Unreleased]" in (REPO / "CHANGELOG.md").read_text()
    assert 'pytest -q -m "not integration and not distributed"' in (REPO / "CONTRIBUTING.md").read_text()


def run_checked(arguments: list, **options) -> subprocess.CompletedProcess:
    """``subprocess.run`` with text output; a non-zero exit fails the test with the end of its output."""
    result = subprocess.run([str(argument) for argument in arguments], capture_output=True, text=True, **options)
    assert result.returncode == 0, (
        f"{arguments[:4]} exited with {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result


def fresh_environment_on_these_packages(folder: Path) -> Path:
    """A new virtual environment in ``folder`` whose interpreter also sees this interpreter's installed packages (a
    ``.pth`` line per site-packages folder, which Python adds to ``sys.path`` without running the ``.pth`` files found
    there, so the editable install of this checkout stays invisible). Dependencies need no download; the package
    itself must come from the wheel. It has no pip or setuptools of its own (ensurepip's older setuptools would
    shadow the one torch requires): ``python -m pip`` runs this interpreter's pip, installing into the new
    environment. Returns the ``bin`` folder."""
    venv.EnvBuilder(with_pip=False).create(folder)
    bin_folder = folder / ("Scripts" if os.name == "nt" else "bin")
    python = bin_folder / "python"
    purelib = run_checked([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_dag_trl_test_base_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    return bin_folder


@pytest.mark.integration
def test_the_built_wheel_installed_in_a_fresh_environment_runs_the_main_job(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run_checked(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
        env=environment,
    )
    (wheel,) = (tmp_path / "dist").glob("dag_trl-*.whl")
    assert wheel.name.startswith(f"dag_trl-{dag_trl.__version__}-")
    bin_folder = fresh_environment_on_these_packages(tmp_path / "venv")
    run_checked([bin_folder / "python", "-m", "pip", "install", wheel], env=environment)

    # From a folder outside the checkout, the package is the wheel's copy, with the version it was built with.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = run_checked(
        [bin_folder / "python", "-c",
         "import dag_trl, importlib.metadata as m; print(dag_trl.__file__); print(m.version('dag_trl'))"],
        cwd=elsewhere, env=environment,
    )  # fmt: skip
    location, version = probe.stdout.split()
    assert Path(location).is_relative_to(tmp_path / "venv") and version == dag_trl.__version__

    # One short epoch of the packaged recipe. The shapes model cannot be rebuilt (its cache folder is under a file),
    # so a wheel without the shipped model fails; without the recipes the arguments do not parse; without the
    # base-sample table the summary has no tilted target.
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    output = elsewhere / "run"
    run_checked(
        [bin_folder / "dag-trl", "train", "--output_dir", output, "--cache_dir", not_a_folder / "cache",
         "--num_epochs", "1", "--train_reward_exp_anneal", "none", "--sample_batch_size", "4",
         "--sample_num_batches_per_epoch", "1", "--train_batch_size", "4", "--train_gradient_accumulation_steps", "1",
         "--eval_num_images", "4"],
        cwd=elsewhere, env={**environment, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    summary = json.loads((output / "summary.json").read_text())
    assert summary["pretrained_model"] == "builtin:shapes" and summary["epochs"] == 1
    assert len(summary["reward_history"]) == 1 and summary["target"]["base_samples"] == 4096
    assert {"pytorch_lora_weights.safetensors", "flow"} <= set(os.listdir(output / "model"))
