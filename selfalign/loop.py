"""The online recipe: for each iteration, generate -> judge -> pair -> train -> refresh -> evaluate.

Read it top to bottom: `run()` is the whole recipe; the helpers below it are one stage
each. Every stage writes its result into RUN/iter_NNN/ atomically and is skipped when its
file is already there, so re-running the same command resumes where a run stopped.
Judging appends each chunk's scores to a journal as soon as they are paid for, so a
resumed run never asks the judge for a label it already has. A resume with a different
config is refused with the difference shown.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .config import ConfigError, check, check_same_config, dump_yaml, field
from .data import DataError, pad_token_id, read_jsonl, text_or_messages, write_atomic, write_jsonl
from .generation import GenerationConfig
from .generation.hf import HFGenerator
from .judges import Judge, Prompt
from .judges.function import FunctionJudge
from .methods import METHODS, Method
from .pairs import SELECTORS
from .train import PreferenceExample, PreferenceTrainer, TrainConfig, resolve_mixed_precision

BUILTIN = "builtin"


@dataclass
class JudgeConfig:
    """Who labels the generations."""

    kind: Literal["function", "reward_model", "pairwise"] = field(
        "function", help="A reward function, a reward model, or a pairwise ranker (mean win probability, like PairRM)."
    )
    function: str = field("", help="'pkg.module:function': fn(prompts, responses) -> scores (kind=function; empty: "
                                   "the built-in task's), or fn(prompt, a, b) -> P(a better than b) (kind=pairwise).")
    reward_model: str = field("", help="Sequence-classification reward model directory or hub name (kind=reward_model).")
    noise: float = field(0.0, help="Bradley-Terry temperature of a simulated annotator over the scores; 0 = noiseless.")
    chunk_size: int = field(64, help="Prompts judged per journal entry (the unit that survives an interruption).")

    def __post_init__(self) -> None:
        check(self.noise >= 0, "judge.noise", f"must be >= 0, got {self.noise}")
        check(self.chunk_size >= 1, "judge.chunk_size", f"must be >= 1, got {self.chunk_size}")


@dataclass
class EvalConfig:
    """Held-out evaluation after every iteration (gold reward, win rate and KL against pi_0)."""

    prompts: int = field(64, help="Held-out prompts to evaluate on; 0 disables evaluation.")
    samples: int = field(2, help="Sampled responses per prompt (for reward of samples and the KL estimate).")
    reward: str = field("", help="'pkg.module:function' gold reward; empty: the judge function without noise.")


@dataclass
class RunConfig:
    """An online alignment run."""

    method: Literal["offline_dpo", "iterative_dpo", "selm", "xpo"] = field("selm", help="Method preset.")
    model: str = field(BUILTIN, help="pi_0: 'builtin' (the built-in task's SFT model) or a from_pretrained path/name.")
    prompts: str = field("", help="JSONL training prompts ({'prompt': text or messages}); empty with the built-in task.")
    eval_prompts: str = field("", help="JSONL held-out prompts; empty with the built-in task.")
    prompt_field: str = field("prompt", help="Column holding the prompt in the prompt files.")
    max_prompt_tokens: int = field(512, help="A longer prompt is an error naming its file and line.")
    output_dir: str = field("runs/run", help="Run directory (the unit of resume).")
    iterations: int = field(3, help="Online iterations, each on a fresh disjoint slice of prompts.")
    prompts_per_iteration: int = field(256, help="Prompts in each iteration's slice.")
    pair_selector: Literal["best_worst", "best_random", "random"] = field("best_worst", help="How a pair is picked from K.")
    reference: Literal["method", "previous", "initial"] = field(
        "method", help="pi_ref each iteration: the method's choice, the previous iterate, or pi_0."
    )
    iteration_learning_rates: list[float] = field(
        default_factory=list, help="Peak learning rate of each iteration (SELM's papers decay it); empty: train.learning_rate."
    )
    seed: int = field(0, help="Seed for prompt order, generation and annotator noise.")
    generation: GenerationConfig = field(default_factory=GenerationConfig, help="Sampling of the K responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="Labelling.")
    train: TrainConfig = field(default_factory=TrainConfig, help="The preference update of each iteration.")
    eval: EvalConfig = field(default_factory=EvalConfig, help="Held-out evaluation.")

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(self.prompts_per_iteration >= 1, "prompts_per_iteration", f"must be >= 1, got {self.prompts_per_iteration}")
        check(self.generation.num_samples >= 2, "generation.num_samples", "must be >= 2 to form a pair")
        check(not self.iteration_learning_rates or len(self.iteration_learning_rates) == self.iterations,
              "iteration_learning_rates", f"needs one value per iteration ({self.iterations}), "
              f"got {len(self.iteration_learning_rates)}")
        check(all(lr > 0 for lr in self.iteration_learning_rates), "iteration_learning_rates", "values must be > 0")
        if self.model != BUILTIN:
            check(bool(self.prompts), "prompts", "required when model is not 'builtin' (a JSONL file of prompts)")
            check(bool(self.judge.function or self.judge.reward_model), "judge",
                  "set judge.function='pkg.module:fn' or judge.reward_model=PATH for a model other than 'builtin'")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]


# ---------------------------------------------------------------------------------- files
def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def load_prompts(path: str, field_name: str, tokenizer, max_tokens: int) -> list[Prompt]:
    """Prompts from JSONL; DataError names the file, line and field of anything unusable."""
    from .data import prompt_ids

    prompts = []
    for lineno, row in read_jsonl(path):
        where = f"{path} line {lineno}"
        value = text_or_messages(row, field_name, where, hint="set prompt_field=... if the column differs")
        n = len(prompt_ids(tokenizer, value))
        if n > max_tokens:
            raise DataError(f"{where}: prompt has {n} tokens, over max_prompt_tokens={max_tokens} "
                            "(shorten it or raise max_prompt_tokens)")
        prompts.append(value)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------- the recipe
def run(cfg: RunConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) cfg; returns one metrics dict per iteration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import prompt_ids

    out = Path(cfg.output_dir)
    method = cfg.method_spec
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              cpu=not torch.cuda.is_available())
    show = progress and accelerator.is_main_process

    # Build: pi_0, prompts, judge, gold reward.
    pi0_path, train_file, eval_file, judge_fn, gold_fn = resolve_task(cfg, progress=show)
    tokenizer = AutoTokenizer.from_pretrained(pi0_path)
    pad_id = pad_token_id(tokenizer)
    train_prompts = load_prompts(train_file, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens)
    eval_prompts = load_prompts(eval_file, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens)[: cfg.eval.prompts] \
        if eval_file and cfg.eval.prompts else []
    slices = prompt_slices(len(train_prompts), cfg)
    judge = build_judge(cfg, judge_fn)
    gold = FunctionJudge(gold_fn) if gold_fn else None
    check_run_dir(out, cfg, accelerator)

    if eval_prompts and gold is not None and accelerator.is_main_process and not (out / "pi0_metrics.json").exists():
        from .evaluate import evaluate_policy

        write_atomic(out / "pi0_metrics.json", json.dumps(
            {"iteration": "pi_0", "labels_total": 0,
             **evaluate_policy(pi0_path, pi0_path, eval_prompts, tokenizer, gold, cfg, cache=out)}, indent=1))
    accelerator.wait_for_everyone()

    history = []
    for t in range(len(slices)):
        it = out / f"iter_{t:03d}"
        if (it / "metrics.json").exists():
            history.append(json.loads((it / "metrics.json").read_text()))
            continue
        prev = pi0_path if t == 0 else out / f"iter_{t - 1:03d}" / "policy"
        ref_path = prev if reference_policy(cfg, method) == "previous" else pi0_path
        prompts = [train_prompts[i] for i in slices[t]]
        if accelerator.is_main_process and not (it / "prompts.jsonl").exists():
            write_jsonl(it / "prompts.jsonl", [{"prompt": p} for p in prompts])
        ids = [prompt_ids(tokenizer, p) for p in prompts]

        if not (it / "policy").exists():
            # 1-2. Generate K responses from the current policy (and y_ref from pi_ref).
            policy = AutoModelForCausalLM.from_pretrained(prev, dtype=torch.float32).to(accelerator.device)
            gens = stage_generate(it, cfg, method, policy, ref_path, prev, ids, tokenizer, accelerator, show)
            # 3. Judge: every label paid for is journaled before it is used.
            scored = stage_judge(it, cfg, judge, prompts, gens, tokenizer, accelerator, show)
            # 4. Pairs.
            examples, pair_stats = stage_pairs(it, cfg, method, ids, scored, tokenizer, accelerator)
            # 5. Train; 6. the reference for this update is ref_path (refreshed per iteration).
            reference = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
            lr = cfg.iteration_learning_rates[t] if cfg.iteration_learning_rates else cfg.train.learning_rate
            train_cfg = dataclasses.replace(cfg.train, loss=method.loss, learning_rate=lr, seed=cfg.train.seed + t)
            trainer = PreferenceTrainer(policy, train_cfg, pad_id, reference=reference, accelerator=accelerator)
            result = trainer.update(examples, checkpoint_dir=it / "train_state", progress=show)
            save_policy(trainer, tokenizer, it / "policy", accelerator)
            if accelerator.is_main_process:
                write_atomic(it / "train.json", json.dumps({"steps": result.steps, "summary": result.summary,
                                                           **pair_stats}, indent=1))
            del trainer, reference, policy
        # 7. Evaluate and record.
        if accelerator.is_main_process:
            metrics = stage_eval(it, cfg, t, pi0_path, eval_prompts, tokenizer, gold, accelerator, show)
            write_atomic(it / "metrics.json", json.dumps(metrics, indent=1))
            write_jsonl(out / "metrics.jsonl", [*history, metrics])
        accelerator.wait_for_everyone()
        history.append(json.loads((it / "metrics.json").read_text()))
    return history


# ---------------------------------------------------------------------------------- stages
def resolve_task(cfg: RunConfig, progress: bool) -> tuple[Path, str, str, str, str]:
    """(pi_0 directory, train prompts file, eval prompts file, judge function spec, gold reward spec).

    The gold reward is eval.reward, else the built-in task's reward, else the judge's function:
    a judge swapped in for the built-in task never changes what evaluation measures.
    """
    if cfg.model != BUILTIN:
        return Path(cfg.model), cfg.prompts, cfg.eval_prompts, cfg.judge.function, cfg.eval.reward or cfg.judge.function
    from .tasks.builtin import build_task

    task = build_task(progress=progress)
    return (task.policy_dir, cfg.prompts or str(task.train_prompts), cfg.eval_prompts or str(task.eval_prompts),
            cfg.judge.function or task.reward_fn, cfg.eval.reward or task.reward_fn)


def prompt_slices(n: int, cfg: RunConfig) -> list[list[int]]:
    """Disjoint slices of a seeded shuffle; offline methods take all of them at once."""
    need = cfg.iterations * cfg.prompts_per_iteration
    if need > n:
        raise ConfigError(f"iterations x prompts_per_iteration = {need} prompts, but only {n} are available; "
                          "lower one of them or supply more prompts")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    slices = [order[t * cfg.prompts_per_iteration : (t + 1) * cfg.prompts_per_iteration] for t in range(cfg.iterations)]
    return [sum(slices, [])] if cfg.method_spec.offline else slices


def reference_policy(cfg: RunConfig, method: Method) -> str:
    return method.reference if cfg.reference == "method" else cfg.reference


def build_judge(cfg: RunConfig, reward_fn: str) -> Judge:
    from .judges.noisy import NoisyJudge

    if cfg.judge.kind == "reward_model":
        from .judges.reward_model import RewardModelJudge

        if not cfg.judge.reward_model:
            raise ConfigError("judge.reward_model: required with judge.kind=reward_model (a model directory)")
        judge: Judge = RewardModelJudge(cfg.judge.reward_model)
    elif cfg.judge.kind == "pairwise":
        from .judges.pairwise import PairwiseJudge

        if not cfg.judge.function:
            raise ConfigError("judge.function: required with judge.kind=pairwise ('pkg.module:fn', fn(prompt, a, b) -> P)")
        judge = PairwiseJudge(cfg.judge.function)
    else:
        judge = FunctionJudge(reward_fn)
    return NoisyJudge(judge, cfg.judge.noise, seed=cfg.seed) if cfg.judge.noise > 0 else judge


def check_run_dir(out: Path, cfg: RunConfig, accelerator: Accelerator) -> None:
    """Save the config, or refuse to resume a run made with a different one."""
    saved = out / "config.yaml"
    check_same_config(saved, cfg)
    if not saved.exists() and accelerator.is_main_process:
        write_atomic(saved, dump_yaml(cfg))
    accelerator.wait_for_everyone()


def generate_sharded(model, ids: list[list[int]], gen_cfg: GenerationConfig, seed: int, tokenizer,
                     accelerator: Accelerator, show: bool) -> list[list[list[int]]]:
    """Each process generates for prompts i = rank, rank + P, ...; the results are gathered in order."""
    generator = HFGenerator(model, pad_token_id(tokenizer), tokenizer.eos_token_id)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(ids), world))
    # The seed depends on the process so that shards do not repeat each other's samples.
    responses = generator.generate([ids[i] for i in mine], gen_cfg, seed=seed * 1000 + rank, progress=show)
    pairs = list(zip(mine, responses))
    if world > 1:
        pairs = gather_object(pairs)
    by_index = dict(pairs)
    return [by_index[i] for i in range(len(ids))]


def stage_generate(it: Path, cfg: RunConfig, method: Method, policy, ref_path: Path, prev: Path,
                   ids: list[list[int]], tokenizer, accelerator: Accelerator, show: bool) -> list[dict[str, Any]]:
    """RUN/iter/responses.jsonl: K decoded responses per prompt (+ y_ref), ids kept beside the text."""
    from transformers import AutoModelForCausalLM

    path = it / "responses.jsonl"
    if path.exists():
        return load_jsonl(path)
    seed = cfg.seed * 7919 + int(it.name.split("_")[1])
    samples = generate_sharded(policy, ids, cfg.generation, seed, tokenizer, accelerator, show)
    ref_samples: list[list[int]] | None = None
    if method.needs_ref_sample and cfg.train.alpha != 0:
        # SELM: y_ref from pi_ref (greedy); XPO: a sample from the fixed pi_0.
        ref_model = policy if ref_path == prev else AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).to(
            accelerator.device)
        greedy = method.ref_sample == "greedy"
        ref_cfg = GenerationConfig(num_samples=1, temperature=0.0 if greedy else cfg.generation.temperature,
                                   top_p=cfg.generation.top_p, max_new_tokens=cfg.generation.max_new_tokens,
                                   batch_size=cfg.generation.batch_size)
        ref_samples = [r[0] for r in generate_sharded(ref_model, ids, ref_cfg, seed + 1, tokenizer, accelerator, show)]
    rows = []
    for i, responses in enumerate(samples):
        row = {"response_ids": responses, "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in responses]}
        if ref_samples is not None:
            row["ref_response_ids"] = ref_samples[i]
        rows.append(row)
    if accelerator.is_main_process:
        write_jsonl(path, rows)
    accelerator.wait_for_everyone()
    return rows


def stage_judge(it: Path, cfg: RunConfig, judge: Judge, prompts: list[Prompt], gens: list[dict[str, Any]],
                tokenizer, accelerator: Accelerator, show: bool) -> list[dict[str, Any]]:
    """RUN/iter/generations.jsonl: prompt, responses[], scores[]; paid labels journaled chunk by chunk."""
    path, journal = it / "generations.jsonl", it / "judge_journal.jsonl"
    if path.exists():
        return load_jsonl(path)
    if accelerator.is_main_process:
        done: dict[int, list[float]] = {}
        if journal.exists():
            text = journal.read_text()
            if not text.endswith("\n") and text:
                # A kill mid-write leaves a partial last line: its chunk is redone, so drop it.
                text = text[: text.rfind("\n") + 1]
                write_atomic(journal, text)
            for line in text.splitlines():
                done.update({int(k): v for k, v in json.loads(line)["scores"].items()})
        size = cfg.judge.chunk_size
        bar = tqdm(total=len(prompts), initial=len(done), desc="judge", disable=not show, leave=False)
        with open(journal, "a") as f:
            for s in range(0, len(prompts), size):
                todo = [i for i in range(s, min(s + size, len(prompts))) if i not in done]
                if not todo:
                    continue
                if hasattr(judge, "salt"):
                    judge.salt = f"{it.name}:{s}"  # annotator noise fixed per chunk: resume-stable
                before = judge.labels
                scores = judge.score([prompts[i] for i in todo], [gens[i]["responses"] for i in todo])
                # The judge's own count: one per response scored, one per comparison for a ranker.
                entry = {"scores": {str(i): sc for i, sc in zip(todo, scores)}, "labels": judge.labels - before}
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done.update(zip(todo, scores))
                bar.update(len(todo))
        bar.close()
        labels = sum(json.loads(line)["labels"] for line in journal.read_text().splitlines() if line.strip())
        rows = [{"prompt": prompts[i], **gens[i], "scores": done[i]} for i in range(len(prompts))]
        write_jsonl(path, rows)
        write_atomic(it / "labels.json", json.dumps({"judge_labels": labels}))
    accelerator.wait_for_everyone()
    return load_jsonl(path)


def stage_pairs(it: Path, cfg: RunConfig, method: Method, ids: list[list[int]], scored: list[dict[str, Any]],
                tokenizer, accelerator: Accelerator) -> tuple[list[PreferenceExample], dict[str, int]]:
    """RUN/iter/pairs.jsonl: the training examples; prompts whose K scores all tie give none."""
    select = SELECTORS[cfg.pair_selector]
    rng = random.Random(f"{cfg.seed}:{it.name}")
    examples, ties = [], 0
    for i, row in enumerate(scored):
        pair = select(row["scores"], rng)
        if pair is None:
            ties += 1
            continue
        examples.append(PreferenceExample(
            ids[i], row["response_ids"][pair.chosen], row["response_ids"][pair.rejected],
            row.get("ref_response_ids")))
    if not examples:
        raise RuntimeError(f"{it}: every prompt's responses tied under the judge; no pair to train on")
    if accelerator.is_main_process and not (it / "pairs.jsonl").exists():
        write_jsonl(it / "pairs.jsonl", [
            {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids,
             "ref_sample_ids": e.ref_sample_ids} for e in examples])
    return examples, {"pairs": len(examples), "ties": ties}


def save_policy(trainer: PreferenceTrainer, tokenizer, path: Path, accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = trainer.policy.merge_and_unload() if trainer.config.lora.enabled else trainer.policy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def stage_eval(it: Path, cfg: RunConfig, t: int, pi0_path: Path, eval_prompts: list[Prompt], tokenizer, gold,
               accelerator: Accelerator, show: bool) -> dict[str, Any]:
    """Gold reward of greedy and sampled responses, win rate and KL against pi_0, labels used."""
    from .evaluate import evaluate_policy

    labels = json.loads((it / "labels.json").read_text())["judge_labels"]
    previous = json.loads((it.parent / f"iter_{t - 1:03d}" / "metrics.json").read_text()) if t > 0 else {}
    train = json.loads((it / "train.json").read_text())
    metrics = {"iteration": t, "labels": labels, "labels_total": previous.get("labels_total", 0) + labels,
               "pairs": train["pairs"], "ties": train["ties"],
               **{f"train/{k}": v for k, v in train["summary"].items() if k in ("loss", "rewards/accuracies",
                                                                                 "rewards/margins")}}
    if eval_prompts and gold is not None:
        metrics.update(evaluate_policy(it / "policy", pi0_path, eval_prompts, tokenizer, gold, cfg, cache=it.parent,
                                       progress=show))
    return metrics
