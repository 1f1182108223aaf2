"""The LLM judge's answer parsing and config checks (no server needed; the server tests are test_llm_judge.py)."""

from __future__ import annotations

import json
import sys

import pytest

from selfalign.config import ConfigError, load_config
from selfalign.judges.llm import LLMJudge, LLMJudgeConfig, parse_choice, parse_score, prompt_text
from selfalign.loop import RunConfig


@pytest.mark.parametrize("answer, expected", [
    ("8", 8.0), ("  7.5\n", 7.5), ("Score: 8/10", 8.0), ("**9**", 9.0), ("<think>maybe 2? no</think> 6", 6.0),
    ("I would rate it 11", None),  # outside [1, 10]
    ("0", None), ("excellent", None), ("", None),
])
def test_parse_score_takes_the_first_number_in_range(answer, expected):
    assert parse_score(answer, 1, 10) == expected


def test_parse_score_with_a_pattern():
    assert parse_score("Reasoning: 3 issues. Final score: [[7]]", 1, 10, r"\[\[(\d+)\]\]") == 7.0
    assert parse_score("Reasoning: 3 issues.", 1, 10, r"\[\[(\d+)\]\]") is None


@pytest.mark.parametrize("answer, expected", [
    ("A", "A"), ("b", "B"), (" (A)", "A"), ("**B**", "B"), ("Response A is better.", "A"), ("Answer: B.", "B"),
    ("My verdict: [[B]]", "B"), ("<think>A looks short</think>B", "B"),
    ("Both are fine", None), ("A and B tie [[A]] [[B]]", None), ("Apples", None), ("", None), ("maybe", None),
])
def test_parse_choice_reads_a_verdict_and_nothing_else(answer, expected):
    assert parse_choice(answer) == expected


def test_prompt_text_of_a_chat():
    assert prompt_text("sort : 2 1") == "sort : 2 1"
    assert prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    assert prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == \
        "system: be brief\nuser: hi"


@pytest.mark.parametrize("overrides, message", [
    (["judge.llm.template=Rate {answer}"], "judge.llm.template: unknown placeholder {answer} for mode=pointwise"),
    (["judge.llm.mode=pairwise", "judge.llm.template=Pick {response}"], "unknown placeholder {response}"),
    (["judge.llm.concurrency=0"], "judge.llm.concurrency: must be >= 1"),
    (["judge.llm.score_min=5", "judge.llm.score_max=5"], "judge.llm.score_max: must be above score_min"),
    (["judge.llm.score_pattern='Score \\d+'"], "needs a group around the score"),
    (["judge.llm.score_pattern=(("], "judge.llm.score_pattern: not a regular expression"),
    (["eval.reward=tests.judge_fns:length", "eval.reward_model=/models/rm"], "set eval.reward or eval.reward_model"),
    (["push_to_hub=not a repo"], "push_to_hub: 'not a repo' is not a hub repository id"),
])
def test_bad_llm_and_eval_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(").replace(".", r"\.")):
        load_config(RunConfig, None, overrides)


def test_a_template_with_literal_braces_is_accepted():
    cfg = load_config(RunConfig, None, ["judge.kind=llm", "judge.llm.template=Answer as {{\"score\": N}}: {response}"])
    assert cfg.judge.llm.template.startswith("Answer as {{")


def test_without_the_openai_client_the_llm_judge_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed: `import openai` raises ImportError
    with pytest.raises(ConfigError, match=r"judge.kind=llm needs the openai client: pip install 'selfalign\[llm\]'"):
        LLMJudge(LLMJudgeConfig(model="judge"))


def test_journal_totals_sum_what_was_paid_and_where_verdicts_point(tmp_path):
    """Four paid answers: tokens 30+2, 31+3, 29+1 (no usage on the fourth: 0); verdicts A, [[B]], A and one
    unparsable ('maybe'), so the first position got 2 of 3 verdicts; a torn last line is not counted."""
    from selfalign.judges.llm import journal_totals

    path = tmp_path / "judge_answers.jsonl"
    rows = [{"key": "k1", "answer": "A", "usage": {"prompt_tokens": 30, "completion_tokens": 2}},
            {"key": "k2", "answer": "I pick [[B]]", "usage": {"prompt_tokens": 31, "completion_tokens": 3}},
            {"key": "k3", "answer": "A.", "usage": {"prompt_tokens": 29, "completion_tokens": 1}},
            {"key": "k4", "answer": "maybe"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "k5", "answ')
    pairwise = journal_totals(path, "pairwise")
    assert pairwise == {"judge_prompt_tokens_total": 90, "judge_completion_tokens_total": 6,
                        "judge_tokens_total": 96, "judge_first_position_share": 2 / 3}
    assert "judge_first_position_share" not in journal_totals(path, "pointwise")
    assert journal_totals(tmp_path / "none.jsonl", "pairwise")["judge_tokens_total"] == 0
