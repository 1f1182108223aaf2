"""The IFEval recipe's sweep: each run's final iterate against pi_0 on IFEval, with the checks against gaming.

Given run directories of `selfalign run ifeval_quickstart ...` (each answered on IFEval: `eval.benchmark=ifeval`,
or afterwards `selfalign eval --benchmark ifeval RUN --max-new-tokens 512`), writes one table: what each run
changed from the recipe, labels and stage seconds, IFEval prompt/instruction-level strict and loose for pi_0 and
the final iterate, the exact McNemar test, the answers' median length against pi_0's, the share cut at the limit
and heavily repeating (a 4-gram 3+ times), KL to pi_0 (k1 and k3, held-out samples), the held-out reward of the
instructions task, and 10 answer pairs (pi_0 vs final, the same prompts for every run).

    python bench/ifeval_recipe.py RUN [RUN ...] [--out bench/results] [--name ifeval_recipe]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfalign import ifeval  # noqa: E402
from selfalign.cli import recipe_path  # noqa: E402

PAIRS = 10


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed(run: Path) -> str:
    """The run's settings that differ from the ifeval_quickstart recipe's (output_dir and eval keys apart)."""
    from selfalign.config import load_config, to_dict
    from selfalign.run_config import RunConfig

    base = flatten(to_dict(load_config(RunConfig, recipe_path("ifeval_quickstart"), [])))
    mine = flatten(yaml.safe_load((run / "config.yaml").read_text()))
    diff = [f"{k}={mine[k]}" for k in sorted(mine) if k in base and base[k] != mine[k]
            and k != "output_dir" and not k.startswith("eval.")]
    return ", ".join(diff) or "the recipe"


def run_row(run: Path) -> dict:
    final = sorted((run / "ifeval").glob("iter_*.json"))[-1]
    scores, pi0 = ifeval.load_scores(final), ifeval.load_scores(run / "ifeval" / "pi0.json")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    pi0_held = json.loads((run / "pi0_metrics.json").read_text()) if (run / "pi0_metrics.json").exists() else {}
    gained, lost, p = ifeval.mcnemar_p(scores.prompt_strict(), pi0.prompt_strict())
    return {"run": str(run), "changed": changed(run), "final": final.stem, "scores": scores, "pi0": pi0,
            "metrics": scores.metrics(), "pi0_metrics": pi0.metrics(), "gained": gained, "lost": lost, "p": p,
            "labels": last.get("labels_total", 0), "pairs": last.get("labelled_pairs_total", 0),
            "seconds": sum(v for h in history for k, v in h.items() if k.startswith("time/")),
            "kl_k1": last.get("kl_k1_to_pi0"), "kl_k3": last.get("kl_to_pi0"),
            "held_greedy": last.get("gold/greedy"), "held_sampled": last.get("gold/sampled"),
            "pi0_held_greedy": pi0_held.get("gold/greedy"), "pi0_held_sampled": pi0_held.get("gold/sampled")}


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def answer_pairs(row: dict) -> list[str]:
    """PAIRS prompts spread over IFEval (every 54th), pi_0's answer beside the final iterate's."""
    scores, pi0 = row["scores"], row["pi0"]
    step = max(1, len(scores.answers) // PAIRS)
    out = []
    for i in range(0, min(step * PAIRS, len(scores.answers)), step):
        a, b, item = pi0.answers[i], scores.answers[i], scores.items[i]
        cut = lambda t: (t[:600] + " [...]") if len(t) > 600 else t  # noqa: E731
        out += [f"**{item.key}** {item.prompt[:300]}", f"instructions: {', '.join(item.instruction_ids)}", "",
                f"pi_0 ({a.tokens} tokens, strict {a.strict}):", "", "```", cut(a.response), "```", "",
                f"final ({b.tokens} tokens, strict {b.strict}):", "", "```", cut(b.response), "```", ""]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="ifeval_recipe")
    parser.add_argument("--notes", type=Path, help="a Markdown file of observations to put under the table")
    args = parser.parse_args(argv)
    rows = [run_row(r) for r in args.runs]
    p0 = rows[0]["pi0_metrics"]
    limit = rows[0]["pi0"].meta.get("max_new_tokens")
    lines = [f"# The IFEval recipe's sweep ({len(rows)} run(s))", "",
             f"IFEval, {len(rows[0]['pi0'].answers)} prompts, greedy, at most {limit} new tokens, chat template; "
             f"pi_0 = {rows[0]['pi0'].meta.get('policy')}: prompt-level strict {p0['prompt_strict']:.3f}, loose {p0['prompt_loose']:.3f}; "
             f"instruction-level strict {p0['inst_strict']:.3f}, loose {p0['inst_loose']:.3f}; median answer "
             f"{p0['median_tokens']:.0f} tokens / {p0['median_words']:.0f} words; {p0['truncated_share']:.2f} cut at "
             f"{limit}; {p0['repetition_share']:.2f} heavily repeating.", "",
             "| run | changed from the recipe | labels | pairs | stage s | prompt strict | loose | inst strict | "
             "vs pi_0: gained / lost, McNemar p | median tokens (x pi_0) | cut | repeating | KL k1 / k3 | "
             "held-out reward greedy / sampled (pi_0) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|"]
    for r in rows:
        m = r["metrics"]
        ratio = m["median_tokens"] / p0["median_tokens"] if p0["median_tokens"] else float("nan")
        lines.append(
            f"| {Path(r['run']).name} | {r['changed']} | {r['labels']} | {r['pairs']} | {r['seconds']:.0f} | "
            f"{m['prompt_strict']:.3f} ({m['prompt_strict'] - p0['prompt_strict']:+.3f}) | {m['prompt_loose']:.3f} | "
            f"{m['inst_strict']:.3f} | {r['gained']} / {r['lost']}, p = {r['p']:.2g} | "
            f"{m['median_tokens']:.0f} ({ratio:.2f}x) | {m['truncated_share']:.2f} | {m['repetition_share']:.2f} | "
            f"{fmt(r['kl_k1'], '.2f')} / {fmt(r['kl_k3'], '.2f')} | {fmt(r['held_greedy'])} / "
            f"{fmt(r['held_sampled'])} ({fmt(r['pi0_held_greedy'])} / {fmt(r['pi0_held_sampled'])}) |")
    if args.notes is not None:
        lines += ["", args.notes.read_text().strip()]
    best = max(rows, key=lambda r: r["metrics"]["prompt_strict"])
    lines += ["", f"## pi_0 against {Path(best['run']).name}", "", "```",
              ifeval.format_table([("pi_0", best["pi0"]), ("final", best["scores"])]), "```", "",
              f"## {PAIRS} answer pairs (pi_0, then {Path(best['run']).name}'s final iterate)", "", *answer_pairs(best)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    keep = ("run", "changed", "final", "metrics", "pi0_metrics", "gained", "lost", "p", "labels", "pairs", "seconds",
            "kl_k1", "kl_k3", "held_greedy", "held_sampled", "pi0_held_greedy", "pi0_held_sampled")
    (args.out / f"{args.name}.json").write_text(json.dumps([{k: r[k] for k in keep} for r in rows], indent=1))
    print("\n".join(lines[:len(rows) + 6]))


if __name__ == "__main__":
    main()
