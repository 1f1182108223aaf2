"""Verifiable instruction constraints (IFEval-like): kinds, checkers, prompts, and the graded reward.

A prompt is a short request about a topic followed by 1-3 constraint sentences, e.g.

    Explain how bicycles work to a ten-year-old. Answer in fewer than 30 words. Do not use any commas.

Each constraint sentence is rendered from its kind's template, and parsed back from the prompt
text by the same template, so the reward needs nothing beside the prompt and the response:

    reward = fraction of the prompt's constraints the response satisfies    (graded, in [0, 1])
    "all satisfied" = reward == 1                                           (reported beside it)

Minimum substance: a response with fewer than MIN_WORDS words satisfies nothing, so an empty
or near-empty answer cannot collect "no commas", "lowercase" or "fewer than 20 words" for free.

The prompt sets are split three ways (see make_prompt_sets): training prompts; held-out prompts
on held-out topics with the training distribution of constraint combinations; and held-out
prompts whose constraint COMBINATIONS (a reserved set of kind pairs) never occur in training,
though every kind occurs there.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MIN_WORDS = 5
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def substantive(text: str) -> bool:
    """The minimum-substance rule every constraint's check starts from."""
    return len(words(text)) >= MIN_WORDS


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE))


def sentence_count(text: str) -> int:
    """Sentences: pieces ended by . ! or ? (or the end of the text) that hold a word."""
    pieces = re.split(r"(?<=[.!?])[\"')\]]*\s+", text.strip())
    return sum(1 for p in pieces if words(p))


def paragraph_count(text: str) -> int:
    return sum(1 for p in re.split(r"\n\s*\n", text.strip()) if p.strip())


def bullet_count(text: str) -> int:
    return len(re.findall(r"^\s*[*-]\s+\S", text, flags=re.MULTILINE))


def _strip_fences(text: str) -> str:
    text = text.strip()
    m = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", text, flags=re.DOTALL)
    return m.group(1).strip() if m else text


# ------------------------------------------------------------------------------------ checkers
# Each takes the response and the constraint's parameters; substance is checked by `check`.
def _lowercase(r: str) -> bool:
    return any(c.isalpha() for c in r) and r == r.lower()


def _uppercase(r: str) -> bool:
    return any(c.isalpha() for c in r) and r == r.upper()


def _max_words(r: str, n: int) -> bool:
    return len(words(r)) < n


def _min_words(r: str, n: int) -> bool:
    return len(words(r)) >= n


def _sentences(r: str, n: int) -> bool:
    return sentence_count(r) == n


def _paragraphs(r: str, n: int) -> bool:
    return paragraph_count(r) == n


def _keyword(r: str, word: str, n: int) -> bool:
    return _count_word(r, word) >= n


def _forbidden(r: str, a: str, b: str) -> bool:
    return _count_word(r, a) == 0 and _count_word(r, b) == 0


def _start_with(r: str, phrase: str) -> bool:
    return r.strip().lower().startswith(phrase.lower())


def _end_with(r: str, phrase: str) -> bool:
    return r.strip().lower().endswith(phrase.lower())


def _bullets(r: str, n: int) -> bool:
    return bullet_count(r) == n


def _no_commas(r: str) -> bool:
    return "," not in r


def _quotation(r: str) -> bool:
    s = r.strip()
    return len(s) > 1 and s[0] == '"' and s[-1] == '"'


def _title(r: str) -> bool:
    return re.search(r"<<[^<>\n]*\w[^<>\n]*>>", r) is not None


def _postscript(r: str) -> bool:
    m = re.search(r"^\s*P\.\s?S\.(.*)$", r, flags=re.MULTILINE | re.IGNORECASE | re.DOTALL)
    return m is not None and bool(words(m.group(1)))


def _json(r: str) -> bool:
    try:
        value = json.loads(_strip_fences(r))
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _placeholders(r: str, n: int) -> bool:
    return len(re.findall(r"\[[^\[\]\n]*\w[^\[\]\n]*\]", r)) >= n


def _highlight(r: str, n: int) -> bool:
    # *text* inside a line; a bullet's leading "* " is not a highlight.
    return len(re.findall(r"(?<![*\w])\*(?![\s*])[^*\n]+(?<![\s*])\*(?!\*)", r)) >= n


def _sections(r: str, n: int) -> bool:
    return len(re.findall(r"^\s*SECTION\s+\d+", r, flags=re.MULTILINE)) == n


def _capital_words(r: str, n: int) -> bool:
    return sum(1 for w in words(r) if len(w) >= 2 and w.isalpha() and w.isupper()) >= n


@dataclass(frozen=True)
class Kind:
    """One kind of constraint: how it reads in a prompt, its parameters' values, and its checker."""

    name: str
    template: str
    check_fn: Callable[..., bool]
    params: dict[str, tuple] = field(default_factory=dict)
    uses_request: bool = False  # the checker also takes the prompt's request (the text before its constraints)

    @property
    def pattern(self) -> re.Pattern:
        text = re.escape(self.template)
        for key, values in self.params.items():
            group = r"\d+" if isinstance(values[0], int) else r"[^\"]+"
            text = text.replace(re.escape("{" + key + "}"), f"(?P<{key}>{group})")
        return re.compile(text)


FORBIDDEN = ("very", "really", "also", "just", "thing", "good", "many", "great", "important", "people")

KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("lowercase", "Write your entire answer in lowercase letters, with no capital letters at all.", _lowercase),
    Kind("uppercase", "Write your entire answer in capital letters only.", _uppercase),
    Kind("max_words", "Answer in fewer than {n} words.", _max_words, {"n": (20, 30, 50)}),
    Kind("min_words", "Answer in at least {n} words.", _min_words, {"n": (30, 50)}),
    Kind("sentences", "Answer in exactly {n} sentences.", _sentences, {"n": (2, 3, 4)}),
    Kind("paragraphs", "Write exactly {n} paragraphs, separated from each other by a blank line.", _paragraphs,
         {"n": (2, 3)}),
    Kind("keyword", 'Use the word "{word}" at least {n} times.', _keyword,
         {"word": ("simple", "future", "example", "together", "change", "light", "story", "easy"), "n": (2, 3)}),
    Kind("forbidden", 'Do not use the words "{a}" or "{b}" anywhere in your answer.', _forbidden,
         {"a": FORBIDDEN, "b": FORBIDDEN}),
    Kind("start_with", 'Start your answer with the phrase "{phrase}".', _start_with,
         {"phrase": ("Here is my answer", "Let me explain", "Sure thing", "In short", "Good question")}),
    Kind("end_with", 'End your answer with the exact phrase "{phrase}".', _end_with,
         {"phrase": ("Is there anything else I can help with?", "That is all.", "Thank you for reading.",
                     "Let me know if you have questions.")}),
    Kind("bullets", "Format your answer as exactly {n} bullet points, each line starting with * like this: * point.",
         _bullets, {"n": (2, 3, 4, 5)}),
    Kind("no_commas", "Do not use any commas in your answer.", _no_commas),
    Kind("quotation", "Wrap your entire answer in double quotation marks.", _quotation),
    Kind("title", "Give your answer a title wrapped in double angular brackets, such as <<my title>>.", _title),
    Kind("postscript", "At the end of your answer, add a postscript starting with P.S.", _postscript),
    Kind("json", "Give your entire answer in JSON format.", _json),
    Kind("placeholders", "Include at least {n} placeholders in square brackets, such as [name].", _placeholders,
         {"n": (1, 2, 3)}),
    Kind("highlight", "Highlight at least {n} parts of your answer with markdown, like *this part*.", _highlight,
         {"n": (1, 2, 3)}),
    Kind("sections", "Divide your answer into exactly {n} sections, each starting on a new line with SECTION X "
         "(SECTION 1, SECTION 2, ...).", _sections, {"n": (2, 3)}),
    Kind("capital_words", "Use at least {n} words written entirely in capital letters.", _capital_words,
         {"n": (2, 3, 5)}),
]}

# Kinds that cannot be asked together (contradictory, or one makes the other meaningless).
_CONFLICTS = {
    "lowercase": {"uppercase", "capital_words", "sections"},
    "uppercase": {"capital_words"},
    "max_words": {"min_words", "sections", "paragraphs"},
    "sentences": {"bullets", "paragraphs", "sections", "json", "postscript"},
    "paragraphs": {"bullets", "sections", "json"},
    "bullets": {"sections", "highlight", "json"},
    "quotation": {"start_with", "end_with", "json"},
    "end_with": {"postscript", "json"},
    "json": {"no_commas", "title", "postscript", "start_with", "sections", "highlight"},
}
CONFLICTS: dict[str, set[str]] = {k: set() for k in KINDS}


def add_conflicts(pairs: dict[str, set[str]]) -> None:
    """Record kinds that cannot be asked together (both ways)."""
    for a, bs in pairs.items():
        for b in bs:
            CONFLICTS.setdefault(a, set()).add(b)
            CONFLICTS.setdefault(b, set()).add(a)


add_conflicts(_CONFLICTS)
# Every kind any prompt may state: KINDS (this task's 20) and the kinds other tasks register (selfalign.tasks.
# instructions adds IFEval's remaining families). Prompts are parsed against all of them.
ALL_KINDS: dict[str, Kind] = dict(KINDS)


@dataclass(frozen=True)
class Constraint:
    """A kind with its parameters, e.g. Constraint('max_words', (('n', 30),))."""

    kind: str
    params: tuple[tuple[str, object], ...] = ()

    @property
    def text(self) -> str:
        return ALL_KINDS[self.kind].template.format(**dict(self.params))

    def check(self, response: str, request: str = "") -> bool:
        """Whether the response satisfies this constraint (never for a response without substance)."""
        kind = ALL_KINDS[self.kind]
        extra = {"request": request} if kind.uses_request else {}
        return substantive(response) and kind.check_fn(response, **dict(self.params), **extra)


def _located_constraints(text: str) -> list[tuple[int, Constraint]]:
    found = []
    for kind in ALL_KINDS.values():
        for m in kind.pattern.finditer(text):
            params = tuple((k, int(v) if isinstance(kind.params[k][0], int) else v) for k, v in m.groupdict().items())
            found.append((m.start(), Constraint(kind.name, params)))
    return sorted(found, key=lambda x: x[0])


def parse_constraints(text: str) -> list[Constraint]:
    """The constraints stated in a prompt's text, in order of appearance (every kind of ALL_KINDS)."""
    return [c for _, c in _located_constraints(text)]


def request_of(text: str) -> str:
    """The request a prompt's constraints follow: its text before the first constraint sentence."""
    found = _located_constraints(text)
    return (text[: found[0][0]] if found else text).strip()


def prompt_text(prompt: str | Sequence[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def constraint_results(prompt: str | Sequence[dict[str, str]], response: str) -> list[tuple[Constraint, bool]]:
    text = prompt_text(prompt)
    constraints = parse_constraints(text)
    if not constraints:
        raise ValueError(f"no constraint of the constraints task found in the prompt: {text[:80]!r}")
    request = request_of(text)
    return [(c, c.check(response, request)) for c in constraints]


def reward(prompts: list, responses: list[str]) -> list[float]:
    """Fraction of each prompt's constraints its response satisfies; 'selfalign.tasks.constraints:reward'."""
    if len(prompts) != len(responses):
        raise ValueError(f"reward got {len(prompts)} prompts but {len(responses)} responses")
    out = []
    for p, r in zip(prompts, responses):
        results = constraint_results(p, r)
        out.append(sum(ok for _, ok in results) / len(results))
    return out


# ------------------------------------------------------------------------------------ prompts
REQUESTS = (
    "Write a short blog post about {t}.",
    "Explain {t} to a ten-year-old.",
    "Describe {t}.",
    "Write a short story about {t}.",
    "Give some practical advice about {t}.",
    "Write a short email to a friend about {t}.",
    "Write a short product description for a book about {t}.",
    "Summarize what people should know about {t}.",
    "Write a short speech about {t}.",
)

TOPICS = (
    "the history of tea", "how bicycles work", "learning to swim", "the moon landing", "growing tomatoes",
    "saving money", "the water cycle", "volcanoes", "honey bees", "the first day at a new job", "public libraries",
    "rainy weekends", "keeping a journal", "the invention of the printing press", "city parks", "electric cars",
    "making bread at home", "the importance of sleep", "learning a second language", "friendly dogs",
    "the ocean tides", "recycling plastic", "a trip to the mountains", "chess for beginners", "the northern lights",
    "composting", "train travel", "the life of a lighthouse keeper", "coffee", "photosynthesis", "board games",
    "birthday parties", "running a marathon", "the solar system", "wind power", "old maps", "homemade soup",
    "the history of the internet", "penguins", "a rainy day in London", "the desert at night", "kindness to strangers",
    "cooking pasta", "paper airplanes", "a school science fair", "the first snow of winter", "street food",
    "how rainbows form", "owning a cat", "the Roman Empire", "learning to play the guitar", "time management",
    "thunderstorms", "a visit to the dentist", "the life cycle of a butterfly", "camping in the woods",
    "video game design", "earthquakes", "a farmers market", "the Great Wall of China", "ice cream", "the human heart",
    "clean drinking water", "writing letters by hand", "a lost umbrella", "bird migration", "the Olympic Games",
    "robots in factories", "a quiet morning", "museums", "starting a small business", "solar panels",
    "the history of jazz", "cleaning your room", "a haunted house", "yoga", "the rain forest", "sharks",
    "planning a picnic", "the history of chocolate", "a broken phone", "sunflowers", "public transport",
    "the first airplane", "a family dinner", "hiking safety", "the stock market", "dinosaurs", "team sports",
    "a snowman", "the importance of breakfast", "deep sea creatures", "an old clock", "making friends at school",
    "the invention of the telephone", "autumn leaves", "learning to code", "a bakery", "wild horses",
    "the ancient pyramids", "a road trip", "space telescopes", "fresh fruit", "the moon", "a message in a bottle",
    "first aid", "lighthouses", "knitting", "wolves", "pizza", "online privacy", "a village festival",
    "climate change", "coral reefs", "a science museum", "the history of money", "recording a podcast",
    "a visit to grandparents", "rivers", "trees in the city", "a magic trick", "the seasons", "octopuses",
    "fixing a flat tire", "fireworks", "an elevator", "gardening on a balcony", "mountain goats", "bees and flowers",
    "a long flight", "studying for exams", "the history of soccer", "weather forecasts", "a new puppy",
    "the human brain", "paper making", "a music festival", "drinking enough water", "caves", "artificial intelligence",
    "a shipwreck", "taking photos", "the Arctic", "a talking parrot", "renewable energy", "bridges",
    "a birthday cake", "the Silk Road", "washing dishes", "the speed of light", "a tiny house", "elephants",
    "the first computer", "a spring morning", "moving to a new city", "glass making", "a lemonade stand",
    "the history of the bicycle", "jellyfish", "a thunderstorm at sea", "learning to draw", "bees in winter",
    "a night at the theater", "the invention of the light bulb", "a kite", "a robot that cooks", "the history of pizza",
    "tigers", "a snow day", "the importance of exercise", "the Amazon river", "making a budget", "a clock tower",
    "origami", "the life of a farmer", "a hot air balloon", "sea turtles", "the human skeleton", "a treehouse",
    "a city at night", "a broken bridge", "the history of writing", "frogs", "a bus driver", "the first library",
    "wildfires", "vegetable soup", "satellites", "a forgotten key", "a dragon", "the Moon's phases", "learning to cook",
    "a pet goldfish", "digital cameras", "a marathon runner", "the history of medicine", "spiders", "a winter coat",
    "mountain climbing", "a vending machine", "the invention of paper", "a lost kitten", "morning routines",
    "the history of trains", "a robot pet", "ants", "a sunny beach", "hurricanes", "a new bicycle",
    "the importance of voting", "a rainy picnic", "the first car", "owls", "a village well", "recycling glass",
)


def compatible(kinds: Sequence[str]) -> bool:
    return all(b not in CONFLICTS.get(a, ()) for a, b in itertools.combinations(kinds, 2))


def _draw(kind: str, rng: random.Random) -> Constraint:
    spec = ALL_KINDS[kind]
    params = {k: rng.choice(v) for k, v in spec.params.items()}
    if kind == "forbidden":
        params["a"], params["b"] = rng.sample(FORBIDDEN, 2)
    return Constraint(kind, tuple(params.items()))


def make_prompt(request: str, topic: str, constraints: Sequence[Constraint]) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join([request.format(t=topic), *(c.text for c in constraints)])}]


@dataclass
class PromptSets:
    """Training prompts and the two held-out sets (message lists), and the reserved kind pairs."""

    train: list[list[dict[str, str]]]
    eval: list[list[dict[str, str]]]
    eval_novel: list[list[dict[str, str]]]
    reserved_pairs: list[tuple[str, str]]


def make_prompt_sets(num_train: int, num_eval: int, num_novel: int, seed: int = 0,
                     heldout_topic_share: float = 0.2, reserved_pair_share: float = 0.15,
                     kinds: Sequence[str] | None = None, requests: Sequence[str] = REQUESTS,
                     name: str = "constraints") -> PromptSets:
    """Disjoint prompt sets, deterministic in seed.

    Topics are split: training prompts use one part, both held-out sets the other. A share of
    the compatible kind pairs is reserved: no training or `eval` prompt contains a reserved
    pair, and every `eval_novel` prompt does (a reserved pair, or a triple holding one).
    """
    rng = random.Random(f"{name}-prompts-{seed}")
    topics = list(TOPICS)
    rng.shuffle(topics)
    n_held = int(len(topics) * heldout_topic_share)
    held_topics, train_topics = topics[:n_held], topics[n_held:]
    names = sorted(kinds if kinds is not None else KINDS)
    pairs = [p for p in itertools.combinations(names, 2) if compatible(p)]
    rng.shuffle(pairs)
    reserved = set(pairs[: int(len(pairs) * reserved_pair_share)])
    # Every kind must still appear in training in some pair: drop reservations that would isolate one.
    for kind in names:
        if all(tuple(sorted(p)) in reserved for p in pairs if kind in p):
            reserved -= {p for p in reserved if kind in p}

    def has_reserved(combo: Sequence[str]) -> bool:
        return any(tuple(sorted(p)) in reserved for p in itertools.combinations(combo, 2))

    def draw_combo(novel: bool) -> tuple[str, ...]:
        while True:
            size = rng.choice((2, 2, 3)) if novel else rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
            combo = tuple(rng.sample(names, size))
            if compatible(combo) and has_reserved(combo) == novel:
                return combo

    seen: set[str] = set()

    def draw(n: int, topic_pool: list[str], novel: bool) -> list[list[dict[str, str]]]:
        out = []
        while len(out) < n:
            combo = draw_combo(novel)
            prompt = make_prompt(rng.choice(requests), rng.choice(topic_pool), [_draw(k, rng) for k in combo])
            if prompt[0]["content"] not in seen:
                seen.add(prompt[0]["content"])
                out.append(prompt)
        return out

    eval_set = draw(num_eval, held_topics, novel=False)
    novel_set = draw(num_novel, held_topics, novel=True)
    train = draw(num_train, train_topics, novel=False)
    return PromptSets(train, eval_set, novel_set, sorted(reserved))
