"""Prompt functions for diffusion alignment.

A prompt function follows the contract of DDPO (Black et al. 2023, arXiv 2305.13301) and TRL's ``DDPOTrainer``:
calling it with no arguments returns ``(prompt, metadata)``, a string and a dict that is handed to the reward
function with the image. Each one here draws uniformly, with replacement, from a fixed prompt set using its own
``random.Random``, so a run is reproducible under ``seed`` and independent of the global random state;
``reseed(seed)`` restarts it.

Prompt sets: ``simple_animals`` (DDPO's 45 animals), the ImageNet-1k class names (``imagenet_all``,
``imagenet_animals`` = classes 0-397, ``imagenet_dogs`` = classes 151-268, the slices DDPO and DAG use),
``drawbench`` (Saharia et al. 2022, the Imagen paper's 200 prompts), ``hpd`` (the HPDv2 benchmark prompts of Wu et
al. 2023, styles photo / paintings / anime / concept-art), and any dataset column or prompt file.
:data:`PROMPTS` maps each name to its function; ``PROMPTS.register(name, factory)`` adds one (the shapes demo
registers its ``shapes`` prompts this way).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from .registry import Registry

__all__ = [
    "PROMPTS",
    "PromptCallable",
    "PromptFunction",
    "PromptList",
    "simple_animals",
    "imagenet_all",
    "imagenet_animals",
    "imagenet_dogs",
    "drawbench",
    "hpd",
    "from_dataset",
    "from_file",
    "get_prompt_fn",
    "available_prompt_fns",
    "HPD_STYLES",
]

HPD_STYLES = ("photo", "paintings", "anime", "concept-art")

# Loaders of ``datasets`` for local prompt tables, by file extension.
_DATASET_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class PromptFunction:
    """Base class of seedable prompt functions: ``prompt_fn() -> (prompt, metadata)``."""

    name: str = "prompts"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the draw sequence from ``seed``."""
        self.rng.seed(seed)

    def __call__(self) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError


class PromptList(PromptFunction):
    """Draws uniformly, with replacement, from a list of prompts; ``metadata[i]`` (copied) goes with ``prompts[i]``."""

    def __init__(
        self,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        name: str = "prompts",
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if isinstance(prompts, str):
            raise ValueError(f"prompts must be a sequence of strings, not a single string ({prompts[:40]!r})")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"prompt set {name!r} is empty; it needs at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
                    f"prompt set {name!r} has an invalid prompt at index {i}: {prompt!r} (need a non-empty str)"
                )
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"prompt set {name!r} has {len(prompts)} prompts but {len(metadata)} metadata dicts")
        self.prompts = prompts
        self.metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self) -> tuple[str, dict[str, Any]]:
        index = self.rng.randrange(len(self.prompts))
        return self.prompts[index], dict(self.metadata[index])

    def __repr__(self) -> str:
        return f"PromptList(name={self.name!r}, size={len(self.prompts)})"


# What a prompt set builds: any callable returning ``(prompt, metadata)``, e.g. a PromptList.
PromptCallable = Callable[[], tuple[str, Any]]

# Each prompt set is registered under the name of its function, so that the name takes that function's arguments.
PROMPTS: Registry[PromptCallable] = Registry("prompt set")


@functools.cache
def load_asset_lines(filename: str) -> tuple[str, ...]:
    """Non-empty, stripped lines of a text file shipped in ``dag_trl/assets``."""
    text = resources.files("dag_trl").joinpath("assets", filename).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@PROMPTS.register("simple_animals")
def simple_animals(seed: int | None = None) -> PromptList:
    """DDPO's 45 common animal names ("cat", "dog", ...), the prompt set of its aesthetic-score experiments."""
    return PromptList(load_asset_lines("simple_animals.txt"), name="simple_animals", seed=seed)


def _imagenet(low: int, high: int, name: str, seed: int | None) -> PromptList:
    # The prompt is the full WordNet synonym line (e.g. "tench, Tinca tinca"), as in DDPO.
    classes = load_asset_lines("imagenet_classes.txt")[low:high]
    metadata = [{"class_index": low + i} for i in range(len(classes))]
    return PromptList(classes, metadata, name=name, seed=seed)


@PROMPTS.register("imagenet_all")
def imagenet_all(seed: int | None = None) -> PromptList:
    """All 1000 ImageNet-1k class names; metadata holds ``class_index``."""
    return _imagenet(0, 1000, "imagenet_all", seed)


@PROMPTS.register("imagenet_animals")
def imagenet_animals(seed: int | None = None) -> PromptList:
    """ImageNet classes 0-397 (the animals), as in DDPO and DAG."""
    return _imagenet(0, 398, "imagenet_animals", seed)


@PROMPTS.register("imagenet_dogs")
def imagenet_dogs(seed: int | None = None) -> PromptList:
    """ImageNet classes 151-268 (the dog breeds)."""
    return _imagenet(151, 269, "imagenet_dogs", seed)


def read_text_file(path: str) -> str:
    """The text of a UTF-8 file, without a leading byte-order mark (spreadsheet programs write one).

    A file in another encoding raises ``ValueError`` naming the file and the line of the first undecodable byte
    (Python's ``UnicodeDecodeError`` names neither).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path!r} is not UTF-8 text: byte 0x{raw[error.start]:02x} on line {line} ({error.reason}); save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from error


def _first_bad_json_line(text: str) -> str:
    """Where the first line of a JSON Lines text that is not a JSON value is, and why; "" if every line parses."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON ({error.msg}, column {error.colno})"
    return ""


def _looks_local(path: str) -> bool:
    """Whether a dataset string can only be a local path, never a Hub id (which is ``name`` or ``owner/name``)."""
    extension = os.path.splitext(path)[1].lower()
    return path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1 or extension in _DATASET_BUILDERS


JSON_KINDS = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def _refuse_non_string_json_prompts(path: str, text: str, extension: str, column: str) -> None:
    """Raise ``ValueError`` naming the line (JSON Lines) or record (a JSON list) whose ``column`` holds a JSON
    value other than a string or null: ``datasets`` would train on ``12`` and ``true`` as ``'12'`` and ``'True'``.
    Text that does not parse is left to the loader, which names the bad line."""
    if extension == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError:
                    return
    else:
        try:
            content = json.loads(text)
        except json.JSONDecodeError:
            return
        records = (
            [(f"record {i}", item) for i, item in enumerate(content, start=1)] if isinstance(content, list) else []
        )
    for where, record in records:
        value = record.get(column) if isinstance(record, dict) else None
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{path!r} holds the JSON {JSON_KINDS.get(type(value), type(value).__name__)} {json.dumps(value)} in "
                f"column {column!r} at {where}, not a string; write every prompt as a JSON string (e.g. "
                f"{json.dumps(json.dumps(value))}), so that it trains exactly as written"
            )


def _load_table(path: str, column: str = "prompt") -> Any:
    """A ``datasets.Dataset`` from a local csv/tsv/json/jsonl/parquet file, with errors naming the file. The
    ``column`` of prompts keeps its text as written: CSV cells are not converted to numbers, and JSON values
    other than strings are refused."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    extension = os.path.splitext(path)[1].lower()
    if extension not in _DATASET_BUILDERS:
        raise ValueError(f"cannot read {path!r} as a dataset; accepted extensions: {sorted(_DATASET_BUILDERS)}")
    builder = _DATASET_BUILDERS[extension]
    text = "" if builder == "parquet" else read_text_file(path)
    if builder == "csv":
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise ValueError(
                f"{path!r} {'has a header line but no rows' if lines else 'is empty'}; expected a header line "
                "naming the columns, then one row per prompt"
            )
    if builder == "json":
        _refuse_non_string_json_prompts(path, text, extension, column)
    kwargs: dict[str, Any] = {"delimiter": "\t"} if extension == ".tsv" else {}
    if builder == "csv":
        # pandas would read a column of 0012 and 1e3 as the numbers 12.0 and 1000.0 (empty and NA cells stay missing).
        kwargs["converters"] = {column: str}
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        detail = (
            _first_bad_json_line(text) if extension == ".jsonl" else ""
        ) or f"{type(cause).__name__}: {str(cause).strip()}"
        raise ValueError(f"cannot read {path!r} as a {extension[1:]} table: {detail}") from error


def _load_dataset(path: str, split: str, column: str = "prompt") -> Any:
    """A ``datasets.Dataset`` from a local file (csv/tsv/json/jsonl/parquet), a local folder or a Hub id."""
    import datasets

    if os.path.isfile(path):
        return _load_table(path, column)
    saved_markers = ("state.json", "dataset_dict.json")
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in saved_markers):
        # A folder written by `save_to_disk`, which `load_dataset` refuses.
        saved = datasets.load_from_disk(path)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"split {split!r} not found in {path!r}; available splits: {list(saved)}")
            return saved[split]
        return saved
    if not os.path.exists(path) and _looks_local(path):
        # Otherwise `load_dataset` takes it for a Hub id and answers about the Hub.
        raise ValueError(
            f"local dataset {path!r} does not exist (looked for {os.path.abspath(path)!r}); pass an existing file or "
            "folder, or a Hub dataset id ('name' or 'owner/name')"
        )
    return datasets.load_dataset(path, split=split)


@PROMPTS.register("from_dataset")
def from_dataset(
    dataset: Any,
    column: str = "prompt",
    metadata_columns: Sequence[str] = (),
    split: str = "train",
    name: str | None = None,
    seed: int | None = None,
) -> PromptList:
    """Prompts from a column of a ``datasets.Dataset``, or of a dataset loaded from a Hub id / local file or folder.

    ``metadata_columns`` are copied into each prompt's metadata.
    """
    label = name or (dataset if isinstance(dataset, str) else "dataset")
    if isinstance(dataset, str):
        dataset = _load_dataset(dataset, split, column)
    elif not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        raise ValueError(
            f"from_dataset needs a datasets.Dataset, a Hub id or a local path; got {type(dataset).__name__} "
            "(for a DatasetDict, pick a split first)"
        )
    available = list(dataset.column_names)
    for wanted in [column, *metadata_columns]:
        if wanted not in available:
            raise ValueError(f"column {wanted!r} not found in {label!r}; available columns: {available}")
    cells = dataset[column]
    missing = [
        row
        for row, cell in enumerate(cells, start=1)
        if cell is None or (isinstance(cell, float) and math.isnan(cell))
    ]
    if missing:
        # str() would train on the literal prompt "None".
        raise ValueError(
            f"{label!r} has no value in column {column!r} at row(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            " (data rows counted from 1, a CSV header line not counted); fill in or delete those rows (in a CSV file, "
            "an empty cell and cells such as NA, null or NaN are read as missing)"
        )
    prompts = [str(p) for p in cells]
    columns = {c: dataset[c] for c in metadata_columns}
    metadata = [{c: values[i] for c, values in columns.items()} for i in range(len(prompts))]
    return PromptList(prompts, metadata, name=label, seed=seed)


@PROMPTS.register("from_file")
def from_file(path: str | os.PathLike, column: str = "prompt", seed: int | None = None) -> PromptList:
    """Prompts from a local file: ``.txt`` (one prompt per non-empty line), ``.json`` (a list of strings), or a
    table (csv/tsv/jsonl/parquet, or a json list of records) whose ``column`` holds the prompts.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"prompt file {path!r} is a folder: pass a file in it (accepted extensions: "
            f"{sorted(['.txt', *_DATASET_BUILDERS])}), or the folder to from_dataset if `save_to_disk` wrote it"
        )
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".txt":
        prompts = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
        return PromptList(prompts, name=path, seed=seed)
    if extension == ".json":
        try:
            content = json.loads(read_text_file(path))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"prompt file {path!r} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
            ) from error
        if isinstance(content, list) and all(isinstance(item, str) for item in content):
            return PromptList(content, name=path, seed=seed)
    if extension not in _DATASET_BUILDERS:
        raise ValueError(
            f"cannot read prompts from {path!r}; accepted extensions: {sorted(['.txt', *_DATASET_BUILDERS])}"
        )
    return from_dataset(path, column=column, name=path, seed=seed)


@PROMPTS.register("drawbench")
def drawbench(
    path: str = "sayakpaul/drawbench",
    split: str = "train",
    prompt_column: str = "Prompts",
    category_column: str | None = "Category",
    seed: int | None = None,
) -> PromptList:
    """DrawBench (Saharia et al. 2022, arXiv 2205.11487): 200 prompts in 11 categories, loaded with ``datasets``
    from a Hub id (default ``sayakpaul/drawbench``) or a local file/folder; metadata holds the category.
    """
    metadata_columns = [category_column] if category_column else []
    prompts = from_dataset(path, prompt_column, metadata_columns, split=split, name="drawbench", seed=seed)
    if category_column:
        prompts.metadata = [{"category": m[category_column]} for m in prompts.metadata]
    return prompts


@PROMPTS.register("hpd")
def hpd(
    styles: str | Sequence[str] = HPD_STYLES,
    path: str = "zhwang/HPDv2",
    seed: int | None = None,
) -> PromptList:
    """The HPDv2 benchmark prompts (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341): 800 per style.

    ``path`` is the Hub dataset (default ``zhwang/HPDv2``, files ``benchmark/<style>.json``) or a local folder
    holding ``<style>.json`` (directly or under ``benchmark/``). Each file is a JSON list of strings, read with
    ``json`` since it is not a table ``datasets`` can load. Metadata holds the ``style``.
    """
    styles = [styles] if isinstance(styles, str) else list(styles)
    unknown = [s for s in styles if s not in HPD_STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown HPD style(s) {unknown or styles}; known styles: {list(HPD_STYLES)}")
    prompts, metadata = [], []
    for style in styles:
        filename = f"{style}.json"
        if os.path.isdir(path):
            candidates = [os.path.join(path, filename), os.path.join(path, "benchmark", filename)]
            found = [c for c in candidates if os.path.isfile(c)]
            if not found:
                raise ValueError(f"HPD style file {filename!r} not found in {path!r} (looked at {candidates})")
            file_path = found[0]
        else:
            from huggingface_hub import hf_hub_download

            file_path = hf_hub_download(path, filename, subfolder="benchmark", repo_type="dataset")
        with open(file_path, encoding="utf-8") as f:
            style_prompts = json.load(f)
        if not isinstance(style_prompts, list):
            raise ValueError(
                f"{file_path!r} must hold a JSON list of prompt strings; got {type(style_prompts).__name__}"
            )
        prompts.extend(style_prompts)
        metadata.extend({"style": style} for _ in style_prompts)
    return PromptList(prompts, metadata, name="hpd", seed=seed)


def available_prompt_fns() -> list[str]:
    """The names :func:`get_prompt_fn` accepts, sorted."""
    return PROMPTS.names()


def get_prompt_fn(name: str | PromptCallable, **kwargs: Any) -> PromptCallable:
    """Build a prompt function by name, passing ``kwargs`` (e.g. ``seed``) to it; a callable is returned unchanged.

    ``get_prompt_fn("imagenet_animals", seed=0)``, ``get_prompt_fn("from_file", path="prompts.txt")``. An unknown
    name raises ``ValueError`` listing the known ones; keyword arguments the function does not take raise
    ``TypeError`` listing the ones it does.
    """
    return PROMPTS.resolve(name, **kwargs)
