"""Tests of dag_trl.prompts: draws stay in their sets, are reproducible under a seed, and load from local files."""

from __future__ import annotations

import json
import random
import re

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


# ------------------------------------------------------------------------------------------------------------------
# Bad prompt files (issue #12): each error names the file and, where there is one, the row or line
# ------------------------------------------------------------------------------------------------------------------


def test_empty_cells_are_rejected_with_the_file_and_row(tmp_path):
    # Without the check, str(None) trained on the literal prompt "None".
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,level\na cat,1\n,2\na dog,3\nnull,4\n")
    with pytest.raises(ValueError) as raised:
        P.from_file(csv)
    assert str(raised.value).startswith(
        f"{str(csv)!r} has no value in column 'prompt' at row(s) [2, 4] (data rows counted from 1, a CSV header line "
        "not counted); fill in or delete those rows"
    )
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": null}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl' has no value in column 'prompt' at row\(s\) \[2, 3\]"):
        P.from_file(jsonl)
    with pytest.raises(ValueError, match=r"^'dataset' has no value in column 'prompt' at row\(s\) \[1\]"):
        P.from_dataset(datasets.Dataset.from_dict({"prompt": [None, "a cat"]}))


def test_prompt_files_must_be_utf8_and_lose_their_byte_order_mark(tmp_path):
    for name in ("latin1.txt", "latin1.csv"):
        (tmp_path / name).write_bytes("prompt\ncaf\u00e9 au lait\n".encode("latin-1"))
        with pytest.raises(ValueError) as raised:
            P.from_file(tmp_path / name)
        assert str(raised.value) == (
            f"{str(tmp_path / name)!r} is not UTF-8 text: byte 0xe9 on line 2 (invalid continuation byte); save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    # Spreadsheet programs and Windows editors start UTF-8 files with a byte-order mark.
    bom = "\ufeff".encode()
    (tmp_path / "bom.txt").write_bytes(bom + "a caf\u00e9\na dog\n".encode())
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(["an owl"]).encode())
    (tmp_path / "bom.csv").write_bytes(bom + b"prompt\na cow\n")
    assert P.from_file(tmp_path / "bom.txt").prompts == ["a caf\u00e9", "a dog"]
    assert P.from_file(tmp_path / "bom.json").prompts == ["an owl"]
    assert P.from_file(tmp_path / "bom.csv").prompts == ["a cow"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "p.csv",
            "prompt,level\na,1\nb,2,3\n",
            r"cannot read PATH as a csv table: ParserError: .*Expected 2 fields in line 3",
        ),
        (
            "p.jsonl",
            '{"prompt": "a"}\n\n{"prompt": "b", }\n',
            r"cannot read PATH as a jsonl table: line 3 is not valid JSON",
        ),
        ("p.json", '["a", "b",]', r"prompt file PATH is not valid JSON: Expecting value at line 1, column 11$"),
        ("p.csv", "prompt\n\n", r"PATH has a header line but no rows; expected a header line naming the columns"),
        ("p.tsv", "", r"PATH is empty; expected a header line"),
    ],
)
def test_malformed_prompt_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="^" + message.replace("PATH", re.escape(repr(str(path))))):
        P.from_file(path)


@pytest.mark.parametrize("path", ["./missing.csv", "data/prompts/missing", "missing.jsonl"])
def test_a_missing_local_dataset_is_not_looked_up_on_the_hub(monkeypatch, path):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"load_dataset called for {path!r}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(ValueError) as raised:
        P.from_dataset(path)
    assert str(raised.value).startswith(f"local dataset {path!r} does not exist (looked for '/")
    assert str(raised.value).endswith("pass an existing file or folder, or a Hub dataset id ('name' or 'owner/name')")


# ------------------------------------------------------------------------------------------------------------------
# Prompt text is kept as written (issue 20, bad case 4); a folder is not a prompt file
# ------------------------------------------------------------------------------------------------------------------


def test_csv_prompts_that_look_numeric_keep_their_text(tmp_path):
    # pandas read this column as numbers: the prompts trained as '12.0', '1000.0' and '7.0'.
    for name, separator in (("p.csv", ","), ("p.tsv", "\t")):
        (tmp_path / name).write_text(f"prompt{separator}level\n0012{separator}1\n1e3{separator}2\n7{separator}3\n")
        table = P.from_file(tmp_path / name)
        assert table.prompts == ["0012", "1e3", "7"]
    table = P.from_dataset(str(tmp_path / "p.csv"), metadata_columns=["level"])
    assert [m["level"] for m in table.metadata] == [1, 2, 3]  # other columns keep their types


@pytest.mark.parametrize(
    "name, content, where, value, example",
    [
        ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": 12}\n', "line 3", "number 12", '"12"'),
        ("p.jsonl", '{"prompt": true}\n', "line 1", "boolean true", '"true"'),
        ("p.json", '[{"prompt": "a cat"}, {"prompt": ["a", "b"]}]', "record 2", 'array ["a", "b"]',
         '"[\\"a\\", \\"b\\"]"'),
    ],
)  # fmt: skip
def test_json_prompts_that_are_not_strings_are_refused_with_their_line(tmp_path, name, content, where, value, example):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as raised:
        P.from_file(path)
    assert str(raised.value) == (
        f"{str(path)!r} holds the JSON {value} in column 'prompt' at {where}, not a string; write every prompt as a "
        f"JSON string (e.g. {example}), so that it trains exactly as written"
    )


def test_a_folder_given_as_a_prompt_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError) as raised:
        P.from_file(tmp_path)
    assert str(raised.value) == (
        f"prompt file {str(tmp_path)!r} is a folder: pass a file in it (accepted extensions: ['.csv', '.json', "
        "'.jsonl', '.parquet', '.tsv', '.txt']), or the folder to from_dataset if `save_to_disk` wrote it"
    )
