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
    real = data.batch_prompt_ids
    monkeypatch.setattr(data, "batch_prompt_ids", lambda t, p: calls.append(p) or real(t, p))
    task = Task(Path("unused"), path, "", "", "", "")
    ds = load_dataset(RunConfig(method="iterative_dpo", model="unused", prompts=path, judge=JudgeConfig(function="x:y")),
                      task, tok)
    assert calls == [PROMPTS]  # one batch of every prompt, in file order
    assert ds.prompts == PROMPTS and ds.ids == [prompt_ids(tok, p) for p in PROMPTS]
    assert load_prompt_ids(path, "prompt", tok, 512) == (PROMPTS, ds.ids)
    assert load_prompts(path, "prompt", tok, 512) == PROMPTS


def test_too_long_prompt_still_names_its_line(tmp_path: Path) -> None:
    tok = build_tokenizer(["sort", ":", "1", "2", "3"])
    path = write(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(DataError, match=r"p.jsonl line 1: prompt has 5 tokens, over max_prompt_tokens=4"):
        load_prompt_ids(path, "prompt", tok, 4)


def test_a_batch_gives_each_prompts_own_ids_and_a_bad_row_is_still_named(tmp_path: Path) -> None:
    """The batched encode equals encoding one at a time, on a real chat template (the built-in task's) with
    messages of several roles; a row the template refuses is found by encoding one by one."""
    from selfalign.models import load_tokenizer
    from selfalign.tasks.builtin import build_task

    tok = load_tokenizer(build_task(progress=False).policy_dir)
    rows = [*PROMPTS, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort : 3 2"}],
            "sort : 2 2 1", [{"role": "user", "content": "sort : 1 2"}]]
    assert data.batch_prompt_ids(tok, rows) == [prompt_ids(tok, p) for p in rows]
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    bad = write(tmp_path / "bad.jsonl", [*rows[:2], [{"role": "tool", "content": "42"}], rows[3]])
    with pytest.raises(DataError, match=r"bad.jsonl line 3: .*no tool turns"):
        load_prompt_ids(bad, "prompt", tok, 512)
