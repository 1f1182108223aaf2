"""Prompts and preferences from every kind of source: JSONL, JSON, Parquet, Arrow, save_to_disk folders and a
Hub dataset name loaded offline from the local cache (built here, never downloaded); the UltraFeedback shape
(text prompt, chosen/rejected conversations) read as is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfalign.data import DataError, PreferenceDataConfig, load_preferences, load_prompts
from selfalign.models import load_tokenizer
from selfalign.sources import read_rows

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": f"sort : {i} 3 1", "chosen": "1 3", "rejected": "3 1", "n": i} for i in range(5)]


def put_in_hub_cache(dd, name: str, cache: Path) -> None:
    """Lay `dd` (a DatasetDict) out in the datasets cache as `load_dataset(name)` leaves it after a download:
    CACHE/<namespace>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow + dataset_info.json."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = cache.parent / f"{name.replace('/', '_')}_parquet"
    src.mkdir(parents=True, exist_ok=True)
    for split, ds in dd.items():
        ds.to_parquet(str(src / f"{split}.parquet"))
    short = name.split("/")[-1]
    builder = Parquet(cache_dir=str(cache), data_files={s: str(src / f"{s}.parquet") for s in dd},
                      dataset_name=short, hash="0" * 16, config_id="default")
    builder.download_and_prepare()
    os.rename(cache / short, cache / name.replace("/", "___"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:2])})
    files = {"jsonl": d / "rows.jsonl", "json": d / "rows.json", "parquet": d / "rows.parquet",
             "arrow_folder": d / "one", "dict_folder": d / "two"}
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    files["json"].write_text(json.dumps(ROWS))
    dd["train"].to_parquet(str(files["parquet"]))
    dd["train"].save_to_disk(str(files["arrow_folder"]))
    dd.save_to_disk(str(files["dict_folder"]))
    files["arrow"] = next(files["arrow_folder"].glob("*.arrow"))
    return files


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "arrow_folder", "dict_folder"])
def test_every_local_kind_gives_the_same_rows(sources, kind):
    got = [row for _, row in read_rows(sources[kind])]
    assert got == ROWS


def test_split_selection_and_row_locations(sources):
    rows = list(read_rows(sources["dict_folder"], "test", split_key="prompts_split"))
    assert [r for _, r in rows] == ROWS[:2]
    assert rows[1][0] == f"{sources['dict_folder']} split 'test' row 1"
    assert next(read_rows(sources["jsonl"]))[0] == f"{sources['jsonl']} line 1"
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\); set prompts_split=\.\.\."):
        list(read_rows(sources["dict_folder"], "dev", split_key="prompts_split"))


def test_a_source_with_several_splits_and_no_train_asks_for_one(tmp_path):
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS), "b": datasets.Dataset.from_list(ROWS)})
    dd.save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataError, match="has splits a, b; choose one with eval_prompts_split=..."):
        list(read_rows(tmp_path / "ab", split_key="eval_prompts_split"))


def test_a_bad_row_of_a_parquet_file_is_named(tmp_path, builtin_task):
    rows = [{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"},
            {"prompt": "sort : 3 1", "chosen": "1 3", "rejected": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    tokenizer = load_tokenizer(builtin_task.policy_dir)
    with pytest.raises(DataError, match=r"pairs.parquet row 1: field 'rejected' must be non-empty text"):
        load_preferences(PreferenceDataConfig(path=str(tmp_path / "pairs.parquet")), tokenizer)


def test_hub_name_offline_in_ultrafeedback_shape_gives_the_jsonl_examples(tmp_path, builtin_task, monkeypatch):
    """The built-in preference file (chat prompts, text responses) rewritten in UltraFeedback's shape -- prompt
    text, chosen and rejected as [user, assistant] conversations, splits train_prefs / test_prefs -- and put in
    the datasets cache under a Hub name: loaded offline, it gives the same token ids, row for row."""
    assert datasets.config.HF_HUB_OFFLINE  # conftest: nothing is downloaded
    native = [row for _, row in read_rows(builtin_task.train_preferences)][:24]

    def shaped(row):
        user = row["prompt"][-1]["content"]
        return {"prompt": user, "prompt_id": str(abs(hash(user))),
                "chosen": [{"role": "user", "content": user}, {"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": row["rejected"]}],
                "score_chosen": 8.0, "score_rejected": 3.0}

    dd = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([shaped(r) for r in native[:16]]),
                               "test_prefs": datasets.Dataset.from_list([shaped(r) for r in native[16:]])})
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    put_in_hub_cache(dd, "selfalign-test/ultrafeedback_tiny", cache)

    tokenizer = load_tokenizer(builtin_task.policy_dir)
    jsonl = tmp_path / "native.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in native[:16]))
    want = load_preferences(PreferenceDataConfig(path=str(jsonl)), tokenizer)
    got = load_preferences(PreferenceDataConfig(path="selfalign-test/ultrafeedback_tiny", split="train_prefs"),
                           tokenizer)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in got] == \
        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in want]
    # Prompts alone (the run's prompts= and eval_prompts=) are the same conversations.
    prompts = load_prompts("selfalign-test/ultrafeedback_tiny", "prompt", tokenizer, 512, "test_prefs")
    assert prompts == [r["prompt"] for r in native[16:]]
    with pytest.raises(DataError, match="has splits train_prefs, test_prefs; choose one with split=..."):
        load_prompts("selfalign-test/ultrafeedback_tiny", "prompt", tokenizer, 512)


def test_a_save_to_disk_folder_takes_a_split_slice(sources):
    """datasets' split syntax on a DatasetDict folder, as load_dataset takes it for a Hub name; rows keep
    their index in the split."""
    rows = list(read_rows(sources["dict_folder"], "train[:3]"))
    assert [r for _, r in rows] == ROWS[:3]
    assert rows[2][0] == f"{sources['dict_folder']} split 'train' row 2"
    rows = list(read_rows(sources["dict_folder"], "train[60%:]+test[:1]"))
    assert [r for _, r in rows] == ROWS[3:] + ROWS[:1]
    assert [where.rsplit(" ", 3)[1:] for where, _ in rows] == [["'train'", "row", "3"], ["'train'", "row", "4"],
                                                                ["'test'", "row", "0"]]
    with pytest.raises(DataError, match=r"split 'dev\[:3\]': Unknown split \"dev\".*; set data.split=\.\.\. to a "
                                        r"split \(train, test\) or a slice of one, e.g. train\[:1000\]"):
        list(read_rows(sources["dict_folder"], "dev[:3]", split_key="data.split"))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "arrow_folder"])
def test_a_source_with_one_split_is_sliced_and_never_silently_read_whole(sources, kind, capsys, monkeypatch):
    """A data file or a save_to_disk of one Dataset is one split, train (as datasets names a data file's): a
    slice of it applies; another split name is logged as not applying (a paper recipe's train_prefs with
    prompts= a local file), and a slice of another split is an error."""
    assert [r for _, r in read_rows(sources[kind], "train[1:3]")] == ROWS[1:3]
    assert [r for _, r in read_rows(sources[kind], "train[:1]+train[60%:]")] == ROWS[:1] + ROWS[3:]
    assert [r for _, r in read_rows(sources[kind], "train")] == ROWS
    monkeypatch.setenv("RANK", "0")
    from selfalign import logs

    logs.setup()
    capsys.readouterr()
    assert [r for _, r in read_rows(sources[kind], "train_prefs", split_key="prompts_split")] == ROWS
    assert "has one split, train: prompts_split=train_prefs does not apply, every row is read" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"split 'test\[:2\]': .*has one split, train: set data.split= empty, or to "
                                        r"a slice such as train\[:1000\]"):
        list(read_rows(sources[kind], "test[:2]", split_key="data.split"))


def chat_tokenizer():
    from selfalign.tasks.tiny import build_tokenizer

    return build_tokenizer(["sort", ":", "1", "2", "3", "4", "5", "one", "more"])


def turns(*pairs: str) -> list[dict[str, str]]:
    """turns("user", "a", "assistant", "b") -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


GOOD = {"prompt": "sort : 2 1", "chosen": turns("user", "sort : 2 1", "assistant", "1 2"),
        "rejected": turns("user", "sort : 2 1", "assistant", "2 1")}
P = "sort : 3 1"


@pytest.mark.parametrize("field, value, message", [
    ("rejected", turns("user", P), "field 'rejected' is a conversation with no assistant answer at its end "
                                   "(roles user): it would train on the prompt's own text"),
    ("rejected", turns("assistant", "3 1", "user", P), "field 'rejected' is a conversation with no assistant answer"),
    ("rejected", turns("user", "sort : 2 1", "assistant", "3 1"),
     "field 'rejected' is a conversation (roles user, assistant) whose turns before the answer are not the row's "
     "prompt: it answers another prompt"),
    ("chosen", turns("user", P), "field 'chosen' is a conversation (roles user) that does not end with an "
                                 "assistant answer after a user turn holding the row's prompt text: the row would "
                                 "lose the chat template"),
    ("chosen", turns("assistant", "1 3", "user", P), "field 'chosen' is a conversation (roles assistant, user)"),
    ("chosen", turns("user", "sort : 2 1", "assistant", "1 3"), "field 'chosen' is a conversation (roles user, "
                                                                "assistant) that does not end"),
])
def test_a_conversation_that_does_not_fit_its_prompt_is_named(tmp_path, field, value, message):
    """UltraFeedback's shape (text prompt, chosen/rejected conversations): a conversation without an answer
    (alone, or reversed) or with another prompt's turns is refused with its file and line, not trained on the
    prompt's text or without the chat template the other rows get."""
    bad = {"prompt": P, "chosen": turns("user", P, "assistant", "1 3"),
           "rejected": turns("user", P, "assistant", "3 1"), field: value}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        load_preferences(PreferenceDataConfig(path=str(path)), chat_tokenizer())
    assert str(e.value).startswith(f"{path} line 2: {message}") and "\n" not in str(e.value)
    if field == "chosen":  # the run's prompts= read the same rows
        with pytest.raises(DataError, match="line 2: field 'chosen' is a conversation"):
            load_prompts(str(path), "prompt", chat_tokenizer(), 512)


def test_a_multi_turn_conversation_trains_on_its_last_answer(tmp_path):
    """[user: prompt, assistant, user, assistant: answer] with the first user turn as the prompt text: the
    prompt is every turn before the answer (chat template), the response the answer alone."""
    tok = chat_tokenizer()
    history = turns("user", P, "assistant", "1 3", "user", "one more")
    row = {"prompt": P, "chosen": history + turns("assistant", "1 3 4"), "rejected": history + turns("assistant", "4")}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [example] = load_preferences(PreferenceDataConfig(path=str(path), eval_fraction=0.0), tok)
    assert example.prompt_ids == tok.apply_chat_template(history, add_generation_prompt=True, return_dict=False)
    assert tok.decode(example.chosen_ids) == "1 3 4 <eos>" and tok.decode(example.rejected_ids) == "4 <eos>"
