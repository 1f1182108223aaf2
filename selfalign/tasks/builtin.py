"""The built-in task of the online loop: sort 4 to 6 distinct numbers, starting from an imperfect pi_0.

Prompt (chat messages): [{"role": "user", "content": "sort : 7 2 9 4"}]; the ideal response
is "2 4 7 9". `gold_reward` grades a response in [0, 1] and gives 1.0 only to the exact sort,
so preference pairs between imperfect responses still carry signal.

pi_0 is a tiny random-init causal LM (Llama-shaped, see tiny.build_model) fine-tuned (SFT,
cross-entropy on response tokens) on deliberately imperfect demonstrations: most are the
sorted list with a mistake in it (mostly the same one, the last two numbers swapped; also
other swapped neighbours, a foreign number, a dropped number, the prompt's order echoed), a
few are correct. Sampled at temperature 1.0, pi_0 therefore scores well below the maximum
and produces exact sorts in a minority of samples: alignment has room to work, and a method
that explores finds the good responses to learn from. Everything is built offline, from a
seed, in about half a minute on a laptop CPU, and saved the Hugging Face way
(save_pretrained) so the loop loads pi_0 through the ordinary from_pretrained path.

    python -m selfalign.tasks.builtin [--cache-dir D] [--seed S]   # build (or reuse) and print pi_0's stats
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..logs import progress_bar
from .tiny import build_model, build_tokenizer, save_tiny

VERSION = 3
NUMBERS = [str(i) for i in range(16)]
WORDS = ["sort", ":", *NUMBERS]
MIN_LEN, MAX_LEN = 4, 6
NUM_TRAIN_PROMPTS, NUM_EVAL_PROMPTS = 2048, 128
REWARD_FN = "selfalign.tasks.builtin:gold_reward"

# What a demonstration looks like, with probabilities. Nearly half the demonstrations make the
# same systematic mistake (the last two numbers swapped), so pi_0's greedy answer is usually
# wrong in that way; the other mistakes spread its samples. Sampled at temperature 1.0, exact
# sorts are rare but present: preferences between samples show the way out.
DEMONSTRATIONS = {
    "correct": 0.04,
    "swap_last": 0.50,  # the last two numbers swapped: the habit alignment has to unlearn
    "swap": 0.14,       # two random neighbours swapped
    "replace": 0.10,    # one number replaced by one not in the prompt
    "drop": 0.08,       # one number left out
    "echo": 0.14,       # the prompt's order, unsorted
}


@dataclass(frozen=True)
class SFTConfig:
    """The SFT stage that makes pi_0; part of the task's identity (changing it needs a new VERSION)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    pool_size: int = 8192  # distinct SFT prompts; demonstrations are drawn afresh at every use


# The SFT that build_task runs; a module constant so a test can check a shortened build's reproducibility.
PI0_SFT = SFTConfig()


@dataclass
class BuiltinTask:
    """Where the built task lives: pi_0, the prompt files, and the gold reward to name in a config."""

    policy_dir: Path
    train_prompts: Path
    eval_prompts: Path
    reward_fn: str = REWARD_FN

    @property
    def train_preferences(self) -> Path:
        """An offline preference dataset over the train prompts (built on first use; see preference_dataset)."""
        path = self.train_prompts.with_name("train_preferences.jsonl")
        if not path.is_file():
            write_preferences(path, read_prompts(self.train_prompts), seed=0)
        return path


# ------------------------------------------------------------------------------------ reward
def _as_number(word: str) -> int | None:
    # Only canonical spellings count: "07" or "+7" are not words the task's vocabulary has.
    return int(word) if word.isdigit() and str(int(word)) == word else None


def prompt_numbers(prompt: str | Sequence[dict[str, str]]) -> list[int]:
    """The numbers to sort: those after the last "sort :" of the last user message (or of the text)."""
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        text = users[-1] if users else ""
    words = text.split()
    # The last "sort", so a chat-template rendering or earlier turns around the request do not matter.
    starts = [i for i, w in enumerate(words) if w == "sort"]
    numbers: list[int] = []
    if starts:
        rest = words[starts[-1] + 1 :]
        if rest and rest[0] == ":":
            rest = rest[1:]
        for w in rest:
            value = _as_number(w)
            if value is None:
                break
            numbers.append(value)
    if not numbers:
        raise ValueError(f"not a prompt of the built-in sorting task (like 'sort : 7 2 9 4'): {text[:80]!r}")
    return numbers


def score_response(numbers: Sequence[int], response: str) -> float:
    """Gold reward of one response to "sort : <numbers>", in [0, 1]; 1.0 only for the exact sort.

    0.5 * positions right (over the longer of answer and response, so extra or missing numbers
    cost) + 0.25 * F1 of the multiset of words against the answer's numbers + 0.25 * adjacent
    pairs that are prompt numbers in ascending order (over the pairs the answer has).
    """
    target = [str(v) for v in sorted(numbers)]
    words = response.split()
    if not words:
        return 0.0
    width = max(len(target), len(words))
    position = sum(a == b for a, b in zip(words, target)) / width
    overlap = sum((Counter(words) & Counter(target)).values())
    f1 = 2 * overlap / (len(target) + len(words))
    allowed = set(target)
    pairs = width - 1
    if pairs:
        up = sum(a in allowed and b in allowed and int(a) < int(b) for a, b in zip(words, words[1:]))
        ascending = up / pairs
    else:
        ascending = float(words == target)
    return 0.5 * position + 0.25 * f1 + 0.25 * ascending


def gold_reward(prompts: list, responses: list[str]) -> list[float]:
    """Gold reward of each (prompt, response); prompts are chat messages or text, responses decoded text.

    Deterministic and cheap; named in a config as "selfalign.tasks.builtin:gold_reward".
    """
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward got {len(prompts)} prompts but {len(responses)} responses")
    return [score_response(prompt_numbers(p), r) for p, r in zip(prompts, responses)]


# ------------------------------------------------------------------------------ prompts, demos
def make_prompt(values: Sequence[int]) -> list[dict[str, str]]:
    return [{"role": "user", "content": "sort : " + " ".join(map(str, values))}]


def _sample_values(rng: random.Random) -> list[int]:
    return rng.sample(range(len(NUMBERS)), rng.randint(MIN_LEN, MAX_LEN))


def _unique_prompts(rng: random.Random, n: int, exclude: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    seen = set(exclude)
    while len(out) < n:
        values = tuple(_sample_values(rng))
        if values not in seen:
            seen.add(values)
            out.append(values)
    return out


def demonstration(values: Sequence[int], rng: random.Random) -> list[int]:
    """A (usually imperfect) response to sort `values`, drawn from DEMONSTRATIONS."""
    answer = sorted(values)
    kind = rng.choices(list(DEMONSTRATIONS), weights=list(DEMONSTRATIONS.values()))[0]
    if kind == "correct":
        return answer
    if kind == "echo" and list(values) == answer:
        kind = "swap"  # an already-sorted prompt cannot be echoed wrongly; without this the loop never ends
    # Every mistake below changes a list of distinct numbers; the check keeps the share of correct
    # demonstrations exactly DEMONSTRATIONS["correct"] should a future kind of mistake not.
    while True:
        out = list(answer)
        if kind == "swap_last":
            out[-2], out[-1] = out[-1], out[-2]
        elif kind == "swap":
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == "replace":
            out[rng.randrange(len(out))] = rng.choice([v for v in range(len(NUMBERS)) if v not in values])
        elif kind == "drop":
            del out[rng.randrange(len(out))]
        else:
            out = list(values)
        if out != answer:
            return out


PREFERENCE_NOISE = 0.1  # Bradley-Terry temperature of the simulated annotators of the dataset


def preference_row(prompt: list[dict[str, str]], rng: random.Random) -> dict[str, Any]:
    """One row of the offline dataset: two demonstrations (pi_0's kind of answer), labelled by a noisy annotator.

    Like a human-labelled dataset (SAIL trains on one): two responses with different gold
    rewards, the preferred one drawn Bradley-Terry with temperature PREFERENCE_NOISE.
    """
    numbers = prompt_numbers(prompt)
    for _ in range(16):
        a, b = (" ".join(map(str, demonstration(numbers, rng))) for _ in range(2))
        ra, rb = score_response(numbers, a), score_response(numbers, b)
        if ra != rb:
            break
    else:  # every draw tied: the exact answer against the last draw (a rare prompt)
        a, ra = " ".join(map(str, sorted(numbers))), 1.0
    p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / PREFERENCE_NOISE))
    chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_preferences(path: Path, prompts: list, seed: int) -> None:
    """The offline preference dataset (prompt, chosen, rejected) for `prompts`, deterministic in seed; atomic."""
    from ..data import write_jsonl

    rng = random.Random(f"builtin-preferences-{seed}")
    write_jsonl(path, [preference_row(p, rng) for p in prompts])


# ----------------------------------------------------------------------------------------- SFT
def train_pi0(seed: int = 0, config: SFTConfig | None = None, exclude: set[tuple[int, ...]] | None = None,
              progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, stats): pi_0 trained from scratch on imperfect demonstrations; deterministic.

    SFT prompts avoid `exclude` (the held-out eval prompts). Runs on one CPU thread: it is as
    fast as more for a model this small, and the result then does not depend on the thread count.
    """
    config = config or SFTConfig()
    rng = random.Random(f"builtin-sft-{seed}")
    tokenizer = build_tokenizer(WORDS)
    eos = tokenizer.eos_token_id
    pool = _unique_prompts(rng, config.pool_size, exclude or set())
    rendered = tokenizer.apply_chat_template([make_prompt(v) for v in pool], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    prompt_ids = [list(ids) for ids in rendered]
    number_id = {int(w): tokenizer.convert_tokens_to_ids(w) for w in NUMBERS}

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            model = build_model(
                len(tokenizer), hidden_size=config.hidden_size, num_layers=config.num_layers,
                num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, max_positions=64, seed=seed,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
            )
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                                          weight_decay=config.weight_decay)

            def lr_scale(step: int) -> float:
                # Linear warmup, then cosine decay to 10%: a fixed budget ends on a settled model.
                if step < config.warmup_steps:
                    return (step + 1) / config.warmup_steps
                t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
            model.train()
            losses: list[float] = []
            bar = progress_bar(range(config.steps), desc="SFT pi_0", disable=not progress, leave=False)
            for step in bar:
                rows = [rng.randrange(len(pool)) for _ in range(config.batch_size)]
                seqs, labels = [], []
                for r in rows:
                    response = [number_id[v] for v in demonstration(pool[r], rng)] + [eos]
                    seqs.append(prompt_ids[r] + response)
                    labels.append([-100] * len(prompt_ids[r]) + response)
                width = max(map(len, seqs))
                input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
                target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
                loss = model(input_ids=input_ids, attention_mask=mask, labels=target).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if step % 20 == 0 or step == config.steps - 1:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
        finally:
            torch.set_num_threads(threads)
    tail = losses[-50:]
    return model, tokenizer, {"final_loss": sum(tail) / len(tail), "steps": config.steps}


# --------------------------------------------------------------------------------------- build
def default_cache_dir() -> Path:
    return Path(os.environ.get("SELFALIGN_CACHE") or Path.home() / ".cache" / "selfalign")


def task_name(seed: int) -> str:
    return f"builtin-sort-v{VERSION}-seed{seed}"


def _task_at(directory: Path) -> BuiltinTask:
    return BuiltinTask(directory / "policy", directory / "train_prompts.jsonl",
                       directory / "eval_prompts.jsonl")


def _write_prompts(path: Path, prompts: list[tuple[int, ...]]) -> None:
    path.write_text("".join(json.dumps({"prompt": make_prompt(v)}) + "\n" for v in prompts), encoding="utf-8")


def publish_build(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Write tmp/task.json (the mark of a finished build) and rename the built folder tmp to final.

    A task is built in a temporary folder beside final, so an interrupted build leaves nothing that
    looks finished. If another process finished the same build first, theirs is identical: keep it.
    """
    (tmp / "task.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "task.json").is_file():
            raise


def build_task(cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True) -> BuiltinTask:
    """Build the task under cache_dir/builtin-sort-v{VERSION}-seed{seed} (default cache: $SELFALIGN_CACHE
    or ~/.cache/selfalign), or reuse it if it is there.

    The build goes to a temporary folder renamed into place at the end, so an interrupted build
    leaves nothing that looks finished, and processes racing to build it agree on the result.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / task_name(seed)
    if (final / "task.json").is_file():
        return _task_at(final)
    root.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            from ..logs import info

            info("%s", msg)

    say(f"building the built-in sorting task (pi_0 by SFT, once) in {final}")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        rng = random.Random(f"builtin-prompts-{seed}")
        eval_prompts = _unique_prompts(rng, NUM_EVAL_PROMPTS, set())
        train_prompts = _unique_prompts(rng, NUM_TRAIN_PROMPTS, set(eval_prompts))
        config = PI0_SFT
        model, tokenizer, stats = train_pi0(seed, config, exclude=set(eval_prompts), progress=progress)
        save_tiny(tmp / "policy", model, tokenizer)
        task = _task_at(tmp)
        _write_prompts(task.train_prompts, train_prompts)
        _write_prompts(task.eval_prompts, eval_prompts)
        # No timings in here: a build is byte-for-byte reproducible from its seed.
        meta = {"version": VERSION, "seed": seed, "reward_fn": REWARD_FN, "sft": asdict(config),
                "demonstrations": DEMONSTRATIONS, "final_loss": round(stats["final_loss"], 6)}
        publish_build(tmp, final, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    say(f"built the built-in task in {seconds:.1f} s (SFT loss {stats['final_loss']:.3f})")
    return _task_at(final)


# ------------------------------------------------------------------------------------- measure
def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def policy_stats(policy_dir: str | Path, prompts: list, num_samples: int = 8, seed: int = 0,
                 max_new_tokens: int = 12) -> dict[str, float]:
    """Mean gold reward of a policy's greedy and sampled (temperature 1.0) responses, and the share of
    exact sorts among each; `prompts` are message lists."""
    from ..generation import GenerationConfig
    from ..generation.hf import HFGenerator
    from ..models import load_causal_lm, load_tokenizer

    model = load_causal_lm(policy_dir)
    tokenizer = load_tokenizer(policy_dir)
    ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)) for p in prompts]
    gen = HFGenerator(model, tokenizer.pad_token_id, tokenizer.eos_token_id)

    def run(k: int, temperature: float) -> list[list[float]]:
        cfg = GenerationConfig(num_samples=k, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=64)
        out = gen.generate(ids, cfg, seed=seed)
        return [gold_reward([p] * k, [tokenizer.decode(r, skip_special_tokens=True) for r in rs])
                for p, rs in zip(prompts, out)]

    greedy = [row[0] for row in run(1, 0.0)]
    sampled = [v for row in run(num_samples, 1.0) for v in row]
    return {
        "prompts": len(prompts),
        "samples": len(sampled),
        "gold_greedy": sum(greedy) / len(greedy),
        "gold_sampled": sum(sampled) / len(sampled),
        "exact_greedy": sum(v == 1.0 for v in greedy) / len(greedy),
        "exact_sampled": sum(v == 1.0 for v in sampled) / len(sampled),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfalign.tasks.builtin",
                                     description="Build (or reuse) the built-in task and print pi_0's stats.")
    parser.add_argument("--cache-dir", default=None,
                        help="Cache root (default: $SELFALIGN_CACHE or ~/.cache/selfalign).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="Sampled responses per eval prompt.")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    task = build_task(args.cache_dir, seed=args.seed)
    built = time.perf_counter() - start
    print(f"policy_dir:    {task.policy_dir}\ntrain_prompts: {task.train_prompts}\n"
          f"eval_prompts:  {task.eval_prompts}\nreward_fn:     {task.reward_fn}\nready in {built:.1f} s")
    prompts = read_prompts(task.eval_prompts)
    stats = policy_stats(task.policy_dir, prompts, num_samples=args.samples, seed=args.seed)
    print(f"pi_0 on {stats['prompts']} eval prompts, {stats['samples']} samples at temperature 1.0:")
    print(f"  gold reward  greedy {stats['gold_greedy']:.3f}   sampled {stats['gold_sampled']:.3f}")
    print(f"  exact sorts  greedy {stats['exact_greedy']:.3f}   sampled {stats['exact_sampled']:.3f}")


if __name__ == "__main__":
    main()
