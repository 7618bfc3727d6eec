"""dag_trl.registry: names to factories, with errors that list what is accepted; the library's registries hold no
demo entries and importing them does not import the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dag_trl.registry import Registry


class Greeting:
    def __init__(self, who: str, punctuation: str = "!") -> None:
        self.text = f"hello {who}{punctuation}"


def test_register_get_and_names():
    registry = Registry("greeting")
    assert registry.register("hello", Greeting) is Greeting

    @registry.register("bye")
    def bye(who: str = "all") -> str:
        return f"bye {who}"

    assert bye(who="you") == "bye you"  # the decorator returns the function itself
    assert registry.names() == ["bye", "hello"]
    assert registry.factory("hello") is Greeting
    assert registry.get("hello", who="you", punctuation="?").text == "hello you?"
    assert registry.get("bye") == "bye all"


def test_unknown_names_and_bad_arguments_say_what_is_accepted():
    registry = Registry("greeting")
    registry.register("hello", Greeting)
    registry.register("hi", Greeting)
    with pytest.raises(ValueError, match="^unknown greeting 'hey'; known greetings: hello, hi$"):
        registry.get("hey")
    with pytest.raises(
        TypeError,
        match=r"^cannot build greeting 'hello': got an unexpected keyword argument 'whom'; "
        r"accepted keyword arguments: who, punctuation$",
    ):
        registry.get("hello", who="you", whom="me")
    with pytest.raises(TypeError, match="^cannot build greeting 'hi': missing a required argument: 'who'"):
        registry.get("hi")


def test_a_taken_name_cannot_be_registered_to_another_factory():
    registry = Registry("greeting")
    registry.register("hello", Greeting)
    registry.register("hello", Greeting)  # the same factory again, as when a module is imported twice
    with pytest.raises(ValueError, match="greeting 'hello' is already registered to <class"):
        registry.register("hello", lambda who: who)
    with pytest.raises(TypeError, match="the factory of greeting 'hi' must be callable; got 'Greeting'"):
        registry.register("hi", "Greeting")
    with pytest.raises(ValueError, match="a greeting name must be a non-empty string; got ''"):
        registry.register("", Greeting)
    assert registry.names() == ["hello"]


def test_resolve_builds_names_and_passes_built_objects_through():
    registry = Registry("greeting")
    registry.register("hello", Greeting)
    assert registry.resolve("hello", who="me").text == "hello me!"
    built = Greeting("you")
    assert registry.resolve(built.__init__) == built.__init__
    with pytest.raises(
        ValueError, match=r"keyword arguments \['who'\] cannot be applied to an already built greeting"
    ):
        registry.resolve(print, who="me")
    with pytest.raises(ValueError, match="expected a greeting name or a built greeting; got 3"):
        registry.resolve(3)


@pytest.mark.integration
def test_library_registries_do_not_import_the_demo():
    """The demo registers its own reward and prompt set; a fresh interpreter that imports only the library sees
    neither and has not imported dag_trl.demo."""
    code = (
        "import json, sys\n"
        "from dag_trl.prompts import PROMPTS\n"
        "from dag_trl.rewards import REWARDS\n"
        "demo = sorted(m for m in sys.modules if m.startswith('dag_trl.demo'))\n"
        "print(json.dumps({'demo': demo, 'rewards': REWARDS.names(), 'prompts': PROMPTS.names()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["demo"] == []
    assert loaded["rewards"] == [
        "aesthetic_score", "clip_score", "hpsv2", "imagereward", "jpeg_compressibility", "jpeg_incompressibility",
        "pickscore", "remote_reward", "weighted_sum",
    ]  # fmt: skip
    assert loaded["prompts"] == [
        "drawbench", "from_dataset", "from_file", "hpd", "imagenet_all", "imagenet_animals", "imagenet_dogs",
        "simple_animals",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# Objectives and model families: plain dicts (OBJECTIVES, PIPELINE_FAMILIES) with a public register each
# ------------------------------------------------------------------------------------------------------------------


def test_register_objective_makes_a_config_accept_its_name_and_refuses_a_taken_or_missing_name():
    from dag_trl import GFlowNetConfig, register_objective
    from dag_trl.objectives import OBJECTIVES, DAGDetailedBalance, Objective

    with pytest.raises(ValueError, match=r"GFlowNetConfig.train_objective='plain' is invalid: expected one of \["):
        GFlowNetConfig(train_objective="plain")

    @register_objective
    class Plain(Objective):
        name = "plain"
        display_name = "Plain"
        description = "an objective of this test"

        def loss(self, batch, model):
            raise NotImplementedError

    try:
        assert OBJECTIVES["plain"] is Plain
        assert GFlowNetConfig(train_objective="plain").objective_name == "plain"
        assert register_objective(Plain) is Plain  # the same class again: allowed

        class Impostor(Plain):
            name = "dag_db"

        with pytest.raises(
            ValueError, match="objective 'dag_db' is already registered to <class .*DAGDetailedBalance"
        ):
            register_objective(Impostor)
        assert OBJECTIVES["dag_db"] is DAGDetailedBalance

        class Nameless(Objective):
            def loss(self, batch, model):
                raise NotImplementedError

        with pytest.raises(ValueError, match="objective class Nameless needs a non-empty string class attribute name"):
            register_objective(Nameless)
        with pytest.raises(TypeError, match="register_objective expects a subclass of Objective; got <class 'dict'>"):
            register_objective(dict)
    finally:
        del OBJECTIVES["plain"]


def test_register_pipeline_family_is_what_model_index_json_picks(tmp_path):
    from dag_trl import DefaultGFlowNetStableDiffusionPipeline, register_pipeline_family
    from dag_trl.models import PIPELINE_FAMILIES, pipeline_family

    class MyFamily(DefaultGFlowNetStableDiffusionPipeline):
        diffusers_pipeline_class = "MyDiffusionPipeline"

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MyDiffusionPipeline"}))
    with pytest.raises(ValueError, match="names the pipeline 'MyDiffusionPipeline', which has no model family here"):
        pipeline_family(str(tmp_path))
    assert register_pipeline_family(MyFamily) is MyFamily
    try:
        assert pipeline_family(str(tmp_path)) is MyFamily

        class Variant(DefaultGFlowNetStableDiffusionPipeline):
            pass  # inherits diffusers_pipeline_class = "StableDiffusionPipeline", a built-in's name

        with pytest.raises(ValueError, match="pipeline family 'StableDiffusionPipeline' is already registered"):
            register_pipeline_family(Variant)
        assert register_pipeline_family(Variant, "VariantPipeline") is PIPELINE_FAMILIES["VariantPipeline"]
        with pytest.raises(TypeError, match="expects a subclass of DiffusersGFlowNetPipeline; got <class 'str'>"):
            register_pipeline_family(str)
    finally:
        PIPELINE_FAMILIES.pop("MyDiffusionPipeline")
        PIPELINE_FAMILIES.pop("VariantPipeline", None)
