"""Run reports: RUN/report.md with PNG plots, and side-by-side comparisons of runs.

    write_report(RUN)             RUN/report.md, RUN/plots/{reward_vs_labels,win_rate,reward_hist,kl}.png
    write_comparison(RUNS, OUT)   OUT/compare.md and OUT/compare.png; returns the markdown table
    iteration_table(RUN, history) the table `selfalign run` prints at its end: pi_0 and each iteration

Everything is read from the run directory (metrics.json per iteration, pi0_metrics.json,
eval_rewards.json), so a report can be made of a finished or a half-finished run, any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .data import write_atomic
from .vocabulary import COLUMNS, cell

LABELS_AXIS = "labelled pairs used (judged prompts + dataset pairs)"


class ReportError(ValueError):
    """The directory is not a run, or has nothing to report yet."""


def iteration_table(out: Path, history: list[dict]) -> str:
    """One row for pi_0 and one per iteration: the numbers a user watches, titled as selfalign.vocabulary says."""
    rows = []
    pi0 = out / "pi0_metrics.json"
    if pi0.exists():
        rows.append(json.loads(pi0.read_text()))
    rows += history
    # Labels by source, cumulative: judge labels are paid for; policy and dataset labels are not (SAIL).
    for r in rows:
        for source, n in r.get("labels_total_by_source", {}).items():
            r[f"labels/{source}"] = n
    extra = [(f"labels/{s}", f"{s} labels", "{:d}") for s in ("policy", "dataset")
             if any(r.get(f"labels/{s}") for r in rows)]
    cols = [c for c in COLUMNS if c[0] not in ("labelled_pairs_total", "implicit/gap")]
    cols = [cols[0], *extra, *cols[1:]]
    # A column no row has (no held-out evaluation, no win rate) is left out rather than printed empty.
    cols = [c for c in cols if c[0] == "labels_total" or any(c[0] in r for r in rows)]
    table = [["iteration", *(title for _, title, _ in cols)]]
    table += [[str(r["iteration"]), *(cell(r, key, fmt) for key, _, fmt in cols)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)


def load_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows): rows are pi_0's metrics (when evaluated) then each finished iteration's."""
    if not (run / "config.yaml").is_file():
        raise ReportError(f"{run}: not a run directory (no config.yaml)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = []
    if (run / "pi0_metrics.json").is_file():
        rows.append(json.loads((run / "pi0_metrics.json").read_text()))
    rows += [json.loads(p.read_text()) for p in sorted(run.glob("iter_*/metrics.json"))]
    if not any(r["iteration"] != "pi_0" for r in rows):
        raise ReportError(f"{run}: no iteration has finished yet; nothing to report")
    return config, rows


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _name(row: dict[str, Any]) -> str:
    return "pi_0" if row["iteration"] == "pi_0" else f"iter {row['iteration']}"


def _x_labels(rows: list[dict[str, Any]]) -> list[int]:
    return [r.get("labelled_pairs_total", r.get("labels_total", 0)) for r in rows]


def plot_reward_vs_labels(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = _x_labels(rows)
    for key, label, style in (("gold/greedy", "greedy answer", "o-"), ("gold/sampled", "sampled answers", "s--")):
        points = [(xi, r) for xi, r in zip(x, rows) if key in r]  # eval.every may skip iterations
        if points:
            ax.plot([xi for xi, _ in points], [r[key] for _, r in points], style, label=label)
            for xi, r in points:
                ax.annotate(_name(r), (xi, r[key]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel(LABELS_AXIS)
    ax.set_ylabel("mean reward on held-out prompts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_win_rate(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    its = [r for r in rows if r["iteration"] != "pi_0" and "win_rate" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [_name(r) for r in its]
    win = [r["win_rate"] for r in its]
    tie = [r["tie_rate"] for r in its]
    loss = [1 - w - t for w, t in zip(win, tie)]
    ax.bar(names, win, label="win", color="tab:green")
    ax.bar(names, tie, bottom=win, label="tie", color="tab:gray")
    ax.bar(names, loss, bottom=[w + t for w, t in zip(win, tie)], label="loss", color="tab:red")
    for i, w in enumerate(win):
        ax.text(i, w / 2, f"{w:.0%}", ha="center", va="center", color="white", fontweight="bold")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of held-out prompts (greedy vs pi_0)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reward_hist(run: Path, rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Sampled-response reward histograms of pi_0 and each iteration (the SELM paper's distribution shift)."""
    series = []
    if (run / "pi0_eval_rewards.json").is_file():
        series.append(("pi_0", json.loads((run / "pi0_eval_rewards.json").read_text())["sampled"]))
    for p in sorted(run.glob("iter_*/eval_rewards.json")):
        series.append((f"iter {int(p.parent.name.split('_')[1])}", json.loads(p.read_text())["sampled"]))
    if not series:
        return False
    plt = pyplot()
    lo = min(min(v) for _, v in series)
    hi = max(max(v) for _, v in series)
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 20
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, (name, values) in enumerate(series):
        ax.hist(values, bins=bins, histtype="step", linewidth=2, label=name,
                color=cmap(i / max(1, len(series) - 1)), weights=[1 / len(values)] * len(values))
    ax.set_xlabel("reward of a sampled response")
    ax.set_ylabel("share of sampled responses")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_kl(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    its = [r for r in rows if r["iteration"] != "pi_0" and "kl_to_pi0" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([_name(r) for r in its], [r["kl_to_pi0"] for r in its], "o-", color="tab:purple")
    ax.set_ylabel("KL(pi || pi_0), nats per response")
    ax.set_xlabel("iteration")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metrics_table(rows: list[dict[str, Any]], first: str = "iteration", names: list[str] | None = None) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = [f"| {first} | " + " | ".join(t for _, t, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for i, r in enumerate(rows):
        name = names[i] if names else _name(r)
        lines.append(f"| {name} | " + " | ".join(cell(r, k, fmt) for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def write_report(run: Path) -> Path:
    """RUN/report.md and RUN/plots/*.png; returns the report's path."""
    run = Path(run)
    config, rows = load_run(run)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    method = config.get("method", "?")
    title = f"{method}: {run.name}"
    plot_reward_vs_labels(rows, plots / "reward_vs_labels.png", title)
    images = ["reward_vs_labels.png"]
    if any("win_rate" in r for r in rows if r["iteration"] != "pi_0"):
        plot_win_rate(rows, plots / "win_rate.png", title)
        plot_kl(rows, plots / "kl.png", title)
        images += ["win_rate.png", "kl.png"]
    if plot_reward_hist(run, rows, plots / "reward_hist.png", title):
        images.append("reward_hist.png")
    its = [r for r in rows if r["iteration"] != "pi_0"]
    sources = ["| iteration | judge | policy | dataset | pairs | ties | routes |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in its:
        by = r.get("labels_by_source", {"judge": r.get("labels", 0)})
        routes = ", ".join(f"{k} {v}" for k, v in r.get("routes", {}).items() if v)
        sources.append(f"| {r['iteration']} | {by.get('judge', 0)} | {by.get('policy', 0)} | {by.get('dataset', 0)} | "
                       f"{r.get('pairs', '')} | {r.get('ties', '')} | {routes} |")
    gen, train = config.get("generation", {}), config.get("train", {})
    text = [
        f"# Run report: {run.name}", "",
        f"- method **{method}**, model `{config.get('model')}`, {config.get('iterations')} iteration(s) of "
        f"{config.get('prompts_per_iteration')} prompts, K = {gen.get('num_samples')} samples at temperature "
        f"{gen.get('temperature')}",
        f"- beta {train.get('beta')}, alpha {train.get('alpha')}, learning rate {train.get('learning_rate')}, "
        f"epochs {train.get('epochs')}, seed {config.get('seed')}",
        "- rewards are on held-out prompts; win rate compares greedy answers with pi_0's under the same reward", "",
        "## Metrics per iteration", "", metrics_table(rows), "",
        "## Labels by source", "",
        "Judge labels are paid for (one per response scored, one per comparison for a ranker); policy labels "
        "(SAIL-PP, and SAIL-DP's per-step redraws) cost nothing; dataset labels come with the preference file.", "",
        *sources, "",
        "## Plots", "",
        *[f"![{name}](plots/{name})\n" for name in images],
    ]
    path = run / "report.md"
    write_atomic(path, "\n".join(text))
    return path


def write_comparison(runs: list[Path], out: Path) -> str:
    """One table (final iteration of each run, with pi_0) and one plot (reward against labels) for several runs."""
    loaded = [(Path(r), *load_run(Path(r))) for r in runs]
    names = [f"{run.name} ({config.get('method')})" for run, config, _ in loaded]
    finals = [rows[-1] for _, _, rows in loaded]
    pi0 = next((rows[0] for _, _, rows in loaded if rows[0]["iteration"] == "pi_0"), None)
    table = metrics_table(([pi0] if pi0 else []) + finals, first="run (final iteration)",
                          names=(["pi_0"] if pi0 else []) + names)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (_, _, rows), name in zip(loaded, names):
        x = _x_labels(rows)
        for ax, key in zip(axes, ("gold/sampled", "gold/greedy")):
            points = [(xi, r[key]) for xi, r in zip(x, rows) if key in r]
            if points:
                ax.plot(*zip(*points), "o-", label=name)
    for ax, what in zip(axes, ("sampled answers", "greedy answer")):
        ax.set_xlabel(LABELS_AXIS)
        ax.set_ylabel(f"mean reward, {what}")
        ax.set_title(f"reward of {what} on held-out prompts")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "compare.png")
    plt.close(fig)
    write_atomic(out / "compare.md", "# Comparison\n\n" + table + "\n\n![compare](compare.png)\n")
    return table
