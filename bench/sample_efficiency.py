"""Sample efficiency on a built-in task: every method at the same label budget, several seeds.

What is run
-----------
Each method runs the same online schedule on the built-in sorting task, from the same pi_0:
ITERATIONS iterations of PROMPTS fresh prompts each (offline DPO takes all of them up front
from pi_0), K = 2 responses per prompt (SAIL's PP and PR routes draw 2, so every method does),
a simulated annotator (Bradley-Terry noise T = 0.1 over the gold reward), beta 0.1, the same
learning rate, batch, epochs and evaluation (held-out prompts, noiseless gold reward). Per
method only what defines it changes: SELM's alpha and y_ref, XPO's alpha, fixed pi_ref and pair
(a policy sample against a pi_0 sample),
SAIL's routes and coefficients (official presets). Every method sees the same number of rows
per iteration, and each row costs one labelled pair (a judged prompt or a dataset pair) except
SAIL-PP's, which the policy labels itself.

What is reported
----------------
For each method, over the seeds: final gold reward of sampled and greedy answers and win rate
against pi_0's greedy answer, as mean and 95% confidence interval (t distribution); the
difference from iterative DPO with an exact two-sided permutation test on the seed means; the
labelled pairs (and judge labels) used; the labelled pairs each method needed to reach
iterative DPO's final mean sampled reward (linear interpolation on its mean curve, "not
reached" if it never does); and the wall-clock per run. Then SELM's alpha ablation: alpha 0
(which is iterative DPO exactly), the paper's grid and two larger values. Then SAIL against the baseline of its own
paper, DPO on the same preference dataset (SAIL with r = p = g = 0), with and without the
response term's baseline, and the PR route alone (every row online) with gamma 0 and 0.3.

The constraints task (`--task constraints`, SmolLM2-135M-Instruct, selfalign.tasks.constraints) runs the
constraints_quickstart recipe's schedule on a CPU (4 methods x 2 seeds, about 90 minutes on 2 cores with the
vLLM backend) or, with --gpu, the constraints_h100 recipe's (every method, 5 seeds, SELM's alpha grid at beta
0.1 and at the paper's 0.01). It also reports the final policy on the second held-out set, whose constraint
pairs never occur in training, and KL to pi_0. The methods that read a preference file (SAIL, selm_official)
get pi_0's judged pairs from the same seed's offline DPO run. pi_0's evaluation is computed once per seed and
shared by every method's run of that seed (same prompts, settings and seed: the same numbers).

    python bench/sample_efficiency.py                 # full: 5 seeds, results in bench/results/
    python bench/sample_efficiency.py --task constraints          # the real model, CPU schedule
    python bench/sample_efficiency.py --task constraints --gpu    # the real model, every method, 5 seeds
    python bench/sample_efficiency.py --quick --out DIR   # a CI-sized smoke run of the same code
    python bench/sample_efficiency.py --set model=DIR prompts=P.jsonl ...   # your own task (see --help)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfalign.config import load_config  # noqa: E402
from selfalign.loop import RunConfig, run  # noqa: E402
from selfalign.report import LABELS_AXIS, pyplot  # noqa: E402

METHODS = ["offline_dpo", "iterative_dpo", "selm", "xpo", "sail_dp", "sail_pp", "sail_pr"]
# SAIL's paper measures it against DPO on the same preference dataset: every row routed offline.
DATASET_DPO = ("sail_pr", ["train.sail.g=0"])
# What SAIL's extra terms do: the official presets with the paper's optional baseline, and the PR route
# alone (every row online and judged) with and without its response term.
SAIL_ABLATION = {
    "sail_pp +baseline": ("sail_pp", ["train.sail.baseline=true"]),
    "sail_pr +baseline": ("sail_pr", ["train.sail.baseline=true"]),
    "pr-only gamma=0": ("sail_pr", ["train.sail.g=1", "train.sail.gamma=0"]),
    "pr-only gamma=0.3": ("sail_pr", ["train.sail.g=1"]),
    "pr-only gamma=0.3 +baseline": ("sail_pr", ["train.sail.g=1", "train.sail.baseline=true"]),
}
# SELM: the quickstart's value (beta 0.1); XPO: its paper's default. selm_official and xpo_policy_pairs
# (selfalign.methods) run only when named in --methods.
ALPHA = {"selm": 0.001, "selm_official": 0.001, "xpo": 1e-5, "xpo_policy_pairs": 1e-5}
ALPHA_GRID = [0.0, 0.005, 0.001, 0.0005, 0.0001]  # 0, then SELM's official grid
ALPHA_BEYOND = [0.5, 0.05]  # larger than the paper tried: where does the optimism term start to matter?
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

FULL = dict(iterations=3, prompts=192, eval_prompts=128, eval_samples=4, seeds=5, grid=ALPHA_GRID + ALPHA_BEYOND)
# quick: a smoke test of the code (28 tiny runs), sized to stay well inside the test's limit on 2 loaded cores.
QUICK = dict(iterations=1, prompts=16, eval_prompts=8, eval_samples=1, seeds=2, grid=[0.0])
# The constraints task (SmolLM2-135M-Instruct, selfalign.tasks.constraints). cpu: what fits about 90 minutes of
# 2 CPU cores (the constraints_quickstart recipe's schedule, 4 methods x 2 seeds, no ablations); gpu: the
# constraints_h100 recipe's schedule, every method, 5 seeds, SELM's alpha grid at beta 0.1 and at the paper's 0.01.
CONSTRAINTS_CPU = dict(iterations=2, prompts=64, eval_prompts=64, eval_samples=1, seeds=2, grid=[],
                       methods=["offline_dpo", "iterative_dpo", "selm", "xpo"])
CONSTRAINTS_GPU = dict(iterations=3, prompts=1024, eval_prompts=128, eval_samples=4, seeds=5, grid=ALPHA_GRID, k=8,
                       methods=METHODS)
CONSTRAINTS_QUICK = dict(iterations=1, prompts=8, eval_prompts=4, eval_samples=1, seeds=2, grid=[],
                         methods=["offline_dpo", "iterative_dpo"])
# Methods whose rows come (partly) from a preference file: on the constraints task that file is pi_0's judged
# pairs on the run's training prompts, exported from the same seed's offline DPO run (see preferences_from).
NEEDS_PREFERENCES = {"selm_official", "sail_dp", "sail_pp", "sail_pr", "sail_mix"}


def overrides(method: str, seed: int, out: Path, size: dict, alpha: float | None = None,
              task: str = "builtin") -> list[str]:
    a = ALPHA.get(method, 0.0) if alpha is None else alpha
    common = [f"method={method}", f"output_dir={out}", f"seed={seed}", f"train.seed={seed}",
              f"iterations={size['iterations']}", f"prompts_per_iteration={size['prompts']}", f"train.alpha={a}",
              f"eval.prompts={size['eval_prompts']}", f"eval.samples={size['eval_samples']}"]
    if task == "constraints":
        # XPO as published pairs one policy sample with one pi_0 sample, and SAIL's PP and PR routes draw 2
        # responses per prompt; selm_official draws only y_ref; every other method draws the task's K.
        k = 1 if method == "selm_official" else 2 if method == "xpo" or method.startswith("sail") else size.get("k", 4)
        return [*common, "model=constraints", f"generation.num_samples={k}",
                f"generation.backend={'vllm' if vllm_installed() else 'hf'}", "eval.implicit_pairs=0"]
    return [*common, "model=builtin",
            f"generation.num_samples={1 if method == 'selm_official' else 2}", "generation.temperature=1.0",
            "generation.max_new_tokens=12",
            "generation.batch_size=64", "judge.noise=0.1", "train.beta=0.1",
            "train.learning_rate=1e-4", "train.batch_size=16", "train.micro_batch_size=16", "train.epochs=2",
            "train.warmup_ratio=0.1"]


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def preferences_from(offline_run: Path, path: Path) -> Path:
    """pi_0's judged pairs of an offline DPO run as a preference file (prompt, chosen, rejected texts).

    Offline DPO generates every training prompt's K responses from pi_0 up front and has them judged: the
    judge's best and worst (noisy annotator scores, ties dropped) become chosen and rejected. The methods
    that read a preference file (SAIL's offline and DP routes, selm_official) get the same labelled data.
    """
    rows = []
    for gen_file in sorted(offline_run.glob("iter_*/generations.jsonl")):
        for line in gen_file.read_text().splitlines():
            g = json.loads(line)
            scores = g["scores"]
            best = max(range(len(scores)), key=scores.__getitem__)
            worst = min(range(len(scores)), key=scores.__getitem__)
            if scores[best] != scores[worst]:
                rows.append({"prompt": g["prompt"], "chosen": g["responses"][best], "rejected": g["responses"][worst]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_pi0_novel(out: Path, run_dir: Path, size: dict) -> dict:
    """pi_0 on the novel-combination held-out set, with a run's generation settings."""
    import yaml

    from selfalign.cli import main as cli_main
    from selfalign.tasks.smollm2 import build_task

    if not out.exists():
        task = build_task(progress=False)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        keys = [f"generation.{k}={saved['generation'][k]}" for k in ("backend", "max_new_tokens", "temperature")]
        cli_main(["eval", str(task.policy_dir), "--no-progress", "--baseline", str(task.policy_dir),
                  "--prompts", str(task.eval_novel_prompts), "--reward", task.reward_fn,
                  "--limit", str(size["eval_prompts"]), "--output", str(out),
                  *keys, f"eval.samples={size['eval_samples']}"])
    return json.loads(out.read_text())


def eval_novel(run_dir: Path, size: dict) -> dict:
    """The run's final policy on the constraints task's second held-out set (constraint pairs never seen in
    training), with the run's own settings, through `selfalign eval`."""
    from selfalign.cli import main as cli_main
    from selfalign.tasks.smollm2 import build_task

    out = run_dir / "eval_novel.json"
    if not out.exists():
        cli_main(["eval", str(run_dir), "--no-progress", "--prompts", str(build_task(progress=False).eval_novel_prompts),
                  "--limit", str(size["eval_prompts"]), "--output", str(out)])
    return json.loads(out.read_text())


PI0_FILES = ("pi0_metrics.json", "pi0_eval_rewards.json", "pi0_eval_responses.jsonl", "baseline_greedy.json")


def share_pi0_evaluation(run_dir: Path, siblings: list[Path]) -> None:
    """Copy pi_0's evaluation from a finished run of the same seed into a new run directory.

    Every method's run of a seed evaluates the same pi_0 on the same prompts with the same settings and
    seed, so the result is identical; on a real model on a CPU it costs about a minute a run. The loop
    skips pi_0's evaluation where pi0_metrics.json exists.
    """
    if (run_dir / "config.yaml").exists():
        return
    for other in siblings:
        if other != run_dir and all((other / f).exists() for f in PI0_FILES):
            run_dir.mkdir(parents=True, exist_ok=True)
            for f in PI0_FILES:
                shutil.copyfile(other / f, run_dir / f)
            return


def run_one(argv: list[str], recipe: Path | None = None) -> tuple[list[dict], dict, float]:
    cfg = load_config(RunConfig, recipe, argv)
    out = Path(cfg.output_dir)
    start = time.perf_counter()
    history = run(cfg, progress=False)
    seconds = time.perf_counter() - start
    if cfg.model == "constraints":
        # The stages' own timings (generation, judging, reference log-probs, update, evaluation), saved in the
        # run: the same whether the run was made now or is reloaded finished; engine start and pi_0's
        # evaluation (shared per seed) are left out.
        seconds = sum(v for h in history for k, v in h.items() if k.startswith("time/"))
    pi0 = json.loads((out / "pi0_metrics.json").read_text())
    return history, pi0, seconds


# ------------------------------------------------------------------------------------ statistics
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (t distribution)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of a difference in means (all splits of the pooled values).

    Hand-written rather than scipy.stats.permutation_test: scipy is not a selfalign dependency (about 40 MB for
    these ten lines), and at the seed counts here (2-5 per method) every split is enumerated, the exact p-value
    scipy would also return."""
    pooled, n = a + b, len(a)
    observed = abs(sum(a) / n - sum(b) / len(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        chosen = set(idx)
        x = [pooled[i] for i in chosen]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += abs(sum(x) / len(x) - sum(y) / len(y)) >= observed - 1e-12
        total += 1
    return hits / total


def paired_p(diffs: list[float], draws: int = 20000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation test that paired differences have mean 0 (random flips, fixed seed).

    Hand-written for the reason permutation_p is; (hits + 1) / (draws + 1) is the Monte Carlo p-value that never
    reports 0."""
    import random

    observed = abs(sum(diffs))
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12 for _ in range(draws))
    return (hits + 1) / (draws + 1)


def against_pi0(run_dirs: list[Path]) -> dict:
    """Final policy minus pi_0 on the same held-out prompts, paired per prompt (greedy) and per sample
    (sampled: the i-th sample of a prompt against pi_0's i-th), pooled over the seeds' runs."""
    out = {}
    for key in ("greedy", "sampled"):
        diffs = []
        for run_dir in run_dirs:
            final = sorted(run_dir.glob("iter_*/eval_rewards.json"))[-1]
            mine, pi0 = json.loads(final.read_text())[key], json.loads((run_dir / "pi0_eval_rewards.json").read_text())[key]
            diffs += [a - b for a, b in zip(mine, pi0)]
        out[key] = {"delta": sum(diffs) / len(diffs), "p": paired_p(diffs), "n": len(diffs),
                    "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}
    return out


def labels_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First x where the piecewise-linear curve [(x, y), ...] reaches y >= target."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return curve[-1][0] if curve and curve[-1][1] >= target else None


def mean_curve(histories: list[list[dict]], pi0: dict, key: str) -> list[tuple[float, float]]:
    points = [(0.0, pi0[key])]
    for t in range(len(histories[0])):
        points.append((sum(h[t]["labelled_pairs_total"] for h in histories) / len(histories),
                       sum(h[t][key] for h in histories) / len(histories)))
    return points


# ------------------------------------------------------------------------------------ tables
def fmt_ci(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}" if half == half else f"{mean:.3f}"


def summarise(results: dict[str, list[dict]], pi0: dict, baseline: str = "iterative_dpo") -> tuple[str, dict]:
    """A table (markdown) of the runs against `baseline`, and its numbers."""
    finals = {m: [r["history"][-1] for r in rs] for m, rs in results.items()}
    base = finals.get(baseline)
    target = sum(f["gold/sampled"] for f in base) / len(base) if base else None
    rows, numbers = [], {}
    novel = all("novel" in r for rs in results.values() for r in rs)
    header = (f"| method | labelled pairs | judge labels | gold (sampled) | Δ vs {baseline} (p) | gold (greedy) | "
              f"win rate vs pi_0 | Δ win (p) | {'novel (sampled) | novel (greedy) | ' if novel else ''}"
              f"KL(pi‖pi_0) | pairs to reach {baseline} | s / run |")
    for method, rs in results.items():
        f = finals[method]
        sampled, greedy, win = ([x[k] for x in f] for k in ("gold/sampled", "gold/greedy", "win_rate"))
        entry = {"gold/sampled": mean_ci(sampled), "gold/greedy": mean_ci(greedy), "win_rate": mean_ci(win),
                 "labelled_pairs": sum(x["labelled_pairs_total"] for x in f) / len(f),
                 "judge_labels": sum(x["labels_total"] for x in f) / len(f),
                 "seconds": sum(r["seconds"] for r in rs) / len(rs),
                 "kl_to_pi0": mean_ci([x.get("kl_to_pi0", float("nan")) for x in f]),
                 "seeds": [r["seed"] for r in rs]}
        if base is not None and method != baseline:
            b_s, b_w = [x["gold/sampled"] for x in base], [x["win_rate"] for x in base]
            entry["delta_sampled"] = entry["gold/sampled"][0] - sum(b_s) / len(b_s)
            entry["p_sampled"] = permutation_p(sampled, b_s)
            entry["delta_win"] = entry["win_rate"][0] - sum(b_w) / len(b_w)
            entry["p_win"] = permutation_p(win, b_w)
        if novel:
            entry["novel/sampled"] = mean_ci([r["novel"]["gold/sampled"] for r in rs])
            entry["novel/greedy"] = mean_ci([r["novel"]["gold/greedy"] for r in rs])
            if base is not None and method != baseline:
                b_n = [r["novel"]["gold/sampled"] for r in results[baseline]]
                entry["p_novel"] = permutation_p([r["novel"]["gold/sampled"] for r in rs], b_n)
        reach = labels_to_reach(mean_curve([r["history"] for r in rs], pi0, "gold/sampled"), target) \
            if target is not None else None
        entry["pairs_to_reach_baseline"] = reach
        numbers[method] = entry
        delta = (f"{entry['delta_sampled']:+.3f} (p={entry['p_sampled']:.3f})" if "delta_sampled" in entry else "—")
        dwin = (f"{entry['delta_win']:+.3f} (p={entry['p_win']:.3f})" if "delta_win" in entry else "—")
        rows.append(f"| {method} | {entry['labelled_pairs']:.0f} | {entry['judge_labels']:.0f} | "
                    f"{fmt_ci(*entry['gold/sampled'])} | {delta} | {fmt_ci(*entry['gold/greedy'])} | "
                    f"{fmt_ci(*entry['win_rate'])} | {dwin} | "
                    + (f"{fmt_ci(*entry['novel/sampled'])}"
                       + (f" (p={entry['p_novel']:.3f})" if "p_novel" in entry else "")
                       + f" | {fmt_ci(*entry['novel/greedy'])} | " if novel else "")
                    + f"{fmt_ci(*entry['kl_to_pi0'])} | "
                    f"{'not reached' if reach is None else f'{reach:.0f}'} | {entry['seconds']:.0f} |")
    table = "\n".join([header, "|---|" + "---:|" * (12 if novel else 10), *rows])
    return table, numbers


def verdicts(numbers: dict, baseline: str = "iterative DPO", alpha: float = 0.05) -> list[str]:
    lines = []
    for method, e in numbers.items():
        if "p_sampled" not in e:
            continue
        for key, name in (("sampled", "sampled gold reward"), ("win", "win rate")):
            d, p = e[f"delta_{key}"], e[f"p_{key}"]
            word = "significantly " + ("higher" if d > 0 else "lower") if p < alpha else "not significantly different"
            lines.append(f"- {method}: {name} {word} {'from' if p >= alpha else 'than'} {baseline} "
                         f"({d:+.3f}, p = {p:.3f})")
    return lines


def plot(results: dict[str, list[dict]], pi0: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    # Methods can coincide (SELM at a small alpha is iterative DPO to three decimals): distinct dashes and
    # markers keep a line drawn on top of another visible.
    styles = itertools.cycle([("-", "o"), ("--", "s"), (":", "D"), ("-.", "^"), ("-", "v"), ("--", "P"), (":", "X")])
    for (method, rs), (dash, marker) in zip(results.items(), styles):
        for ax, key in zip(axes, ("gold/sampled", "win_rate")):
            hs = [r["history"] for r in rs]
            xs = [0.0] + [sum(h[t]["labelled_pairs_total"] for h in hs) / len(hs) for t in range(len(hs[0]))]
            stats = [(pi0[key], 0.0)] + [mean_ci([h[t][key] for h in hs]) for t in range(len(hs[0]))]
            means = [m for m, _ in stats]
            halves = [0.0 if h != h else h for _, h in stats]
            line, = ax.plot(xs, means, linestyle=dash, marker=marker, label=method, linewidth=1.8, markersize=5)
            ax.fill_between(xs, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                            color=line.get_color(), alpha=0.07)
    axes[0].set_ylabel("gold reward of sampled answers (held-out)")
    axes[1].set_ylabel("win rate vs pi_0 (greedy, held-out)")
    for ax in axes:
        ax.set_xlabel(LABELS_AXIS)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(title + " (mean over seeds, band = 95% CI)")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["builtin", "constraints"], default="builtin",
                        help="builtin: the sorting task (default); constraints: SmolLM2-135M-Instruct on verifiable "
                             "constraints (needs bash scripts/setup.sh real)")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 1 iteration of 16 prompts, 2 seeds")
    parser.add_argument("--gpu", action="store_true",
                        help="constraints task: the GPU schedule (constraints_h100: full fine-tune, 3 x 1,024 prompts, "
                             "every method, 5 seeds); default: the CPU schedule (constraints_quickstart, 4 methods)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 5, quick 2)")
    parser.add_argument("--existing", action="store_true",
                        help="report only the runs already finished in --workdir (start no new run): a partial "
                             "result when the whole schedule does not fit the time")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, "selm_official", "xpo_policy_pairs"],
                        help=f"default: {' '.join(METHODS)} (constraints on a CPU: "
                             f"{' '.join(CONSTRAINTS_CPU['methods'])})")
    parser.add_argument("--no-ablation", action="store_true", help="skip SELM's alpha ablation")
    parser.add_argument("--no-sail-ablation", action="store_true",
                        help="skip SAIL against dataset DPO and its response-term ablation")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the results go")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench"), help="where the runs go")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. your own model, prompts, preferences and judge: "
                             "model=DIR prompts=P.jsonl eval_prompts=E.jsonl preferences=PREFS.jsonl "
                             "judge.reward_model=RM eval.reward=pkg.mod:gold")
    args = parser.parse_args(argv)
    constraints = args.task == "constraints"
    recipe = None
    if constraints:
        from selfalign.cli import recipe_path

        recipe = recipe_path("constraints_h100" if args.gpu else "constraints_quickstart")
        size = dict(CONSTRAINTS_QUICK if args.quick else CONSTRAINTS_GPU if args.gpu else CONSTRAINTS_CPU)
        # SELM's paper pairs alpha with beta 0.01: the grid runs at beta 0.1 (the task's) and at 0.01.
        betas = [0.1, 0.01] if size["grid"] else []
    else:
        size = dict(QUICK if args.quick else FULL)
        betas = [None]
    methods = args.methods or size.get("methods", METHODS)
    if args.seeds:
        size["seeds"] = args.seeds
    out, work = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    name = ("sample_efficiency_constraints" + ("_gpu" if args.gpu else "") if constraints else "sample_efficiency")
    name += "_quick" if args.quick else ""
    seeds = list(range(size["seeds"]))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # (table key, method, extra overrides, SELM/XPO alpha)
    jobs = [(m, m, [], None) for m in methods]
    if constraints and any(m in NEEDS_PREFERENCES for m in methods) and "offline_dpo" not in methods:
        jobs.insert(0, ("offline_dpo", "offline_dpo", [], None))  # its judged pi_0 pairs are the preference file
    if not args.no_ablation:
        for beta in betas:
            tag = "" if beta is None else f" beta={beta:g}"
            extra = [] if beta is None else [f"train.beta={beta}"]
            jobs += [(f"selm alpha={a:g}{tag}", "selm", extra, a) for a in size["grid"]
                     if a != ALPHA["selm"] or "selm" not in methods or beta not in (None, 0.1)]
    if not args.no_sail_ablation and not constraints:
        jobs += [("dataset_dpo", *DATASET_DPO, None)]
        jobs += [(key, method, extra, None) for key, (method, extra) in SAIL_ABLATION.items()]
    results: dict[str, list[dict]] = {}
    pi0 = None
    for key, method, extra, alpha in jobs:
        for seed in seeds:
            run_dir = work / name / key.replace(" ", "_").replace("=", "").replace("+", "") / f"seed{seed}"
            if args.existing and not (run_dir / f"iter_{size['iterations'] - 1:03d}" / "metrics.json").exists():
                print(f"{key:>28} seed {seed}: not finished in {run_dir}, left out (--existing)", flush=True)
                continue
            if constraints and method in NEEDS_PREFERENCES:
                offline = work / name / "offline_dpo" / f"seed{seed}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                extra = [*extra, f"preferences={preferences_from(offline, run_dir.parent / f'prefs_seed{seed}.jsonl')}"]
            argv_run = [*overrides(method, seed, run_dir, size, alpha, args.task), *extra, *args.set]
            if constraints:
                share_pi0_evaluation(run_dir, sorted((work / name).glob(f"*/seed{seed}")))
            history, pi0_s, seconds = run_one(argv_run, recipe)
            pi0 = pi0 or pi0_s
            final = history[-1]
            record = {"seed": seed, "history": history, "seconds": seconds, "dir": str(run_dir)}
            novel = ""
            if constraints:
                record["novel"] = eval_novel(run_dir, size)
                novel = f" novel sampled {record['novel']['gold/sampled']:.3f}"
            print(f"{key:>28} seed {seed}: gold sampled {final['gold/sampled']:.3f} greedy {final['gold/greedy']:.3f} "
                  f"win {final['win_rate']:.3f} KL {final.get('kl_to_pi0', float('nan')):.3f}{novel} labelled pairs "
                  f"{final['labelled_pairs_total']} ({seconds:.0f} s)", flush=True)
            results.setdefault(key, []).append(record)

    main_results = {m: results[m] for m in methods if m in results}
    table, numbers = summarise(main_results, pi0)
    ab_tables, ab_numbers = [], {}
    for beta in betas if not args.no_ablation else []:
        tag = "" if beta is None else f" beta={beta:g}"
        own = {f"selm alpha={ALPHA['selm']:g}{tag}" if k == "selm" and beta in (None, 0.1) else k: v
               for k, v in results.items() if (k == "selm" and beta in (None, 0.1))
               or (k.startswith("selm alpha=") and k.endswith(tag) and (tag or " beta=" not in k))}
        own = dict(sorted(own.items(), key=lambda kv: -float(kv[0].split("=")[1].split()[0])))
        if f"selm alpha=0{tag}" in own:
            ab_table, numbers_b = summarise(own, pi0, baseline=f"selm alpha=0{tag}")
            ab_tables.append((tag, ab_table, verdicts(numbers_b, f"SELM alpha=0{tag}")))
            ab_numbers.update(numbers_b)
    pi0_novel = None
    if constraints:
        pi0_novel = eval_pi0_novel(work / name / "pi0_novel.json", work / name / methods[0] / "seed0", size)
    sail_table = sail_numbers = online_table = online_numbers = None
    if "dataset_dpo" in results:
        mixed = ["dataset_dpo", *(k for k in ("sail_dp", "sail_pp", "sail_pp +baseline", "sail_pr",
                                              "sail_pr +baseline") if k in results)]
        sail_table, sail_numbers = summarise({k: results[k] for k in mixed}, pi0, baseline="dataset_dpo")
        online = [k for k in SAIL_ABLATION if k.startswith("pr-only")]
        online_table, online_numbers = summarise({k: results[k] for k in online}, pi0, baseline=online[0])
    title = (f"Constraints task (SmolLM2-135M-Instruct), {size['iterations']} x {size['prompts']} prompts, K = 4 "
             f"(XPO 2), {len(seeds)} seeds" if constraints else
             f"Built-in task, {size['iterations']} x {size['prompts']} prompts, K = 2, {len(seeds)} seeds")
    plot(main_results, pi0, out / f"{name}.png", title)
    command = "python bench/sample_efficiency.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    paired = {m: against_pi0([Path(r["dir"]) for r in rs]) for m, rs in main_results.items()}
    paired_rows = [f"| {m} | " + " | ".join(
        f"{v[k]['delta']:+.3f} | {v[k]['better']}/{v[k]['worse']} of {v[k]['n']} | {v[k]['p']:.4f}"
        for k in ("greedy", "sampled")) + " |" for m, v in paired.items()]
    paired_md = ["## Against pi_0, paired over the held-out prompts", "",
                 "Each method's final policies (all seeds) against pi_0 on the same held-out prompts: the mean "
                 "reward difference, how many prompts (samples) improved / got worse, and p from a sign-flip "
                 "permutation test of the paired differences (20,000 random flips). This asks whether these "
                 "trained policies beat pi_0 on this prompt set; the seed columns above ask how much training "
                 "varies.", "",
                 "| method | Δ greedy | better/worse (greedy) | p (greedy) | Δ sampled | better/worse (sampled) | "
                 "p (sampled) |", "|---|---:|---:|---:|---:|---:|---:|", *paired_rows, ""]
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    novel_line = (f" On the novel-combination held-out set pi_0 scores {pi0_novel['gold/sampled']:.3f} sampled, "
                  f"{pi0_novel['gold/greedy']:.3f} greedy; `novel` columns are the final policy there (p against "
                  "iterative DPO)." if pi0_novel else "")
    md = [
        f"# Sample efficiency on the {'constraints' if constraints else 'built-in'} task"
        f"{' (quick mode)' if args.quick else ''}", "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {device}.", "",
        f"{title}; pi_0: gold sampled {pi0['gold/sampled']:.3f}, greedy {pi0['gold/greedy']:.3f}. "
        "Means ± 95% CI over seeds; p from an exact permutation test against iterative DPO (with 2 seeds the "
        "smallest possible p is 0.333: nothing can be significant at 0.05)." + novel_line
        + (" `s / run` is the stages' own seconds (generation, judging, reference log-probs, update, evaluation), "
           "without engine start and pi_0's evaluation." if constraints else ""), "",
        table, "", *verdicts(numbers), "",
        f"![sample efficiency]({name}.png)", "", *paired_md,
    ]
    for tag, ab_table, ab_verdicts in ab_tables:
        beyond = [f"{a:g}" for a in size["grid"] if a > max(ALPHA_GRID)]
        md += [f"## SELM alpha ablation{tag}", "",
               "alpha 0 is iterative DPO exactly; Δ and p are against it. The paper's grid is 0.005 to 0.0001"
               + (f"; {', '.join(beyond)} lie beyond it." if beyond else "."), "", ab_table,
               "", *ab_verdicts, ""]
    if sail_table:
        md += ["## SAIL against its own baseline", "",
               "SAIL's paper compares with DPO on the same preference dataset: `dataset_dpo` is SAIL with "
               "r = p = g = 0 (every row is a dataset pair, plain DPO). `+baseline` subtracts the running mean "
               "of F in the response term (`train.sail.baseline=true`).", "",
               sail_table, "", *verdicts(sail_numbers, "dataset DPO"), "",
               "## SAIL's response term, PR route only", "",
               "Every row online and judged (g = 1), so only the response term differs; gamma = 0 is on-policy "
               "DPO against the fixed pi_0 reference.", "",
               online_table, "", *verdicts(online_numbers, "gamma = 0"), ""]
    text = "\n".join(md)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"command": command, "size": size, "pi0": pi0, "pi0_novel": pi0_novel, "summary": numbers,
         "against_pi0": paired,
         "ablation": ab_numbers,
         "sail": sail_numbers, "sail_pr_only": online_numbers,
         "runs": {k: [{"seed": r["seed"], "seconds": r["seconds"], "history": r["history"],
                       **({"novel": r["novel"]} if "novel" in r else {})} for r in rs]
                  for k, rs in results.items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
