"""Offline preference training (`selfalign train`): one update of a model on a preference file.

`train(cfg)` is the whole recipe: check the model and the data, lock and prepare the run
directory, split off held-out pairs, train, measure the held-out pairs before and after, save
the policy with its model card (last: its arrival marks the run done), and upload it where
asked. The command line only parses arguments, calls it, and prints `step_table` of the result.

    from selfalign.config import load_config
    from selfalign.offline import TrainRunConfig, train

    summary = train(load_config(TrainRunConfig, "recipe.yaml", ["train.beta=0.2"]))
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .card import check_repo_id, push_folder, train_card
from .config import ConfigError, UsageError, check_same_config, dump_yaml, field, to_dict
from .data import PreferenceDataConfig, load_preferences, write_atomic, write_jsonl
from .models import check_source
from .records import PreferenceExample, ReferenceLogps
from .rundir import RunLock, check_same_data, data_digest
from .tokens import pad_token_id
from .tracking import RunTracker, accelerator_kwargs, parse_report_to
from .train import PreferenceTrainer, TrainConfig
from .train_config import RESUME_OLD_DEFAULTS


@dataclass
class TrainRunConfig:
    """An offline preference-training run: model, data, and the update's settings."""

    model: str = field("", help="Policy to train: a local directory, hub name or .gguf file (selfalign.models).")
    reference: str = field("", help="Frozen reference model; empty means a copy of `model` (pi_0).")
    output_dir: str = field("runs/train", help="Run directory: config.yaml, steps.jsonl, metrics.jsonl, policy/.")
    report_to: str = field("none", help="Experiment trackers, as in `selfalign run`: none, or one or more "
                                        "(comma-separated) of tensorboard (RUN/tensorboard/), wandb, trackio, mlflow, ...")
    push_to_hub: str = field("", help="Hub repository (user/name) to upload policy/ (with its model card) to at the "
                                      "end; needs network and a token (HF_TOKEN). Empty: no upload.")
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig, help="Preference data.")
    train: TrainConfig = field(default_factory=TrainConfig, help="The preference update.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        check_repo_id("push_to_hub", self.push_to_hub)
        parse_report_to(self.report_to)


@dataclass
class TrainSummary:
    """What an offline run returns (its directory holds the same: summary.json, metrics.jsonl, policy/).

    steps: each optimizer step's metrics (loss, rewards/..., logps/...), in order; before, after: the
    held-out pairs' accuracies and margin before and after training (heldout_accuracy; empty without
    held-out pairs); train_pairs, heldout_pairs: how many pairs each side had; policy: the saved policy
    directory; uploaded: where push_to_hub put it, or None.
    """

    steps: list[dict[str, float]]
    before: dict[str, float]
    after: dict[str, float]
    train_pairs: int
    heldout_pairs: int
    policy: Path
    uploaded: str | None = None


def train(cfg: TrainRunConfig, progress: bool = True) -> TrainSummary:
    """Train cfg.model on cfg.data; write the run directory (locked while it runs); return the summary."""
    if not cfg.model:
        raise ConfigError("model: required (a local model directory or hub name)")
    if not cfg.data.path:
        raise ConfigError("data.path: required (prompt/chosen/rejected rows: a JSONL or Parquet file, a save_to_disk "
                          "folder or a dataset name)")
    from .tasks.smollm2 import named_model

    cfg.model, cfg.reference = named_model(cfg.model, progress), cfg.reference and named_model(cfg.reference, progress)
    check_source(cfg.model, "model")
    if cfg.reference:
        check_source(cfg.reference, "reference")
    with RunLock(Path(cfg.output_dir)):
        return _train(cfg, progress)


def run_train(cfg: TrainRunConfig, progress: bool = True) -> dict[str, float]:
    """train(cfg), returning only the final held-out metrics (the API before TrainSummary)."""
    return train(cfg, progress).after


def prepare_run_dir(cfg: TrainRunConfig) -> Path:
    """The run directory with cfg saved in it: refused when it holds a finished run, or a different config."""
    out = Path(cfg.output_dir)
    if (out / "policy").exists():
        raise UsageError(f"{out}/policy already exists: this run finished; choose another output_dir=... to train again")
    saved = out / "config.yaml"
    check_same_config(saved, cfg, old_defaults=RESUME_OLD_DEFAULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, dump_yaml(cfg))
    return out


@torch.no_grad()
def heldout_accuracy(trainer: PreferenceTrainer, examples: list[PreferenceExample],
                     reference: list[ReferenceLogps]) -> dict[str, float]:
    """Implicit-reward accuracy and margin, and plain log-prob accuracy, on held-out pairs (reference: theirs)."""
    from .logprobs import collate
    from .losses import preference_logits

    batch = collate([e.prompt_ids for e in examples] * 2, [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples],
                    trainer.pad_token_id)
    lp = trainer.scorer.policy_logps(batch).cpu()
    n = len(examples)
    chosen, rejected = lp[:n], lp[n:]
    ref_c = torch.tensor([r.chosen for r in reference])
    ref_r = torch.tensor([r.rejected for r in reference])
    margin = preference_logits(chosen, rejected, ref_c, ref_r, trainer.config.beta)
    return {
        "eval/rewards/accuracies": (margin > 0).float().mean().item(),
        "eval/rewards/margins": margin.mean().item(),
        "eval/logps/accuracies": (chosen > rejected).float().mean().item(),
    }


def _train(cfg: TrainRunConfig, progress: bool) -> TrainSummary:
    from .distributed import make_accelerator
    from .iterates import frozen_dtype, policy_dtype, save_policy
    from .models import load_causal_lm, load_tokenizer
    from .train import resolve_mixed_precision

    # The trackers first: one that is not installed stops the run before any work, as in `selfalign run`.
    accelerator = make_accelerator(resolve_mixed_precision(cfg.train.mixed_precision),
                                   **accelerator_kwargs(cfg.report_to, Path(cfg.output_dir)))
    tokenizer = load_tokenizer(cfg.model)
    examples = load_preferences(cfg.data, tokenizer)
    out = prepare_run_dir(cfg)
    check_same_data(out, {"data": data_digest(cfg.data.path, [[e.prompt_ids, e.chosen_ids, e.rejected_ids]
                                                              for e in examples])}, write=True)
    random.Random(cfg.train.seed).shuffle(examples)
    n_eval = int(len(examples) * cfg.data.eval_fraction)
    heldout, train_set = examples[:n_eval], examples[n_eval:]

    policy = load_causal_lm(cfg.model, dtype=policy_dtype(cfg.train))
    reference = None
    if not cfg.train.lora.enabled:  # LoRA: the reference is the policy with its adapter disabled
        reference = load_causal_lm(cfg.reference or cfg.model, dtype=frozen_dtype(cfg.train))
    pad = pad_token_id(tokenizer)
    trainer = PreferenceTrainer(policy, cfg.train, pad_token_id=pad, reference=reference, accelerator=accelerator)

    # The reference is frozen: the held-out pairs' reference log-probs serve before and after training.
    heldout_ref = trainer.compute_reference_logps(heldout, progress=False) if heldout else []
    before = heldout_accuracy(trainer, heldout, heldout_ref) if heldout else {}
    # RUN/steps.jsonl as training runs, and the report_to trackers: the config, each step, held-out before/after.
    steps = RunTracker(out, trainer.accelerator, to_dict(cfg))
    steps.begin_iteration(0)
    steps.log_iteration(before, steps=0)
    trainer.on_step = steps.on_step
    result = trainer.update(train_set, checkpoint_dir=out / "checkpoint", progress=progress)
    after = heldout_accuracy(trainer, heldout, heldout_ref) if heldout else {}
    steps.log_iteration(after, steps=len(result.steps))
    steps.close()
    write_jsonl(out / "metrics.jsonl", [{"step": i + 1, **s} for i, s in enumerate(result.steps)])
    summary = {"train_pairs": len(train_set), "heldout_pairs": len(heldout), **after}
    write_atomic(out / "summary.json", json.dumps({"before": before, "after": after, **summary}, indent=2))
    card = train_card(cfg, {"before": before, "after": after, **summary})
    # Last: its arrival marks the run done; the model card goes in with it.
    save_policy(trainer, tokenizer, out / "policy", trainer.accelerator, card=card)
    uploaded = push_folder(cfg.push_to_hub, out / "policy", out) if cfg.push_to_hub else None
    return TrainSummary(result.steps, before, after, len(train_set), len(heldout), out / "policy", uploaded)


def step_table(summary: TrainSummary) -> str:
    """About ten of the run's steps (loss, accuracy, margin, log-probs) and the held-out pairs before and after."""
    cols = ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
    steps, before, after = summary.steps, summary.before, summary.after
    lines = [f"{'step':>5} " + " ".join(f"{c:>19}" for c in cols)]
    every = max(1, len(steps) // 10)
    for i, s in enumerate(steps):
        if i % every == 0 or i == len(steps) - 1:
            lines.append(f"{i + 1:>5} " + " ".join(f"{s[c]:>19.4f}" for c in cols))
    if before:
        lines.append("held-out pairs            before   after")
        for key in after:
            lines.append(f"  {key:<24}{before[key]:>7.3f} {after[key]:>7.3f}")
    return "\n".join(lines)
