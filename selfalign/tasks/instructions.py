"""The constraints task widened toward IFEval's instruction families: longer answers, 34 kinds, a guarded reward.

`model: instructions` in a run. pi_0 is SmolLM2-135M-Instruct as in selfalign.tasks.smollm2; the
prompts are generated here, from our own templates, never from IFEval's prompts or phrasings:
1-3 constraints (selfalign.tasks.constraints' 20 kinds and the 14 below) appended to a request
about one of 215 topics, in 24 request forms, many of them long-form (essays, letters, stories,
poems) as IFEval's are. The kinds below cover the IFEval families the constraints task lacks:

    repeat_request      copy the request word for word, then answer       (IFEval combination:repeat_prompt)
    two_answers         two different answers split by ******             (combination:two_responses)
    divided_paragraphs  N paragraphs split by lines of ***                (length_constraints:number_paragraphs)
    first_word          N paragraphs, paragraph i starts with a word      (length_constraints:nth_paragraph_first_word)
    letter_count        a letter at least N times                         (keywords:letter_frequency)
    include_words       two given words must occur                        (keywords:existence)
    sentences_max / _min  fewer than / at least N sentences               (length_constraints:number_sentences)
    words_max / words_min  under / at least N words, N up to 300          (length_constraints:number_words)
    few_capitals        fewer than N all-capital words                    (change_case:capital_word_frequency)
    verdict             end with "My verdict: yes/no/maybe."              (detectable_format:constrained_response)
    keyword_once        a word exactly once                               (keywords:frequency, "exactly")
    end_phrase          end with one of more closing phrases              (startend:end_checker)

The reward (`selfalign.tasks.instructions:reward`) is the fraction of the prompt's constraints
satisfied, and 0 for an answer that pays for nothing real: under 5 words (as before), or looping
(a quarter or more of its word 4-grams repeat an earlier one, over at least 40 words). Answers
cut at max_new_tokens are the run's to handle (`generation.truncated`; the recipe penalizes them).
"""

from __future__ import annotations

import re
from collections import Counter

from .constraints import (
    ALL_KINDS,
    REQUESTS,
    Kind,
    _capital_words,
    _count_word,
    _end_with,
    _max_words,
    _min_words,
    add_conflicts,
    constraint_results,
    make_prompt_sets,
    sentence_count,
    words,
)

NAME = "instructions"

# ------------------------------------------------------------------------------------ checkers


def _repeat_request(r: str, request: str) -> bool:
    norm = lambda s: " ".join(s.split()).lower()  # noqa: E731
    body = norm(r)
    return bool(request) and body.startswith(norm(request)) and len(body) > len(norm(request)) + 10


def _two_answers(r: str) -> bool:
    parts = [p.strip() for p in r.split("******")]
    return len(parts) == 2 and all(words(p) for p in parts) and parts[0] != parts[1]


def _divided_paragraphs(r: str, n: int) -> bool:
    parts = re.split(r"^\s*\*\*\*\s*$", r.strip(), flags=re.MULTILINE)
    return len(parts) == n and all(p.strip() for p in parts)


def _first_word(r: str, n: int, i: int, word: str) -> bool:
    paragraphs = [p for p in re.split(r"\n\s*\n", r.strip()) if p.strip()]
    if len(paragraphs) != n or i > n:
        return False
    first = words(paragraphs[i - 1])
    return bool(first) and first[0].lower() == word.lower()


def _letter_count(r: str, letter: str, n: int) -> bool:
    return r.lower().count(letter) >= n


def _include_words(r: str, a: str, b: str) -> bool:
    return _count_word(r, a) > 0 and _count_word(r, b) > 0


def _sentences_max(r: str, n: int) -> bool:
    return sentence_count(r) < n


def _sentences_min(r: str, n: int) -> bool:
    return sentence_count(r) >= n


def _few_capitals(r: str, n: int) -> bool:
    return not _capital_words(r, n)


def _verdict(r: str) -> bool:
    return re.search(r"My verdict: (yes|no|maybe)\.\s*$", r.strip()) is not None


def _keyword_once(r: str, word: str) -> bool:
    return _count_word(r, word) == 1


INCLUDE = ("window", "river", "music", "garden", "journey", "bright", "history", "friend", "morning", "silver")

EXTRA_KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("repeat_request", "Before answering, copy my request above word for word (leave out these instructions), "
         "then give your answer.", _repeat_request, uses_request=True),
    Kind("two_answers", "Give two different answers, with a line of six asterisks (******) between them and nothing "
         "else on that line.", _two_answers),
    Kind("divided_paragraphs", "Write {n} paragraphs, and put a line holding only three asterisks (***) between "
         "one paragraph and the next.", _divided_paragraphs, {"n": (2, 3, 4)}),
    Kind("first_word", 'Write {n} paragraphs separated by blank lines, where paragraph number {i} begins with the '
         'word "{word}".', _first_word, {"n": (2, 3, 4), "i": (1, 2), "word": ("Today", "First", "However",
                                                                            "Finally", "Imagine", "Yes")}),
    Kind("letter_count", 'The letter "{letter}" has to appear at least {n} times in what you write.', _letter_count,
         {"letter": ("z", "q", "j", "x", "k", "w", "y", "v"), "n": (4, 6, 10)}),
    Kind("include_words", 'Make sure the words "{a}" and "{b}" both appear in your reply.', _include_words,
         {"a": INCLUDE, "b": INCLUDE}),
    Kind("sentences_max", "Use fewer than {n} sentences in total.", _sentences_max, {"n": (4, 6, 8)}),
    Kind("sentences_min", "Your reply must have at least {n} sentences.", _sentences_min, {"n": (5, 8, 12)}),
    Kind("words_max", "Keep the whole reply under {n} words.", _max_words, {"n": (60, 100, 150)}),
    Kind("words_min", "The reply should be at least {n} words long.", _min_words, {"n": (100, 150, 200, 300)}),
    Kind("few_capitals", "Write fewer than {n} words in all capital letters.", _few_capitals, {"n": (2, 3, 5)}),
    Kind("verdict", 'Close with a final line that reads exactly "My verdict: yes.", "My verdict: no." or '
         '"My verdict: maybe."', _verdict),
    Kind("keyword_once", 'Mention the word "{word}" exactly once.', _keyword_once,
         {"word": ("simple", "future", "example", "together", "change", "light", "story", "easy")}),
    Kind("end_phrase", 'Your reply must finish with the words "{phrase}" and nothing after them.', _end_with,
         {"phrase": ("Any other questions?", "Hope this helps.", "Peace out.", "That is my final answer.",
                     "Talk soon.")}),
]}
ALL_KINDS.update(EXTRA_KINDS)
add_conflicts({
    "repeat_request": {"quotation", "start_with", "json", "lowercase", "uppercase", "two_answers", "first_word",
                       "max_words", "words_max", "sentences", "sentences_max"},
    "two_answers": {"json", "quotation", "start_with", "end_with", "end_phrase", "verdict", "paragraphs",
                    "divided_paragraphs", "first_word", "sections", "bullets", "keyword_once", "sentences",
                    "sentences_max", "postscript", "title"},
    "divided_paragraphs": {"paragraphs", "first_word", "bullets", "sections", "json", "sentences", "max_words",
                           "words_max"},
    "first_word": {"paragraphs", "bullets", "sections", "json", "sentences", "max_words", "start_with",
                   "quotation", "words_max"},
    "sentences_max": {"sentences", "sentences_min", "words_min", "min_words", "bullets", "paragraphs", "sections",
                      "json", "divided_paragraphs"},
    "sentences_min": {"sentences", "max_words", "words_max", "bullets", "json"},
    "words_max": {"words_min", "min_words", "max_words", "sections"},
    "words_min": {"max_words", "json", "bullets", "sentences"},
    "few_capitals": {"uppercase", "capital_words", "sections"},
    "verdict": {"end_with", "end_phrase", "postscript", "json", "quotation", "lowercase", "uppercase"},
    "keyword_once": {"keyword"},
    "end_phrase": {"end_with", "postscript", "json", "quotation", "verdict"},
    "include_words": {"forbidden"},
})

REQUESTS_WIDE = (*REQUESTS,
    "Write an essay about {t}.",
    "Write a poem about {t}.",
    "Write a letter to the editor of a local newspaper about {t}.",
    "Write a rap about {t}.",
    "Write a review of a documentary about {t}.",
    "Write a riddle whose answer is connected to {t}.",
    "Write a cover letter for a job connected to {t}.",
    "Write a dialogue between two friends talking about {t}.",
    "Write an advertisement for a class on {t}.",
    "Give a list of tips about {t}.",
    "Is {t} overrated? Give your opinion.",
    "Write a travel guide entry that mentions {t}.",
    "Write a pitch to investors for a startup about {t}.",
    "Write a funny song about {t}.",
    "What are the pros and cons of {t}?",
)

# ------------------------------------------------------------------------------------ the reward
LOOP_MIN_WORDS = 40
LOOP_SHARE = 0.25


def loop_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams that repeat an earlier n-gram (0 for a text without repeats)."""
    ws = [w.lower() for w in words(text)]
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return sum(c - 1 for c in Counter(grams).values()) / len(grams)


def looping(text: str) -> bool:
    """A looping answer: at least LOOP_MIN_WORDS words, a LOOP_SHARE or more of whose 4-grams are repeats."""
    return len(words(text)) >= LOOP_MIN_WORDS and loop_share(text) >= LOOP_SHARE


def reward(prompts: list, responses: list[str]) -> list[float]:
    """Fraction of each prompt's constraints its response satisfies, 0 for a looping answer;
    'selfalign.tasks.instructions:reward'."""
    if len(prompts) != len(responses):
        raise ValueError(f"reward got {len(prompts)} prompts but {len(responses)} responses")
    out = []
    for p, r in zip(prompts, responses):
        results = constraint_results(p, r)
        out.append(0.0 if looping(r) else sum(ok for _, ok in results) / len(results))
    return out


def prompt_sets(num_train: int, num_eval: int, num_novel: int, seed: int = 0):
    """The widened prompt sets (selfalign.tasks.constraints.make_prompt_sets over all 34 kinds)."""
    return make_prompt_sets(num_train, num_eval, num_novel, seed=seed, kinds=sorted(ALL_KINDS),
                            requests=REQUESTS_WIDE, name=NAME)

