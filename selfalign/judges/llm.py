"""An LLM as the judge, over any OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp servers, hosted APIs).

Two modes:
  pointwise  one request per (prompt, response): the answer holds a score in [score_min, score_max];
  pairwise   one request per compared pair (two with both_orders): the answer names A or B; the
             PairwiseJudge turns the comparisons into scores (mean win probability).

Every answer is paid for, so every answer is journaled the moment it arrives: a line appended to
RUN/judge_answers.jsonl and fsynced, keyed by a hash of the request (model, messages, sampling
settings, extra_body, attempt). A resumed run, or a chunk redone after a kill, finds the answer there
and does not ask again. The API key is read from the environment at each start and is never part of
the key, the journal or the config (which holds only the variable's name).

Requests run `concurrency` at a time. Transport errors, timeouts, 408/409/429 and 5xx answers are
retried by the openai client with exponential backoff (`max_retries`); an answer that cannot be
parsed is asked again `parse_retries` times (a new request, journaled too) and is then a one-line
JudgeError quoting it. When a request fails for good, the requests already in flight are let finish
(and journaled) before the error is raised: nothing paid is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import faults
from ..config import ConfigError, check, field
from . import JudgeError, Prompt

POINTWISE_TEMPLATE = (
    "Rate how well the response answers the user's request, from {score_min:g} (useless) to {score_max:g} "
    "(perfect).\n\n[Request]\n{prompt}\n\n[Response]\n{response}\n\nReply with the score only: one number."
)
PAIRWISE_TEMPLATE = (
    "Which response answers the user's request better?\n\n[Request]\n{prompt}\n\n[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\nReply with one letter: A or B."
)
FIELDS = {"pointwise": {"prompt", "response", "score_min", "score_max"},
          "pairwise": {"prompt", "response_a", "response_b"}}
NUMBER = r"[-+]?\d+(?:\.\d+)?"


@dataclass
class LLMJudgeConfig:
    """An LLM judge over an OpenAI-compatible chat-completions endpoint (judge.kind=llm)."""

    base_url: str = field("", help="The server's OpenAI-compatible URL, e.g. http://localhost:8000/v1; empty: "
                                   "$OPENAI_BASE_URL, else OpenAI's.")
    model: str = field("", help="Model name the server knows (GET BASE_URL/models lists them).")
    api_key_env: str = field("OPENAI_API_KEY", help="Environment variable holding the API key (read at start, never "
                                                    "written to the run directory); unset: no key (local servers).")
    mode: Literal["pointwise", "pairwise"] = field(
        "pointwise", help="pointwise: a score per response; pairwise: A or B per pair of responses (K(K-1)/2 "
                          "requests per prompt), scores = mean win probability.")
    template: str = field("", help="User message; placeholders {prompt} {response} {score_min} {score_max} "
                                   "(pointwise) or {prompt} {response_a} {response_b} (pairwise); literal braces "
                                   "doubled. Empty: a built-in one.")
    system: str = field("", help="System message sent before the template; empty: none.")
    score_min: float = field(1.0, help="Lowest score a pointwise answer may give.")
    score_max: float = field(10.0, help="Highest score a pointwise answer may give.")
    score_pattern: str = field("", help="Regex whose first group is the score in a pointwise answer; empty: the "
                                        "answer's first number.")
    both_orders: bool = field(False, help="Pairwise: ask A-vs-B and B-vs-A and average (cancels position bias; "
                                          "two requests per comparison).")
    temperature: float = field(0.0, help="Sampling temperature of the judge's answers.")
    max_tokens: int = field(16, help="Longest answer, in tokens (raise it for a judge that reasons first).")
    extra_body: dict[str, Any] = field(default_factory=dict, help="Extra request fields, sent as they are: e.g. vLLM's "
                             "{structured_outputs: {choice: [A, B]}} or llama.cpp's {grammar: ...}.")
    concurrency: int = field(8, help="Requests in flight at once.")
    timeout: float = field(60.0, help="Seconds before a request is abandoned (then retried).")
    max_retries: int = field(4, help="Retries of a failed request (connection errors, timeouts, 408/409/429/5xx), "
                                     "with exponential backoff.")
    parse_retries: int = field(1, help="New requests for an answer that holds no valid score or choice, before "
                                       "the run stops with the answer quoted.")

    def __post_init__(self) -> None:
        check(self.concurrency >= 1, "judge.llm.concurrency", f"must be >= 1, got {self.concurrency}")
        check(self.timeout > 0, "judge.llm.timeout", f"must be > 0, got {self.timeout}")
        check(self.max_retries >= 0, "judge.llm.max_retries", f"must be >= 0, got {self.max_retries}")
        check(self.parse_retries >= 0, "judge.llm.parse_retries", f"must be >= 0, got {self.parse_retries}")
        check(self.max_tokens >= 1, "judge.llm.max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.score_min < self.score_max, "judge.llm.score_max",
              f"must be above score_min ({self.score_min:g}), got {self.score_max:g}")
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None} \
            if self.template else set()
        unknown = sorted(names - FIELDS[self.mode])
        if unknown:
            allowed = ", ".join("{" + f + "}" for f in sorted(FIELDS[self.mode]))
            raise ConfigError(f"judge.llm.template: unknown placeholder {{{unknown[0]}}} for mode={self.mode} "
                              f"(allowed: {allowed}; write a literal brace as {{{{ or }}}})")
        if self.score_pattern:
            try:
                groups = re.compile(self.score_pattern).groups
            except re.error as e:
                raise ConfigError(f"judge.llm.score_pattern: not a regular expression ({e})") from e
            check(groups >= 1, "judge.llm.score_pattern", "needs a group around the score, e.g. 'Score: (\\d+)'")


def parse_score(answer: str, low: float, high: float, pattern: str = "") -> float | None:
    """The score in a pointwise answer, or None when it holds none in [low, high].

    A reasoning model's <think>...</think> block is skipped; the score is pattern's first group,
    else the first number of the answer ("8", "Score: 8/10", "**8**" all give 8)."""
    text = re.sub(r"<think>.*?</think>", "", answer, flags=re.S).strip()
    match = re.search(pattern, text, flags=re.S) if pattern else re.search(NUMBER, text)
    if match is None:
        return None
    try:
        value = float(match.group(1) if pattern else match.group(0))
    except (TypeError, ValueError):
        return None
    return value if low <= value <= high else None


def parse_choice(answer: str) -> str | None:
    """'A' or 'B' from a pairwise answer, or None.

    Accepted: MT-Bench's [[A]] anywhere, or an answer whose first word is the letter ("B", "(A)",
    "**B**", "Response A is better", "Answer: B."). Anything else is not a verdict."""
    text = re.sub(r"<think>.*?</think>", "", answer, flags=re.S).strip()
    bracketed = set(re.findall(r"\[\[([AB])\]\]", text))
    if bracketed:
        return bracketed.pop() if len(bracketed) == 1 else None  # both named: no verdict
    match = re.match(r"^[\s*_(\[\"'`]*(?:(?:the\s+)?(?:better\s+)?(?:response|answer|output|verdict|choice)\s*:?\s*)?"
                     r"[*_(\[\"'`]*([AB])(?![A-Za-z0-9])", text, flags=re.I)
    return match.group(1).upper() if match else None


def journal_totals(path: Path, mode: str) -> dict[str, float | int]:
    """What a run's LLM judge cost, and (pairwise) where its verdicts pointed, from RUN/judge_answers.jsonl: every
    answer paid for, across resumes, retried unparsable answers included.

    judge_prompt_tokens_total, judge_completion_tokens_total, judge_tokens_total: the server's usage counts
    summed (answers whose server sent none count 0). judge_first_position_share (pairwise): the share of
    verdicts naming the first response shown, A; a judge without position bias sits near 0.5 (exactly, with
    both_orders, when it does not flip with the order), one that always says A at 1.0."""
    prompt_tokens = completion_tokens = 0
    verdicts: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a torn last line: not paid for in the record
                continue
            usage = row.get("usage") or {}
            prompt_tokens += int(usage.get("prompt_tokens") or 0)
            completion_tokens += int(usage.get("completion_tokens") or 0)
            if mode == "pairwise" and (v := parse_choice(row.get("answer", ""))) is not None:
                verdicts.append(v)
    out: dict[str, float | int] = {"judge_prompt_tokens_total": prompt_tokens,
                                   "judge_completion_tokens_total": completion_tokens,
                                   "judge_tokens_total": prompt_tokens + completion_tokens}
    if verdicts:
        out["judge_first_position_share"] = verdicts.count("A") / len(verdicts)
    return out


class Journal:
    """RUN/judge_answers.jsonl: one line per answer paid for, appended and fsynced as it arrives."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.answers: dict[str, str] = {}
        self.lock = threading.Lock()
        if path is None or not path.exists():
            return
        text = path.read_text()
        if text and not text.endswith("\n"):  # a kill mid-line: that answer is asked again
            text = text[: text.rfind("\n") + 1]
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for line in text.splitlines():
            row = json.loads(line)
            self.answers[row["key"]] = row["answer"]

    def add(self, key: str, answer: str, usage: dict[str, int] | None) -> None:
        with self.lock:
            self.answers[key] = answer
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "answer": answer, **({"usage": usage} if usage else {})}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            faults.after_write(self.path, renamed=False)


class LLMJudge:
    """Scores (pointwise) or compares (pairwise, through PairwiseJudge) with a chat model behind an OpenAI API.

    journal: where paid answers are kept (RUN/judge_answers.jsonl in a run); None keeps them in memory.
    `requests` counts requests sent by this process (journaled answers are not asked again).
    """

    def __init__(self, config: LLMJudgeConfig, journal: Path | None = None) -> None:
        try:
            import openai
        except ImportError as e:
            raise ConfigError("judge.kind=llm needs the openai client: pip install 'selfalign[llm]' "
                              "(or pip install openai)") from e
        if not config.model:
            raise ConfigError("judge.llm.model: required with judge.kind=llm (a model name the server serves)")
        self.config = config
        self.openai = openai
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        # A local server takes any key; the client refuses none, so an unset variable sends a placeholder.
        self.client = openai.OpenAI(base_url=config.base_url or None, api_key=key or "no-key-set",
                                    timeout=config.timeout, max_retries=config.max_retries)
        self.where = config.base_url or os.environ.get("OPENAI_BASE_URL", "") or "OpenAI's API"
        self.journal = Journal(journal)
        self.labels = 0
        self.keeps_answers = True  # a repeated request is answered from the journal, not paid again
        self.requests = 0
        self._count = threading.Lock()

    # ---------------------------------------------------------------- the two modes
    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        """Pointwise: one score per candidate (mode=pointwise). key: unused (the answers are keyed by request)."""
        cfg = self.config
        if cfg.mode != "pointwise":
            raise JudgeError("LLMJudge.score needs judge.llm.mode=pointwise (pairwise runs through PairwiseJudge)")
        template = cfg.template or POINTWISE_TEMPLATE
        items = [(p, r) for p, cands in zip(prompts, candidates) for r in cands]
        messages = [self._messages(template, prompt=prompt_text(p), response=r, score_min=cfg.score_min,
                                   score_max=cfg.score_max) for p, r in items]
        flat = self._ask_parsed(messages, lambda a: parse_score(a, cfg.score_min, cfg.score_max, cfg.score_pattern),
                                f"score from {cfg.score_min:g} to {cfg.score_max:g}")
        self.labels += len(flat)
        out, i = [], 0
        for cands in candidates:
            out.append(flat[i : i + len(cands)])
            i += len(cands)
        return out

    def compare(self, prompts: Sequence[Prompt], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        """Pairwise: P(a better than b) per pair: 1 or 0 from one verdict, their mean with both_orders."""
        cfg = self.config
        template = cfg.template or PAIRWISE_TEMPLATE
        messages = [self._messages(template, prompt=prompt_text(p), response_a=a, response_b=b)
                    for p, a, b in zip(prompts, responses_a, responses_b)]
        if cfg.both_orders:
            messages += [self._messages(template, prompt=prompt_text(p), response_a=b, response_b=a)
                         for p, a, b in zip(prompts, responses_a, responses_b)]
        verdicts = self._ask_parsed(messages, parse_choice, "verdict (A or B)")
        first = [1.0 if v == "A" else 0.0 for v in verdicts[: len(prompts)]]
        if not cfg.both_orders:
            return first
        swapped = [1.0 if v == "B" else 0.0 for v in verdicts[len(prompts):]]
        return [(x + y) / 2 for x, y in zip(first, swapped)]

    # ---------------------------------------------------------------- requests
    def _messages(self, template: str, **values: Any) -> list[dict[str, str]]:
        user = template.format(**values)
        return ([{"role": "system", "content": self.config.system}] if self.config.system else []) + \
            [{"role": "user", "content": user}]

    def _key(self, messages: list[dict[str, str]], attempt: int) -> str:
        cfg = self.config
        request = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                   "max_tokens": cfg.max_tokens, "extra_body": cfg.extra_body, "attempt": attempt}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def _ask_parsed(self, messages: list[list[dict[str, str]]], parse, wanted: str) -> list:
        """parse(answer) for every request; unparsable answers are asked again up to parse_retries times."""
        values: list = [None] * len(messages)
        answers: list[str] = [""] * len(messages)
        todo = list(range(len(messages)))
        for attempt in range(self.config.parse_retries + 1):
            got = self._ask([(messages[i], attempt) for i in todo])
            for i, answer in zip(todo, got):
                answers[i], values[i] = answer, parse(answer)
            todo = [i for i in todo if values[i] is None]
            if not todo:
                return values
        i = todo[0]
        tries = self.config.parse_retries + 1
        raise JudgeError(f"LLM judge '{self.config.model}' at {self.where}: {len(todo)} of {len(messages)} answers hold "
                         f"no valid {wanted} after {tries} tr{'y' if tries == 1 else 'ies'}, e.g. {answers[i][:120]!r}; "
                         "every answer is kept in judge_answers.jsonl. Constrain the answer (judge.llm.extra_body, "
                         "e.g. vLLM's structured_outputs), change judge.llm.template, or set judge.llm.score_pattern")

    def _ask(self, requests: list[tuple[list[dict[str, str]], int]]) -> list[str]:
        """The answer to each (messages, attempt): from the journal, else asked (concurrently) and journaled."""
        keys = [self._key(m, a) for m, a in requests]
        missing: dict[str, list[dict[str, str]]] = {}
        for key, (m, _) in zip(keys, requests):
            if key not in self.journal.answers:
                missing.setdefault(key, m)  # identical requests (K equal samples) are paid once
        if missing:
            with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
                futures = [pool.submit(self._request, key, m) for key, m in missing.items()]
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                for f in pending:
                    f.cancel()  # not yet started; those running finish and are journaled
            errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
            if errors:
                raise errors[0]
        return [self.journal.answers[k] for k in keys]

    def _request(self, key: str, messages: list[dict[str, str]]) -> None:
        cfg, openai = self.config, self.openai
        with self._count:
            self.requests += 1
        try:
            reply = self.client.chat.completions.create(
                model=cfg.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                extra_body=cfg.extra_body or None)
        except openai.NotFoundError as e:
            raise JudgeError(f"LLM judge: {self.where} has no model '{cfg.model}' (404: {_reason(e)}); set "
                             f"judge.llm.model to one it serves{self._served()}") from e
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise JudgeError(f"LLM judge: {self.where} refused the API key ({e.status_code}: {_reason(e)}); put the "
                             f"key in ${cfg.api_key_env} (judge.llm.api_key_env names the variable)") from e
        except openai.APITimeoutError as e:
            raise JudgeError(f"LLM judge: no answer from {self.where} within judge.llm.timeout={cfg.timeout:g} s, "
                             f"{cfg.max_retries} retries; answers already paid are kept: run the same command again "
                             "to resume") from e
        except openai.APIConnectionError as e:
            raise JudgeError(f"LLM judge: cannot reach {self.where} ({_reason(e)}) after {cfg.max_retries} retries; "
                             "answers already paid are kept: start the server (or check judge.llm.base_url) and run "
                             "the same command again to resume") from e
        except openai.APIStatusError as e:
            raise JudgeError(f"LLM judge: {self.where} answered {e.status_code} ({_reason(e)}) after "
                             f"{cfg.max_retries} retries; answers already paid are kept: run the same command "
                             "again to resume") from e
        choices = getattr(reply, "choices", None)
        if not choices or choices[0].message is None:
            raise JudgeError(f"LLM judge: {self.where} sent a reply without a message ({str(reply)[:160]})")
        answer = choices[0].message.content or ""
        usage = getattr(reply, "usage", None)
        self.journal.add(key, answer, {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
                         if usage is not None else None)

    def _served(self) -> str:
        try:
            names = [m.id for m in self.client.models.list()]
        except Exception:  # the listing is a courtesy; the 404 is the error
            return ""
        return f" (it serves: {', '.join(names[:10])})" if names else ""


def _reason(e: Exception) -> str:
    """The first line of what the server (or the connection) said."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body["error"] if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"]).strip().splitlines()[0][:200]
    text = str(e.__cause__ or e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


def prompt_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: the text, or a chat's turns as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
