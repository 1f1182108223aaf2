"""The preference update's settings: TrainConfig, its LoRA and SAIL parts, and the optimism decision.

Kept apart from the trainer so configs (the run's, the CLI's, a method's SAIL preset) can be
built and checked without importing torch or accelerate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .config import check
from .config import field as cfield

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA adapters through peft; the reference is then the same model with the adapter disabled."""

    enabled: bool = cfield(False, help="Train LoRA adapters instead of all weights.")
    r: int = cfield(64, help="LoRA rank (SAIL's official setting: 64).")
    alpha: int = cfield(16, help="LoRA scaling alpha (SAIL's official setting: 16).")
    dropout: float = cfield(0.0, help="Dropout on the LoRA input; 0 keeps policy and reference forwards comparable.")
    target_modules: list[str] | str = cfield(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        help="Names of the linear layers that get adapters, or 'all-linear' (every linear layer but the LM head)."
    )
    merge: bool = cfield(
        False, help="Online loop: save each iterate merged into a full model (policy/ is then an ordinary "
                    "from_pretrained directory; the adapter goes to policy/adapter/). false: policy/ is the adapter.")

    def __post_init__(self) -> None:
        check(self.r > 0, "lora.r", f"must be a positive integer, got {self.r}")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            check(self.target_modules == "all-linear", "lora.target_modules",
                  f"must be a list of module names or 'all-linear', got {self.target_modules!r}")
        check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")




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

    # The routing probabilities and coefficients a method preset supplies (the rest are switches).
    VALUES = ("r", "p", "g", "rho", "pi", "gamma")

    def __post_init__(self) -> None:
        for key in self.VALUES:
            value = getattr(self, key)
            check(value is None or math.isfinite(value), f"train.sail.{key}", f"must be a finite number, got {value}")
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

    def over(self, preset: SailConfig | None) -> SailConfig:
        """These settings with every unset value taken from `preset` (a method's), else 0."""

        def pick(key: str) -> float:
            value = getattr(self, key)
            if value is None and preset is not None:
                value = getattr(preset, key)
            return 0.0 if value is None else value

        return dataclasses.replace(self, **{key: pick(key) for key in self.VALUES})


@dataclass
class TrainConfig:
    """Everything one preference update needs."""

    loss: Literal["dpo", "ipo", "ipo_sum", "selm", "xpo", "sail"] = cfield(
        "dpo", help="Preference loss (see selfalign.losses). ipo averages log-probs over each response's tokens, as "
                    "TRL's IPO does; ipo_sum is IPO on summed log-probs (selfalign's ipo before it matched TRL).")
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
    lr_scheduler: Literal["cosine", "linear", "constant"] = cfield(
        "cosine", help="Decay after warmup, by transformers' get_scheduler.")
    warmup_ratio: float = cfield(
        0.1, help="Fraction of the update's optimizer steps (rounded up) spent in linear warmup from lr 0.")
    max_grad_norm: float = cfield(1.0, help="Clip the global gradient norm to this value; 0 disables clipping.")
    batch_size: int = cfield(8, help="Examples per optimizer step, over all processes (the global batch).")
    micro_batch_size: int = cfield(2, help="Examples per forward pass on one process (chosen+rejected = 2x rows).")
    epochs: int = cfield(1, help="Passes over the update's examples.")
    ref_batch_size: int = cfield(16, help="Examples per forward pass when precomputing reference log-probs.")
    logprob_chunk_size: int = cfield(1024, help="Tokens per LM-head chunk; bounds the logits held in memory.")
    mixed_precision: Literal["auto", "no", "bf16"] = cfield(
        "auto", help="'auto' is bf16 autocast on a GPU that supports it, full precision otherwise."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = cfield(
        "auto", help="Weights' dtype as loaded. auto: bf16 on a GPU that supports it for the reference and a LoRA "
                     "base, while the weights a full fine-tune trains stay fp32 under bf16 autocast (bf16 weights "
                     "lose updates under ~1/256 of their size, e.g. lr 5e-7); fp32 on a CPU. bf16/fp16/fp32: every "
                     "model in that dtype (bf16 full fine-tuning keeps no fp32 master copy unless ZeRO/FSDP2 does).")
    gradient_checkpointing: bool = cfield(False, help="Recompute activations in backward to save memory.")
    offload_reference: bool = cfield(
        False, help="Keep a separate reference model in CPU memory, moved to the GPU only while its log-probs or "
                    "y_ref are computed (no effect with LoRA, whose reference is the base with the adapter off).")
    disable_dropout: bool = cfield(True, help="Set every dropout probability to 0 (as DPO implementations do).")
    seed: int = cfield(0, help="Seed for the example order.")
    checkpoint_every: int = cfield(0, help="Save a resumable checkpoint every N optimizer steps (counted across "
                                           "generation rounds); 0 disables.")
    lora: LoraSettings = cfield(default_factory=LoraSettings, help="LoRA settings.")
    sail: SailConfig = cfield(default_factory=SailConfig, help="SAIL routing and extra terms (loss=sail).")

    # Float settings that must be finite numbers: inf or nan (YAML's .inf, or `train.beta=inf`) passes a range
    # check such as beta > 0 and surfaces steps later as a non-finite loss blamed on the learning rate.
    FINITE = ("beta", "alpha", "label_smoothing", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
              "adam_epsilon", "warmup_ratio", "max_grad_norm")

    def __post_init__(self) -> None:
        for key in self.FINITE:
            value = getattr(self, key)
            check(value is None or math.isfinite(value), f"train.{key}", f"must be a finite number, got {value}")
        check(self.beta > 0, "train.beta", f"must be > 0, got {self.beta}")
        check(self.alpha is None or self.alpha >= 0, "train.alpha", f"must be >= 0, got {self.alpha}")
        check(0.0 <= self.label_smoothing < 0.5, "train.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.learning_rate > 0, "train.learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        for key in ("batch_size", "micro_batch_size", "epochs", "ref_batch_size", "logprob_chunk_size"):
            check(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        check(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")

    @property
    def needs_ref_sample(self) -> bool:
        """Whether y_ref goes through the policy in this update (see needs_ref_sample())."""
        return needs_ref_sample(self.loss, self.alpha)


# The papers' optimism coefficients (ALGORITHMS.md): SELM's Zephyr/Phi-3 setting and XPO's; an unset
# train.alpha takes these, so method=selm or xpo never trains plain DPO by omission.
PAPER_ALPHA: dict[str, float] = {"selm": 1e-3, "xpo": 1e-5}


# Keys whose default changed, with the former default, which a resumed run (online or `selfalign train`) that
# saved it keeps (config.adopt_old_defaults): train.alpha was 0.0 before null (the paper's value for selm, xpo).
RESUME_OLD_DEFAULTS: dict[str, object] = {"train.alpha": 0.0}


def resolve_alpha(loss: str, alpha: float | None) -> float:
    """train.alpha as set, or the paper's value for `loss` when unset (null); 0 for losses without the term."""
    return alpha if alpha is not None else PAPER_ALPHA.get(loss, 0.0)


def needs_ref_sample(loss: str, alpha: float | None) -> bool:
    """Whether the update feeds y_ref through the policy: selm and xpo with a non-zero alpha.

    The one owner of this decision (the loop draws y_ref for the optimism term on it, the trainer
    leaves y_ref out of the forward on it, and the loss falls back to DPO on it). With alpha = 0
    the optimism term vanishes, so selm and xpo train exactly as DPO does, bit for bit.
    """
    return loss in PAPER_ALPHA and resolve_alpha(loss, alpha) != 0
