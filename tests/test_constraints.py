"""The constraints task's checkers, parser, reward and prompt splits, on hand-written answers."""

from __future__ import annotations

import itertools
import re

import pytest

from selfalign.tasks.constraints import (
    CONFLICTS,
    KINDS,
    MIN_WORDS,
    REQUESTS,
    Constraint,
    make_prompt,
    make_prompt_sets,
    parse_constraints,
    reward,
)

# kind, params, answers that satisfy it, answers that do not (every answer has >= MIN_WORDS words
# unless it is there to show the minimum-substance rule).
CASES = {
    "lowercase": ({}, ["tea came from china long ago and spread west."],
                  ["Tea came from china long ago and spread west.", "1 2 3 4 5 6"]),
    "uppercase": ({}, ["TEA CAME FROM CHINA LONG AGO."], ["TEA CAME FROM CHINA LONG agO."]),
    "max_words": ({"n": 8}, ["Bicycles turn pedal power into motion."],
                  ["Bicycles turn pedal power into forward motion very well."]),
    "min_words": ({"n": 8}, ["Bicycles turn pedal power into forward motion quite well."],
                  ["Bicycles turn pedal power into motion."]),
    "sentences": ({"n": 2}, ["Bees make honey. They live in hives!", "Bees make honey. Do they sleep?"],
                  ["Bees make honey. They live in hives. They dance.", "Bees make honey and live in hives."]),
    "paragraphs": ({"n": 2}, ["Bees make honey in summer.\n\nThey rest in winter, mostly."],
                   ["Bees make honey in summer.\nThey rest in winter, mostly.",
                    "Bees make honey.\n\nThey rest.\n\nThey wake up in spring."]),
    "keyword": ({"word": "simple", "n": 2}, ["Keep it simple. Simple plans work best for most people."],
                ["Keep it simple because plans that are simplest work best."]),
    "forbidden": ({"a": "very", "b": "good"}, ["Tea is tasty and everybody seems to enjoy it."],
                  ["Tea is very tasty and people enjoy it.", "Tea is tasty and GOOD for people to drink."]),
    "start_with": ({"phrase": "In short"}, ["in short, bikes turn pedals into motion."],
                   ["Well, in short, bikes turn pedals into motion."]),
    "end_with": ({"phrase": "That is all."}, ["Bikes turn pedals into motion. That is all.  "],
                 ["Bikes turn pedals into motion. That is all. Bye."]),
    "bullets": ({"n": 3}, ["Tips:\n* save a little\n* spend less\n- track every coin you have"],
                ["Tips:\n* save a little\n* spend less", "Tips: * save * spend * track every coin"]),
    "no_commas": ({}, ["Save a little money every single week."], ["Save a little, spend less, and track it.", ""]),
    "quotation": ({}, ['"Save a little money every single week."'],
                  ['"Save a little money every single week.', 'He said "save money" every single week.']),
    "title": ({}, ["<<Saving Money>>\nSave a little money every week."],
              ["<Saving Money>\nSave a little money every week.", "<<>> Save a little money every week."]),
    "postscript": ({}, ["Save money every week.\n\nP.S. Start today with one coin."],
                   ["Save money every week. Keep the receipts.", "Save money every week PS start today."]),
    "json": ({}, ['{"topic": "tea", "summary": "tea came from china long ago"}',
                  '```json\n["tea came from china", "long ago", "and spread"]\n```'],
             ['{"topic": "tea", "summary": "tea came from china long ago"', "Tea came from china long ago."]),
    "placeholders": ({"n": 2}, ["Dear [name], meet me at [address] tomorrow morning."],
                     ["Dear [name], meet me at the station tomorrow morning.", "Dear [], meet me at [ ] soon okay."]),
    "highlight": ({"n": 2}, ["Tea is *very old* and *very popular* around the world."],
                  ["Tea is *very old* and popular around the world.",
                   "Some tips:\n* drink tea\n* rest well and sleep"]),
    "sections": ({"n": 2}, ["SECTION 1\nTea comes from China.\nSECTION 2\nIt spread west."],
                 ["SECTION 1\nTea comes from China and spread west long ago.",
                  "Section 1\nTea comes from China.\nSection 2\nIt spread west."]),
    "capital_words": ({"n": 2}, ["Tea is VERY old and REALLY popular today."],
                      ["Tea is VERY old and popular today A I.", "Tea is very old and popular today."]),
}


def test_every_kind_has_a_case_and_there_are_at_least_15():
    assert set(CASES) == set(KINDS)
    assert len(KINDS) >= 15


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_on_hand_written_answers(kind):
    params, passing, failing = CASES[kind]
    c = Constraint(kind, tuple(params.items()))
    for answer in passing:
        assert c.check(answer), f"{kind} should accept {answer!r}"
    for answer in failing:
        assert not c.check(answer), f"{kind} should reject {answer!r}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_near_empty_answer_satisfies_nothing(kind):
    """Minimum substance: fewer than MIN_WORDS words satisfy no constraint, not even "no commas" or "lowercase"."""
    params = {k: v[0] for k, v in KINDS[kind].params.items()}
    c = Constraint(kind, tuple(params.items()))
    for answer in ["", "   ", "ok", " ".join(["yes"] * (MIN_WORDS - 1))]:
        assert not c.check(answer)


def test_parse_renders_round_trip_for_every_kind_and_value():
    for kind in KINDS.values():
        for values in itertools.product(*kind.params.values()):
            c = Constraint(kind.name, tuple(zip(kind.params, values)))
            text = make_prompt("Describe {t}.", "tea", [c])[0]["content"]
            assert parse_constraints(text) == [c]


def test_reward_is_the_graded_fraction_satisfied():
    """Three constraints: lowercase (yes), fewer than 20 words (yes), no commas (no) -> 2/3."""
    prompt = make_prompt("Describe {t}.", "tea", [
        Constraint("lowercase"), Constraint("max_words", (("n", 20),)), Constraint("no_commas")])
    assert reward([prompt], ["tea is warm, brown and lovely to drink."]) == [pytest.approx(2 / 3)]
    assert reward([prompt], ["tea is warm and brown and lovely to drink."]) == [1.0]
    assert reward([prompt], [""]) == [0.0]  # satisfies nothing, though it has no capitals and no commas
    # A text prompt works too (the user message's text).
    assert reward([prompt[0]["content"]], ["Tea is warm and brown and lovely to drink."]) == [pytest.approx(2 / 3)]


def test_reward_rejects_a_prompt_without_constraints():
    with pytest.raises(ValueError, match="no constraint"):
        reward(["Describe tea."], ["Tea is warm and brown and lovely."])


def test_prompt_sets_are_disjoint_and_novel_combinations_never_occur_in_training():
    sets = make_prompt_sets(600, 60, 60, seed=1)
    texts = [{p[0]["content"] for p in s} for s in (sets.train, sets.eval, sets.eval_novel)]
    assert sum(map(len, texts)) == 720 and not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    reserved = set(sets.reserved_pairs)

    def pairs(p):
        kinds = sorted(c.kind for c in parse_constraints(p[0]["content"]))
        return set(itertools.combinations(kinds, 2))

    train_pairs = set().union(*(pairs(p) for p in sets.train))
    assert reserved and not (train_pairs & reserved)
    assert all(pairs(p) & reserved for p in sets.eval_novel)
    assert not any(pairs(p) & reserved for p in sets.eval)
    # Every kind occurs in training; no prompt asks for two conflicting kinds; 1-3 constraints each.
    for s in (sets.train, sets.eval, sets.eval_novel):
        for p in s:
            kinds = [c.kind for c in parse_constraints(p[0]["content"])]
            assert 1 <= len(kinds) <= 3 and len(set(kinds)) == len(kinds)
            assert not any(b in CONFLICTS[a] for a, b in itertools.combinations(kinds, 2))
    assert {c.kind for p in sets.train for c in parse_constraints(p[0]["content"])} == set(KINDS)
    # Held-out prompts are about topics no training prompt is about; the sets are deterministic in seed.
    assert not topics(sets.train) & (topics(sets.eval) | topics(sets.eval_novel))
    assert make_prompt_sets(600, 60, 60, seed=1).train == sets.train


def topics(prompts):
    patterns = [re.compile(re.escape(r).replace(re.escape("{t}"), "(?P<t>.+?)")) for r in REQUESTS]
    out = set()
    for p in prompts:
        m = next(m for m in (pat.match(p[0]["content"]) for pat in patterns) if m)
        out.add(m.group("t"))
    return out
