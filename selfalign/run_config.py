"""The configuration of an online run (RunConfig and its parts), and where a run's pieces come from (resolve_task).

Kept apart from the recipe (loop.py) so the CLI, the tests and the benchmarks can build and
check a run's config without importing the training code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .card import check_repo_id
from .config import UsageError, check, field
from .estimate import HardwareConfig
from .generation import GenerationConfig
from .judges.llm import LLMJudgeConfig
from .methods import METHODS, Method
from .tasks import BUILTIN, CONSTRAINTS, INSTRUCTIONS, TASKS
from .tracking import parse_report_to
from .train_config import PAPER_ALPHA, SailConfig, TrainConfig, needs_ref_sample, resolve_alpha


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

    kind: Literal["function", "reward_model", "pairwise", "llm"] = field(
        "function", help="A reward function, a reward model, a pairwise ranker (mean win probability, like PairRM), "
                         "or an LLM behind an OpenAI-compatible server (judge.llm.*)."
    )
    function: str = field("", help="'pkg.module:function': fn(prompts, responses) -> scores (kind=function; empty: "
                                   "the built-in task's), or fn(prompts, responses_a, responses_b) -> P(a better "
                                   "than b) per pair, called on batches (kind=pairwise).")
    reward_model: str = field("", help="Sequence-classification reward model directory or hub name (kind=reward_model).")
    noise: float = field(0.0, help="Bradley-Terry temperature of a simulated annotator over the scores; 0 = noiseless.")
    chunk_size: int = field(64, help="Prompts per judge call, journaled as soon as the call returns: a kill re-pays "
                                     "at most one call's labels (chunk_size x K); 1 for a paid judge.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        "auto", help="Reward model weights' dtype (kind=reward_model, and eval.reward_model's): auto is bf16 on a GPU that supports it, fp32 "
                     "on a CPU. Loaded only when the method calls the judge (not by sail_dp, sail_pp).")
    batch_size: int = field(16, help="Sequences per reward-model forward pass (kind=reward_model, and eval.reward_model).")
    offload: bool = field(False, help="Keep the reward model in CPU memory between judge calls, on the GPU only "
                                      "while it scores (kind=reward_model, and eval.reward_model): training then has its memory.")
    llm: LLMJudgeConfig = field(default_factory=LLMJudgeConfig, help="The LLM judge (kind=llm): endpoint, model, "
                                "prompts, concurrency, retries; every answer journaled in RUN/judge_answers.jsonl.")

    def __post_init__(self) -> None:
        check(self.noise >= 0, "judge.noise", f"must be >= 0, got {self.noise}")
        check(self.chunk_size >= 1, "judge.chunk_size", f"must be >= 1, got {self.chunk_size}")
        check(self.batch_size >= 1, "judge.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class EvalConfig:
    """Held-out evaluation after every iteration (gold reward, win rate and KL against pi_0)."""

    prompts: int = field(64, help="Held-out prompts to evaluate on; 0 disables evaluation.")
    samples: int = field(2, help="Sampled responses per prompt (for reward of samples and the KL estimate).")
    implicit_pairs: int = field(256, help="Training pairs of the iteration (at most) on which SELM's implicit reward gap "
                                          "is measured (a policy and a pi_0 forward pass each); 0 skips it.")
    reward: str = field("", help="'pkg.module:function' gold reward; empty: the built-in task's, else the judge "
                                 "function, else the judge's reward model (without noise).")
    reward_model: str = field("", help="Sequence-classification reward model (directory, hub name or .gguf) that "
                                       "scores the held-out answers instead of a function.")
    every: int = field(1, help="Evaluate on the held-out prompts after every N-th iteration (and always after the "
                               "last); 0: after the last only. Skipped iterations record no held-out metrics.")
    benchmark: Literal["", "ifeval"] = field(
        "", help="A public benchmark answered by pi_0 (once per weights, cached) and by the final iterate, on the "
                 "run's generation engine, saved in RUN/ifeval/ with a paired test: ifeval (541 prompts, Google's "
                 "checkers; needs the ifeval extra). Empty: none.")
    benchmark_max_new_tokens: int = field(1280, help="Longest benchmark answer in tokens (greedy; the Open LLM "
                                                     "Leaderboard allows 1280 on IFEval).")
    benchmark_prompts: int = field(0, help="Answer the benchmark's first N prompts only (a quick look; paired tests "
                                           "need them all); 0: every prompt.")

    def __post_init__(self) -> None:
        check(self.prompts >= 0, "eval.prompts", f"must be >= 0 (0 disables evaluation), got {self.prompts}")
        check(self.samples >= 1, "eval.samples", f"must be >= 1, got {self.samples}")
        check(self.implicit_pairs >= 0, "eval.implicit_pairs", f"must be >= 0, got {self.implicit_pairs}")
        check(self.every >= 0, "eval.every", f"must be >= 0 (0: the last iteration only), got {self.every}")
        check(self.benchmark_max_new_tokens >= 1, "eval.benchmark_max_new_tokens",
              f"must be >= 1, got {self.benchmark_max_new_tokens}")
        check(self.benchmark_prompts >= 0, "eval.benchmark_prompts", f"must be >= 0 (0: all), got {self.benchmark_prompts}")
        check(not (self.reward and self.reward_model), "eval.reward_model",
              "set eval.reward or eval.reward_model, not both (one reward scores the held-out answers)")


@dataclass
class RunTrainConfig(TrainConfig):
    """The preference update of each iteration; its loss is the method's unless train.loss names another."""

    loss: Literal["dpo", "ipo", "ipo_sum", "selm", "xpo", "sail"] | None = field(
        None, help="Preference loss; null: the method's. dpo, ipo (length-averaged, as TRL's) or ipo_sum (IPO on "
                   "summed log-probs) trains any non-SAIL method's pairs and reference with that loss (train.alpha "
                   "must then be 0); selm, xpo and sail only with their own methods.")


def expand_path(value: str) -> str:
    """value with a leading `~` and $VARS expanded (unchanged when it holds neither)."""
    return os.path.expandvars(os.path.expanduser(value)) if value and ("~" in value or "$" in value) else value


@dataclass
class RunConfig:
    """An online alignment run."""

    method: Literal["offline_dpo", "iterative_dpo", "selm", "selm_official", "xpo", "xpo_policy_pairs", "sail_dp",
                    "sail_pp", "sail_pr", "sail_mix"] = field(
        "selm", help="Method preset (selfalign.methods). selm_official ranks pi_ref's greedy answer with a preference "
                     "file's pair (SELM's code); xpo pairs a policy sample with a pi_0 sample (XPO's paper).")
    model: str = field(BUILTIN, help="pi_0: 'builtin' (the built-in task's SFT model), 'constraints' (SmolLM2-135M-Instruct on "
                                     "the constraints task), 'instructions' (the same model on the constraints widened "
                                     "toward IFEval's families), 'smollm2' (that model alone, for your own prompts and "
                                     "judge), or a model directory, hub name or .gguf file.")
    prompts: str = field("", help="Training prompts ({'prompt': text or messages}): a JSONL/JSON/Parquet/Arrow file, a "
                                  "save_to_disk folder or a Hugging Face dataset name; empty with the built-in task.")
    eval_prompts: str = field("", help="Held-out prompts (any source prompts takes); empty with the built-in task.")
    preferences: str = field("", help="Preference dataset (prompt, chosen, rejected; any source prompts takes) for SAIL's "
                                      "offline and DP routes; its prompts are the run's prompts. Empty with the built-in task.")
    prompts_split: str = field("", help="Split of prompts= when it has several (e.g. train_prefs; HF slicing such as "
                                        "train[:1000] works); empty: its only split, or train.")
    eval_prompts_split: str = field("", help="Split of eval_prompts= (e.g. test_prefs); empty: its only split, or train.")
    preferences_split: str = field("", help="Split of preferences=; empty: its only split, or train.")
    subset: str = field("", help="Configuration (subset) of a Hub dataset that has several; empty: its default.")
    prompt_field: str = field("prompt", help="Column holding the prompt in the prompt and preference files.")
    chosen_field: str = field("chosen", help="Column holding the preferred response in the preference file.")
    rejected_field: str = field("rejected", help="Column holding the dispreferred response in the preference file.")
    max_prompt_tokens: int = field(512, help="A longer prompt is an error naming its file and line.")
    output_dir: str = field("runs/run", help="Run directory (the unit of resume).")
    push_to_hub: str = field("", help="Hub repository (user/name) to upload the final policy and its model card to "
                                      "when the run ends; needs network and a token (HF_TOKEN). Empty: no upload.")
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
    report_to: str = field("none", help="Experiment trackers, through accelerate: none, or one or more (comma-separated) "
                                        "of tensorboard (RUN/tensorboard/), wandb, trackio, mlflow, ...; per-step metrics "
                                        "also go to RUN/steps.jsonl whatever this says.")
    generation: SamplingConfig = field(default_factory=SamplingConfig, help="Sampling of the K responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="Labelling.")
    train: RunTrainConfig = field(default_factory=RunTrainConfig, help="The preference update of each iteration.")
    eval: EvalConfig = field(default_factory=EvalConfig, help="Held-out evaluation.")
    hardware: HardwareConfig = field(default_factory=HardwareConfig,
                                     help="The GPUs the recipe is meant for (selfalign estimate checks the fit).")

    def __post_init__(self) -> None:
        # `~` and $VARS in every path setting, as a shell would expand them (hub names never hold either).
        for key in ("model", "prompts", "eval_prompts", "preferences", "output_dir"):
            setattr(self, key, expand_path(getattr(self, key)))
        self.judge.reward_model = expand_path(self.judge.reward_model)
        self.eval.reward_model = expand_path(self.eval.reward_model)
        check(self.output_dir.strip() != "", "output_dir", "must name a directory (got an empty value)")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(self.prompts_per_iteration >= 1, "prompts_per_iteration", f"must be >= 1, got {self.prompts_per_iteration}")
        check(self.generate_every >= 0, "generate_every", f"must be >= 0, got {self.generate_every}")
        parse_report_to(self.report_to)
        check(self.generation.num_samples >= 2 or self.method_spec.ranks_dataset_pair, "generation.num_samples",
              "must be >= 2 to form a pair")
        check_repo_id("push_to_hub", self.push_to_hub)
        check(not self.iteration_learning_rates or len(self.iteration_learning_rates) == self.iterations,
              "iteration_learning_rates", f"needs one value per iteration ({self.iterations}), "
              f"got {len(self.iteration_learning_rates)}")
        check(all(lr > 0 for lr in self.iteration_learning_rates), "iteration_learning_rates", "values must be > 0")
        method = self.method_spec
        self._check_loss(method)
        check(not (method.offline and self.generate_every), "generate_every",
              f"{self.method} answers every prompt with pi_0 up front; generation rounds need an online method")
        if method.is_sail:
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
        self._check_greedy_ties(method)
        if method.pairing == "policy_vs_ref":
            check(self.generation.num_samples == 2, "generation.num_samples",
                  f"{self.method} pairs one policy sample with one pi_ref sample: 2 responses per prompt; set "
                  f"generation.num_samples=2 (got {self.generation.num_samples})")
        if method.ranks_dataset_pair:
            check(self.pair_selector == "best_worst", "pair_selector",
                  f"{self.method} pairs the best and worst of y_ref, chosen and rejected, as SELM's code does; "
                  f"set pair_selector=best_worst (got {self.pair_selector})")
            # SELM's code generates one greedy answer per prompt and reads the preference file's prompts:
            # a setting it would ignore is refused rather than silently dropped.
            check(self.generation.num_samples == 1, "generation.num_samples",
                  f"{self.method} generates one response per prompt (pi_ref's greedy y_ref, ranked with the preference "
                  f"file's chosen and rejected, as SELM's code does) and no policy samples; set "
                  f"generation.num_samples=1 (got {self.generation.num_samples})")
            for key in ("prompts", "prompts_split"):
                check(not getattr(self, key), key,
                      f"{self.method} answers the preference file's prompts (preferences=, preferences_split=), "
                      f"which {key}= cannot change; drop {key}={getattr(self, key)}")
        if self.model not in TASKS and not (method.is_sail and self.sail.g == 0):
            check(bool(self.judge.function or self.judge.reward_model or self.judge.kind == "llm"), "judge",
                  "set judge.function='pkg.module:fn' or judge.reward_model=PATH for a model other than 'builtin'")

    def _check_greedy_ties(self, method: Method) -> None:
        """Greedy decoding draws K identical responses, which a noiseless judge scores equal: every prompt ties, so a
        round pays for generation and judging and trains on nothing. Refused up front."""
        if self.generation.temperature != 0 or self.judge.noise != 0 or method.pairing != "policy_samples":
            return
        if method.is_sail and self.sail.p + self.sail.g == 0:  # SAIL-DP only: no policy pair is drawn
            return
        check(False, "generation.temperature",
              f"0 is greedy decoding: the {self.generation.num_samples} responses to a prompt are identical and the "
              "noiseless judge (judge.noise=0) ties them all, leaving no pair to train on; set "
              "generation.temperature > 0 (1.0 samples from the policy itself)")

    def _check_loss(self, method: Method) -> None:
        """train.loss may swap the method's loss for one that needs nothing the method does not supply."""
        loss = self.train.loss
        if loss is None or loss == method.loss:
            return
        check(not method.is_sail, "train.loss",
              f"{self.method} trains with sail (its routes need it); drop train.loss or choose a non-SAIL method")
        own = f"the y_ref that method={loss} draws" if loss in PAPER_ALPHA else "a sail_* method's routes"
        check(loss in ("dpo", "ipo", "ipo_sum"), "train.loss",
              f"{loss} cannot train {self.method}: it needs {own}; change the method, or set train.loss=dpo or ipo")
        check(not self.train.alpha, "train.alpha",
              f"{loss} has no optimism term, so alpha={self.train.alpha:g} would be unused; set train.alpha=0 "
              f"(or drop train.loss to train {method.loss})")

    def source_split(self, key: str) -> tuple[str, str, str, str]:
        """(split, subset, chosen column, split key) of data source `key` (prompts, eval_prompts, preferences)."""
        return getattr(self, f"{key}_split"), self.subset, self.chosen_field, f"{key}_split"

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
        return self.train.sail.over(self.method_spec.sail)

    @property
    def alpha(self) -> float:
        """train.alpha, or the paper value of the loss trained when unset (SELM 0.001, XPO 1e-5; 0 otherwise)."""
        return resolve_alpha(self.loss, self.train.alpha)

    @property
    def needs_ref_sample(self) -> bool:
        """Whether each update feeds y_ref through the policy (train_config.needs_ref_sample decides)."""
        return needs_ref_sample(self.loss, self.train.alpha)

    def train_config(self, t: int) -> TrainConfig:
        """Iteration t's update settings: the resolved loss, alpha and SAIL values, its learning rate and seed."""
        lr = self.iteration_learning_rates[t] if self.iteration_learning_rates else self.train.learning_rate
        return dataclasses.replace(self.train, loss=self.loss, alpha=self.alpha, learning_rate=lr,
                                   seed=self.train.seed + t, sail=self.sail)

    @property
    def needs_dataset(self) -> bool:
        """Whether the preference file is read: SAIL with an offline share or a DP route, or a method that ranks its pairs."""
        return self.method_spec.ranks_dataset_pair or (
            self.method_spec.is_sail and (self.sail.online_share < 1 or self.sail.r > 0))


# What a key missing from a saved config.yaml stood for, where its default does not reproduce the versions
# that wrote configs without it (config.fill_missing_keys; every other missing key takes its default). Before
# train.dtype and judge.dtype every model loaded in fp32 (auto is bf16 on a GPU); before train.lora.merge a
# LoRA iterate was saved merged. A new key whose default changes what an older run did belongs here.
RESUME_LEGACY: dict[str, object] = {"train.dtype": "fp32", "judge.dtype": "fp32", "train.lora.merge": True}


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
    if cfg.model in (CONSTRAINTS, INSTRUCTIONS):
        from .tasks.smollm2 import build_task as build_constraints

        real = build_constraints(progress=progress, prompts=cfg.model)
        return Task(real.policy_dir, cfg.prompts or str(real.train_prompts), cfg.eval_prompts or str(real.eval_prompts),
                    cfg.preferences, cfg.judge.function or real.reward_fn, cfg.eval.reward or real.reward_fn)
    if cfg.model != BUILTIN:
        from .tasks.smollm2 import named_model

        # A pairwise judge's function compares two responses: it is no reward to evaluate with.
        return Task(Path(named_model(cfg.model, progress)), cfg.prompts, cfg.eval_prompts, cfg.preferences,
                    cfg.judge.function, cfg.eval.reward or (cfg.judge.function if cfg.judge.kind == "function" else ""))
    from .tasks.builtin import build_task

    task = build_task(progress=progress)
    preferences = cfg.preferences or (str(task.train_preferences) if cfg.needs_dataset else "")
    return Task(task.policy_dir, cfg.prompts or str(task.train_prompts), cfg.eval_prompts or str(task.eval_prompts),
                preferences, cfg.judge.function or task.reward_fn, cfg.eval.reward or task.reward_fn)


RECIPES = Path(__file__).parent / "recipes"


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of one bundled with selfalign (e.g. 'quickstart')."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    bundled = RECIPES / f"{name}.yaml"
    if not bundled.exists():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise UsageError(f"no recipe file '{name}' and no bundled recipe of that name (bundled: {known})")
    return bundled
