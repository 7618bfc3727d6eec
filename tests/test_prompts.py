"""Tests of dag_trl.prompts: draws stay in their sets, are reproducible under a seed, and load from local files."""

from __future__ import annotations

import json
import random

import datasets
import pytest

from dag_trl import prompts as P


def draws(prompt_fn, n: int = 300) -> list[tuple[str, dict]]:
    return [prompt_fn() for _ in range(n)]


def test_simple_animals_and_imagenet_slices_come_from_the_shipped_lists():
    animals = P.load_asset_lines("simple_animals.txt")
    classes = P.load_asset_lines("imagenet_classes.txt")
    assert len(animals) == 45 and len(set(animals)) == 45 and "cat" in animals
    # The standard ImageNet-1k order: the slice bounds DDPO uses depend on it.
    assert len(classes) == 1000
    assert classes[0] == "tench, Tinca tinca" and classes[999].startswith("toilet tissue")
    assert (
        classes[151] == "Chihuahua" and classes[268] == "Mexican hairless" and classes[269].startswith("timber wolf")
    )
    assert classes[397].startswith("puffer") and classes[398] == "abacus"

    assert {p for p, _ in draws(P.simple_animals(seed=0))} <= set(animals)
    for name, low, high in [("imagenet_all", 0, 1000), ("imagenet_animals", 0, 398), ("imagenet_dogs", 151, 269)]:
        prompt_fn = P.get_prompt_fn(name, seed=1)
        assert len(prompt_fn) == high - low
        for prompt, metadata in draws(prompt_fn):
            assert low <= metadata["class_index"] < high and classes[metadata["class_index"]] == prompt


def test_draws_are_reproducible_under_a_seed_and_independent_of_global_random():
    random.seed(123)
    first = draws(P.imagenet_dogs(seed=7), 50)
    random.seed(456)
    second = draws(P.imagenet_dogs(seed=7), 50)
    assert first == second
    assert first != draws(P.imagenet_dogs(seed=8), 50)
    prompt_fn = P.imagenet_dogs(seed=7)
    draws(prompt_fn, 10)
    prompt_fn.reseed(7)
    assert draws(prompt_fn, 50) == first
    # Uniform draws with replacement reach all 118 breeds in 2000 draws (a miss has probability ~1e-5).
    assert len({p for p, _ in draws(P.imagenet_dogs(seed=0), 2000)}) == 118


def test_metadata_is_copied_per_draw():
    prompt_fn = P.PromptList(["a"], [{"k": 1}], seed=0)
    _, metadata = prompt_fn()
    metadata["k"] = 2
    assert prompt_fn() == ("a", {"k": 1})


def test_from_file_text_json_and_table(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.json").write_text(json.dumps(["an owl", "a fox"]))
    (tmp_path / "p.jsonl").write_text('{"text": "a cow", "id": 1}\n{"text": "a pig", "id": 2}\n')
    assert set(P.from_file(tmp_path / "p.txt", seed=0).prompts) == {"a cat", "a dog"}
    assert P.get_prompt_fn("from_file", path=str(tmp_path / "p.json")).prompts == ["an owl", "a fox"]
    table = P.from_file(tmp_path / "p.jsonl", column="text", seed=0)
    assert table.prompts == ["a cow", "a pig"]
    assert {p for p, _ in draws(table, 50)} == {"a cow", "a pig"}


def test_from_dataset_object_and_saved_folder(tmp_path):
    dataset = datasets.Dataset.from_dict({"caption": ["red", "green", "blue"], "level": [1, 2, 3]})
    prompt_fn = P.from_dataset(dataset, "caption", metadata_columns=["level"], seed=0)
    for prompt, metadata in draws(prompt_fn, 50):
        assert metadata == {"level": {"red": 1, "green": 2, "blue": 3}[prompt]}
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "saved"))
    saved = P.from_dataset(str(tmp_path / "saved"), "caption", split="test")
    assert saved.prompts == ["red", "green", "blue"]
    with pytest.raises(ValueError, match=r"split 'train' not found.*available splits: \['test'\]"):
        P.from_dataset(str(tmp_path / "saved"), "caption")


def test_drawbench_from_local_csv(tmp_path):
    csv = tmp_path / "drawbench.csv"
    csv.write_text('Prompts,Category\n"A red cube, on a blue sphere",Colors\nA stop sign,Text\nTwo cats,Counting\n')
    prompt_fn = P.get_prompt_fn("drawbench", path=str(csv), seed=3)
    assert len(prompt_fn) == 3
    expected = {"A red cube, on a blue sphere": "Colors", "A stop sign": "Text", "Two cats": "Counting"}
    seen = draws(prompt_fn, 100)
    assert all(metadata == {"category": expected[prompt]} for prompt, metadata in seen)
    assert {p for p, _ in seen} == set(expected)


def test_hpd_from_local_folder_with_styles(tmp_path):
    benchmark = tmp_path / "benchmark"
    benchmark.mkdir()
    for style in P.HPD_STYLES:
        (benchmark / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
    everything = P.hpd(path=str(tmp_path), seed=0)
    assert len(everything) == 12
    assert all(prompt.startswith(metadata["style"]) for prompt, metadata in draws(everything, 200))
    anime = P.get_prompt_fn("hpd", styles="anime", path=str(tmp_path), seed=0)
    assert {m["style"] for _, m in draws(anime, 50)} == {"anime"}
    with pytest.raises(ValueError, match=r"unknown HPD style\(s\) \['manga'\]; known styles: \['photo', 'paintings'"):
        P.hpd(styles=["anime", "manga"], path=str(tmp_path))
    (benchmark / "photo.json").unlink()
    with pytest.raises(ValueError, match="'photo.json' not found in"):
        P.hpd(styles="photo", path=str(tmp_path))


def test_bad_prompt_sources_raise_clear_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown prompt set 'animals'; known prompt sets: drawbench, .*simple_animals"
    ):
        P.get_prompt_fn("animals")
    with pytest.raises(TypeError, match=r"cannot build prompt set 'imagenet_dogs': .*'sed'; .*arguments: seed$"):
        P.get_prompt_fn("imagenet_dogs", sed=1)
    with pytest.raises(ValueError, match="column 'prompt' not found in 'dataset'; available columns: \\['caption'\\]"):
        P.from_dataset(datasets.Dataset.from_dict({"caption": ["x"]}))
    with pytest.raises(ValueError, match="pick a split first"):
        P.from_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x"]})}))
    with pytest.raises(ValueError, match="is empty"):
        P.PromptList([], name="nothing")
    with pytest.raises(ValueError, match="invalid prompt at index 1: ''"):
        P.PromptList(["ok", ""])
    with pytest.raises(ValueError, match="does not exist"):
        P.from_file(tmp_path / "missing.txt")
    (tmp_path / "prompts.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="accepted extensions: \\['.csv'"):
        P.from_file(tmp_path / "prompts.yaml")
    prompt_fn = P.simple_animals()
    assert P.get_prompt_fn(prompt_fn) is prompt_fn
    with pytest.raises(ValueError, match="cannot be applied to an already built prompt set"):
        P.get_prompt_fn(prompt_fn, seed=1)


def test_prompt_set_names_are_their_functions():
    # The registered factory is the public function itself, so a name takes exactly that function's arguments.
    names = ["drawbench", "from_dataset", "from_file", "hpd", "imagenet_all", "imagenet_animals", "imagenet_dogs"]
    for name in [*names, "simple_animals"]:
        assert P.PROMPTS.factory(name) is getattr(P, name)
