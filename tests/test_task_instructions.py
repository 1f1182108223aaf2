"""The instructions task: the kinds it adds toward IFEval's families, parsing, the guarded reward, its prompt sets."""

from __future__ import annotations

import itertools

import pytest

from selfalign.tasks import instructions
from selfalign.tasks.constraints import (
    ALL_KINDS,
    CONFLICTS,
    KINDS,
    Constraint,
    make_prompt,
    parse_constraints,
)

REQ = "Write a poem about the moon."
# kind, params, answers that satisfy it, answers that do not (each worked out by hand from the kind's sentence).
CASES = {
    "repeat_request": ({}, [REQ + " The moon is bright and round tonight."],
                       ["The moon is bright and round tonight. " + REQ, REQ]),
    "two_answers": ({}, ["The moon is bright tonight.\n******\nThe moon hides behind clouds."],
                    ["The moon is bright tonight.\n******\nThe moon is bright tonight.",
                     "The moon is bright.\n******\nIt hides.\n******\nIt rises."]),
    "divided_paragraphs": ({"n": 2}, ["The moon is bright tonight.\n***\nIt hides behind the clouds."],
                           ["The moon is bright tonight.\n\nIt hides behind the clouds.",
                            "The moon is bright.\n***\n***\nIt hides behind clouds."]),
    "first_word": ({"n": 2, "i": 2, "word": "However"},
                   ["The moon is bright tonight.\n\nHowever, it hides behind the clouds."],
                   ["The moon is bright tonight.\n\nBut it hides behind the clouds.",
                    "The moon is bright tonight.\n\nHowever it hides.\n\nIt rises again later."]),
    "letter_count": ({"letter": "z", "n": 4}, ["Zany zebras zoom past the lazy moon."],
                     ["Zany zebras run past the bright moon."]),
    "include_words": ({"a": "river", "b": "silver"}, ["The silver moon shines on the River tonight."],
                      ["The silver moon shines on the lake tonight."]),
    "sentences_max": ({"n": 3}, ["The moon is bright. It hides behind clouds."],
                      ["The moon is bright. It hides. It rises again."]),
    "sentences_min": ({"n": 3}, ["The moon is bright. It hides. It rises again."],
                      ["The moon is bright. It hides behind clouds."]),
    "words_max": ({"n": 8}, ["The moon is bright and round."], ["The moon is bright and round and very high."]),
    "words_min": ({"n": 8}, ["The moon is bright and round and very high."], ["The moon is bright and round."]),
    "few_capitals": ({"n": 2}, ["The MOON is bright and round tonight."],
                     ["The MOON is BRIGHT and round tonight."]),
    "verdict": ({}, ["The moon is worth a look tonight.\nMy verdict: yes."],
                ["My verdict: yes. The moon is worth a look tonight.", "The moon is worth a look. My verdict: sure."]),
    "keyword_once": ({"word": "light"}, ["The moon gives a soft light tonight."],
                     ["The moon gives light, a soft light tonight.", "The moon is bright and round tonight."]),
    "end_phrase": ({"phrase": "Hope this helps."}, ["The moon is bright and round. Hope this helps."],
                   ["The moon is bright and round. Hope this helps. Bye."]),
}


def test_every_added_kind_has_a_case_and_none_shadows_the_constraints_kinds():
    assert set(CASES) == set(instructions.EXTRA_KINDS)
    assert set(ALL_KINDS) == set(KINDS) | set(instructions.EXTRA_KINDS) and len(ALL_KINDS) == 34
    assert not set(KINDS) & set(instructions.EXTRA_KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_added_kinds_check_hand_written_answers(kind):
    params, good, bad = CASES[kind]
    c = Constraint(kind, tuple(params.items()))
    for answer in good:
        assert c.check(answer, REQ), (kind, answer)
    for answer in bad:
        assert not c.check(answer, REQ), (kind, answer)


@pytest.mark.parametrize("kind", sorted(instructions.EXTRA_KINDS))
def test_added_kinds_parse_back_from_their_prompt_sentence(kind):
    spec = ALL_KINDS[kind]
    for values in itertools.product(*spec.params.values()):
        c = Constraint(kind, tuple(zip(spec.params, values)))
        assert parse_constraints(make_prompt(REQ, "x", [c])[0]["content"]) == [c]


def test_reward_pays_nothing_for_loops_and_scores_the_request():
    prompt = make_prompt("Write a poem about {t}.", "the moon",
                         [Constraint("repeat_request"), Constraint("no_commas")])
    good = "Write a poem about the moon. The moon is bright and round tonight"
    assert instructions.reward([prompt], [good]) == [1.0]
    assert instructions.reward([prompt], ["The moon is bright and round tonight. Really bright."]) == [0.5]
    loop = "The moon is bright and round tonight. " * 12  # no commas, but 7 words over and over
    assert instructions.looping(loop) and instructions.reward([prompt], ["Write a poem about the moon. " + loop]) == [0.0]
    assert not instructions.looping(good)
    # a long answer that repeats a common phrase a few times is no loop
    varied = " ".join(f"word{i} of the moon" if i % 10 == 0 else f"word{i}" for i in range(60))
    assert instructions.loop_share(varied) < instructions.LOOP_SHARE


def test_prompt_sets_use_every_kind_and_never_ask_conflicting_ones():
    sets = instructions.prompt_sets(800, 40, 40, seed=3)
    kinds = [[c.kind for c in parse_constraints(p[0]["content"])] for p in sets.train]
    assert {k for ks in kinds for k in ks} == set(ALL_KINDS)
    assert all(1 <= len(ks) <= 3 for ks in kinds)
    assert not any(b in CONFLICTS.get(a, ()) for ks in kinds for a, b in itertools.combinations(ks, 2))
    assert instructions.prompt_sets(800, 40, 40, seed=3).train == sets.train
    assert not {p[0]["content"] for p in sets.train} & {p[0]["content"] for p in sets.eval}
