"""Where prompt and preference rows come from: local files, `save_to_disk` folders, Hub datasets.

A source is one string:
- a JSONL file (one JSON object per line) or a JSON file (an array of objects, or JSON lines):
  read here, so an error names the line;
- a Parquet file or an Arrow file (`Dataset.to_parquet`, the `.arrow` files `datasets` writes);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a folder of data
  files that `datasets.load_dataset(folder)` understands;
- a Hugging Face Hub dataset name (`HuggingFaceH4/ultrafeedback_binarized`), loaded through
  `datasets.load_dataset`: from the Hub, or from the local cache when offline
  (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 after one online load).
A source with several splits needs a split unless it has exactly one or a `train` split.
Rows come back with where they are (file and line, or source, split and row index) so that a
bad row's error (a DataError, here and in selfalign.data) names it. Everything but JSON is read through `datasets` (and its pyarrow),
imported only when such a source is used.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARQUET_MAGIC = b"PAR1"
# An Arrow IPC file starts with ARROW1; the stream format `datasets` writes with a continuation marker.
ARROW_MAGICS = (b"ARROW1", b"\xff\xff\xff\xff")


class DataError(ValueError):
    """A data file is missing, malformed, or has a bad field; the message names file, line and field."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) for each non-blank line; DataError names the broken line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file (a JSONL file is expected)")
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        raise DataError(f"{path}: a Parquet file; selfalign reads JSONL here (convert it, e.g. "
                        "datasets.load_dataset('parquet', data_files=...).to_json(path, lines=True))")
    with path.open(encoding="utf-8") as f:
        lines = enumerate(f, start=1)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as e:  # decoded in blocks: the line is not known
                raise DataError(f"{path}: not UTF-8 text (is it a binary file?); "
                                "a JSONL file of one JSON object per line is expected") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_rows(source: str | Path, split: str = "", subset: str = "", split_key: str = "split") -> Iterator[
        tuple[str, dict[str, Any]]]:
    """Yield (where, row) for every row of `source`; DataError (one line) for anything unreadable.

    split: the split to read ("" picks the only split, or `train`); HF slicing such as
    "train[:1000]" works for folders and Hub datasets. subset: a Hub dataset's configuration.
    split_key names the config key that sets the split, for the error that asks for one.
    """
    text = str(source)
    if not text:
        raise DataError("no data source given (a JSONL/JSON/Parquet/Arrow file, a save_to_disk folder or a dataset name)")
    path = Path(text).expanduser()
    if path.is_file():
        head = _head(path)
        if head.startswith(PARQUET_MAGIC) or path.suffix == ".parquet":
            yield from _dataset_rows(text, _load_parquet(path), split, split_key)
        elif path.suffix == ".arrow" or head.startswith(ARROW_MAGICS):
            yield from _dataset_rows(text, _load_arrow(path), split, split_key)
        elif path.suffix == ".json" and head.lstrip()[:1] == b"[":
            yield from _file_split(text, _json_array_rows(path), split, split_key)
        else:
            yield from _file_split(text, ((f"{text} line {lineno}", row) for lineno, row in read_jsonl(path)), split,
                                   split_key)
        return
    if path.is_dir():
        ds, applied = _load_folder(path, split)
        yield from _dataset_rows(text, ds, split, split_key, applied)
        return
    if path.suffix in (".jsonl", ".json", ".parquet", ".arrow") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DataError(f"{text}: file not found")
    yield from _dataset_rows(text, _load_hub(text, subset, split), split, split_key, applied=True)


def _file_split(source: str, rows: Iterator[tuple[str, dict[str, Any]]], split: str,
                split_key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A data file's rows: one split, `train` (as `datasets` names a data file's), streamed whole or sliced
    (train[:8], read whole first)."""
    if not split or split == "train":
        yield from rows
        return
    every = list(rows)
    yield from (every[i] for i in _single_split_range(source, len(every), split, split_key))


def _single_split_range(source: str, n: int, split: str, split_key: str) -> list[int]:
    """The rows of a source with one split of n rows (named `train`) that `split` selects: a slice of it
    (train[:8], train[10%:20%]). Another split name (a paper recipe's train_prefs, with prompts= a local
    file) does not apply: every row, with a log line saying so, never silently."""
    if "[" in split:
        import datasets

        try:
            parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": n})
        except (ValueError, AssertionError) as e:
            raise DataError(f"{source}: split '{split}': {_first_line(e)}; {source} has one split, train: set "
                            f"{split_key}= empty, or to a slice such as train[:1000]") from e
        return [i for part in parts for i in range(part.from_, part.to)]
    from .logs import info

    info("%s has one split, train: %s=%s does not apply, every row is read (set %s= empty to silence this, or "
         "slice with train[:1000])", source, split_key, split, split_key)
    return list(range(n))


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(8)


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (a JSON array of objects is expected)") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path} row {i}", row


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Import `datasets` with its progress bars and cache notices off: they are not selfalign's log lines."""
    try:
        import datasets
    except ImportError as e:  # a dependency: only a broken install gets here
        raise DataError("reading Parquet, Arrow, save_to_disk folders or Hub datasets needs the `datasets` package "
                        "(pip install datasets)") from e
    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _load_parquet(path: Path) -> Any:
    with _quiet_datasets() as datasets:
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(pq.read_table(path))
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from e


def _load_arrow(path: Path) -> Any:
    with _quiet_datasets() as datasets:
        try:
            return datasets.Dataset.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a readable Arrow file (as `datasets` writes them) ({_first_line(e)})") from e


def _load_folder(path: Path, split: str) -> tuple[Any, bool]:
    """(the folder's dataset, whether `split` was applied already: load_dataset applies it, load_from_disk not)."""
    with _quiet_datasets() as datasets:
        if any((path / name).exists() for name in ("dataset_dict.json", "state.json", "dataset_info.json")) and \
                not any(path.glob("*.parquet")) and not any(path.glob("*.jsonl")):
            try:
                return datasets.load_from_disk(str(path)), False
            except Exception as e:
                raise DataError(f"{path}: a save_to_disk folder that cannot be read ({_first_line(e)})") from e
        try:
            return datasets.load_dataset(str(path), split=split or None), True
        except Exception as e:
            raise DataError(f"{path}: a folder that is neither a save_to_disk dataset nor a folder of data files "
                            f"`datasets` can read ({_first_line(e)})") from e


def _load_hub(name: str, subset: str, split: str) -> Any:
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(name, subset or None, split=split or None)
        except ConnectionError as e:
            raise DataError(f"{name}: no such file or folder, and the dataset is not in the local Hugging Face cache "
                            "(offline: load it once online, or give a file or save_to_disk folder)") from e
        except ValueError as e:
            raise DataError(f"{name}: {_first_line(e)} (set the split or subset key)") from e
        except Exception as e:
            raise DataError(f"{name}: no such file or folder, and not a loadable dataset ({_first_line(e)})") from e


def _dataset_rows(source: str, ds: Any, split: str, split_key: str = "split",
                  applied: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a Dataset, or of the chosen split of a DatasetDict (a slice such as train[:8] too).

    applied: load_dataset already chose the split. Otherwise a single Dataset (a Parquet or Arrow file, a
    save_to_disk of one Dataset) is one split, train, which `split` may slice (_single_split_range).
    """
    if not applied and hasattr(ds, "features") and split and split != "train":
        keep = _single_split_range(source, len(ds), split, split_key)
        for i in keep:
            yield f"{source} row {i}", ds[i]
        return
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
        names = list(ds.keys())
        if "[" in split or "+" in split:
            yield from _sliced_rows(source, ds, split, split_key)
            return
        if split:
            if split not in ds:
                raise DataError(f"{source}: no split '{split}' (splits: {', '.join(names)}); set {split_key}=...")
        elif len(names) == 1:
            split = names[0]
        elif "train" in ds:
            split = "train"
        else:
            raise DataError(f"{source} has splits {', '.join(names)}; choose one with {split_key}=...")
        ds = ds[split]
    label = f"{source} split '{split}'" if split else source
    for i, row in enumerate(ds):
        yield f"{label} row {i}", row


def _sliced_rows(source: str, dd: Any, spec: str, split_key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a DatasetDict (a save_to_disk folder) chosen with datasets' own split syntax, as load_dataset
    reads it for Hub datasets: train[:1000], train[10%:20%], train[:8]+test[:8]. Rows keep their split's index."""
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(d) for name, d in dd.items()})
    except (ValueError, AssertionError) as e:
        raise DataError(f"{source}: split '{spec}': {_first_line(e)}; set {split_key}=... to a split "
                        f"({', '.join(dd)}) or a slice of one, e.g. {next(iter(dd))}[:1000]") from e
    for part in parts:
        for i, row in enumerate(dd[part.splitname].select(range(part.from_, part.to)), start=part.from_):
            yield f"{source} split '{part.splitname}' row {i}", row


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def chat_prompt(row: dict[str, Any], prompt: Any, chosen_field: str, tokenizer) -> Any:
    """UltraFeedback's shape: a text prompt beside a chosen conversation [..., user: prompt, ..., assistant: answer]
    is that conversation's turns before the answer, rendered with the chat template (when the tokenizer has one),
    as the dataset's own responses were written for it. Any other prompt is returned as it is.

    A chosen conversation with turns of its own that do not end with an assistant answer, or hold no user turn
    with the prompt's text (reversed, or another prompt's), is a DataError (without a location: the caller adds
    it), not a row left quietly without the chat template while the others have it."""
    chosen = row.get(chosen_field)
    if not (isinstance(prompt, str) and isinstance(chosen, list) and getattr(tokenizer, "chat_template", None)):
        return prompt
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in chosen):
        return prompt
    if all(m.get("role") == "assistant" for m in chosen):  # the answer alone: the text prompt is the prompt
        return prompt
    if chosen[-1].get("role") == "assistant" and any(
            m.get("role") == "user" and m["content"].strip() == prompt.strip() for m in chosen[:-1]):
        return [{"role": m["role"], "content": m["content"]} for m in chosen[:-1]]
    roles = ", ".join(str(m.get("role")) for m in chosen)
    raise DataError(f"field '{chosen_field}' is a conversation (roles {roles}) that does not end with an assistant "
                    "answer after a user turn holding the row's prompt text: the row would lose the chat template "
                    "(fix its turns' order or text, or drop the row)")
