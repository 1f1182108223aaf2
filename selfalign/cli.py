"""The `selfalign` command line.

    selfalign quickstart [key.sub=value ...]               SELM on the built-in task (CPU, a few minutes)
    selfalign run RECIPE [key.sub=value ...]               an online run from a YAML recipe or a bundled name
    selfalign demo [--output-dir DIR] [key.sub=value ...]   build the tiny sorting task offline and train on it
    selfalign train RECIPE.yaml [key.sub=value ...]        offline preference training of a local/hub model
    selfalign eval POLICY|RUN [--baseline DIR] [...]        held-out reward, win rate, KL, implicit-reward gap
    selfalign report RUN                                    RUN/report.md and RUN/plots/*.png
    selfalign compare RUN1 RUN2 ... [--output DIR]          runs side by side: one table, one plot
    selfalign config                                        list every config key with its default and meaning

Bad input (config, data, paths) ends with a one-line error and exit status 2 (`--debug` shows the
traceback instead); Ctrl-C / SIGTERM end with one line and exit status 130 / 143, and re-running
the same command resumes.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import signal
import sys
import threading
from pathlib import Path

from . import logs
from .card import PushError
from .config import ConfigError, UsageError, describe, load_config
from .data import write_atomic
from .eval_targets import benchmark_targets, check_tokenizer, plan_eval
from .eval_targets import check_tokenizer as _check_tokenizer  # noqa: F401  (re-exported: the old name)
from .judges import JudgeError
from .offline import TrainRunConfig, TrainSummary, run_train, step_table, train  # noqa: F401  (run_train: re-exported)
from .report import ReportError, iteration_table
from .run_config import RECIPES, recipe_path  # noqa: F401  (re-exported)
from .sources import DataError
from .train import NonFiniteError

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
    after = print_train(train(cfg, progress=not args.no_progress)).after
    print(f"held-out preference accuracy after training: {after['eval/rewards/accuracies']:.2f} "
          "(0.5 is chance: the model learned a preference for sorted answers from pairs alone)")


def cmd_train(args: argparse.Namespace) -> None:
    print_train(train(load_config(TrainRunConfig, args.recipe, args.overrides), progress=not args.no_progress))


def print_train(summary: TrainSummary) -> TrainSummary:
    print(step_table(summary))
    print(f"policy saved to {summary.policy}")
    if summary.uploaded:
        print(f"selfalign: uploaded {summary.policy} to {summary.uploaded}")
    return summary


def cmd_run(args: argparse.Namespace) -> None:
    from .distributed import launched_sharding, make_accelerator
    from .loop import RunConfig, run
    from .train import resolve_mixed_precision

    cfg = load_config(RunConfig, recipe_path(args.recipe), args.overrides)
    # The launch's accelerator state, before anything runs: a launch that cannot run as asked is refused
    # here, and the estimate sizes the sharding accelerate put in force, not the one the recipe states.
    accelerator = make_accelerator(resolve_mixed_precision(cfg.train.mixed_precision))
    if accelerator.is_main_process:
        logs.info("%s on %s, %d iteration(s), run directory %s", cfg.method, cfg.model, cfg.iterations, cfg.output_dir)
        print_estimate(cfg, launched_sharding(accelerator), accelerator.num_processes)
    history = run(cfg, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(iteration_table(Path(cfg.output_dir), history))
        table = Path(cfg.output_dir) / "ifeval" / "table.txt"
        if cfg.eval.benchmark and table.is_file():
            print(table.read_text(), end="")


def cmd_estimate(args: argparse.Namespace) -> None:
    from .estimate import report
    from .run_config import RunConfig

    cfg = load_config(RunConfig, recipe_path(args.recipe), args.overrides)
    text, fits = report(cfg, args.sharding, args.processes, args.device)
    print(text)
    if not fits:
        raise UsageError(f"{args.recipe} does not fit its stated hardware by this estimate: shard it "
                         "(--sharding zero3 / fsdp2 with more processes), use LoRA, or lower the batch sizes")


def print_estimate(cfg, sharding: str, processes: int) -> None:
    """The memory estimate a run prints before it starts (estimate.launch_report), timestamped like every line
    before the table."""
    from .estimate import launch_report

    for line in launch_report(cfg, sharding, processes).splitlines():
        logs.info("%s", line)


def cmd_quickstart(args: argparse.Namespace) -> None:
    args.recipe = "quickstart"
    cmd_run(args)


def cmd_benchmark(args: argparse.Namespace) -> None:
    """`selfalign eval --benchmark ifeval TARGET`: IFEval's 541 prompts, Google's checkers, a paired test."""
    from . import ifeval

    if args.overrides or args.prompts or args.reward or args.reward_model or args.pairs or args.reference:
        raise UsageError("--benchmark ifeval takes its own prompts and checkers: drop --prompts, --reward, "
                         "--reward-model, --pairs, --reference and key=value overrides")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    ifeval.load_items()  # a missing extra is one line now, not after minutes of loading models
    ifeval.registry()
    policies = benchmark_targets(Path(args.target), args.baseline, args.output)
    for _, policy, out in policies:
        check_tokenizer(policies[-1][1], policy, "--baseline")
        if out.is_dir():
            raise UsageError(f"--output {out}: is a directory; pass a file name (FILE.json, answers beside it)")
    results = ifeval.evaluate(policies, args.max_new_tokens, args.limit, args.backend, progress=not args.no_progress)
    print(ifeval.format_table(results))
    for (name, _, out), _ in zip(policies, results):
        print(f"{name}: scores in {out}, answers in {ifeval.answers_path(out)}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a policy directory, or a run's final policy with the run's own settings."""
    from .tasks.smollm2 import named_model

    for key in ("target", "baseline", "reference"):  # `smollm2` names the cached SmolLM2-135M-Instruct
        if getattr(args, key):
            setattr(args, key, named_model(getattr(args, key), progress=not args.no_progress))
    if args.benchmark:
        return cmd_benchmark(args)
    from .evaluate import evaluate_policy

    plan = plan_eval(Path(args.target), args.overrides, baseline=args.baseline, reference=args.reference,
                     prompts=args.prompts, reward=args.reward, reward_model=args.reward_model, pairs=args.pairs,
                     limit=args.limit, progress=not args.no_progress)
    responses = Path(args.output).with_suffix(".responses.jsonl") if args.output else None
    metrics = evaluate_policy(plan.policy, plan.pi0, plan.prompts, plan.tokenizer, plan.gold, plan.cfg,
                              progress=not args.no_progress, baseline_path=plan.baseline, pairs=plan.pairs,
                              high_reward=args.high_reward, responses_path=responses, cache=plan.run,
                              trust_unkeyed=False)
    record = {"policy": str(plan.policy), "baseline": str(plan.baseline), "reference": str(plan.pi0),
              "prompts": plan.prompts_file, "num_prompts": len(plan.prompts), "reward": plan.scorer, **metrics}
    if args.output:
        write_atomic(Path(args.output), json.dumps(record, indent=1))
    width = max(len(k) for k in record)
    for key, value in record.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if responses is not None:
        print(f"responses saved to {responses}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    path = write_report(Path(args.run))
    print(f"selfalign: wrote {path} and {path.parent / 'plots'}/")


def cmd_compare(args: argparse.Namespace) -> None:
    from .report import write_comparison

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: is a file, but compare writes compare.md and compare.png into a directory; "
                         "pass a directory (new or existing)")
    print(write_comparison([Path(r) for r in args.runs], out))
    print(f"selfalign: wrote {out / 'compare.md'} and {out / 'compare.png'}")


def cmd_config(args: argparse.Namespace) -> None:
    from .run_config import RunConfig

    schema = RunConfig if args.which == "run" else TrainRunConfig
    print(f"# keys of `selfalign {args.which}` recipes (override any with key.sub=value)")
    for key, default, help_text in describe(schema):
        print(f"{key:<34} {default:<14} {help_text}")


def cmd_accelerate_config(args: argparse.Namespace) -> None:
    from .distributed import SHIPPED_CONFIGS, config_path

    if args.name is None:
        for name, what in SHIPPED_CONFIGS.items():
            print(f"{name:<6} {config_path(name)}\n       {what}")
        return
    print(config_path(args.name))


# The keys `run --help` shows (every key: `selfalign config run` or `run --help-all`).
COMMON_RUN_KEYS = ["method", "model", "prompts", "eval_prompts", "preferences", "output_dir", "iterations",
                   "prompts_per_iteration", "generate_every", "generation.num_samples", "generation.max_new_tokens",
                   "generation.temperature", "generation.backend", "judge.kind", "judge.function", "judge.reward_model",
                   "judge.llm.base_url", "judge.llm.model", "judge.llm.mode", "judge.noise", "train.beta", "train.alpha",
                   "train.learning_rate", "train.batch_size", "train.lora.enabled", "eval.prompts", "eval.reward",
                   "eval.reward_model", "seed", "push_to_hub"]
COMMON_TRAIN_KEYS = ["model", "reference", "output_dir", "data.path", "data.eval_fraction", "train.loss", "train.beta",
                     "train.learning_rate", "train.batch_size", "train.micro_batch_size", "train.epochs",
                     "train.lora.enabled", "train.checkpoint_every", "push_to_hub"]


def keys_text(which: str, only: list[str] | None) -> str:
    """Config keys with their defaults and meaning: `only` those (in that order), or every key."""
    from .run_config import RunConfig

    rows = {key: (default, help_text) for key, default, help_text in
            describe(RunConfig if which == "run" else TrainRunConfig)}
    keys = [k for k in only if k in rows] if only else list(rows)
    width = max(len(k) for k in keys) + 1
    lines = []
    for key in keys:
        default, help_text = rows[key]
        first = re.split(r"(?<!e\.g)\.\s", help_text)[0].rstrip(".")
        lines.append(f"  {key:<{width}} {default:<12} {first if only else help_text}")
    return "\n".join(lines)


class KeysHelp(argparse.Action):
    """-h / --help-all of a subcommand: its usage plus the most used config keys, or every key."""

    def __init__(self, option_strings, dest, which: str, every: bool, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.which, self.every = which, every

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.every:
            print(f"# every key of `selfalign {self.which}` recipes, its default and meaning (set with key.sub=value)")
            print(keys_text(self.which, None))
            parser.exit()
        common = COMMON_RUN_KEYS if self.which == "run" else COMMON_TRAIN_KEYS
        parser.epilog = (f"most used config keys (override any with key.sub=value; all of them: --help-all or "
                         f"`selfalign config {self.which}`):\n{keys_text(self.which, common)}")
        parser.print_help()
        parser.exit()


def add_key_help(parser: argparse.ArgumentParser, which: str) -> None:
    parser.add_argument("-h", "--help", action=KeysHelp, which=which, every=False,
                        help="show this help, with the most used config keys and their defaults, and exit")
    parser.add_argument("--help-all", action=KeysHelp, which=which, every=True,
                        help="list every config key, its default and meaning, and exit")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("selfalign")
    except PackageNotFoundError:  # run from a checkout without installing
        from . import __version__

        return __version__


USER_ERRORS = (ConfigError, DataError, JudgeError, ReportError, UsageError, NonFiniteError, PushError)
# OS errors a user fixes (a full disk, a read-only or unwritable place, a file where a directory goes).
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
               errno.EISDIR, errno.ENAMETOOLONG}


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received: raised in the main thread so every `with` block unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _describe_os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "free some space or choose another output_dir=...",
            errno.EDQUOT: "free some space or choose another output_dir=...",
            errno.EFBIG: "a file-size limit (ulimit -f, or the file system's largest file) stops it; raise the limit or "
                         "choose another output_dir=..."}.get(
        e.errno, "check the path and its permissions, or choose another output_dir=...")
    return f"{e.strerror or e}{where} ({hint})"


# TRL / transformers argument names and the selfalign key each stands for (`--learning_rate 1e-6`); any other
# `--name value` is taken as the key `name` itself (`--train.beta 0.2`), and load_config judges it as it judges
# `name=value` (an unknown key names the nearest valid one).
TRL_NAMES = {
    "learning_rate": "train.learning_rate", "beta": "train.beta", "num_train_epochs": "train.epochs",
    "warmup_ratio": "train.warmup_ratio", "lr_scheduler_type": "train.lr_scheduler", "loss_type": "train.loss",
    "gradient_checkpointing": "train.gradient_checkpointing", "max_grad_norm": "train.max_grad_norm",
    "per_device_train_batch_size": "train.micro_batch_size", "model_name_or_path": "model",
}
TRL_RUN_NAMES = {**TRL_NAMES, "max_new_tokens": "generation.max_new_tokens", "temperature": "generation.temperature",
                 "dataset_name": "prompts"}
TRL_TRAIN_NAMES = {**TRL_NAMES, "dataset_name": "data.path"}


def trl_spellings(argv: list[str], command: str, options: set[str]) -> list[str]:
    """argv after the subcommand with TRL's spellings made selfalign's: `--config FILE` becomes the positional
    recipe, `--name value` and `--name=value` (not one of the subcommand's own options) become `key=value`
    overrides, TRL's names mapped to selfalign's keys (TRL_NAMES) and dashes to underscores; a bare
    `--flag` is `flag=true`."""
    names = TRL_TRAIN_NAMES if command == "train" else TRL_RUN_NAMES
    out: list[str] = []
    config = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg.split("=", 1)[0] in options or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            else:
                value = "true"
        if name == "config":
            if config is not None:
                raise UsageError(f"--config given twice ({config}, {value}): pass one recipe")
            config = value
            continue
        key = name.replace("-", "_")
        out.append(f"{names.get(key, key)}={value}")
    if config is not None:
        if command == "quickstart":
            raise UsageError("quickstart runs the bundled quickstart recipe: use `selfalign run --config FILE` for "
                             "your own")
        out.insert(0, config)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfalign", description="Online preference alignment: SELM, SAIL, DPO.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"selfalign {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build the tiny sorting task offline and train on it (CPU, ~1 minute)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the task and the run go (default runs/demo)")
    demo.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    demo.set_defaults(func=cmd_demo)
    keyed = dict(add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    train = sub.add_parser("train", help="offline preference training from a YAML recipe", **keyed)
    add_key_help(train, "train")
    train.add_argument("recipe", help="YAML recipe (see `selfalign config` for the keys)")
    train.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    train.set_defaults(func=cmd_train)
    quick = sub.add_parser("quickstart", help="SELM on the built-in task, a few iterations on a CPU (a few minutes)",
                           **keyed)
    add_key_help(quick, "run")
    quick.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    quick.set_defaults(func=cmd_quickstart)
    runp = sub.add_parser("run", help="an online alignment run from a recipe (a YAML file or a bundled name)", **keyed)
    add_key_help(runp, "run")
    runp.add_argument("recipe", help="YAML recipe, or a bundled one: quickstart, selm_llama3_8b, ...")
    runp.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    runp.set_defaults(func=cmd_run)
    est = sub.add_parser("estimate", help="memory per GPU of a recipe, from the model config (nothing loaded or run)")
    est.add_argument("recipe", help="YAML recipe, or a bundled one")
    est.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    est.add_argument("--sharding", choices=["none", "ddp", "fsdp2", "zero2", "zero3"],
                     help="how training is spread (default: the recipe's hardware.sharding)")
    est.add_argument("--processes", type=int, help="processes, one per GPU (default: the recipe's hardware.gpus)")
    est.add_argument("--device", choices=["cuda", "cpu"],
                     help="where it runs (default: cuda when the recipe states a GPU, else cpu)")
    est.set_defaults(func=cmd_estimate)
    ev = sub.add_parser("eval", help="evaluate a policy (or a run's final policy) on held-out prompts")
    ev.add_argument("target", help="a policy directory (smollm2: the cached SmolLM2-135M-Instruct), or a run "
                    "directory (its last iteration, its settings)")
    ev.add_argument("overrides", nargs="*", help="run-config overrides key.sub=value (eval.samples=8, seed=1, ...)")
    ev.add_argument("--prompts", help="JSONL held-out prompts (default: the run's or the built-in task's)")
    ev.add_argument("--reward", help="'pkg.module:fn' reward (default: the run's gold reward)")
    ev.add_argument("--reward-model", help="score with this sequence-classification reward model instead")
    ev.add_argument("--baseline", help="policy to win against (default: pi_0, the model the policy was trained "
                                       "from as its run records it; required for a policy outside a run)")
    ev.add_argument("--reference", help="pi_ref of the KL and implicit reward (default: pi_0, else the baseline)")
    ev.add_argument("--pairs", help="JSONL pairs for the implicit-reward gap (a run's pairs.jsonl or prompt/chosen/rejected)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate on the first N prompts only")
    ev.add_argument("--high-reward", type=float, default=0.999, help="threshold of the high-reward region")
    ev.add_argument("--benchmark", choices=["ifeval"], help="a public benchmark instead of held-out prompts: "
                    "ifeval (541 prompts, Google's checkers; needs the ifeval extra). A run directory evaluates pi_0 "
                    "and its final iterate, paired; a policy directory itself (and --baseline's)")
    ev.add_argument("--max-new-tokens", type=int, default=1280, help="--benchmark: longest answer in tokens "
                    "(default 1280, the Open LLM Leaderboard's)")
    ev.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                    help="--benchmark: generation backend (auto: vLLM where installed)")
    ev.add_argument("--output", help="also write the metrics as JSON here (and the responses next to it, "
                                     "OUTPUT.responses.jsonl)")
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
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error instead of one line")
    conf = sub.add_parser("config", help="list every config key, its default and meaning")
    conf.add_argument("which", nargs="?", choices=["run", "train"], default="run",
                      help="the online loop's keys (run, quickstart; default) or offline training's (train)")
    conf.set_defaults(func=cmd_config)
    acc = sub.add_parser("accelerate-config", help="print the path of a shipped accelerate config (ddp, fsdp2, zero2, "
                                                    "zero3) for `accelerate launch --config_file`")
    acc.add_argument("name", nargs="?", default=None, help="the config; without one, list them all")
    acc.set_defaults(func=cmd_accelerate_config)
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if a in sub.choices), None)
    if at is not None and argv[at] in ("run", "train", "quickstart", "estimate"):
        options = set(sub.choices[argv[at]]._option_string_actions)
        try:
            argv = [*argv[: at + 1], *trl_spellings(argv[at + 1 :], argv[at], options)]
        except UsageError as e:
            print(f"selfalign: error: {e}", file=sys.stderr)
            return 2
    args, extra = parser.parse_known_args(argv)
    # `eval RUN --limit 8 eval.samples=4`: argparse leaves overrides that follow an option unparsed.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # transformers' own bars (loading and writing weights: sub-second on the tasks here) only interleave
    # with selfalign's bars for generation, judging and training; --no-progress silences those too.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logs.setup()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main_thread else None
    try:
        args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"selfalign: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug or e.errno not in USER_ERRNOS:
            raise
        print(f"selfalign: error: {_describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"selfalign: stopped by {signal.Signals(signum).name}; the unfinished stage's partial files were "
              "removed and every paid label is kept: run the same command again to resume", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

