"""The model card (README.md beside the final policy's weights) and the optional upload to the Hugging Face Hub.

The card says what a reader of the policy directory needs: the base model, the method and its
main settings, the data and the judge, and the metrics per iteration. It holds no wall-clock
time, no API key and nothing else that differs between two runs of the same command, so a
resumed run writes the same bytes. The upload is `huggingface_hub`'s upload_folder; it needs
network and a token (HF_TOKEN or `hf auth login`), so it is not exercised by the tests beyond
its failure: without network it ends with one line saying the run is complete and how to upload.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .vocabulary import cell, columns

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CARD_METRICS = columns("labels_total", "gold/greedy", "gold/sampled", "win_rate", "kl_to_pi0", "kl_k1_to_pi0")


class PushError(RuntimeError):
    """The upload to the hub failed; the run itself is complete."""


def check_repo_id(key: str, repo_id: str) -> None:
    from .config import ConfigError

    if repo_id and not REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"{key}: '{repo_id}' is not a hub repository id (user/name or org/name)")


def _front_matter(base: str, tags: list[str]) -> str:
    lines = ["---", "library_name: transformers"]
    if REPO_ID.fullmatch(base) and not Path(base).exists():  # a hub name: the hub links the card to it
        lines.append(f"base_model: {base}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    return "\n".join([*lines, "---", ""])


def _judge_line(cfg: Any) -> str:
    judge = cfg.judge
    if judge.kind == "reward_model":
        what = f"reward model `{judge.reward_model}`"
    elif judge.kind == "llm":
        what = f"LLM judge `{judge.llm.model}` ({judge.llm.mode}) over an OpenAI-compatible endpoint"
    elif judge.kind == "pairwise":
        what = f"pairwise ranker `{judge.function}`"
    else:
        what = f"reward function `{judge.function or 'the built-in task reward'}`"
    return what + (f", Bradley-Terry noise T = {judge.noise:g}" if judge.noise else "")


def run_card(cfg: Any, history: list[dict[str, Any]], pi0: dict[str, Any] | None) -> str:
    """The card of an online run's final policy."""
    gen = cfg.generation
    rows = [pi0] if pi0 else []
    rows += history
    metric_cols = [c for c in CARD_METRICS if any(c[0] in r for r in rows)]
    table = ["| iteration | " + " | ".join(title for _, title, _ in metric_cols) + " |",
             "|---|" + "---:|" * len(metric_cols)]
    for r in rows:
        table.append(f"| {r['iteration']} | " + " | ".join(
            cell(r, k, fmt) for k, _, fmt in metric_cols) + " |")
    reward = cfg.eval.reward_model or cfg.eval.reward or ("the judge's reward model" if cfg.judge.kind ==
                                                          "reward_model" else "the task's gold reward")
    text = [
        _front_matter(cfg.model, ["selfalign", cfg.method, "preference-alignment", "online-rlhf"]),
        f"# {Path(cfg.output_dir).name}: `{cfg.model}` aligned with {cfg.method}",
        "",
        "This policy was trained with selfalign's online preference "
        "alignment loop: each iteration the policy sampled responses, a judge labelled them, and the policy "
        "trained on the resulting pairs.",
        "",
        "## Training",
        "",
        f"- base model (pi_0): `{cfg.model}`",
        f"- method: `{cfg.method}` (loss `{cfg.loss}`, beta {cfg.train.beta:g}, alpha {cfg.alpha:g}, "
        f"reference `{cfg.reference}`)",
        f"- iterations: {len(history)} of {cfg.prompts_per_iteration} prompts, {gen.num_samples} samples per prompt "
        f"(temperature {gen.temperature:g}, at most {gen.max_new_tokens} new tokens)",
        f"- prompts: `{cfg.prompts or cfg.preferences or 'the built-in task'}`"
        + (f"; preference pairs: `{cfg.preferences}`" if cfg.preferences else ""),
        f"- judge: {_judge_line(cfg)}",
        f"- optimiser: {cfg.train.optimizer}, learning rate {cfg.train.learning_rate:g}, batch {cfg.train.batch_size}"
        + (f", LoRA r {cfg.train.lora.r}" if cfg.train.lora.enabled else ", full fine-tune"),
        f"- seed: {cfg.seed}",
        "",
        "## Metrics",
        "",
        f"Held-out prompts: `{cfg.eval_prompts or 'the built-in task'}`, scored by {reward}."
        if any("gold/greedy" in r for r in rows) else "No held-out evaluation was run.",
        "",
        *table,
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(text)


def train_card(cfg: Any, summary: dict[str, Any]) -> str:
    """The card of `selfalign train`'s policy (offline preference training)."""
    t = cfg.train
    held = [f"| {k} | {summary['before'].get(k, float('nan')):.3f} | {v:.3f} |" for k, v in summary["after"].items()]
    text = [
        _front_matter(cfg.model, ["selfalign", t.loss, "preference-alignment"]),
        f"# {Path(cfg.output_dir).name}: `{cfg.model}` trained with {t.loss}",
        "",
        "## Training",
        "",
        f"- base model: `{cfg.model}`" + (f" (reference `{cfg.reference}`)" if cfg.reference else ""),
        f"- loss: `{t.loss}`, beta {t.beta:g}, learning rate {t.learning_rate:g}, batch {t.batch_size}, "
        f"{t.epochs} epoch(s)" + (f", LoRA r {t.lora.r}" if t.lora.enabled else ", full fine-tune"),
        f"- data: `{cfg.data.path}` ({summary['train_pairs']} training pairs, {summary['heldout_pairs']} held out)",
        "",
        "## Metrics (held-out pairs)",
        "",
        *(["| metric | before | after |", "|---|---:|---:|", *held] if held else ["No pairs were held out."]),
        "",
    ]
    return "\n".join(text)


def push_folder(repo_id: str, folder: Path, run_dir: Path) -> str:
    """Upload `folder` to the hub repository `repo_id` (created if missing); its URL, or PushError in one line."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="selfalign: upload policy")
    except Exception as e:  # network, auth, offline mode: all end the same way, and the run is kept
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PushError(f"push_to_hub: could not upload {folder} to {repo_id} ({type(e).__name__}: {reason}); "
                        f"the run is complete in {run_dir}: upload it later with `hf upload {repo_id} {folder}` "
                        "(needs network and a token: HF_TOKEN or `hf auth login`)") from e
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
