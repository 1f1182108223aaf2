"""The preference update: one pass of a preference loss over a list of examples, on accelerate.

The online loop calls `PreferenceTrainer.update(examples)` once per iteration (or once per
few generation rounds). Inside an update the reference policy is frozen, so its log-probs
are computed once up front, not in a second forward every step. Chosen, rejected and, where
the loss needs it, y_ref go through the policy in one concatenated forward. Each optimizer
step's examples are sorted by length before they are cut into micro-batches: gradient
accumulation sums over the same examples either way, so the update is unchanged while less
padding is computed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from . import faults, losses
from .config import check, to_dict
from .config import field as cfield
from .logprobs import LogprobModel, collate, sequence_logprobs
from .logs import progress_bar

Tensor = torch.Tensor

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA adapters through peft; the reference is then the same model with the adapter disabled."""

    enabled: bool = cfield(False, help="Train LoRA adapters instead of all weights.")
    r: int = cfield(64, help="LoRA rank (SAIL's official setting: 64).")
    alpha: int = cfield(16, help="LoRA scaling alpha (SAIL's official setting: 16).")
    dropout: float = cfield(0.0, help="Dropout on the LoRA input; 0 keeps policy and reference forwards comparable.")
    target_modules: list[str] = cfield(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), help="Names of the linear layers that get adapters."
    )

    def __post_init__(self) -> None:
        check(self.r > 0, "lora.r", f"must be a positive integer, got {self.r}")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


ROUTES = ("offline", "dp", "pp", "pr")


@dataclass
class SailConfig:
    """SAIL (Ding et al., arXiv 2406.15567): how examples are routed, and its extra gradient terms.

    Each example goes to SAIL-DP with probability r (a dataset pair whose label is redrawn
    from the policy's own preference every step; label term rho), SAIL-PP with p (two policy
    samples labelled by the policy when generated; label and response terms, pi), SAIL-PR
    with g (two policy samples labelled by the judge; response term, gamma), and plain offline
    DPO on its dataset pair otherwise. Unset values (null) take the method preset's.
    """

    r: float | None = cfield(None, help="Probability of the SAIL-DP route (preset sail_dp: 0.4).")
    p: float | None = cfield(None, help="Probability of the SAIL-PP route (preset sail_pp: 0.3).")
    g: float | None = cfield(None, help="Probability of the SAIL-PR route (preset sail_pr: 0.3).")
    rho: float | None = cfield(None, help="Label-term coefficient of SAIL-DP (official 0.2).")
    pi: float | None = cfield(None, help="Label- and response-term coefficient of SAIL-PP (official 0.2).")
    gamma: float | None = cfield(None, help="Response-term coefficient of SAIL-PR (official 0.3).")
    baseline: bool = cfield(
        False, help="Subtract a running mean of F (over earlier steps) in the response term: less variance, same "
                    "expected gradient."
    )
    official_response_term: bool = cfield(
        False, help="Reproduce the official code's gradient hook -c*sg(F)/sg(logp(y)) instead of the paper's "
                    "score-function term (opposite sign, divided by the log-prob); for reproduction only."
    )
    stretch_epochs: bool = cfield(
        False, help="Visit each iteration's rows 1/(1-r-p-g) times (re-routed each visit), as the official code "
                    "stretches epochs so the offline pairs seen stay the same."
    )

    def __post_init__(self) -> None:
        for key in ("r", "p", "g", "rho", "pi", "gamma"):
            value = getattr(self, key)
            check(value is None or value >= 0, f"train.sail.{key}", f"must be >= 0, got {value}")
        for key in ("r", "p", "g"):
            value = getattr(self, key)
            check(value is None or value <= 1, f"train.sail.{key}", f"is a probability, must be <= 1, got {value}")
        total = sum(getattr(self, k) or 0.0 for k in ("r", "p", "g"))
        check(total <= 1 + 1e-9, "train.sail", f"r + p + g = {total:g} must be <= 1 (the rest is offline DPO)")

    @property
    def online_share(self) -> float:
        return (self.r or 0.0) + (self.p or 0.0) + (self.g or 0.0)

    def coefficient(self, name: str) -> float:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"train.sail.{name} is unset: choose a sail_* method preset or set it")
        return value


@dataclass
class TrainConfig:
    """Everything one preference update needs."""

    loss: Literal["dpo", "ipo", "selm", "xpo", "sail"] = cfield("dpo", help="Preference loss (see selfalign.losses).")
    beta: float = cfield(0.1, help="KL strength beta in h = beta * (log-ratio difference).")
    alpha: float | None = cfield(
        None, help="Optimism coefficient for selm (alpha*beta*...) and xpo (alpha*...); null: the paper's value for the "
                   "loss (selm 0.001, paired there with beta 0.01; xpo 1e-5), 0 for other losses. 0 trains DPO exactly.")
    label_smoothing: float = cfield(0.0, help="Probability a label is flipped (conservative DPO); 0 is plain DPO.")
    optimizer: Literal["adamw", "rmsprop"] = cfield("adamw", help="AdamW, or RMSprop (SAIL's official choice).")
    learning_rate: float = cfield(1e-6, help="Peak learning rate.")
    weight_decay: float = cfield(0.0, help="Weight decay (decoupled for AdamW).")
    adam_beta1: float = cfield(0.9, help="AdamW beta1.")
    adam_beta2: float = cfield(0.999, help="AdamW beta2; RMSprop's smoothing constant alpha.")
    adam_epsilon: float = cfield(1e-8, help="Epsilon of AdamW and RMSprop.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = cfield("cosine", help="Decay after warmup.")
    warmup_ratio: float = cfield(0.1, help="Fraction of the update's optimizer steps spent in linear warmup.")
    max_grad_norm: float = cfield(1.0, help="Clip the global gradient norm to this value; 0 disables clipping.")
    batch_size: int = cfield(8, help="Examples per optimizer step, over all processes (the global batch).")
    micro_batch_size: int = cfield(2, help="Examples per forward pass on one process (chosen+rejected = 2x rows).")
    epochs: int = cfield(1, help="Passes over the update's examples.")
    ref_batch_size: int = cfield(16, help="Examples per forward pass when precomputing reference log-probs.")
    logprob_chunk_size: int = cfield(1024, help="Tokens per LM-head chunk; bounds the logits held in memory.")
    mixed_precision: Literal["auto", "no", "bf16"] = cfield(
        "auto", help="'auto' is bf16 autocast on a GPU that supports it, full precision otherwise."
    )
    gradient_checkpointing: bool = cfield(False, help="Recompute activations in backward to save memory.")
    disable_dropout: bool = cfield(True, help="Set every dropout probability to 0 (as DPO implementations do).")
    seed: int = cfield(0, help="Seed for the example order.")
    checkpoint_every: int = cfield(0, help="Save a resumable checkpoint every N optimizer steps (counted across "
                                           "generation rounds); 0 disables.")
    lora: LoraSettings = cfield(default_factory=LoraSettings, help="LoRA settings.")
    sail: SailConfig = cfield(default_factory=SailConfig, help="SAIL routing and extra terms (loss=sail).")

    def __post_init__(self) -> None:
        check(self.beta > 0, "train.beta", f"must be > 0, got {self.beta}")
        check(self.alpha is None or self.alpha >= 0, "train.alpha", f"must be >= 0, got {self.alpha}")
        check(0.0 <= self.label_smoothing < 0.5, "train.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        for key in ("batch_size", "micro_batch_size", "epochs", "ref_batch_size", "logprob_chunk_size"):
            check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")


# The papers' optimism coefficients (ALGORITHMS.md): SELM's Zephyr/Phi-3 setting and XPO's; an unset
# train.alpha takes these, so method=selm or xpo never trains plain DPO by omission.
PAPER_ALPHA: dict[str, float] = {"selm": 1e-3, "xpo": 1e-5}


def resolve_alpha(loss: str, alpha: float | None) -> float:
    """train.alpha as set, or the paper's value for `loss` when unset (null); 0 for losses without the term."""
    return alpha if alpha is not None else PAPER_ALPHA.get(loss, 0.0)


@dataclass
class PreferenceExample:
    """One training pair in token ids; ref_* fields are filled by the trainer.

    prompt_ids, chosen_ids, rejected_ids: token ids (the response ids exclude the prompt).
    ref_sample_ids: y_ref, a response drawn from pi_ref (needed by selm and xpo).
    route: the SAIL route ("offline", "dp", "pp", "pr"); None trains it with the plain loss.
    ref_chosen, ref_rejected, ref_ref_sample: reference log-probs, computed once per update.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_sample_ids: list[int] | None = None
    route: str | None = None
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    ref_ref_sample: float | None = None

    @property
    def num_tokens(self) -> int:
        extra = len(self.prompt_ids) + len(self.ref_sample_ids) if self.ref_sample_ids is not None else 0
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids) + extra


@dataclass
class Logps:
    """Per-example sequence log-probs for one micro-batch, each [B] float32.

    chosen, rejected: policy (with gradient); ref_chosen, ref_rejected: reference (constants).
    ref_sample / ref_ref_sample: policy / reference log-probs of y_ref, or None.
    route: [B] index into ROUTES (loss=sail); uniform: [B] draws in [0, 1) for SAIL-DP's
    per-step relabelling; f_baseline: the running mean of F for SAIL's response term.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    ref_sample: Tensor | None = None
    ref_ref_sample: Tensor | None = None
    route: Tensor | None = None
    uniform: Tensor | None = None
    f_baseline: float | None = None


@dataclass(frozen=True)
class Objective:
    """A training loss and what it needs from the data."""

    name: str
    needs_ref_sample: bool
    compute: Callable[[Logps, TrainConfig], losses.PairLoss]


def _dpo(lp: Logps, c: TrainConfig) -> losses.PairLoss:
    return losses.dpo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, c.beta, c.label_smoothing)


def _sail(lp: Logps, c: TrainConfig) -> losses.PairLoss:
    """SAIL's per-example loss: DPO on the (possibly relabelled) pair plus each route's extra terms.

    SAIL-DP swaps its pair with probability 1 - sigmoid(h) under the current policy (the label
    is redrawn at every step, from this very forward); the label term then acts on the
    relabelled pair. Terms whose coefficient is 0 are left out, so SAIL with every coefficient
    0 trains exactly as DPO does.
    """
    s = c.sail
    route = lp.route if lp.route is not None else torch.zeros_like(lp.chosen, dtype=torch.long)
    dp, pp, pr = (route == ROUTES.index(name) for name in ("dp", "pp", "pr"))
    h = losses.preference_logits(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, c.beta)
    swap = dp & (lp.uniform >= torch.sigmoid(h.detach())) if bool(dp.any()) else torch.zeros_like(dp)
    chosen, rejected = torch.where(swap, lp.rejected, lp.chosen), torch.where(swap, lp.chosen, lp.rejected)
    ref_chosen = torch.where(swap, lp.ref_rejected, lp.ref_chosen)
    ref_rejected = torch.where(swap, lp.ref_chosen, lp.ref_rejected)
    out = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, c.beta, c.label_smoothing)
    loss = out.loss
    h = losses.preference_logits(chosen, rejected, ref_chosen, ref_rejected, c.beta)
    zero = torch.zeros_like(h)
    rho = s.coefficient("rho") if bool(dp.any()) else 0.0
    pi = s.coefficient("pi") if bool(pp.any()) else 0.0
    gamma = s.coefficient("gamma") if bool(pr.any()) else 0.0
    label_coef = torch.where(dp, rho, torch.where(pp, pi, zero))
    response_coef = torch.where(pp, pi, torch.where(pr, gamma, zero))
    if bool((label_coef != 0).any()):
        loss = loss + losses.sail_label_term(h, 1.0) * label_coef
    if bool((response_coef != 0).any()):
        if s.official_response_term:
            term = losses.sail_response_term_official(h, chosen, rejected, 1.0)
        else:
            term = losses.sail_response_term(h, chosen, rejected, 1.0, baseline=lp.f_baseline if s.baseline else None)
        loss = loss + term * response_coef
    f = torch.nn.functional.logsigmoid(h.detach())
    on_policy = pp | pr
    extras = {"dp": dp.sum(), "dp_swapped": swap.sum(), "on_policy": on_policy.sum(),
              "on_policy_f": torch.where(on_policy, f, zero).sum()}
    return losses.PairLoss(loss, out.chosen_rewards, out.rejected_rewards, extras)


# selm and xpo fall back to DPO only when alpha = 0 (the trainer then leaves y_ref out).
OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective("dpo", False, _dpo),
    "ipo": Objective(
        "ipo", False, lambda lp, c: losses.ipo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, c.beta)
    ),
    "selm": Objective(
        "selm", True,
        lambda lp, c: _dpo(lp, c) if lp.ref_sample is None else losses.selm_loss(
            lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.ref_sample, lp.ref_ref_sample,
            c.beta, c.alpha, c.label_smoothing,
        ),
    ),
    "xpo": Objective(
        "xpo", True,
        lambda lp, c: _dpo(lp, c) if lp.ref_sample is None else losses.xpo_loss(
            lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.ref_sample, c.beta, c.alpha, c.label_smoothing
        ),
    ),
    "sail": Objective("sail", False, _sail),
}


@dataclass
class UpdateResult:
    """What one update did: a metrics dict per optimizer step, and the steps it ran in this call."""

    steps: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0

    @property
    def summary(self) -> dict[str, float]:
        """Mean of each metric over the update's steps."""
        if not self.steps:
            return {}
        return {k: sum(s[k] for s in self.steps) / len(self.steps) for k in self.steps[0]}


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `s` (0-based)."""

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch reports a full disk as a failed zip write
            if shutil.disk_usage(tmp.parent).free < 1 << 20:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from e
            raise
        f.flush()
        os.fsync(f.fileno())
    faults.before_rename()
    os.replace(tmp, path)
    faults.after_write(path)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of an optimizer step is NaN or infinite; the step was not applied."""


class PreferenceTrainer:
    """Runs preference updates of `policy` against a frozen reference.

    reference: a separate frozen model, or None when the policy is a peft model (then the
    reference is the policy with its adapter disabled). With `config.lora.enabled` a plain
    policy is wrapped with fresh LoRA adapters here; read the wrapped model from `.policy`.
    """

    def __init__(
        self,
        policy: nn.Module,
        config: TrainConfig,
        pad_token_id: int,
        reference: nn.Module | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        if config.alpha is None:
            config = replace(config, alpha=resolve_alpha(config.loss, None))
        self.config = config
        self.objective = OBJECTIVES[config.loss]
        self.pad_token_id = pad_token_id
        if config.lora.enabled and not is_peft_model(policy):
            policy = apply_lora(policy, config.lora)
        if reference is None and not is_peft_model(policy):
            raise ValueError(
                "no reference model: pass reference=<frozen model>, or train LoRA adapters "
                "(train.lora.enabled=true) so the reference is the policy with its adapter disabled"
            )
        # Without a GPU, cpu=True lets a torchrun / accelerate-launched job run data-parallel on gloo.
        self.accelerator = accelerator or Accelerator(
            mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=not torch.cuda.is_available()
        )
        if config.disable_dropout:
            disable_dropout(policy)
            if reference is not None:
                disable_dropout(reference)
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x
                policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if is_peft_model(policy):
                policy.enable_input_require_grads()
        policy.train()
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
            reference.to(self.accelerator.device)
        self.model = self.accelerator.prepare_model(LogprobModel(policy, config.logprob_chunk_size))
        # Called after every optimizer step with (step within the update, its metrics): the run's live record.
        self.on_step: Callable[[int, dict[str, float]], None] | None = None

    @property
    def needs_ref_sample(self) -> bool:
        """Whether y_ref goes through the policy. With alpha = 0 the optimism term vanishes, so
        y_ref is left out of the forward and selm/xpo train exactly as DPO does, bit for bit."""
        return self.objective.needs_ref_sample and self.config.alpha != 0

    # ------------------------------------------------------------------ reference log-probs
    @torch.no_grad()
    def _reference_logps(self, prompts: list[list[int]], responses: list[list[int]]) -> Tensor:
        batch = collate(prompts, responses, self.pad_token_id).to(self.accelerator.device)
        with self.accelerator.autocast():
            if self.reference is not None:
                return sequence_logprobs(self.reference, batch, self.config.logprob_chunk_size)
            with self.policy.disable_adapter():
                return sequence_logprobs(self.policy, batch, self.config.logprob_chunk_size)

    def compute_reference_logps(self, examples: Sequence[PreferenceExample], progress: bool = True) -> None:
        """Fill ref_chosen / ref_rejected / ref_ref_sample of every example that lacks them.

        Values already present are kept: clear them when the reference policy changes. Every
        sequence (chosen, rejected, y_ref) is a row of its own; rows are sorted by length so
        batches carry little padding, sharded across processes, and gathered.
        """
        rows = []  # (example index, slot, prompt, response); slot 0 chosen, 1 rejected, 2 y_ref
        for i, ex in enumerate(examples):
            if ex.ref_chosen is None:
                rows += [(i, 0, ex.prompt_ids, ex.chosen_ids), (i, 1, ex.prompt_ids, ex.rejected_ids)]
                if ex.ref_sample_ids is not None and self.needs_ref_sample:
                    rows.append((i, 2, ex.prompt_ids, ex.ref_sample_ids))
        if not rows:
            return
        acc = self.accelerator
        rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))
        mine = rows[acc.process_index :: acc.num_processes]
        size = 2 * self.config.ref_batch_size
        results: list[tuple[int, int, float]] = []
        was_training = self.policy.training
        self.policy.eval()
        bar = progress_bar(total=len(mine), desc="reference log-probs", disable=not (progress and acc.is_main_process), leave=False)
        for s in range(0, len(mine), size):
            chunk = mine[s : s + size]
            lp = self._reference_logps([r[2] for r in chunk], [r[3] for r in chunk]).float().cpu().tolist()
            results += [(r[0], r[1], v) for r, v in zip(chunk, lp)]
            bar.update(len(chunk))
        bar.close()
        self.policy.train(was_training)
        if acc.num_processes > 1:
            results = gather_object(results)
        names = ("ref_chosen", "ref_rejected", "ref_ref_sample")
        for i, slot, value in results:
            setattr(examples[i], names[slot], value)

    @torch.no_grad()
    def policy_preference(self, examples: Sequence[PreferenceExample], progress: bool = False) -> list[float]:
        """h of each example under the current policy: its implicit preference of chosen over rejected.

        SAIL-PP labels its two policy samples with Bernoulli(sigmoid(h)). Reference log-probs
        are computed (and kept on the examples) first.
        """
        self.compute_reference_logps(examples, progress=progress)
        was_training = self.policy.training
        self.policy.eval()
        h = []
        size = self.config.ref_batch_size
        for s in range(0, len(examples), size):
            chunk = examples[s : s + size]
            batch = collate([ex.prompt_ids for ex in chunk] * 2, [ex.chosen_ids for ex in chunk] +
                            [ex.rejected_ids for ex in chunk], self.pad_token_id).to(self.accelerator.device)
            with self.accelerator.autocast():
                lp = sequence_logprobs(self.policy, batch, self.config.logprob_chunk_size).float().cpu()
            n = len(chunk)
            h += [self.config.beta * ((lp[i] - ex.ref_chosen) - (lp[n + i] - ex.ref_rejected)).item()
                  for i, ex in enumerate(chunk)]
        self.policy.train(was_training)
        return h

    # ------------------------------------------------------------------ the update
    def plan(self, n_examples: int, round_index: int = 0) -> list[list[int]]:
        """Example indices of each optimizer step: a seeded shuffle per epoch, cut into global batches."""
        gen = torch.Generator().manual_seed(self.config.seed + 1_000_003 * round_index)
        steps = []
        for _ in range(self.config.epochs):
            order = torch.randperm(n_examples, generator=gen).tolist()
            steps += [order[s : s + self.config.batch_size] for s in range(0, n_examples, self.config.batch_size)]
        # Every process must take part in each step's gradient all-reduce.
        return [s for s in steps if len(s) >= self.accelerator.num_processes]

    def _fingerprint(self, examples: Sequence[PreferenceExample]) -> str:
        digest = hashlib.sha256(json.dumps(to_dict(self.config), sort_keys=True).encode())
        for ex in examples:
            digest.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids, ex.ref_sample_ids,
                                      ex.route]).encode())
        return digest.hexdigest()

    def _trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}

    def _micro_logps(self, chunk: list[PreferenceExample], uniform: list[float]) -> Logps:
        device = self.accelerator.device
        prompts = [ex.prompt_ids for ex in chunk] * 2
        responses = [ex.chosen_ids for ex in chunk] + [ex.rejected_ids for ex in chunk]
        needs_sample = self.needs_ref_sample
        if needs_sample:
            prompts += [ex.prompt_ids for ex in chunk]
            responses += [ex.ref_sample_ids for ex in chunk]
        batch = collate(prompts, responses, self.pad_token_id).to(device)
        with self.accelerator.autocast():
            lp = self.model(batch.input_ids, batch.attention_mask, batch.response_mask)
        n = len(chunk)

        def const(name: str) -> Tensor:
            return torch.tensor([getattr(ex, name) for ex in chunk], dtype=torch.float32, device=device)

        sail = self.config.loss == "sail"
        return Logps(
            chosen=lp[:n], rejected=lp[n : 2 * n], ref_chosen=const("ref_chosen"), ref_rejected=const("ref_rejected"),
            ref_sample=lp[2 * n :] if needs_sample else None,
            ref_ref_sample=const("ref_ref_sample") if needs_sample else None,
            route=torch.tensor([ROUTES.index(ex.route or "offline") for ex in chunk], device=device) if sail else None,
            uniform=torch.tensor(uniform, dtype=torch.float32, device=device) if sail else None,
            f_baseline=self._f_baseline,
        )

    def update(
        self,
        examples: Sequence[PreferenceExample],
        checkpoint_dir: str | Path | None = None,
        stop_after_steps: int | None = None,
        progress: bool = True,
    ) -> UpdateResult:
        """Train on `examples` for config.epochs; returns per-step metrics.

        With checkpoint_dir set and config.checkpoint_every > 0, a checkpoint is written every
        that many steps; calling update() again with the same examples, config and directory
        resumes after the last checkpointed step. stop_after_steps ends the call early after
        that many optimizer steps (checkpointing first), for tests and time-boxed jobs.
        """
        if not examples:
            raise ValueError("update() got no examples")
        self.begin(len(self.plan(len(examples))), checkpoint_dir)
        return self.train_round(examples, last=True, stop_after_steps=stop_after_steps, progress=progress)

    def begin(self, total_steps: int, checkpoint_dir: str | Path | None = None) -> int:
        """Start an update of about `total_steps` optimizer steps, fed in rounds by train_round().

        The optimizer and the learning-rate schedule live for the whole update, across rounds:
        the online loop generates a round of examples from the current policy, trains on it,
        and generates the next. If checkpoint_dir holds a checkpoint, its weights, optimizer
        and schedule are restored; returns the number of rounds it had finished.
        """
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "rmsprop":
            optimizer: torch.optim.Optimizer = torch.optim.RMSprop(
                params, lr=cfg.learning_rate, alpha=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(
                params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                weight_decay=cfg.weight_decay,
            )
        # Not acc.prepare_optimizer(): the accelerator would keep every update's optimizer (and
        # its state, 2x the trainable weights) alive for the life of the run. bf16 autocast and
        # DDP need nothing from a prepared optimizer.
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self._optimizer = optimizer
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup, total_steps))
        self._ckpt_path = Path(checkpoint_dir) / "update_state.pt" if checkpoint_dir is not None else None
        self._history: list[dict[str, float]] = []
        self._rounds_done = 0
        self._resume: dict | None = None
        self._f_baseline: float | None = None
        if self._ckpt_path is not None and self._ckpt_path.exists():
            state = torch.load(self._ckpt_path, map_location="cpu", weights_only=False)
            missing = set(self._trainable_state()) - set(state["trainable"])
            if missing:
                raise ValueError(f"{self._ckpt_path} lacks trainable parameters such as {sorted(missing)[0]}")
            self.policy.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            self._scheduler.load_state_dict(state["scheduler"])
            self._history = list(state["history"])
            self._rounds_done = state["round"]
            self._f_baseline = state.get("f_baseline")
            self._resume = state if state["step"] > 0 else None
        self._saved_at = len(self._history)
        return self._rounds_done

    def train_round(
        self,
        examples: Sequence[PreferenceExample],
        last: bool = True,
        stop_after_steps: int | None = None,
        progress: bool = True,
        later_steps: int | None = None,
    ) -> UpdateResult:
        """Train on one round of examples (config.epochs passes) after begin(); returns all steps so far.

        The learning-rate schedule is sized to the steps actually planned: the steps run before
        this round, this round's own, and `later_steps` expected after it (0 on the last round;
        None keeps begin()'s total on a round that is not the last). begin() can only guess from
        the prompt count; judge ties and dropped samples leave fewer examples than prompts.

        A round that stops early (stop_after_steps, or a kill after a checkpoint_every save)
        resumes mid-round when begin() and train_round() are called again with the same
        examples. A round that ends when a checkpoint is due saves one marking it finished, so a
        resumed online loop goes on with the next round (begin() returns how many rounds the
        checkpoint had finished; its caller replays the rest); the last round removes it.
        """
        cfg, acc = self.config, self.accelerator
        k = self._rounds_done
        if not examples:
            raise ValueError("train_round() got no examples")
        if self.needs_ref_sample and any(ex.ref_sample_ids is None for ex in examples):
            raise ValueError(f"loss '{cfg.loss}' needs y_ref for every example (PreferenceExample.ref_sample_ids)")
        steps = self.plan(len(examples), k)
        if not steps:
            raise ValueError(f"{len(examples)} examples are fewer than the {acc.num_processes} processes")
        fingerprint = self._fingerprint(examples)
        result = UpdateResult(steps=self._history)
        start = 0
        resumed = self._resume["step"] if self._resume is not None else 0
        if later_steps is not None or last:
            self._resize_schedule(len(self._history) - resumed + len(steps) + (later_steps or 0))
        if self._resume is not None:
            if self._resume["fingerprint"] != fingerprint:
                raise ValueError(
                    f"{self._ckpt_path} belongs to a different update (other examples or config); "
                    "delete it to start this update afresh"
                )
            for ex, (rc, rr, rs) in zip(examples, self._resume["ref_logps"]):
                ex.ref_chosen, ex.ref_rejected, ex.ref_ref_sample = rc, rr, rs
            start = result.resumed_from_step = self._resume["step"]
            self._resume = None
        self.compute_reference_logps(examples, progress=progress)

        end = len(steps) if stop_after_steps is None else min(len(steps), start + stop_after_steps)
        desc = f"{cfg.loss} update" + (f" round {k}" if k or not last else "")
        bar = progress_bar(range(start, end), desc=desc, disable=not (progress and acc.is_main_process), leave=False)
        for j in bar:
            metrics = self._step(steps[j], examples, key=f"{cfg.seed}:{k}:{j}")
            result.steps.append(metrics)
            if self.on_step is not None:
                self.on_step(len(result.steps), metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            done = j + 1
            if self._ckpt_path is not None and done < len(steps) and (self._checkpoint_due() or done == end):
                self._save_checkpoint(k, done, fingerprint, examples)
        if end < len(steps):
            return result
        self._rounds_done = k + 1
        if last:
            self._optimizer = self._scheduler = None  # its state is as large as the trainable weights
        if self._ckpt_path is not None:
            if not last and self._checkpoint_due():
                self._save_checkpoint(k + 1, 0, None, [])
            elif last and acc.is_main_process and self._ckpt_path.exists():
                self._ckpt_path.unlink()  # the update finished; its caller saves the policy
        return result

    def _resize_schedule(self, total_steps: int) -> None:
        """Re-size the warmup and decay to total_steps, keeping the step count (and the current step's lr)."""
        cfg, scheduler = self.config, self._scheduler
        fn = lr_lambda(cfg.lr_scheduler, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
        scheduler.lr_lambdas = [fn] * len(self._optimizer.param_groups)
        for group, base in zip(self._optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self._optimizer.param_groups]

    def _checkpoint_due(self) -> bool:
        """checkpoint_every optimizer steps (counted over rounds) have passed since the last save.

        Rounds of one step (generation every step) thus save every checkpoint_every steps, not every
        round: a full fine-tune's checkpoint is three times the weights. A resumed update replays the
        rounds after its last checkpoint from their stored examples.
        """
        every = self.config.checkpoint_every
        return bool(every) and len(self._history) - self._saved_at >= every

    def _save_checkpoint(self, round_index: int, step: int, fingerprint: str | None,
                         examples: Sequence[PreferenceExample]) -> None:
        path = self._ckpt_path
        self._saved_at = len(self._history)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(
                {
                    "fingerprint": fingerprint,
                    "round": round_index,
                    "step": step,
                    "trainable": self._trainable_state(),
                    "optimizer": self._optimizer.state_dict(),
                    "scheduler": self._scheduler.state_dict(),
                    "ref_logps": [(ex.ref_chosen, ex.ref_rejected, ex.ref_ref_sample) for ex in examples],
                    "history": self._history,
                    "f_baseline": self._f_baseline,
                },
                path,
            )
        self.accelerator.wait_for_everyone()

    def _non_finite_message(self, loss: float, grad_norm: float) -> str:
        """Which step diverged and what is kept: the line a user reads when training blows up."""
        step = len(self._history) + 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self._ckpt_path is not None and self._ckpt_path.exists():
            kept = f"the last good checkpoint is {self._ckpt_path} (step {self._saved_at})"
        else:
            kept = "no mid-update checkpoint was saved (train.checkpoint_every=0 or none due yet)"
        return (f"optimizer step {step} of the update (round {self._rounds_done}) has a non-finite {what}; "
                f"stopped before applying it and {kept}; lower train.learning_rate, keep train.max_grad_norm > 0 "
                "or check the data")

    def _step(self, indices: list[int], examples: Sequence[PreferenceExample], key: str) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        optimizer, scheduler = self._optimizer, self._scheduler
        # SAIL-DP's per-step label draws, keyed by example and step: the same whatever the split.
        draws = {i: random.Random(f"{key}:{i}").random() for i in indices}
        # Longest first, then dealt round-robin to processes: each process gets similar lengths.
        order = sorted(indices, key=lambda i: -examples[i].num_tokens)
        mine = order[acc.process_index :: acc.num_processes]
        # Per-example losses are scaled so that DDP's gradient average yields the mean over the
        # global batch, whatever the micro-batch split: 8 x 1 equals 1 x 8.
        scale = acc.num_processes / len(order)
        micro = [mine[s : s + cfg.micro_batch_size] for s in range(0, len(mine), cfg.micro_batch_size)]
        sums = torch.zeros(12, dtype=torch.float64, device=acc.device)
        poison = faults.nan_at_step(len(self._history) + 1)
        for j, chunk_ids in enumerate(micro):
            chunk = [examples[i] for i in chunk_ids]
            sync = acc.no_sync(self.model) if j < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                lp = self._micro_logps(chunk, [draws[i] for i in chunk_ids])
                out = self.objective.compute(lp, cfg)
                if poison:
                    out.loss = out.loss * float("nan")
                acc.backward(out.loss.sum() * scale)
            extras = out.extras or {}
            zero = torch.zeros((), device=acc.device)
            sums += torch.stack([
                out.loss.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(), lp.chosen.detach().sum(),
                lp.rejected.detach().sum(), torch.tensor(float(len(chunk)), device=acc.device),
                torch.tensor(float(sum(ex.num_tokens for ex in chunk)), device=acc.device),
                *(extras.get(name, zero).float() for name in ("dp", "dp_swapped", "on_policy", "on_policy_f")),
            ]).double()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        sums = acc.reduce(sums, reduction="sum") if acc.num_processes > 1 else sums
        if not (math.isfinite(float(grad_norm)) and math.isfinite(sums[0].item())):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self._non_finite_message(sums[0].item() / max(sums[6].item(), 1.0), float(grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n = sums[6].item()
        metrics = {
            "loss": sums[0].item() / n,
            "rewards/chosen": sums[1].item() / n,
            "rewards/rejected": sums[2].item() / n,
            "rewards/margins": (sums[1] - sums[2]).item() / n,
            "rewards/accuracies": sums[3].item() / n,
            "logps/chosen": sums[4].item() / n,
            "logps/rejected": sums[5].item() / n,
            "grad_norm": float(grad_norm),
            "learning_rate": lr,
            "num_tokens": sums[7].item(),
        }
        if cfg.loss == "sail":
            dp, swapped, on_policy, f_sum = (sums[i].item() for i in range(8, 12))
            metrics["sail/dp_examples"] = dp
            metrics["sail/dp_swapped"] = swapped
            if on_policy:
                f_mean = f_sum / on_policy
                # The baseline for later steps: a running mean, independent of their own samples.
                self._f_baseline = f_mean if self._f_baseline is None else 0.9 * self._f_baseline + 0.1 * f_mean
        return metrics
