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

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from . import faults, losses
from .checkpoint import UpdateCheckpoint, fingerprint, trainable_state
from .logprobs import LogprobModel, collate
from .records import PreferenceExample, Route
from .scoring import PairScorer, ReferenceLogps
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
    ref_sample / ref_ref_sample: policy / reference log-probs of y_ref, or None.
    route: [B] Route.index of each example (loss=sail); uniform: [B] draws in [0, 1) for SAIL-DP's
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
        "ipo", False, lambda lp, c: losses.ipo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, c.beta)
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
    """Re-size the warmup and decay to total_steps, keeping the step count (and the current step's lr)."""
    optimizer = scheduler.optimizer
    fn = lr_lambda(cfg.lr_scheduler, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    scheduler.lr_lambdas = [fn] * len(optimizer.param_groups)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
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


class PreferenceTrainer:
    """Runs preference updates of `policy` against a frozen reference.

    reference: a separate frozen model, or None when the policy is a peft model (then the
    reference is the policy with its adapter disabled). With `config.lora.enabled` a plain
    policy is wrapped with fresh LoRA adapters here; read the wrapped model from `.policy`.
    Reference scoring lives in scoring.PairScorer (`.scorer`), the mid-update checkpoint in
    checkpoint.UpdateCheckpoint.
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
        # Without a GPU, cpu=True lets a torchrun / accelerate-launched job run data-parallel on gloo.
        self.accelerator = accelerator or Accelerator(
            mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=not torch.cuda.is_available()
        )
        self.policy = prepare_models(policy, reference, config, self.accelerator.device)
        self.reference = reference
        self.scorer = PairScorer(self.policy, reference, pad_token_id, config, self.accelerator)
        self.model = self.accelerator.prepare_model(LogprobModel(self.policy, config.logprob_chunk_size))

    @property
    def needs_ref_sample(self) -> bool:
        """Whether y_ref goes through the policy (TrainConfig.needs_ref_sample decides)."""
        return self.config.needs_ref_sample

    # ------------------------------------------------------------------ reference log-probs
    def compute_reference_logps(self, examples: Sequence[PreferenceExample], progress: bool = True) -> None:
        """Fill ref_chosen / ref_rejected / ref_ref_sample of every example that lacks them.

        Values already present are kept: clear them when the reference policy changes. The
        update reads them from the examples, and a checkpoint stores them.
        """
        todo = [ex for ex in examples if ex.ref_chosen is None]
        for ex, ref in zip(todo, self.scorer.reference_logps(todo, self.needs_ref_sample, progress)):
            ex.ref_chosen, ex.ref_rejected = ref.chosen, ref.rejected
            if ref.ref_sample is not None:
                ex.ref_ref_sample = ref.ref_sample

    def policy_preference(self, examples: Sequence[PreferenceExample], progress: bool = False) -> list[float]:
        """h of each example under the current policy (scoring.PairScorer.policy_preference); SAIL-PP's labels.

        Reference log-probs are computed (and kept on the examples) first.
        """
        self.compute_reference_logps(examples, progress=progress)
        return self.scorer.policy_preference(examples, [ReferenceLogps(ex.ref_chosen, ex.ref_rejected)
                                                        for ex in examples])

    # ------------------------------------------------------------------ the update
    def plan(self, n_examples: int, round_index: int = 0) -> list[list[int]]:
        """Example indices of each optimizer step (plan_steps())."""
        return plan_steps(self.config, n_examples, round_index, self.accelerator.num_processes)

    def _fingerprint(self, examples: Sequence[PreferenceExample]) -> str:
        return fingerprint(self.config, examples)

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

        routed = self.objective.routed
        return Logps(
            chosen=lp[:n], rejected=lp[n : 2 * n], ref_chosen=const("ref_chosen"), ref_rejected=const("ref_rejected"),
            ref_sample=lp[2 * n :] if needs_sample else None,
            ref_ref_sample=const("ref_ref_sample") if needs_sample else None,
            route=torch.tensor([Route(ex.route or Route.OFFLINE).index for ex in chunk], device=device)
            if routed else None,
            uniform=torch.tensor(uniform, dtype=torch.float32, device=device) if routed else None,
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
        # Not acc.prepare_optimizer(): the accelerator would keep every update's optimizer (and
        # its state, 2x the trainable weights) alive for the life of the run. bf16 autocast and
        # DDP need nothing from a prepared optimizer.
        self._optimizer = build_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer,
                                                            lr_lambda(cfg.lr_scheduler, warmup, total_steps))
        self.checkpoint = UpdateCheckpoint(checkpoint_dir, self.accelerator)
        self._history: list[dict[str, float]] = []
        self._rounds_done = 0
        self._resume: dict | None = None
        self._f_baseline: float | None = None
        state = self.checkpoint.load(self.policy)
        if state is not None:
            self._optimizer.load_state_dict(state["optimizer"])
            self._scheduler.load_state_dict(state["scheduler"])
            self._history = list(state["history"])
            self._rounds_done = state["round"]
            self._f_baseline = state.get("f_baseline")
            self._resume = state if state["step"] > 0 else None
        self.checkpoint.saved_at = len(self._history)
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
            resize_schedule(self._scheduler, cfg, len(self._history) - resumed + len(steps) + (later_steps or 0))
        if self._resume is not None:
            self.checkpoint.check_fingerprint(self._resume, fingerprint)
            for ex, (rc, rr, rs) in zip(examples, self._resume["ref_logps"]):
                ex.ref_chosen, ex.ref_rejected, ex.ref_ref_sample = rc, rr, rs
            start = result.resumed_from_step = self._resume["step"]
            self._resume = None
        self.compute_reference_logps(examples, progress=progress)

        end = len(steps) if stop_after_steps is None else min(len(steps), start + stop_after_steps)
        desc = f"{cfg.loss} update" + (f" round {k}" if k or not last else "")
        bar = tqdm(range(start, end), desc=desc, disable=not (progress and acc.is_main_process), leave=False)
        for j in bar:
            metrics = self._step(steps[j], examples, key=f"{cfg.seed}:{k}:{j}")
            result.steps.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            done = j + 1
            if self.checkpoint.enabled and done < len(steps) and (self._checkpoint_due() or done == end):
                self._save_checkpoint(k, done, fingerprint, examples)
        if end < len(steps):
            return result
        self._rounds_done = k + 1
        if last:
            self._optimizer = self._scheduler = None  # its state is as large as the trainable weights
        if self.checkpoint.enabled:
            if not last and self._checkpoint_due():
                self._save_checkpoint(k + 1, 0, None, [])
            elif last:
                self.checkpoint.remove()  # the update finished; its caller saves the policy
        return result

    def _checkpoint_due(self) -> bool:
        """checkpoint_every optimizer steps (counted over rounds) have passed since the last save.

        Rounds of one step (generation every step) thus save every checkpoint_every steps, not every
        round: a full fine-tune's checkpoint is three times the weights. A resumed update replays the
        rounds after its last checkpoint from their stored examples.
        """
        every = self.config.checkpoint_every
        return bool(every) and len(self._history) - self.checkpoint.saved_at >= every

    def _save_checkpoint(self, round_index: int, step: int, fingerprint: str | None,
                         examples: Sequence[PreferenceExample]) -> None:
        self.checkpoint.save(lambda: {
            "fingerprint": fingerprint,
            "round": round_index,
            "step": step,
            "trainable": trainable_state(self.policy),
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "ref_logps": [(ex.ref_chosen, ex.ref_rejected, ex.ref_ref_sample) for ex in examples],
            "history": self._history,
            "f_baseline": self._f_baseline,
        }, len(self._history))

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
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=acc.device)
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
            sums += micro_batch_sums(out, lp, chunk)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        sums = acc.reduce(sums, reduction="sum") if acc.num_processes > 1 else sums
        total = dict(zip(SUMS, sums.tolist()))
        if not (math.isfinite(float(grad_norm)) and math.isfinite(total["loss"])):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self._non_finite_message(total["loss"] / max(total["examples"], 1.0), float(grad_norm)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = step_metrics(total, float(grad_norm), lr)
        if self.objective.routed:
            metrics["sail/dp_examples"] = total["dp"]
            metrics["sail/dp_swapped"] = total["dp_swapped"]
            if total["on_policy"]:
                f_mean = total["on_policy_f"] / total["on_policy"]
                # The baseline for later steps: a running mean, independent of their own samples.
                self._f_baseline = f_mean if self._f_baseline is None else 0.9 * self._f_baseline + 0.1 * f_mean
        return metrics

    def _non_finite_message(self, loss: float, grad_norm: float) -> str:
        """Which step diverged and what is kept: the line a user reads when training blows up."""
        step = len(self._history) + 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        return (f"optimizer step {step} of the update (round {self._rounds_done}) has a non-finite {what}; "
                f"stopped before applying it and {self.checkpoint.kept()}; lower train.learning_rate, keep "
                "train.max_grad_norm > 0 or check the data")
