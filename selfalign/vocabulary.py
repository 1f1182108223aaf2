"""What each metric is called where a person reads it: the run's printed table, RUN/report.md, the comparison,
the model card and the README use these titles; metrics.json, the trackers and dashboards use the keys.

    labelled pairs      labelled_pairs_total            judged prompts + dataset pairs used so far
    judge labels        labels_total                    labels the judge was paid for so far
    judge tokens        judge_tokens_total              an LLM judge's prompt + completion tokens so far
    judge says A        judge_first_position_share      a pairwise LLM judge's verdicts for the first response
                                                        shown (0.5 without position bias)
    reward (greedy)     gold/greedy                     held-out gold reward of the greedy answers
    reward (sampled)    gold/sampled                    ... of the sampled answers
    perfect (sampled)   gold/high_reward_fraction       share of sampled answers at the top reward (the built-in
                                                        task: the exact sort; constraints: all satisfied)
    win vs pi_0         win_rate                        greedy answers against pi_0's, under the gold reward
    ties                tie_rate
    KL k3, KL k1        kl_to_pi0, kl_k1_to_pi0         KL(pi || pi_0) on held-out samples: k3 (never negative,
                                                        explodes on far-moved policies) and k1 (the log-ratio mean)
    cut (sampled)       eval/truncated_share            share of held-out sampled answers cut at max_new_tokens
    implicit gap        implicit/gap                    the DPO implicit reward's chosen - rejected gap
"""

from __future__ import annotations

# (metrics key, title, format), in the order tables show them.
COLUMNS: list[tuple[str, str, str]] = [
    ("labelled_pairs_total", "labelled pairs", "{:d}"),
    ("labels_total", "judge labels", "{:d}"),
    ("judge_tokens_total", "judge tokens", "{:d}"),
    ("judge_first_position_share", "judge says A", "{:.2f}"),
    ("gold/greedy", "reward (greedy)", "{:.3f}"),
    ("gold/sampled", "reward (sampled)", "{:.3f}"),
    ("gold/high_reward_fraction", "perfect (sampled)", "{:.3f}"),
    ("win_rate", "win vs pi_0", "{:.3f}"),
    ("tie_rate", "ties", "{:.3f}"),
    ("kl_to_pi0", "KL k3", "{:.3f}"),
    ("kl_k1_to_pi0", "KL k1", "{:.3f}"),
    ("eval/truncated_share", "cut (sampled)", "{:.2f}"),
    ("implicit/gap", "implicit gap", "{:.3f}"),
]
TITLES = {key: title for key, title, _ in COLUMNS}


def columns(*keys: str) -> list[tuple[str, str, str]]:
    """The (key, title, format) of each key, in the given order."""
    by_key = {c[0]: c for c in COLUMNS}
    return [by_key[k] for k in keys]


def cell(row: dict, key: str, fmt: str) -> str:
    """row[key] formatted, or '' where the row has no such value."""
    value = row.get(key)
    if value is None:
        return ""
    return fmt.format(int(value)) if fmt == "{:d}" else fmt.format(value)
