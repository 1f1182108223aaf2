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
