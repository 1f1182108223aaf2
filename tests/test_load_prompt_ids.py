"""The loop tokenizes each training prompt once: the length check's ids are the ids it trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import selfalign.data as data
from selfalign.data import DataError, prompt_ids
from selfalign.loop import JudgeConfig, RunConfig, Task, load_dataset, load_prompt_ids, load_prompts
from selfalign.tasks.tiny import build_tokenizer

PROMPTS = ["sort : 3 1 2", [{"role": "user", "content": "sort : 2 1"}], "sort : 1"]


def write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return str(path)


def test_each_prompt_tokenized_once_with_the_same_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(["sort", ":", "1", "2", "3"])
    path = write(tmp_path / "p.jsonl", PROMPTS)
    calls = []
    real = data.prompt_ids
    monkeypatch.setattr(data, "prompt_ids", lambda t, p: calls.append(p) or real(t, p))
    task = Task(Path("unused"), path, "", "", "", "")
    ds = load_dataset(RunConfig(method="iterative_dpo", model="unused", prompts=path, judge=JudgeConfig(function="x:y")),
                      task, tok)
    assert calls == PROMPTS  # one call per prompt, in file order
    assert ds.prompts == PROMPTS and ds.ids == [prompt_ids(tok, p) for p in PROMPTS]
    assert load_prompt_ids(path, "prompt", tok, 512) == (PROMPTS, ds.ids)
    assert load_prompts(path, "prompt", tok, 512) == PROMPTS


def test_too_long_prompt_still_names_its_line(tmp_path: Path) -> None:
    tok = build_tokenizer(["sort", ":", "1", "2", "3"])
    path = write(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(DataError, match=r"p.jsonl line 1: prompt has 5 tokens, over max_prompt_tokens=4"):
        load_prompt_ids(path, "prompt", tok, 4)
