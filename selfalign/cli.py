"""The `selfalign` command line.

    selfalign quickstart [key.sub=value ...]               SELM on the built-in task (CPU, a few minutes)
    selfalign run RECIPE [key.sub=value ...]               an online run from a YAML recipe or a bundled name
    selfalign demo [--output-dir DIR] [key.sub=value ...]   build the tiny sorting task offline and train on it
    selfalign train RECIPE.yaml [key.sub=value ...]        offline preference training of a local/hub model
    selfalign eval POLICY|RUN [--baseline DIR] [...]        held-out reward, win rate, KL, implicit-reward gap
    selfalign report RUN                                    RUN/report.md and RUN/plots/*.png
    selfalign compare RUN1 RUN2 ... [--output DIR]          runs side by side: one table, one plot
    selfalign config                                        list every config key with its default and meaning

Bad input (config, data) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, check_same_config, describe, dump_yaml, field, load_config
from .data import DataError, PreferenceDataConfig, load_preferences, pad_token_id, write_atomic, write_jsonl
from .judges import JudgeError
from .report import ReportError
from .train import PreferenceExample, PreferenceTrainer, TrainConfig


@dataclass
class TrainRunConfig:
    """An offline preference-training run: model, data, and the update's settings."""

    model: str = field("", help="Policy to train: a local directory, hub name or .gguf file (selfalign.models).")
    reference: str = field("", help="Frozen reference model; empty means a copy of `model` (pi_0).")
    output_dir: str = field("runs/train", help="Run directory: config.yaml, metrics.jsonl, policy/.")
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig, help="Preference data.")
    train: TrainConfig = field(default_factory=TrainConfig, help="The preference update.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")


class UsageError(Exception):
    """Input the user must fix; printed as one line, exit status 2."""


def _prepare_run_dir(cfg: TrainRunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / "policy").exists():
        raise UsageError(f"{out}/policy already exists: this run finished; choose another output_dir=... to train again")
    saved = out / "config.yaml"
    check_same_config(saved, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, dump_yaml(cfg))
    return out


@torch.no_grad()
def heldout_accuracy(trainer: PreferenceTrainer, examples: list[PreferenceExample]) -> dict[str, float]:
    """Implicit-reward accuracy and margin, and plain log-prob accuracy, on held-out pairs."""
    from .logprobs import collate, sequence_logprobs

    trainer.compute_reference_logps(examples, progress=False)
    batch = collate([e.prompt_ids for e in examples] * 2, [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples],
                    trainer.pad_token_id).to(trainer.accelerator.device)
    trainer.policy.eval()
    lp = sequence_logprobs(trainer.policy, batch, trainer.config.logprob_chunk_size).cpu()
    trainer.policy.train()
    n = len(examples)
    chosen, rejected = lp[:n], lp[n:]
    ref_c = torch.tensor([e.ref_chosen for e in examples])
    ref_r = torch.tensor([e.ref_rejected for e in examples])
    margin = trainer.config.beta * ((chosen - ref_c) - (rejected - ref_r))
    return {
        "eval/rewards/accuracies": (margin > 0).float().mean().item(),
        "eval/rewards/margins": margin.mean().item(),
        "eval/logps/accuracies": (chosen > rejected).float().mean().item(),
    }


def run_train(cfg: TrainRunConfig, progress: bool = True) -> dict[str, float]:
    """Train cfg.model on cfg.data; write the run directory; return the final held-out metrics."""
    from .loop import save_policy
    from .models import load_causal_lm, load_tokenizer

    if not cfg.model:
        raise ConfigError("model: required (a local model directory or hub name)")
    if not cfg.data.path:
        raise ConfigError("data.path: required (a JSONL file of prompt/chosen/rejected rows)")
    tokenizer = load_tokenizer(cfg.model)
    examples = load_preferences(cfg.data, tokenizer)
    out = _prepare_run_dir(cfg)
    random.Random(cfg.train.seed).shuffle(examples)
    n_eval = int(len(examples) * cfg.data.eval_fraction)
    heldout, train_set = examples[:n_eval], examples[n_eval:]

    policy = load_causal_lm(cfg.model)
    reference = None
    if not cfg.train.lora.enabled:
        reference = load_causal_lm(cfg.reference or cfg.model)
    pad = pad_token_id(tokenizer)
    trainer = PreferenceTrainer(policy, cfg.train, pad_token_id=pad, reference=reference)

    before = heldout_accuracy(trainer, heldout) if heldout else {}
    result = trainer.update(train_set, checkpoint_dir=out / "checkpoint", progress=progress)
    after = heldout_accuracy(trainer, heldout) if heldout else {}
    write_jsonl(out / "metrics.jsonl", [{"step": i + 1, **s} for i, s in enumerate(result.steps)])
    save_policy(trainer, tokenizer, out / "policy", trainer.accelerator)
    summary = {"train_pairs": len(train_set), "heldout_pairs": len(heldout), **after}
    write_atomic(out / "summary.json", json.dumps({"before": before, "after": after, **summary}, indent=2))
    _print_table(result.steps, before, after)
    print(f"policy saved to {out / 'policy'}")
    return after


def _print_table(steps: list[dict[str, float]], before: dict[str, float], after: dict[str, float]) -> None:
    cols = ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
    print(f"{'step':>5} " + " ".join(f"{c:>19}" for c in cols))
    every = max(1, len(steps) // 10)
    for i, s in enumerate(steps):
        if i % every == 0 or i == len(steps) - 1:
            print(f"{i + 1:>5} " + " ".join(f"{s[c]:>19.4f}" for c in cols))
    if before:
        print("held-out pairs            before   after")
        for key in after:
            print(f"  {key:<24}{before[key]:>7.3f} {after[key]:>7.3f}")


DEMO_DEFAULTS = [
    "train.learning_rate=0.001", "train.beta=0.1", "train.batch_size=16", "train.micro_batch_size=16",
    "train.epochs=6", "train.warmup_ratio=0.05", "data.eval_fraction=0.25",
]


def cmd_demo(args: argparse.Namespace) -> None:
    from .tasks.sorting import build_task

    root = Path(args.output_dir)
    model_dir, data_path = build_task(root / "task")
    cfg = load_config(TrainRunConfig, None, [
        f"model={model_dir}", f"data.path={data_path}", f"output_dir={root / 'run'}", *DEMO_DEFAULTS, *args.overrides,
    ])
    print(f"demo: offline DPO on the sorting task ({data_path}), tiny random-init model ({model_dir})")
    after = run_train(cfg, progress=not args.no_progress)
    print(f"held-out preference accuracy after training: {after['eval/rewards/accuracies']:.2f} "
          "(0.5 is chance: the model learned a preference for sorted answers from pairs alone)")


def cmd_train(args: argparse.Namespace) -> None:
    run_train(load_config(TrainRunConfig, args.recipe, args.overrides), progress=not args.no_progress)


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


def iteration_table(out: Path, history: list[dict]) -> str:
    """One row for pi_0 and one per iteration: the numbers a user watches."""
    rows = []
    pi0 = out / "pi0_metrics.json"
    if pi0.exists():
        rows.append(json.loads(pi0.read_text()))
    rows += history
    # Labels by source, cumulative: judge labels are paid for; policy and dataset labels are not (SAIL).
    for r in rows:
        for source, n in r.get("labels_total_by_source", {}).items():
            r[f"labels/{source}"] = n
    extra = [(f"labels/{s}", f"{s} labels", "{:>14d}") for s in ("policy", "dataset")
             if any(r.get(f"labels/{s}") for r in rows)]
    cols = [("labels_total", "judge labels", "{:>12d}"), *extra, ("gold/greedy", "gold(greedy)", "{:>13.3f}"),
            ("gold/sampled", "gold(sampled)", "{:>14.3f}"), ("gold/high_reward_fraction", "perfect", "{:>8.3f}"),
            ("win_rate", "win vs pi_0", "{:>12.3f}"), ("tie_rate", "ties", "{:>6.3f}"), ("kl_to_pi0", "KL(pi|pi_0)", "{:>12.3f}")]
    lines = [f"{'iteration':>9} " + " ".join(f"{title:>{len(fmt.format(0))}}" for _, title, fmt in cols)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else " " * len(fmt.format(0)) for key, _, fmt in cols]
        lines.append(f"{str(r['iteration']):>9} " + " ".join(cells))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> None:
    from .loop import RunConfig, run

    cfg = load_config(RunConfig, recipe_path(args.recipe), args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"selfalign: {cfg.method} on {cfg.model}, {cfg.iterations} iteration(s), run directory {cfg.output_dir}")
    history = run(cfg, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(iteration_table(Path(cfg.output_dir), history))


def cmd_quickstart(args: argparse.Namespace) -> None:
    args.recipe = "quickstart"
    cmd_run(args)


def _eval_pairs(path: str, tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids from a run's pairs.jsonl or a preference JSONL (prompt, chosen, rejected)."""
    from .data import read_jsonl

    first = next(iter(read_jsonl(path)), (0, {}))[1]
    if "prompt_ids" in first:
        return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for _, r in read_jsonl(path)]
    return [(e.prompt_ids, e.chosen_ids, e.rejected_ids)
            for e in load_preferences(PreferenceDataConfig(path=path, eval_fraction=0.0), tokenizer)]


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a policy directory, or a run's final policy with the run's own settings."""
    from .evaluate import evaluate_policy
    from .judges.function import FunctionJudge
    from .loop import RunConfig, load_prompts, resolve_task
    from .models import load_tokenizer

    target = Path(args.target)
    if (target / "config.yaml").is_file():  # a run directory: its last policy, its settings
        cfg = load_config(RunConfig, target / "config.yaml", args.overrides)
        policies = sorted(target.glob("iter_*/policy"))
        if not policies:
            raise UsageError(f"{target}: no iteration has finished yet (no iter_*/policy); run it first")
        policy = policies[-1]
    elif (target / "config.json").is_file():
        cfg, policy = load_config(RunConfig, None, args.overrides), target
    else:
        raise UsageError(f"{target}: neither a policy directory (config.json) nor a run directory (config.yaml)")
    task = resolve_task(cfg, progress=not args.no_progress)
    pi0 = Path(args.reference or task.policy)
    baseline = Path(args.baseline) if args.baseline else pi0
    prompts_file = args.prompts or task.eval_prompts
    if not prompts_file:
        raise UsageError("no held-out prompts: pass --prompts FILE.jsonl (or set eval_prompts in the run's config)")
    tokenizer = load_tokenizer(policy)
    prompts = load_prompts(prompts_file, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens)[: args.limit or None]
    if args.reward_model:
        from .judges.reward_model import RewardModelJudge

        gold = RewardModelJudge(args.reward_model)
        scorer = f"reward model {args.reward_model}"
    else:
        spec = args.reward or task.gold_fn
        if not spec:
            raise UsageError("no reward to evaluate with: pass --reward pkg.module:fn or --reward-model DIR")
        gold, scorer = FunctionJudge(spec), spec
    pairs = _eval_pairs(args.pairs, tokenizer) if args.pairs else None
    metrics = evaluate_policy(policy, pi0, prompts, tokenizer, gold, cfg, progress=not args.no_progress,
                              baseline_path=baseline, pairs=pairs, high_reward=args.high_reward)
    record = {"policy": str(policy), "baseline": str(baseline), "reference": str(pi0), "prompts": prompts_file,
              "num_prompts": len(prompts), "reward": scorer, **metrics}
    if args.output:
        write_atomic(Path(args.output), json.dumps(record, indent=1))
    width = max(len(k) for k in record)
    for key, value in record.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    path = write_report(Path(args.run))
    print(f"selfalign: wrote {path} and {path.parent / 'plots'}/")


def cmd_compare(args: argparse.Namespace) -> None:
    from .report import write_comparison

    out = Path(args.output)
    print(write_comparison([Path(r) for r in args.runs], out))
    print(f"selfalign: wrote {out / 'compare.md'} and {out / 'compare.png'}")


def cmd_config(args: argparse.Namespace) -> None:
    from .loop import RunConfig

    schema = RunConfig if args.which == "run" else TrainRunConfig
    print(f"# keys of `selfalign {args.which}` recipes (override any with key.sub=value)")
    for key, default, help_text in describe(schema):
        print(f"{key:<34} {default:<14} {help_text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfalign", description="Online preference alignment: SELM, SAIL, DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build the tiny sorting task offline and train on it (CPU, ~1 minute)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the task and the run go (default runs/demo)")
    demo.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="offline preference training from a YAML recipe")
    train.add_argument("recipe", help="YAML recipe (see `selfalign config` for the keys)")
    train.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    train.set_defaults(func=cmd_train)
    quick = sub.add_parser("quickstart", help="SELM on the built-in task, a few iterations on a CPU (a few minutes)")
    quick.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    quick.set_defaults(func=cmd_quickstart)
    runp = sub.add_parser("run", help="an online alignment run from a recipe (a YAML file or a bundled name)")
    runp.add_argument("recipe", help="YAML recipe, or a bundled one: quickstart, selm_llama3_8b, ...")
    runp.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    runp.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="evaluate a policy (or a run's final policy) on held-out prompts")
    ev.add_argument("target", help="a policy directory, or a run directory (its last iteration, its settings)")
    ev.add_argument("overrides", nargs="*", help="run-config overrides key.sub=value (eval.samples=8, seed=1, ...)")
    ev.add_argument("--prompts", help="JSONL held-out prompts (default: the run's or the built-in task's)")
    ev.add_argument("--reward", help="'pkg.module:fn' reward (default: the run's gold reward)")
    ev.add_argument("--reward-model", help="score with this sequence-classification reward model instead")
    ev.add_argument("--baseline", help="policy to win against (default: pi_0)")
    ev.add_argument("--reference", help="pi_ref of the KL and implicit reward (default: pi_0)")
    ev.add_argument("--pairs", help="JSONL pairs for the implicit-reward gap (a run's pairs.jsonl or prompt/chosen/rejected)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate on the first N prompts only")
    ev.add_argument("--high-reward", type=float, default=0.999, help="threshold of the high-reward region")
    ev.add_argument("--output", help="also write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)
    rep = sub.add_parser("report", help="write RUN/report.md and RUN/plots/*.png")
    rep.add_argument("run", help="run directory")
    rep.set_defaults(func=cmd_report)
    cmp_ = sub.add_parser("compare", help="runs side by side: one table and one plot")
    cmp_.add_argument("runs", nargs="+", help="run directories")
    cmp_.add_argument("--output", default="runs/compare", help="where compare.md and compare.png go")
    cmp_.set_defaults(func=cmd_compare)
    for p in (demo, train, quick, runp, ev):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    conf = sub.add_parser("config", help="list every config key, its default and meaning")
    conf.add_argument("which", nargs="?", choices=["run", "train"], default="run",
                      help="the online loop's keys (run, quickstart; default) or offline training's (train)")
    conf.set_defaults(func=cmd_config)
    args = parser.parse_args(argv)
    # transformers' own bars (loading and writing weights: sub-second on the tasks here) only interleave
    # with selfalign's bars for generation, judging and training; --no-progress silences those too.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (ConfigError, DataError, JudgeError, ReportError, UsageError) as e:
        print(f"selfalign: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

