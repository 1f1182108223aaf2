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
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from . import faults
from .checks import check_pretrained, loading
from .config import ConfigError, check, check_same_config, dump_yaml, field
from .data import DataError, pad_token_id, read_jsonl, text_or_messages, write_atomic, write_jsonl
from .generation import Backend, GenerationConfig, build_backend, load_generation_config, stop_token_ids
from .generation.hf import HFBackend
from .judges import Judge, Prompt
from .judges.function import FunctionJudge
from .logprobs import head_scale
from .methods import METHODS, Method
from .pairs import SELECTORS, Pair, selm_three_way
from .rundir import RunLock
from .train import (
    ROUTES,
    NonFiniteError,
    PreferenceExample,
    PreferenceTrainer,
    SailConfig,
    TrainConfig,
    resolve_alpha,
    resolve_mixed_precision,
)
from .truncation import end_token_ids, finished, is_truncated, penalized_scores

BUILTIN = "builtin"
CONSTRAINTS = "constraints"  # SmolLM2-135M-Instruct on verifiable constraints (selfalign.tasks.smollm2)
TASKS = (BUILTIN, CONSTRAINTS)


@dataclass
class SamplingConfig(GenerationConfig):
    """How the K responses are sampled, and what becomes of a truncated one (see selfalign.truncation)."""

    truncated: Literal["keep", "penalize", "drop"] = field(
        "keep", help="A response that hit max_new_tokens without an end token: keep it (judged like any other), "
                     "penalize its score before pairing, or drop it (never in a pair). Counted in metrics either way.")
    truncated_score: float | None = field(
        None, help="The score a truncated response gets with truncated=penalize; null: 1 below the lowest score the "
                   "judge gave in the round (it then loses to every finished answer).")


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
    chunk_size: int = field(64, help="Prompts per judge call, journaled as soon as the call returns: a kill re-pays "
                                     "at most one call's labels (chunk_size x K); 1 for a paid judge.")

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
class RunTrainConfig(TrainConfig):
    """The preference update of each iteration; its loss is the method's unless train.loss names another."""

    loss: Literal["dpo", "ipo", "selm", "xpo", "sail"] | None = field(
        None, help="Preference loss; null: the method's. dpo or ipo trains any non-SAIL method's pairs and reference "
                   "with that loss (train.alpha must then be 0); selm, xpo and sail only with their own methods.")


@dataclass
class RunConfig:
    """An online alignment run."""

    method: Literal["offline_dpo", "iterative_dpo", "selm", "selm_official", "xpo", "xpo_policy_pairs", "sail_dp",
                    "sail_pp", "sail_pr", "sail_mix"] = field(
        "selm", help="Method preset (selfalign.methods). selm_official ranks pi_ref's greedy answer with a preference "
                     "file's pair (SELM's code); xpo pairs a policy sample with a pi_0 sample (XPO's paper).")
    model: str = field(BUILTIN, help="pi_0: 'builtin' (the built-in task's SFT model), 'constraints' (SmolLM2-135M-Instruct on "
                                     "the constraints task), or a model directory, hub name or .gguf file.")
    prompts: str = field("", help="JSONL training prompts ({'prompt': text or messages}); empty with the built-in task.")
    eval_prompts: str = field("", help="JSONL held-out prompts; empty with the built-in task.")
    preferences: str = field("", help="JSONL preference dataset (prompt, chosen, rejected) for SAIL's offline and DP "
                                      "routes; its prompts are the run's prompts. Empty with the built-in task.")
    prompt_field: str = field("prompt", help="Column holding the prompt in the prompt and preference files.")
    chosen_field: str = field("chosen", help="Column holding the preferred response in the preference file.")
    rejected_field: str = field("rejected", help="Column holding the dispreferred response in the preference file.")
    max_prompt_tokens: int = field(512, help="A longer prompt is an error naming its file and line.")
    output_dir: str = field("runs/run", help="Run directory (the unit of resume).")
    iterations: int = field(3, help="Online iterations, each on a fresh disjoint slice of prompts.")
    prompts_per_iteration: int = field(256, help="Prompts in each iteration's slice.")
    generate_every: int = field(
        0, help="Optimizer steps between generation rounds inside an iteration (each round generates from the "
                "current policy; small is fully online); 0: one round per iteration.")
    pair_selector: Literal["best_worst", "best_random", "random"] = field("best_worst", help="How a pair is picked from K.")
    reference: Literal["method", "previous", "initial"] = field(
        "method", help="pi_ref each iteration: the method's choice, the previous iterate, or pi_0."
    )
    iteration_learning_rates: list[float] = field(
        default_factory=list, help="Peak learning rate of each iteration (SELM's papers decay it); empty: train.learning_rate."
    )
    seed: int = field(0, help="Seed for prompt order, routing, generation and annotator noise.")
    generation: SamplingConfig = field(default_factory=SamplingConfig, help="Sampling of the K responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="Labelling.")
    train: RunTrainConfig = field(default_factory=RunTrainConfig, help="The preference update of each iteration.")
    eval: EvalConfig = field(default_factory=EvalConfig, help="Held-out evaluation.")

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(self.prompts_per_iteration >= 1, "prompts_per_iteration", f"must be >= 1, got {self.prompts_per_iteration}")
        check(self.generate_every >= 0, "generate_every", f"must be >= 0, got {self.generate_every}")
        check(self.generation.num_samples >= 2, "generation.num_samples", "must be >= 2 to form a pair")
        check(not self.iteration_learning_rates or len(self.iteration_learning_rates) == self.iterations,
              "iteration_learning_rates", f"needs one value per iteration ({self.iterations}), "
              f"got {len(self.iteration_learning_rates)}")
        check(all(lr > 0 for lr in self.iteration_learning_rates), "iteration_learning_rates", "values must be > 0")
        method = self.method_spec
        self._check_loss(method)
        check(not (method.offline and self.generate_every), "generate_every",
              f"{self.method} answers every prompt with pi_0 up front; generation rounds need an online method")
        if method.loss == "sail":
            check(self.generation.num_samples == 2, "generation.num_samples",
                  f"SAIL's PP and PR routes draw 2 responses per prompt; set generation.num_samples=2 "
                  f"(got {self.generation.num_samples})")
            sail = self.sail
            check(not (sail.stretch_epochs and sail.online_share >= 1), "train.sail.stretch_epochs",
                  f"r + p + g = {sail.online_share:g} leaves no offline share to stretch epochs by")
            if self.model != BUILTIN and self.needs_dataset:
                check(bool(self.preferences), "preferences",
                      "SAIL's offline and DP routes need a preference file (prompt, chosen, rejected)")
        elif self.model not in TASKS and method.ranks_dataset_pair:
            check(bool(self.preferences), "preferences",
                  f"{self.method} ranks y_ref against a preference file's chosen and rejected (prompt, chosen, rejected)")
        elif self.model not in TASKS:
            check(bool(self.prompts), "prompts", "required when model is not 'builtin' (a JSONL file of prompts)")
        if method.pairing == "policy_vs_ref":
            check(self.generation.num_samples == 2, "generation.num_samples",
                  f"{self.method} pairs one policy sample with one pi_ref sample: 2 responses per prompt; set "
                  f"generation.num_samples=2 (got {self.generation.num_samples})")
        if method.ranks_dataset_pair:
            check(self.pair_selector == "best_worst", "pair_selector",
                  f"{self.method} pairs the best and worst of y_ref, chosen and rejected, as SELM's code does; "
                  f"set pair_selector=best_worst (got {self.pair_selector})")
        if self.model not in TASKS and not (method.loss == "sail" and self.sail.g == 0):
            check(bool(self.judge.function or self.judge.reward_model), "judge",
                  "set judge.function='pkg.module:fn' or judge.reward_model=PATH for a model other than 'builtin'")

    def _check_loss(self, method: Method) -> None:
        """train.loss may swap the method's loss for one that needs nothing the method does not supply."""
        loss = self.train.loss
        if loss is None or loss == method.loss:
            return
        check(method.loss != "sail", "train.loss",
              f"{self.method} trains with sail (its routes need it); drop train.loss or choose a non-SAIL method")
        own = "a sail_* method's routes" if loss == "sail" else f"the y_ref that method={loss} draws"
        check(loss in ("dpo", "ipo"), "train.loss",
              f"{loss} cannot train {self.method}: it needs {own}; change the method, or set train.loss=dpo or ipo")
        check(not self.train.alpha, "train.alpha",
              f"{loss} has no optimism term, so alpha={self.train.alpha:g} would be unused; set train.alpha=0 "
              f"(or drop train.loss to train {method.loss})")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    @property
    def loss(self) -> str:
        """The loss each update trains with: train.loss, or the method's."""
        return self.train.loss or self.method_spec.loss

    @property
    def sail(self) -> SailConfig:
        """train.sail with every unset value taken from the method preset (SAIL methods only)."""
        preset = self.method_spec.sail or {}
        values = {k: v if v is not None else preset.get(k, 0.0)
                  for k, v in dataclasses.asdict(self.train.sail).items() if k in ("r", "p", "g", "rho", "pi", "gamma")}
        return dataclasses.replace(self.train.sail, **values)

    @property
    def alpha(self) -> float:
        """train.alpha, or the paper value of the loss trained when unset (SELM 0.001, XPO 1e-5; 0 otherwise)."""
        return resolve_alpha(self.loss, self.train.alpha)

    @property
    def needs_dataset(self) -> bool:
        """Whether the preference file is read: SAIL with an offline share or a DP route, or a method that ranks its pairs."""
        return self.method_spec.ranks_dataset_pair or (
            self.method_spec.loss == "sail" and (self.sail.online_share < 1 or self.sail.r > 0))


# ---------------------------------------------------------------------------------- files
def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def load_prompts(path: str, field_name: str, tokenizer, max_tokens: int) -> list[Prompt]:
    """Prompts from JSONL; DataError names the file, line and field of anything unusable."""
    return load_prompt_ids(path, field_name, tokenizer, max_tokens)[0]


def load_prompt_ids(path: str, field_name: str, tokenizer, max_tokens: int) -> tuple[list[Prompt], list[list[int]]]:
    """Prompts from JSONL and their token ids, each prompt tokenized once (the length check's ids are kept:
    a chat template costs ~0.7 ms a prompt, seconds for a file of thousands)."""
    from .data import located, prompt_ids

    prompts, ids = [], []
    for lineno, row in read_jsonl(path):
        where = f"{path} line {lineno}"
        value = text_or_messages(row, field_name, where, hint="set prompt_field=... if the column differs")
        tokens = located(where, prompt_ids, tokenizer, value)
        if len(tokens) > max_tokens:
            raise DataError(f"{where}: prompt has {len(tokens)} tokens, over max_prompt_tokens={max_tokens} "
                            "(shorten it or raise max_prompt_tokens)")
        prompts.append(value)
        ids.append(tokens)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts, ids


# ---------------------------------------------------------------------------------- the recipe
@dataclass
class Dataset:
    """The run's prompts: raw (for the judge), token ids (for the policy), and dataset pairs where SAIL needs them."""

    prompts: list[Prompt]
    ids: list[list[int]]
    pairs: list[PreferenceExample] | None = None


def run(cfg: RunConfig, progress: bool = True, backend: Backend | None = None) -> list[dict[str, Any]]:
    """Run (or resume) cfg; returns one metrics dict per iteration.

    backend: a generation backend to use (and leave open) instead of the one cfg.generation
    asks for, which is started here once for the whole run and closed at its end.

    The run directory is locked for the duration (RunLock: a second run on it stops with an
    error) and a killed run's leftover temporaries are removed before anything is written.
    """
    out = Path(cfg.output_dir)
    with RunLock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        try:
            return _run(cfg, progress, backend)
        except NonFiniteError as e:
            unfinished = next((p.name for p in sorted(out.glob("iter_*")) if not (p / "metrics.json").exists()), "?")
            raise NonFiniteError(f"{unfinished}: {e}; every judge label paid so far is kept in {out}") from e


def _run(cfg: RunConfig, progress: bool, backend: Backend | None) -> list[dict[str, Any]]:
    from transformers import AutoConfig

    from .models import is_gguf, load_causal_lm, load_tokenizer, materialize

    out = Path(cfg.output_dir)
    method = cfg.method_spec
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              cpu=not torch.cuda.is_available())
    show = progress and accelerator.is_main_process

    # Build: pi_0, prompts (and dataset pairs), judge, gold reward.
    task = resolve_task(cfg, progress=show)
    check_pretrained("model", task.policy)
    tokenizer = load_tokenizer(task.policy)
    pad_id = pad_token_id(tokenizer)
    if not is_gguf(task.policy):  # refuse a logit scaling log-probs cannot reproduce, up front (GGUF: once converted)
        head_scale(AutoConfig.from_pretrained(task.policy))
    data = load_dataset(cfg, task, tokenizer)
    eval_prompts = load_prompts(task.eval_prompts, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens)[: cfg.eval.prompts] \
        if task.eval_prompts and cfg.eval.prompts else []
    slices = prompt_slices(len(data.prompts), cfg)
    judge = build_judge(cfg, task.judge_fn)
    gold = FunctionJudge(task.gold_fn) if task.gold_fn else None
    check_run_dir(out, cfg, accelerator)
    pi0_path = task.policy
    if is_gguf(pi0_path):
        # Dequantise a GGUF pi_0 once into RUN/pi0: the reference, evaluation and iteration 0 all load it.
        if accelerator.is_main_process:
            materialize(pi0_path, out / "pi0", tokenizer)
        accelerator.wait_for_everyone()
        pi0_path = out / "pi0"
        head_scale(AutoConfig.from_pretrained(pi0_path))
    own_backend = backend is None
    if own_backend:
        backend = build_backend(cfg.generation, tokenizer, pi0_path, load_generation_config(pi0_path), seed=cfg.seed,
                                max_model_len=cfg.max_prompt_tokens + cfg.generation.max_new_tokens)

    if eval_prompts and gold is not None and accelerator.is_main_process and not (out / "pi0_metrics.json").exists():
        from .evaluate import evaluate_policy

        result = evaluate_policy(pi0_path, pi0_path, eval_prompts, tokenizer, gold, cfg, cache=out, keep_rewards=True,
                                 progress=show, responses_path=out / "pi0_eval_responses.jsonl",
                                 backend=backend)
        write_atomic(out / "pi0_eval_rewards.json", json.dumps(result.pop("rewards")))
        write_atomic(out / "pi0_metrics.json", json.dumps(
            {"iteration": "pi_0", "labels_total": 0, "labelled_pairs_total": 0, **result}, indent=1))
    accelerator.wait_for_everyone()

    history = []
    for t in range(len(slices)):
        it = out / f"iter_{t:03d}"
        if (it / "metrics.json").exists():
            history.append(json.loads((it / "metrics.json").read_text()))
            continue
        prev = pi0_path if t == 0 else out / f"iter_{t - 1:03d}" / "policy"
        ref_path = prev if reference_policy(cfg, method) == "previous" else pi0_path
        rows = route_rows(cfg, slices[t], t)
        if accelerator.is_main_process and not (it / "prompts.jsonl").exists():
            write_jsonl(it / "prompts.jsonl", [{"prompt": data.prompts[i], **({"route": r} if r else {})}
                                               for i, r in rows])

        # Done only when all three are there: the policy is renamed into place last.
        if not all((it / name).exists() for name in ("policy", "labels.json", "train.json")):
            policy = load_causal_lm(prev).to(accelerator.device)
            reference = load_causal_lm(ref_path)
            lr = cfg.iteration_learning_rates[t] if cfg.iteration_learning_rates else cfg.train.learning_rate
            train_cfg = dataclasses.replace(cfg.train, loss=cfg.loss, alpha=cfg.alpha, learning_rate=lr,
                                            seed=cfg.train.seed + t, sail=cfg.sail)
            trainer = PreferenceTrainer(policy, train_cfg, pad_id, reference=reference, accelerator=accelerator)
            rounds = round_bounds(len(rows), cfg)
            done = trainer.begin(sum(math.ceil((b - a) / cfg.train.batch_size) for a, b in rounds) * cfg.train.epochs,
                                 checkpoint_dir=it / "train_state")
            timings: dict[str, float] = {}
            for k, (a, b) in enumerate(rounds[done:], start=done):
                rd = round_dir(it, k, len(rounds))
                # 1-4. Generate from the current policy, label (judge, policy or dataset), pair.
                examples = stage_round(rd, cfg, method, trainer, rows[a:b], data, judge, tokenizer, accelerator,
                                       seed=cfg.seed * 7919 + t + 100_003 * k, show=show, backend=backend,
                                       timings=timings)
                backend.sleep()  # a GPU engine gives its memory to training until the next round's push
                # 5. Train on them; the optimizer and schedule carry over from round to round. The schedule
                # is sized from the examples left after ties (later rounds: at this round's share).
                with timed(timings, "reference_logprobs"):
                    trainer.compute_reference_logps(examples, progress=show)
                later = sum(len(trainer.plan(round((d - c) * len(examples) / (b - a)))) for c, d in rounds[k + 1:])
                with timed(timings, "update"):
                    result = trainer.train_round(examples, last=k == len(rounds) - 1, progress=show, later_steps=later)
            if accelerator.is_main_process:
                counts = [json.loads((round_dir(it, k, len(rounds)) / "labels.json").read_text())
                          for k in range(len(rounds))]
                labels = {key: sum(c.get(key, 0) for c in counts)
                          for key in ("judge", "judged_prompts", "policy", "dataset", "pairs", "ties", "responses",
                                      "truncated", "truncation_dropped")}
                labels["routes"] = {r: sum(c["routes"].get(r, 0) for c in counts) for r in counts[0]["routes"]}
                write_atomic(it / "labels.json", json.dumps(labels, indent=1))
                write_atomic(it / "train.json", json.dumps({"steps": result.steps, "summary": result.summary,
                                                           "rounds": len(rounds)}, indent=1))
                write_atomic(it / "timings.json", json.dumps(timings, indent=1))
            # 6. The reference of the next iteration follows from ref_path's choice. Saved last: the
            # policy directory's arrival marks the training stage done.
            save_policy(trainer, tokenizer, it / "policy", accelerator)
            del trainer, reference, policy
            # The run-wide accelerator keeps every prepared model: without this each iteration's policy
            # stays alive to the end of the run.
            accelerator.free_memory()
        # 7. Evaluate and record.
        if accelerator.is_main_process:
            metrics = stage_eval(it, cfg, t, pi0_path, eval_prompts, tokenizer, gold, accelerator, show, backend)
            write_jsonl(out / "metrics.jsonl", [*history, metrics])
            write_atomic(it / "metrics.json", json.dumps(metrics, indent=1))  # last: the iteration is done
        accelerator.wait_for_everyone()
        history.append(json.loads((it / "metrics.json").read_text()))
    if own_backend:
        backend.close()
    return history


# ---------------------------------------------------------------------------------- stages
@dataclass
class Task:
    """Where a run's pieces come from (files and 'pkg.module:fn' names)."""

    policy: Path
    prompts: str
    eval_prompts: str
    preferences: str
    judge_fn: str
    gold_fn: str


def resolve_task(cfg: RunConfig, progress: bool) -> Task:
    """pi_0, the prompt and preference files, the judge function and the gold reward.

    The gold reward is eval.reward, else the built-in task's reward, else the judge's function:
    a judge swapped in for the built-in task never changes what evaluation measures.
    """
    if cfg.model == CONSTRAINTS:
        from .tasks.smollm2 import build_task as build_constraints

        real = build_constraints(progress=progress)
        return Task(real.policy_dir, cfg.prompts or str(real.train_prompts), cfg.eval_prompts or str(real.eval_prompts),
                    cfg.preferences, cfg.judge.function or real.reward_fn, cfg.eval.reward or real.reward_fn)
    if cfg.model != BUILTIN:
        return Task(Path(cfg.model), cfg.prompts, cfg.eval_prompts, cfg.preferences, cfg.judge.function,
                    cfg.eval.reward or cfg.judge.function)
    from .tasks.builtin import build_task

    task = build_task(progress=progress)
    preferences = cfg.preferences or (str(task.train_preferences) if cfg.needs_dataset else "")
    return Task(task.policy_dir, cfg.prompts or str(task.train_prompts), cfg.eval_prompts or str(task.eval_prompts),
                preferences, cfg.judge.function or task.reward_fn, cfg.eval.reward or task.reward_fn)


def load_dataset(cfg: RunConfig, task: Task, tokenizer) -> Dataset:
    """The prompts to slice: the preference file's when SAIL trains on dataset pairs, else the prompt file's."""
    from .data import PreferenceDataConfig, load_preferences

    if cfg.needs_dataset:
        prompts = load_prompts(task.preferences, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens)
        pairs = load_preferences(PreferenceDataConfig(
            path=task.preferences, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
            rejected_field=cfg.rejected_field, max_prompt_tokens=cfg.max_prompt_tokens), tokenizer)
        return Dataset(prompts, [ex.prompt_ids for ex in pairs], pairs)
    return Dataset(*load_prompt_ids(task.prompts, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens))


def round_dir(it: Path, k: int, rounds: int) -> Path:
    """Where generation round k of an iteration keeps its stage files (the iteration itself when it has one)."""
    return it if rounds == 1 else it / f"round_{k:03d}"


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


def route_rows(cfg: RunConfig, indices: list[int], t: int) -> list[tuple[int, str | None]]:
    """(prompt index, route) of each row of iteration t; the route is None outside SAIL.

    SAIL routes every row independently: DP with probability r, PP with p, PR with g, plain
    offline DPO otherwise. With train.sail.stretch_epochs the slice is visited 1/(1 - r - p - g)
    times over (later visits reshuffled), each visit routed afresh.
    """
    if cfg.method_spec.loss != "sail":
        return [(i, None) for i in indices]
    sail = cfg.sail
    rng = random.Random(f"{cfg.seed}:routes:{t}")
    rows = list(indices)
    if sail.stretch_epochs:
        target = math.ceil(len(indices) / (1.0 - sail.online_share) - 1e-9)
        while len(rows) < target:
            again = list(indices)
            rng.shuffle(again)
            rows += again[: target - len(rows)]
    routed = []
    for i in rows:
        u = rng.random()
        route = "dp" if u < sail.r else "pp" if u < sail.r + sail.p else "pr" if u < sail.online_share else "offline"
        routed.append((i, route))
    return routed


def round_bounds(n_rows: int, cfg: RunConfig) -> list[tuple[int, int]]:
    """[start, end) rows of each generation round: generate_every optimizer steps' worth, or all rows."""
    size = cfg.generate_every * cfg.train.batch_size if cfg.generate_every else n_rows
    return [(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]


def reference_policy(cfg: RunConfig, method: Method) -> str:
    return method.reference if cfg.reference == "method" else cfg.reference


def build_judge(cfg: RunConfig, reward_fn: str) -> Judge:
    from .judges.noisy import NoisyJudge

    if cfg.judge.kind == "reward_model":
        from .judges.reward_model import RewardModelJudge

        if not cfg.judge.reward_model:
            raise ConfigError("judge.reward_model: required with judge.kind=reward_model (a model directory)")
        check_pretrained("judge.reward_model", cfg.judge.reward_model)
        with loading("judge.reward_model", cfg.judge.reward_model):
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


class timed:
    """`with timed(timings, "generation"):` adds the block's wall-clock seconds to timings["generation"]."""

    def __init__(self, timings: dict[str, float] | None, key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.timings is not None:
            self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start


def generate_sharded(model, ids: list[list[int]], gen_cfg: GenerationConfig, seed: int, tokenizer,
                     accelerator: Accelerator, show: bool, backend: Backend | None = None) -> list[list[list[int]]]:
    """Each process generates for prompts i = rank, rank + P, ...; the results are gathered in order.

    With the vllm backend each process drives its own engine on its own shard (the policy is
    replicated under data parallelism anyway); backend.generator(model) pushes model's weights.
    """
    if backend is None:
        backend = HFBackend(pad_token_id(tokenizer), stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    generator = backend.generator(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(ids), world))
    # The seed depends on the process so that shards do not repeat each other's samples.
    responses = generator.generate([ids[i] for i in mine], gen_cfg, seed=seed * 1000 + rank, progress=show)
    pairs = list(zip(mine, responses))
    if world > 1:
        pairs = gather_object(pairs)
    by_index = dict(pairs)
    return [by_index[i] for i in range(len(ids))]


def stage_key(rd: Path) -> str:
    """'iter_000', or 'iter_000/round_001' inside an iteration with several rounds: keys the stage's randomness."""
    return f"{rd.parent.name}/{rd.name}" if rd.name.startswith("round_") else rd.name


def stage_generate(rd: Path, cfg: RunConfig, method: Method, trainer: PreferenceTrainer, ids: list[list[int]],
                   tokenizer, accelerator: Accelerator, seed: int, show: bool,
                   dataset_pairs: list[tuple[list[int], list[int]]] | None = None,
                   backend: Backend | None = None) -> list[dict[str, Any]]:
    """RUN/iter[/round]/responses.jsonl: the candidates the judge ranks for each prompt (+ y_ref from pi_ref).

    The candidates are the method's (Method.candidates): K policy samples, or a policy sample and
    y_ref (XPO), or y_ref and the dataset pair (SELM's code; dataset_pairs gives each prompt's).
    """
    path = rd / "responses.jsonl"
    end_ids = set(end_token_ids(tokenizer, getattr(trainer.policy, "generation_config", None)))
    limit = cfg.generation.max_new_tokens
    if path.exists():
        rows = load_jsonl(path)
        for row in rows:  # a file written before truncation was recorded
            row.setdefault("truncated", [is_truncated(r, limit, end_ids) for r in row["response_ids"]])
        return rows
    k = method.policy_samples(cfg.generation.num_samples)
    samples = generate_sharded(trainer.policy, ids, dataclasses.replace(cfg.generation, num_samples=k), seed,
                               tokenizer, accelerator, show, backend) if ids and k else [[] for _ in ids]
    ref_samples: list[list[int]] | None = None
    if method.needs_ref_sample and (cfg.alpha != 0 or method.ranks_ref_sample) and ids:
        # SELM: y_ref from pi_ref (greedy); XPO: a sample from the fixed pi_0.
        greedy = method.ref_sample == "greedy"
        ref_cfg = dataclasses.replace(cfg.generation, num_samples=1,
                                      temperature=0.0 if greedy else cfg.generation.temperature)
        ref_samples = [r[0] for r in generate_sharded(trainer.reference, ids, ref_cfg, seed + 1, tokenizer, accelerator,
                                                      show, backend)]
    rows = []
    for i, policy in enumerate(samples):
        ref = ref_samples[i] if ref_samples is not None else None
        responses, ref_index = method.candidates(policy, ref, dataset_pairs[i] if dataset_pairs else None)
        row = {"response_ids": responses, "responses": [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
               "truncated": [is_truncated(r, limit, end_ids) for r in responses]}
        if ref is not None:
            row["ref_response_ids"] = ref
        if ref_index is not None:
            row["ref_index"] = ref_index
        rows.append(row)
    if accelerator.is_main_process:
        write_jsonl(path, rows)
    accelerator.wait_for_everyone()
    return rows


def stage_judge(rd: Path, cfg: RunConfig, judge: Judge, prompts: list[Prompt], responses: list[list[str]],
                accelerator: Accelerator, show: bool,
                truncated: list[list[bool]] | None = None) -> tuple[list[list[float]], int]:
    """RUN/iter[/round]/generations.jsonl: prompt, responses[], scores[], truncated[]; returns (scores, labels paid).

    Every label paid for is journaled chunk by chunk before it is used, so a resumed run
    never asks the judge again for one it already has.
    """
    path, journal = rd / "generations.jsonl", rd / "judge_journal.jsonl"
    if not prompts:
        return [], 0
    if not path.exists() and accelerator.is_main_process:
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
        rd.mkdir(parents=True, exist_ok=True)
        with open(journal, "a") as f:
            for s in range(0, len(prompts), size):
                todo = [i for i in range(s, min(s + size, len(prompts))) if i not in done]
                if not todo:
                    continue
                if hasattr(judge, "salt"):
                    judge.salt = f"{stage_key(rd)}:{s}"
                before = judge.labels
                scores = judge.score([prompts[i] for i in todo], [responses[i] for i in todo])
                # The judge's own count: one per response scored, one per comparison for a ranker.
                entry = {"scores": {str(i): sc for i, sc in zip(todo, scores)}, "labels": judge.labels - before}
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
                faults.after_write(journal, renamed=False)
                done.update(zip(todo, scores))
                bar.update(len(todo))
        bar.close()
        write_jsonl(path, [{"prompt": prompts[i], "responses": responses[i], "scores": done[i],
                            **({"truncated": truncated[i]} if truncated is not None else {})}
                           for i in range(len(prompts))])
    accelerator.wait_for_everyone()
    labels = sum(json.loads(line)["labels"] for line in journal.read_text().splitlines() if line.strip())
    return [row["scores"] for row in load_jsonl(path)], labels


def stage_round(rd: Path, cfg: RunConfig, method: Method, trainer: PreferenceTrainer, rows: list[tuple[int, str | None]],
                data: Dataset, judge: Judge, tokenizer, accelerator: Accelerator, seed: int,
                show: bool, backend: Backend | None = None,
                timings: dict[str, float] | None = None) -> list[PreferenceExample]:
    """RUN/iter[/round]/pairs.jsonl and labels.json: one round's training examples and where their labels came from.

    Rows on an online route (every row outside SAIL; SAIL's PP and PR) get the method's candidates:
    K responses from the current policy, or (Method.pairing) a policy sample and y_ref, or y_ref
    and the row's dataset pair. The judge labels them, except SAIL-PP's, which the policy labels itself:
    Bernoulli(sigmoid(h)) over its two samples, at no judge call. SAIL's offline and DP rows
    train on the dataset's pair. Every example carries its own row's prompt ids; nothing is
    zipped across two lists that could be ordered differently.
    """
    if (rd / "pairs.jsonl").exists() and (rd / "labels.json").exists():
        return [PreferenceExample(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r.get("ref_sample_ids"),
                                  r.get("route")) for r in load_jsonl(rd / "pairs.jsonl")]
    online = [j for j, (_, route) in enumerate(rows) if route in (None, "pp", "pr")]
    dataset_pairs = [(data.pairs[rows[j][0]].chosen_ids, data.pairs[rows[j][0]].rejected_ids) for j in online] \
        if method.ranks_dataset_pair else None
    with timed(timings, "generation"):
        gens = dict(zip(online, stage_generate(rd, cfg, method, trainer, [data.ids[rows[j][0]] for j in online],
                                               tokenizer, accelerator, seed, show, dataset_pairs, backend)))
    judged = [j for j in online if rows[j][1] != "pp"]
    with timed(timings, "judging"):
        scores, judge_labels = stage_judge(rd, cfg, judge, [data.prompts[rows[j][0]] for j in judged],
                                           [gens[j]["responses"] for j in judged], accelerator, show,
                                           truncated=[gens[j]["truncated"] for j in judged])
    mode = cfg.generation.truncated
    if mode == "penalize":  # generations.jsonl keeps the judge's own scores; the pairs see the penalty
        scores = penalized_scores(scores, [gens[j]["truncated"] for j in judged], cfg.generation.truncated_score)
    scores_of = dict(zip(judged, scores))
    select = SELECTORS[cfg.pair_selector]
    rng = random.Random(f"{cfg.seed}:{stage_key(rd)}")
    examples: dict[int, PreferenceExample] = {}
    sources: dict[int, str] = {}
    ties = dropped = 0
    for j, (i, route) in enumerate(rows):
        if route in ("offline", "dp"):
            pair = data.pairs[i]
            examples[j] = PreferenceExample(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, route=route)
            sources[j] = "dataset"
        elif route == "pp":
            if mode == "drop" and any(gens[j]["truncated"]):
                dropped += 1
                continue
            y = gens[j]["response_ids"]
            examples[j] = PreferenceExample(data.ids[i], y[0], y[1], route=route)
            sources[j] = "policy"
        else:
            keep = finished(gens[j]["truncated"]) if mode == "drop" else list(range(len(scores_of[j])))
            if len(keep) < 2:
                dropped += 1
                continue
            kept = [scores_of[j][c] for c in keep]
            # SELM's code ranks (y_ref, chosen, rejected) best vs worst; XPO's pair is its two candidates.
            pair = selm_three_way(*kept) if method.ranks_dataset_pair and len(kept) == 3 else select(kept, rng)
            if pair is None:
                ties += 1
                continue
            pair = Pair(keep[pair.chosen], keep[pair.rejected])
            y = gens[j]["response_ids"]
            examples[j] = PreferenceExample(data.ids[i], y[pair.chosen], y[pair.rejected],
                                            gens[j].get("ref_response_ids"), route=route)
            sources[j] = "judge"
    policy_prob = label_by_policy(trainer, examples, [j for j, (_, r) in enumerate(rows) if r == "pp"], seed)
    ordered = [examples[j] for j in sorted(examples)]
    if not ordered:
        raise RuntimeError(f"{rd}: every prompt's responses tied under the judge or were dropped as truncated "
                           "(generation.truncated=drop); no pair to train on")
    routes = [r for _, r in rows]
    counts = {
        "judge": judge_labels,
        "judged_prompts": len(judged),
        # SAIL-DP redraws each of its labels from the policy at every visit (once per epoch).
        "policy": routes.count("pp") + routes.count("dp") * cfg.train.epochs,
        "dataset": routes.count("offline") + routes.count("dp"),
        "pairs": len(ordered), "ties": ties,
        # Policy samples that hit max_new_tokens without an end token, and rows that lost their pair to
        # generation.truncated=drop.
        "responses": sum(len(g["truncated"]) for g in gens.values()),
        "truncated": sum(sum(g["truncated"]) for g in gens.values()), "truncation_dropped": dropped,
        "routes": {r: routes.count(r) for r in ROUTES} if method.loss == "sail" else {},
    }
    if accelerator.is_main_process:
        write_jsonl(rd / "pairs.jsonl", [
            {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids,
             "ref_sample_ids": e.ref_sample_ids, "route": e.route, "label_source": sources[j],
             **({"policy_prob": policy_prob[j]} if j in policy_prob else {})}
            for j, e in sorted(examples.items())])
        write_atomic(rd / "labels.json", json.dumps(counts, indent=1))
    accelerator.wait_for_everyone()
    return ordered


def label_by_policy(trainer: PreferenceTrainer, examples: dict[int, PreferenceExample], rows: list[int],
                    seed: int) -> dict[int, float]:
    """SAIL-PP: order each pair by a draw from the policy's own preference P(y1 > y2) = sigmoid(h)."""
    if not rows:
        return {}
    h = trainer.policy_preference([examples[j] for j in rows])
    probs = {}
    for j, hj in zip(rows, h):
        p1 = 1.0 / (1.0 + math.exp(-hj))
        ex = examples[j]
        if random.Random(f"{seed}:pp:{j}").random() >= p1:
            ex.chosen_ids, ex.rejected_ids = ex.rejected_ids, ex.chosen_ids
            ex.ref_chosen, ex.ref_rejected = ex.ref_rejected, ex.ref_chosen
        probs[j] = p1
    return probs


def save_policy(trainer: PreferenceTrainer, tokenizer, path: Path, accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = trainer.policy.merge_and_unload() if trainer.config.lora.enabled else trainer.policy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        faults.before_rename()
        if path.exists():  # a run from before stage files were ordered left a policy without its stage files
            shutil.rmtree(path)
        os.replace(tmp, path)
        faults.after_write(path)
    accelerator.wait_for_everyone()


def stage_eval(it: Path, cfg: RunConfig, t: int, pi0_path: Path, eval_prompts: list[Prompt], tokenizer, gold,
               accelerator: Accelerator, show: bool, backend: Backend | None = None) -> dict[str, Any]:
    """Gold reward of greedy and sampled responses, win rate and KL against pi_0, labels used by source."""
    from .evaluate import evaluate_policy

    labels = json.loads((it / "labels.json").read_text())
    previous = json.loads((it.parent / f"iter_{t - 1:03d}" / "metrics.json").read_text()) if t > 0 else {}
    train = json.loads((it / "train.json").read_text())
    # Seconds this process spent in each stage (a resumed iteration counts only what it redid).
    timings = json.loads((it / "timings.json").read_text()) if (it / "timings.json").exists() else {}
    by_source = {k: labels[k] for k in ("judge", "policy", "dataset")}
    before = previous.get("labels_total_by_source", {})
    # Labelled pairs: prompts whose K responses the judge scored, plus dataset pairs (SAIL). Comparable
    # across methods where judge labels are not (K judge labels make one labelled prompt).
    labelled = labels["judged_prompts"] + labels["dataset"]
    metrics = {"iteration": t, "labels": labels["judge"], "labels_total": previous.get("labels_total", 0) + labels["judge"],
               "labels_by_source": by_source,
               "labels_total_by_source": {k: before.get(k, 0) + v for k, v in by_source.items()},
               "labelled_pairs": labelled, "labelled_pairs_total": previous.get("labelled_pairs_total", 0) + labelled,
               "pairs": labels["pairs"], "ties": labels["ties"],
               "truncated": labels.get("truncated", 0),
               "truncated_share": labels.get("truncated", 0) / labels["responses"] if labels.get("responses") else 0.0,
               "truncation_dropped": labels.get("truncation_dropped", 0),
               **({"routes": labels["routes"]} if labels["routes"] else {}),
               **{f"train/{k}": v for k, v in train["summary"].items() if k in ("loss", "rewards/accuracies",
                                                                                 "rewards/margins")}}
    if eval_prompts and gold is not None:
        # SELM's analysis: the implicit reward gap, here on (up to 256 of) the iteration's own training pairs.
        pairs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                 for rd in [it, *sorted(it.glob("round_*"))] if (rd / "pairs.jsonl").exists()
                 for r in load_jsonl(rd / "pairs.jsonl")]
        pairs = random.Random(f"{cfg.seed}:implicit").sample(pairs, min(256, len(pairs)))
        start = time.perf_counter()
        result = evaluate_policy(it / "policy", pi0_path, eval_prompts, tokenizer, gold, cfg, cache=it.parent,
                                 progress=show, pairs=pairs, keep_rewards=True,
                                 responses_path=it / "eval_responses.jsonl", backend=backend)
        write_atomic(it / "eval_rewards.json", json.dumps(result.pop("rewards")))
        metrics.update(result)
        timings["eval"] = time.perf_counter() - start
    metrics.update({f"time/{k}": round(v, 3) for k, v in timings.items()})
    return metrics
