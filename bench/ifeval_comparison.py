"""The method comparison on IFEval: every method on the ifeval_quickstart recipe, same label budget, several seeds.

Each run is the `ifeval_quickstart` recipe (SmolLM2-135M-Instruct, the instructions task's prompts, never IFEval's)
with only its method swapped in, and ends with IFEval's 541 prompts answered greedily by the final iterate
(`eval.benchmark=ifeval`; pi_0's answers are computed once and shared, cached by its weights' digest):

    iterative_dpo   the recipe itself (K = 4, best vs worst)
    selm            SELM's on-policy preset with the paper's alpha (0.001)
    selm_official   SELM's official pipeline: the judge ranks pi_ref's greedy answer with a preference file's pair
    xpo             XPO as published: a policy sample against a pi_0 sample (K = 2), alpha 1e-5
    sail_pr         SAIL's PR variant (its routes draw K = 2)
    offline_dpo     one update on pi_0's judged pairs (all the run's prompts up front)

selm_official and sail_pr read a preference file: pi_0's judged pairs from the same seed's offline DPO run.

Reported per method over the seeds: IFEval prompt-level strict (mean, 95% interval over seeds), the exact McNemar
test of each run's final iterate against pi_0 and against iterative DPO of the same seed (paired over the 541
prompts), labels, wall-clock of the run's stages, KL to pi_0 (k1 and k3, held-out samples), median answer tokens,
the share of answers cut at the length limit and with heavy repetition; and a plot.

Resumable: a finished run is read back, an unfinished one resumes where it stopped (the loop's own resume);
--existing reports what is finished without starting anything. Partial results are marked partial.

    python bench/ifeval_comparison.py --workdir /work/ifeval_runs                 # all methods, seeds 0 1 2
    python bench/ifeval_comparison.py --workdir DIR --methods iterative_dpo selm --seeds 0
    python bench/ifeval_comparison.py --workdir DIR --existing                    # tables from finished runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sample_efficiency import mean_ci, preferences_from  # noqa: E402

from selfalign import ifeval  # noqa: E402

METHODS = ["iterative_dpo", "selm", "selm_official", "xpo", "sail_pr", "offline_dpo"]
EXTRA = {
    "selm": ["train.alpha=0.001"],
    "selm_official": ["generation.num_samples=1", "train.alpha=0.001"],
    "xpo": ["generation.num_samples=2", "train.alpha=1e-5"],
    "sail_pr": ["generation.num_samples=2"],
}
NEEDS_PREFERENCES = {"selm_official", "sail_pr"}


def run_dir(workdir: Path, method: str, seed: int) -> Path:
    return workdir / f"{method}-seed{seed}"


def final_file(run: Path) -> Path | None:
    files = sorted((run / "ifeval").glob("iter_*.json")) if (run / "ifeval").is_dir() else []
    return files[-1] if files else None


def launch(workdir: Path, method: str, seed: int, extra: list[str], log: Path) -> int:
    """One run in its own process (its engine's memory goes with it), output appended to log."""
    run = run_dir(workdir, method, seed)
    argv = [sys.executable, "-m", "selfalign", "run", "ifeval_quickstart", f"method={method}", f"seed={seed}",
            f"train.seed={seed}", f"output_dir={run}", "eval.benchmark=ifeval", "--no-progress",
            *EXTRA.get(method, []), *extra]
    if method in NEEDS_PREFERENCES:
        offline = run_dir(workdir, "offline_dpo", seed)
        if not (offline / "iter_000" / "generations.jsonl").exists() and not list(offline.glob("iter_*/generations.jsonl")):
            print(f"{method} seed {seed}: needs offline_dpo seed {seed} first (its pi_0 pairs), skipped")
            return 1
        prefs = preferences_from(offline, workdir / f"preferences-seed{seed}.jsonl")
        argv.append(f"preferences={prefs}")
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        return subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def collect(workdir: Path, methods: list[str], seeds: list[int]) -> dict:
    """Finished runs: per method, per seed, the final iterate's IFEval scores and the run's numbers."""
    found: dict = {}
    for method in methods:
        for seed in seeds:
            run = run_dir(workdir, method, seed)
            final = final_file(run)
            if final is None or not (run / "ifeval" / "pi0.json").exists():
                continue
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = history[-1]
            found.setdefault(method, {})[seed] = {
                "scores": ifeval.load_scores(final), "pi0": ifeval.load_scores(run / "ifeval" / "pi0.json"),
                "labels": last.get("labels_total", 0), "pairs": last.get("labelled_pairs_total", 0),
                "seconds": sum(v for h in history for k, v in h.items() if k.startswith("time/")),
                "kl_k3": last.get("kl_to_pi0"), "kl_k1": last.get("kl_k1_to_pi0"),
            }
    return found


def table(found: dict, methods: list[str], seeds: list[int]) -> tuple[str, dict]:
    any_run = next(iter(next(iter(found.values())).values()))
    pi0 = any_run["pi0"]
    p0 = pi0.metrics()
    lines = [
        f"pi_0: prompt-level strict {p0['prompt_strict']:.3f}, loose {p0['prompt_loose']:.3f}, instruction-level "
        f"strict {p0['inst_strict']:.3f}; median answer {p0['median_tokens']:.0f} tokens, "
        f"{p0['truncated_share']:.2f} cut at {pi0.meta.get('max_new_tokens')}, {p0['repetition_share']:.2f} "
        "heavily repeating.", "",
        "| method | seeds | prompt strict (95% CI) | per seed | vs pi_0: gained/lost, McNemar p per seed | "
        "vs iterative DPO: gained/lost, p | inst strict | labels | pairs | s / run | KL k1 / k3 | median tokens | "
        "cut | repeating |",
        "|---|---:|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    numbers: dict = {}
    for method in methods:
        runs = found.get(method, {})
        if not runs:
            lines.append(f"| {method} | 0 | not run yet | | | | | | | | | | | |")
            continue
        strict = [r["scores"].metrics()["prompt_strict"] for r in runs.values()]
        mean, half = mean_ci(strict)
        vs0 = [ifeval.mcnemar_p(r["scores"].prompt_strict(), r["pi0"].prompt_strict()) for r in runs.values()]
        base = found.get("iterative_dpo", {})
        vsd = [ifeval.mcnemar_p(r["scores"].prompt_strict(), base[s]["scores"].prompt_strict())
               for s, r in runs.items() if s in base] if method != "iterative_dpo" else []
        m = [r["scores"].metrics() for r in runs.values()]

        def avg(key: str, m=m) -> float:
            return sum(x[key] for x in m) / len(m)
        kl1 = [r["kl_k1"] for r in runs.values() if r["kl_k1"] is not None]
        kl3 = [r["kl_k3"] for r in runs.values() if r["kl_k3"] is not None]
        numbers[method] = {"seeds": sorted(runs), "prompt_strict": strict, "mean": mean, "ci": half,
                           "vs_pi0": vs0, "vs_iterative_dpo": vsd}
        ci = f"{mean:.3f} ± {half:.3f}" if len(strict) > 1 else f"{mean:.3f}"
        lines.append(
            f"| {method} | {len(runs)} | {ci} | {', '.join(f'{v:.3f}' for v in strict)} | "
            f"{'; '.join(f'{a}/{b}, {p:.2g}' for a, b, p in vs0)} | "
            f"{'; '.join(f'{a}/{b}, {p:.2g}' for a, b, p in vsd) or '-'} | {avg('inst_strict'):.3f} | "
            f"{sum(r['labels'] for r in runs.values()) / len(runs):.0f} | "
            f"{sum(r['pairs'] for r in runs.values()) / len(runs):.0f} | "
            f"{sum(r['seconds'] for r in runs.values()) / len(runs):.0f} | "
            f"{(sum(kl1) / len(kl1)) if kl1 else float('nan'):.2f} / {(sum(kl3) / len(kl3)) if kl3 else float('nan'):.2f}"
            f" | {avg('median_tokens'):.0f} | {avg('truncated_share'):.2f} | {avg('repetition_share'):.2f} |")
    return "\n".join(lines), {"pi0": p0, "methods": numbers}


def plot(numbers: dict, path: Path) -> None:
    from selfalign.report import pyplot

    plt = pyplot()
    methods = list(numbers["methods"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, m in enumerate(methods):
        n = numbers["methods"][m]
        ax.scatter([i] * len(n["prompt_strict"]), n["prompt_strict"], color="C0", alpha=0.5, s=14)
        ax.errorbar([i], [n["mean"]], yerr=[0 if n["ci"] != n["ci"] else n["ci"]], fmt="o", color="C1", capsize=4)
    ax.axhline(numbers["pi0"]["prompt_strict"], color="gray", linestyle="--", label="pi_0")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("IFEval prompt-level strict")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the runs go (each resumes there)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--existing", action="store_true", help="report finished runs only; start none")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the tables go")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # offline DPO first within a seed: its pi_0 pairs feed the methods that read a preference file
    order = sorted(args.methods, key=lambda m: (m != "offline_dpo", m != "iterative_dpo"))
    if not args.existing:
        for seed in args.seeds:
            for method in order:
                if final_file(run_dir(args.workdir, method, seed)) is None:
                    start = time.time()
                    print(f"{method} seed {seed}: running (log {args.workdir / 'runs.log'})", flush=True)
                    code = launch(args.workdir, method, seed, args.set, args.workdir / "runs.log")
                    print(f"{method} seed {seed}: exit {code} after {time.time() - start:.0f} s", flush=True)
    found = collect(args.workdir, args.methods, args.seeds)
    if not found:
        print("no finished run yet")
        return
    text, numbers = table(found, args.methods, args.seeds)
    complete = all(len(found.get(m, {})) == len(args.seeds) for m in args.methods)
    # The resume command repeats every option the runs were made with: a run resumed under other settings is
    # refused (its config.yaml differs).
    sets = f" --set {' '.join(shlex.quote(x) for x in args.set)}" if args.set else ""
    status = "complete" if complete else (
        f"PARTIAL: {sum(len(v) for v in found.values())} of {len(args.methods) * len(args.seeds)} runs finished; "
        f"resume with `python bench/ifeval_comparison.py --workdir {args.workdir} --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))} --out {args.out}{sets}`")
    n = len(next(iter(next(iter(found.values())).values()))["pi0"].prompt_strict())
    subset = "" if n == 541 else f" (the first {n} of them: eval.benchmark_prompts, a quick look)"
    head = (f"# IFEval method comparison ({status})\n\nEach run: `selfalign run ifeval_quickstart method=M seed=S "
            f"eval.benchmark=ifeval{' ' + ' '.join(args.set) if args.set else ''}` (SmolLM2-135M-Instruct, "
            f"instructions-task prompts only); IFEval's 541 prompts{subset} answered greedily by the final iterate. "
            f"McNemar: exact test on prompt-level strict, paired over the {n} prompts, each seed's run on its own.\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ifeval_comparison.md").write_text(head + text + "\n")
    (args.out / "ifeval_comparison.json").write_text(json.dumps({"status": status, **numbers}, indent=1))
    plot(numbers, args.out / "ifeval_comparison.png")
    print(head + text)


if __name__ == "__main__":
    main()
