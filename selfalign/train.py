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
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from torch import nn

from . import faults, losses
from .checkpoint import UpdateCheckpoint, UpdateState, fingerprint
from .distributed import Sharding, make_accelerator
from .logprobs import LogprobModel, collate
from .logs import progress_bar
from .records import PreferenceExample, ReferenceLogps, Route
from .scoring import PairScorer
from .train_config import (  # noqa: F401  (re-exported: callers import these from selfalign.train)
    DEFAULT_LORA_TARGETS,
    PAPER_ALPHA,
    LoraSettings,
    SailConfig,
    TrainConfig,
    needs_ref_sample,
    resolve_alpha,
)

Tensor = torch.Tensor

# Route values in Route's order (Logps.route indexes it); kept for callers that index by name.
ROUTES = tuple(route.value for route in Route)


@dataclass
class Logps:
    """Per-example sequence log-probs for one micro-batch, each [B] float32.

    chosen, rejected: policy (with gradient); ref_chosen, ref_rejected: reference (constants).
    chosen_tokens, rejected_tokens: the responses' token counts (IPO averages over them).
    ref_sample / ref_ref_sample: policy / reference log-probs of y_ref, or None.
    route: [B] Route.index of each example (loss=sail); uniform: [B] draws in [0, 1) for SAIL-DP's
    per-step relabelling; f_baseline: the running mean of F for SAIL's response term.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_sample: Tensor | None = None
    ref_ref_sample: Tensor | None = None
    route: Tensor | None = None
    uniform: Tensor | None = None
    f_baseline: float | None = None

    @classmethod
    def of_micro_batch(cls, lp: Tensor, chunk: Sequence[PreferenceExample], reference: Sequence[ReferenceLogps],
                       uniform: Sequence[float] | None, f_baseline: float | None, with_sample: bool) -> Logps:
        """Split the policy's log-probs of policy_rows(chunk, with_sample) into their parts.

        reference: the chunk's reference log-probs, which become constants; uniform: SAIL-DP's
        draws of a routed loss (None: the loss reads no routes, and none are built).
        """
        n, device = len(chunk), lp.device

        def const(values: Sequence[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        routed = uniform is not None
        return cls(
            chosen=lp[:n], rejected=lp[n : 2 * n],
            ref_chosen=const([r.chosen for r in reference]), ref_rejected=const([r.rejected for r in reference]),
            chosen_tokens=const([len(ex.chosen_ids) for ex in chunk]),
            rejected_tokens=const([len(ex.rejected_ids) for ex in chunk]),
            ref_sample=lp[ref_sample_rows(chunk)] if with_sample else None,
            ref_ref_sample=const([r.ref_sample for r in reference]) if with_sample else None,
            route=torch.tensor([Route(ex.route or Route.OFFLINE).index for ex in chunk], device=device)
            if routed else None,
            uniform=const(uniform) if routed else None,
            f_baseline=f_baseline,
        )


def policy_rows(chunk: Sequence[PreferenceExample], with_ref_sample: bool) -> tuple[list[list[int]], list[list[int]]]:
    """The (prompt, response) rows of a micro-batch's one policy forward: every chosen, every rejected, then each
    y_ref that is not one of its pair (ref_sample_slot 2)."""
    own = [ex for ex in chunk if with_ref_sample and ex.ref_sample_slot == 2]
    prompts = [ex.prompt_ids for ex in chunk] * 2 + [ex.prompt_ids for ex in own]
    responses = [ex.chosen_ids for ex in chunk] + [ex.rejected_ids for ex in chunk] + [ex.ref_sample_ids for ex in own]
    return prompts, responses


def ref_sample_rows(chunk: Sequence[PreferenceExample]) -> list[int]:
    """Each example's row of y_ref among policy_rows(chunk, True): its chosen's, its rejected's, or its own."""
    n, own, rows = len(chunk), 0, []
    for i, ex in enumerate(chunk):
        slot = ex.ref_sample_slot
        if slot is None:
            raise ValueError("an example without y_ref (PreferenceExample.ref_sample_ids) in a loss that needs it")
        rows.append(slot * n + i if slot < 2 else 2 * n + own)
        own += slot == 2
    return rows


@dataclass(frozen=True)
class Objective:
    """A training loss and what it needs from the data (y_ref: TrainConfig.needs_ref_sample).

    routed: the loss reads each example's SAIL route and SAIL-DP's per-step label draws.
    """

    name: str
    routed: bool
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
    dp, pp, pr = (route == r.index for r in (Route.DP, Route.PP, Route.PR))
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


# selm and xpo are DPO when alpha = 0: TrainConfig.needs_ref_sample is then False and y_ref is left out.
OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective("dpo", False, _dpo),
    "ipo": Objective(
        "ipo", False, lambda lp, c: losses.ipo_loss(
            lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.chosen_tokens, lp.rejected_tokens, c.beta
        ),
    ),
    "ipo_sum": Objective(
        "ipo_sum", False,
        lambda lp, c: losses.ipo_sum_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, c.beta),
    ),
    "selm": Objective(
        "selm", False,
        lambda lp, c: _dpo(lp, c) if not c.needs_ref_sample else losses.selm_loss(
            lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.ref_sample, lp.ref_ref_sample,
            c.beta, c.alpha, c.label_smoothing,
        ),
    ),
    "xpo": Objective(
        "xpo", False,
        lambda lp, c: _dpo(lp, c) if not c.needs_ref_sample else losses.xpo_loss(
            lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, lp.ref_sample, c.beta, c.alpha, c.label_smoothing
        ),
    ),
    "sail": Objective("sail", True, _sail),
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


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cfg.lr_scheduler over total_steps, after a linear warmup from lr 0 over the first
    ceil(warmup_ratio * total_steps) of them (as in transformers' Trainer and TRL)."""
    # Imported here: transformers.optimization takes about 4 s to import, which every `selfalign` command
    # would otherwise pay (the CLI imports this module).
    from transformers import get_scheduler

    # transformers' "constant" ignores num_warmup_steps; "constant_with_warmup" is it after the warmup.
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def plan_steps(cfg: TrainConfig, n_examples: int, round_index: int, num_processes: int) -> list[list[int]]:
    """Example indices of each optimizer step: a seeded shuffle per epoch, cut into global batches."""
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * round_index)
    steps = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        steps += [order[s : s + cfg.batch_size] for s in range(0, n_examples, cfg.batch_size)]
    # Every process must take part in each step's gradient all-reduce.
    return [s for s in steps if len(s) >= num_processes]


def resize_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, total_steps: int) -> None:
    """Re-size the warmup and decay to total_steps in place, keeping the step count: the current step's lr
    becomes the re-sized schedule's. In place, because the update's checkpoint holds this scheduler."""
    optimizer = scheduler.optimizer
    # The schedule built here only lends its lambdas: its base_lrs are the optimizer's initial_lr, as
    # scheduler's are, and the lrs it writes into the optimizer are overwritten below.
    scheduler.lr_lambdas = build_schedule(optimizer, cfg, total_steps).lr_lambdas
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or RMSprop with adam_beta2 as its smoothing constant (SAIL's official choice)."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.learning_rate, alpha=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def prepare_models(policy: nn.Module, reference: nn.Module | None, config: TrainConfig,
                   device: torch.device) -> nn.Module:
    """LoRA (when enabled), dropout off, activation checkpointing, a frozen reference on `device`; returns the policy."""
    if config.lora.enabled and not is_peft_model(policy):
        policy = apply_lora(policy, config.lora)
    if reference is None and not is_peft_model(policy):
        raise ValueError(
            "no reference model: pass reference=<frozen model>, or train LoRA adapters "
            "(train.lora.enabled=true) so the reference is the policy with its adapter disabled"
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
    if reference is not None:
        reference.requires_grad_(False)
        reference.eval()
        if not config.offload_reference:  # else it visits the device only while it is used (scoring.py)
            reference.to(device)
    return policy


# What one optimizer step sums over its micro-batches (and processes) before dividing by the example count.
SUMS = ("loss", "chosen_rewards", "rejected_rewards", "correct", "logps_chosen", "logps_rejected", "examples",
        "tokens", "dp", "dp_swapped", "on_policy", "on_policy_f")


def micro_batch_sums(out: losses.PairLoss, lp: Logps, chunk: Sequence[PreferenceExample]) -> Tensor:
    """One micro-batch's SUMS, in that order, as a float64 vector (one all-reduce sums every process's)."""
    device = lp.chosen.device
    extras = out.extras or {}
    zero = torch.zeros((), device=device)
    return torch.stack([
        out.loss.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
        (out.chosen_rewards > out.rejected_rewards).float().sum(), lp.chosen.detach().sum(),
        lp.rejected.detach().sum(), torch.tensor(float(len(chunk)), device=device),
        torch.tensor(float(sum(ex.num_tokens for ex in chunk)), device=device),
        *(extras.get(name, zero).float() for name in SUMS[8:]),
    ]).double()


def step_metrics(sums: dict[str, float], grad_norm: float, lr: float) -> dict[str, float]:
    """The step's metrics (TRL's names) from its named sums."""
    n = sums["examples"]
    return {
        "loss": sums["loss"] / n,
        "rewards/chosen": sums["chosen_rewards"] / n,
        "rewards/rejected": sums["rejected_rewards"] / n,
        "rewards/margins": (sums["chosen_rewards"] - sums["rejected_rewards"]) / n,
        "rewards/accuracies": sums["correct"] / n,
        "logps/chosen": sums["logps_chosen"] / n,
        "logps/rejected": sums["logps_rejected"] / n,
        "grad_norm": grad_norm,
        "learning_rate": lr,
        "num_tokens": sums["tokens"],
    }


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of an optimizer step is NaN or infinite; the step was not applied."""


def non_finite_message(state: UpdateState, loss: float, grad_norm: float, kept: str) -> str:
    """Which step diverged and what is kept (kept: UpdateCheckpoint.kept()): the line a user reads when training
    blows up."""
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    return (f"optimizer step {len(state.history) + 1} of the update (round {state.rounds_done}) has a non-finite "
            f"{what}; stopped before applying it and {kept}; lower train.learning_rate, keep "
            "train.max_grad_norm > 0 or check the data")


def next_f_baseline(baseline: float | None, total: dict[str, float]) -> float | None:
    """SAIL's F baseline after a step with these sums: a running mean over steps, independent of their own samples."""
    if not total["on_policy"]:
        return baseline
    f_mean = total["on_policy_f"] / total["on_policy"]
    return f_mean if baseline is None else 0.9 * baseline + 0.1 * f_mean


class PreferenceTrainer:
    """Runs preference updates of `policy` against a frozen reference.

    reference: a separate frozen model, or None when the policy is a peft model (then the
    reference is the policy with its adapter disabled). With `config.lora.enabled` a plain
    policy is wrapped with fresh LoRA adapters here; read the wrapped model from `.policy`.
    Scoring outside the update (reference log-probs, the policy's own log-probs and its
    preference h) lives in scoring.PairScorer (`.scorer`), the mid-update checkpoint in
    checkpoint.UpdateCheckpoint (`.checkpoint`, from begin()) and what it restores in `.state`.
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
        # Without a GPU, cpu=True lets a torchrun / accelerate-launched job run data-parallel on gloo
        # (and FSDP2 when the launch config asks for it: distributed.make_accelerator).
        self.accelerator = accelerator or make_accelerator(resolve_mixed_precision(config.mixed_precision))
        self.sharding = Sharding(self.accelerator)
        self.policy = prepare_models(policy, reference, config, self.accelerator.device)
        self.reference = reference
        self.scorer = PairScorer(self.policy, reference, pad_token_id, config, self.accelerator)
        self._sharded_policy: nn.Module | None = None  # the policy as FSDP2 / DeepSpeed prepared it, from begin()
        if self.sharding.sharded:
            # FSDP2 / DeepSpeed: the reference is sharded here, the policy with its optimizer in begin().
            self.sharding.remember(self.policy)
            self.model = LogprobModel(self.policy, config.logprob_chunk_size)
            self.scorer.sharding = self.sharding
            self.scorer.prepared_policy = self.model
            if reference is not None:
                self.sharding.remember(reference)
                self.scorer.prepared_reference = self.sharding.prepare_frozen(
                    LogprobModel(reference, config.logprob_chunk_size))
        else:
            self.model = self.accelerator.prepare_model(LogprobModel(self.policy, config.logprob_chunk_size))
        self.state = UpdateState()
        # Called after every optimizer step with (step within the update, its metrics): the run's live record.
        self.on_step: Callable[[int, dict[str, float]], None] | None = None

    def whole(self, which: Literal["policy", "reference"] = "policy") -> contextlib.AbstractContextManager:
        """The policy or the reference with whole (unsharded) weights, for generation (Sharding.gathered)."""
        if which == "policy":
            return self.sharding.gathered(self._sharded_policy, self.policy)
        return self.sharding.gathered(self.scorer.prepared_reference, self.reference)

    def saved_policy(self) -> nn.Module | None:
        """The policy to save_pretrained on the main process (None elsewhere); every process must call it."""
        return self.sharding.saved(self._sharded_policy, self.policy)

    # ------------------------------------------------------------------ reference log-probs
    def compute_reference_logps(self, examples: Sequence[PreferenceExample],
                                known: Sequence[ReferenceLogps | None] | None = None,
                                progress: bool = True) -> list[ReferenceLogps]:
        """Reference log-probs of each example: known[i] where it is given, else computed (one pass over the rest).

        The examples are left as they are; pass the result to train_round() (or update()).
        """
        reference = list(known) if known is not None else [None] * len(examples)
        todo = [i for i, ref in enumerate(reference) if ref is None]
        computed = self.scorer.reference_logps([examples[i] for i in todo], self.config.needs_ref_sample, progress)
        for i, ref in zip(todo, computed):
            reference[i] = ref
        return reference

    # ------------------------------------------------------------------ the update
    def plan(self, n_examples: int, round_index: int = 0) -> list[list[int]]:
        """Example indices of each optimizer step (plan_steps())."""
        return plan_steps(self.config, n_examples, round_index, self.accelerator.num_processes)

    def update(
        self,
        examples: Sequence[PreferenceExample],
        checkpoint_dir: str | Path | None = None,
        stop_after_steps: int | None = None,
        progress: bool = True,
        reference: Sequence[ReferenceLogps] | None = None,
    ) -> UpdateResult:
        """Train on `examples` for config.epochs; returns per-step metrics.

        With checkpoint_dir set and config.checkpoint_every > 0, a checkpoint is written every
        that many steps; calling update() again with the same examples, config and directory
        resumes after the last checkpointed step. stop_after_steps ends the call early after
        that many optimizer steps (checkpointing first), for tests and time-boxed jobs.
        reference: the examples' reference log-probs (compute_reference_logps()), computed when None.
        """
        if not examples:
            raise ValueError("update() got no examples")
        self.begin(len(self.plan(len(examples))), checkpoint_dir)
        return self.train_round(examples, reference, last=True, stop_after_steps=stop_after_steps, progress=progress)

    def begin(self, total_steps: int, checkpoint_dir: str | Path | None = None) -> int:
        """Start an update of about `total_steps` optimizer steps, fed in rounds by train_round().

        The optimizer and the learning-rate schedule live for the whole update, across rounds:
        the online loop generates a round of examples from the current policy, trains on it,
        and generates the next. If checkpoint_dir holds a checkpoint, its weights, optimizer
        and schedule are restored; returns the number of rounds it had finished.
        """
        cfg = self.config
        # Not acc.prepare_optimizer() without sharding: the accelerator would keep every update's
        # optimizer (and its state, 2x the trainable weights) alive for the life of the run. bf16
        # autocast and DDP need nothing from a prepared optimizer. FSDP2 and DeepSpeed do (they
        # shard it): it is prepared with the model, and released when the update ends.
        raw = build_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self._optimizer = raw
        if self.sharding.sharded:
            rows = (3 if self.config.needs_ref_sample else 2) * cfg.micro_batch_size
            self.model, self._optimizer = self.sharding.prepare_training(self.model, raw, rows, cfg.max_grad_norm)
            self.scorer.prepared_policy = self._sharded_policy = self.model
        self._scheduler = build_schedule(raw, cfg, total_steps)
        self.checkpoint = UpdateCheckpoint(checkpoint_dir, self.accelerator, self.sharding.sharded,
                                           cfg.checkpoint_every)
        self.state = self.checkpoint.restore(self.policy, self._optimizer, self._scheduler)
        return self.state.rounds_done

    def train_round(
        self,
        examples: Sequence[PreferenceExample],
        reference: Sequence[ReferenceLogps] | None = None,
        last: bool = True,
        stop_after_steps: int | None = None,
        progress: bool = True,
        later_steps: int | None = None,
    ) -> UpdateResult:
        """Train on one round of examples (config.epochs passes) after begin(); returns all steps so far.

        reference: the examples' reference log-probs (compute_reference_logps()); computed when
        None. A resumed round takes its checkpoint's instead.

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
        cfg, acc, state, checkpoint = self.config, self.accelerator, self.state, self.checkpoint
        k = state.rounds_done
        if not examples:
            raise ValueError("train_round() got no examples")
        if self.config.needs_ref_sample and any(ex.ref_sample_ids is None for ex in examples):
            raise ValueError(f"loss '{cfg.loss}' needs y_ref for every example (PreferenceExample.ref_sample_ids)")
        steps = self.plan(len(examples), k)
        if not steps:
            raise ValueError(f"{len(examples)} examples are fewer than the {acc.num_processes} processes")
        fp = fingerprint(cfg, examples)
        result = UpdateResult(steps=state.history)
        if later_steps is not None or last:
            resize_schedule(self._scheduler, cfg,
                            len(state.history) - state.resume_step + len(steps) + (later_steps or 0))
        start = result.resumed_from_step = state.resume_step
        if state.resume is not None:
            reference = state.resume_reference(fp, checkpoint)
        elif reference is None:
            reference = self.compute_reference_logps(examples, progress=progress)

        end = len(steps) if stop_after_steps is None else min(len(steps), start + stop_after_steps)
        desc = f"{cfg.loss} update" + (f" round {k}" if k or not last else "")
        bar = progress_bar(range(start, end), desc=desc, disable=not (progress and acc.is_main_process), leave=False)
        for j in bar:
            metrics = self._step(steps[j], examples, reference, key=f"{cfg.seed}:{k}:{j}")
            result.steps.append(metrics)
            if self.on_step is not None:
                self.on_step(len(result.steps), metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            done = j + 1
            if checkpoint.enabled and done < len(steps) and (checkpoint.due(len(state.history)) or done == end):
                checkpoint.save_update(state, k, done, fp, reference)
        if end < len(steps):
            return result
        state.rounds_done = k + 1
        if last:
            self.sharding.release(self._optimizer)
            self._optimizer = self._scheduler = None  # its state is as large as the trainable weights
            checkpoint.finish()  # the update finished; its caller saves the policy
        elif checkpoint.enabled and checkpoint.due(len(state.history)):
            checkpoint.save_update(state, k + 1, 0, None, [])
        return result

    def _micro_logps(self, chunk: list[PreferenceExample], reference: list[ReferenceLogps],
                     uniform: list[float]) -> Logps:
        batch = collate(*policy_rows(chunk, self.config.needs_ref_sample), self.pad_token_id).to(self.accelerator.device)
        with self.accelerator.autocast():
            lp = self.model(batch.input_ids, batch.attention_mask, batch.response_mask)
        return Logps.of_micro_batch(lp, chunk, reference, uniform if self.objective.routed else None,
                                    self.state.f_baseline, self.config.needs_ref_sample)

    def _step(self, indices: list[int], examples: Sequence[PreferenceExample], reference: Sequence[ReferenceLogps],
              key: str) -> dict[str, float]:
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
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=acc.device)
        poison = faults.nan_at_step(len(self.state.history) + 1)
        for j, ids in enumerate(micro):
            chunk = [examples[i] for i in ids]
            sync = self.sharding.accumulating(self.model) if j < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                lp = self._micro_logps(chunk, [reference[i] for i in ids], [draws[i] for i in ids])
                out = self.objective.compute(lp, cfg)
                if poison:
                    out.loss = out.loss * float("nan")
                acc.backward(out.loss.sum() * scale)
            sums += micro_batch_sums(out, lp, chunk)
        grad_norm = self.sharding.clip_grad_norm(self.model, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")  # None: DeepSpeed did not say
        lr = scheduler.get_last_lr()[0]
        sums = acc.reduce(sums, reduction="sum") if acc.num_processes > 1 else sums
        total = dict(zip(SUMS, sums.tolist()))
        if not ((math.isfinite(grad_norm) or self.sharding.kind == "deepspeed") and math.isfinite(total["loss"])):
            optimizer.zero_grad(set_to_none=True)
            loss = total["loss"] / max(total["examples"], 1.0)
            raise NonFiniteError(non_finite_message(self.state, loss, grad_norm, self.checkpoint.kept()))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = step_metrics(total, grad_norm, lr)
        if self.objective.routed:
            metrics["sail/dp_examples"] = total["dp"]
            metrics["sail/dp_swapped"] = total["dp_swapped"]
            self.state.f_baseline = next_f_baseline(self.state.f_baseline, total)
        return metrics
