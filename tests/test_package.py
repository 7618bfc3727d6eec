"""The package's layering: what importing one part loads, the lazy top-level names, and no import cycle."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dag_trl

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "dag_trl"


def loaded_dag_trl_modules(code: str) -> list[str]:
    """The ``dag_trl`` modules a fresh interpreter has loaded after running ``code`` (this checkout's package)."""
    script = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m == 'dag_trl' or m.startswith('dag_trl.')))"
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPOSITORY, env=environment
    )
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_importing_the_config_loads_the_config_alone():
    assert loaded_dag_trl_modules("import dag_trl.config") == ["dag_trl", "dag_trl.config"]


def test_building_a_config_loads_the_objectives_but_neither_the_trainer_nor_the_rewards():
    # Validation looks the objective up (and the objectives import the models and samplers they use).
    loaded = loaded_dag_trl_modules(
        "import dag_trl.config; dag_trl.config.GFlowNetConfig(train_objective='dag_kl', train_klpf=1.0)"
    )
    assert "dag_trl.objectives.dag_kl" in loaded
    assert not [m for m in loaded if m.split(".")[1:2] in (["trainer"], ["rewards"], ["io"], ["demo"], ["testing"])]


def test_the_lazy_name_table_all_and_the_type_checking_imports_list_the_same_names():
    # Each name resolves to its module's object on first use (from dag_trl import GFlowNetDiffusionTrainer works).
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    type_checking = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imported = {
        alias.name: node.module
        for node in type_checking.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == dag_trl._PUBLIC_NAMES
    assert sorted(dag_trl.__all__) == sorted(dag_trl._PUBLIC_NAMES)
    for name, module in dag_trl._PUBLIC_NAMES.items():
        assert getattr(dag_trl, name) is getattr(importlib.import_module(f"dag_trl.{module}"), name), name


def test_unknown_attributes_raise_attribute_error_and_subpackages_import_on_access():
    with pytest.raises(AttributeError, match="module 'dag_trl' has no attribute 'not_a_name'"):
        dag_trl.not_a_name  # noqa: B018
    assert dag_trl.samplers is importlib.import_module("dag_trl.samplers")


def test_the_objectives_former_module_paths_are_the_same_modules():
    import dag_trl.trainer.objectives.losses

    import dag_trl.objectives
    import dag_trl.objectives.losses
    import dag_trl.trainer.objectives

    assert dag_trl.trainer.objectives.losses is dag_trl.objectives.losses
    assert dag_trl.trainer.objectives.OBJECTIVES is dag_trl.objectives.OBJECTIVES


# ------------------------------------------------------------------------------------------------------------------
# No import cycle
# ------------------------------------------------------------------------------------------------------------------


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions (what runs at some point).

    Imports under ``if TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs the packages
    ``a`` and ``a.b``, except those that contain the importing module (they are already being imported).
    """
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                node.body = []
        package = module.split(".") if is_package else module.split(".")[:-1]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)  # submodules imported by name
        edges = set()
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                name = ".".join(parts[:end])
                if name in modules and name != module and not module.startswith(name + "."):
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` as a list of modules (first repeated at the end), or ``[]``."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return path[path.index(successor) :] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_import_graph_sees_imports_inside_functions_and_package_inits():
    graph = import_graph()
    assert "dag_trl.objectives" in graph["dag_trl.config"]  # inside GFlowNetConfig._validate_objective
    assert "dag_trl.trainer" in graph["dag_trl.cli"]  # importing dag_trl.trainer.x runs dag_trl.trainer
    assert "dag_trl.config" not in graph["dag_trl.objectives.base"]  # under TYPE_CHECKING only


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) == []


def test_no_module_outside_the_demo_imports_it_and_only_the_preset_table_names_it():
    # The command line finds the demo's preset through dag_trl.presets.PRESET_MODULES, imported by name at run time.
    graph = import_graph()
    importers = {
        module: sorted(t for t in targets if t.startswith("dag_trl.demo")) for module, targets in graph.items()
    }
    assert {m: t for m, t in importers.items() if t and not m.startswith("dag_trl.demo")} == {}
    naming = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "demo" not in path.relative_to(PACKAGE).parts
        and any(text.startswith("dag_trl.demo") for text in code_strings(path))
    }
    assert naming == {"presets.py"}
    from dag_trl.presets import PRESET_MODULES

    assert PRESET_MODULES == ("dag_trl.demo.shapes.preset",)


# ------------------------------------------------------------------------------------------------------------------
# Layers below the objectives name none
# ------------------------------------------------------------------------------------------------------------------


def code_strings(path: Path) -> set[str]:
    """The string constants of a module's code (f-string parts included), its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_code_strings_leave_docstrings_out():
    module = REPOSITORY / "tests" / "test_package.py"
    strings = code_strings(module)
    assert "dag_trl.config" in strings  # a constant in the code above
    assert code_strings.__doc__ not in strings


def test_the_config_trainer_models_and_samplers_name_no_objective():
    # What they need from an objective is a declared attribute of its class, read through the registry.
    from dag_trl.objectives import OBJECTIVES

    paths = [PACKAGE / "config.py"]
    for folder in ("trainer", "models", "samplers"):
        paths += sorted((PACKAGE / folder).rglob("*.py"))
    named = {str(path.relative_to(PACKAGE)): sorted(set(OBJECTIVES) & code_strings(path)) for path in paths}
    assert {path: names for path, names in named.items() if names} == {}
