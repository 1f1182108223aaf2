"""The model lifecycle of an iteration: which base and which adapter it trains, in what dtype, and how its
iterate is saved (loading one back is models.load_causal_lm).

dtype. Models load in the training dtype (`train.dtype`) instead of fp32 cast down by
autocast at every matmul. `auto` is bf16 on a GPU for every frozen copy (the reference, a
LoRA base, the reward model through `judge.dtype`) while the weights a full fine-tune
trains stay fp32 (bf16 autocast computes in bf16): a bf16 weight cannot absorb an update
below about 1/256 of its size, so SELM's lr 5e-7 would round away. ZeRO and FSDP2 keep their
own fp32 master weights, so `train.dtype=bf16` is safe there.

LoRA in the online loop. The reference is the policy with its adapter disabled: one base
model in memory, never a second full copy. Which model is the base follows from what pi_ref
must be (ALGORITHMS.md):
- pi_ref = the previous iterate (SELM, iterative DPO): the base of iteration t is the
  previous iterate with its adapter merged in, and a fresh adapter (B = 0) is trained, so
  "adapter disabled" is exactly the previous iterate and the policy starts there too;
- pi_ref = pi_0 (XPO, SAIL): the base stays pi_0 and the previous iterate's adapter is
  loaded trainable, so "adapter disabled" is pi_0 and the policy starts at the last iterate.
Each iterate is saved as its adapter (peft's save_pretrained; `base_model_name_or_path`
names the base it was trained on, which for the first case is the previous iterate's
directory). `models.load_causal_lm` loads such a directory as the merged model, following the
chain. `train.lora.merge=true` saves the merged model instead, with the adapter in
policy/adapter/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import faults
from .checkpoint import tensor_bytes, writing_weights
from .models import is_adapter_dir, load_causal_lm, resolve_dtype
from .train import LoraSettings, PreferenceTrainer, TrainConfig, apply_lora, is_peft_model

if TYPE_CHECKING:
    from accelerate import Accelerator

ADAPTER_SUBDIR = "adapter"  # with train.lora.merge: policy/ is the merged model, policy/adapter/ the adapter


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the weights nothing trains: the reference, and a LoRA run's base model."""
    return resolve_dtype(cfg.dtype)


def policy_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the policy's weights as loaded: a full fine-tune keeps fp32 under `auto` (see the module doc)."""
    if cfg.lora.enabled or cfg.dtype != "auto":
        return resolve_dtype(cfg.dtype)
    return torch.float32


def adapter_of(iterate: Path) -> Path:
    """The adapter directory of a LoRA iterate: policy/ itself, or policy/adapter/ when it was saved merged."""
    return iterate if is_adapter_dir(iterate) else iterate / ADAPTER_SUBDIR


def iteration_models(cfg: TrainConfig, previous: Path, pi0: Path, reference_path: Path,
                     device: torch.device | str) -> tuple[nn.Module, nn.Module | None]:
    """(policy, reference) for one online iteration; the reference is None under LoRA (adapter disabled).

    previous: the iterate the policy starts from (pi_0 at iteration 0); reference_path: pi_ref,
    which is either `previous` or `pi0`.
    """
    if not cfg.lora.enabled:
        policy = load_causal_lm(previous, dtype=policy_dtype(cfg)).to(device)
        reference = load_causal_lm(reference_path, dtype=frozen_dtype(cfg))
        return policy, reference
    dtype = frozen_dtype(cfg)
    if Path(reference_path) == Path(previous):
        # pi_ref = previous iterate: it becomes the base (merged), and a fresh adapter starts at it.
        return fresh_adapter(load_causal_lm(previous, dtype=dtype), cfg.lora, previous).to(device), None
    if Path(reference_path) != Path(pi0):
        raise ValueError(f"LoRA needs pi_ref to be pi_0 or the previous iterate, got {reference_path}")
    base = load_causal_lm(pi0, dtype=dtype)
    if Path(previous) == Path(pi0):
        return fresh_adapter(base, cfg.lora, pi0).to(device), None
    # pi_ref = pi_0: the base stays pi_0 and the last iterate's adapter trains on.
    from peft import PeftModel

    policy = PeftModel.from_pretrained(base, str(adapter_of(previous)), is_trainable=True)
    return policy.to(device), None


def fresh_adapter(base: nn.Module, settings: LoraSettings, base_path: Path | str) -> nn.Module:
    """`base` with a new LoRA adapter whose saved config names `base_path` as its base model."""
    model = apply_lora(base, settings)
    model.peft_config["default"].base_model_name_or_path = str(base_path)
    return model


@contextmanager
def reference_view(policy: nn.Module, reference: nn.Module | None, offloaded: bool = False) -> Iterator[nn.Module]:
    """pi_ref as a model to generate from: the separate reference (on the policy's device while in use, when
    train.offload_reference keeps it in CPU memory), or the policy with its LoRA adapter disabled."""
    from .scoring import on_device

    if reference is not None:
        with on_device(reference, next(policy.parameters()).device, offloaded):
            yield reference
        return
    was_training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(was_training)


def save_iterate(trainer: PreferenceTrainer, tokenizer, path: Path, policy: nn.Module | None = None,
                 card: str | None = None) -> None:
    """Write the trained policy to `path` atomically: a full model, or (LoRA) its adapter, or both (lora.merge).

    policy: the model to save (default trainer.policy; under sharding, a replica gathered from
    the full state dict). card: a model card, written as README.md. With lora.merge peft's merge_and_unload changes the model in place,
    which is fine here: the iteration is over when its policy is saved.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy = trainer.policy if policy is None else policy
    adapter_only = is_peft_model(policy) and not trainer.config.lora.merge
    need = tensor_bytes(dict(policy.named_parameters()) if not adapter_only else
                        {n: p for n, p in policy.named_parameters() if p.requires_grad})
    with writing_weights("the policy", tmp, need):
        if is_peft_model(policy):
            if trainer.config.lora.merge:
                policy.save_pretrained(tmp / ADAPTER_SUBDIR)
                policy.merge_and_unload().save_pretrained(tmp)
            else:
                policy.save_pretrained(tmp)
        else:
            policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
    faults.before_rename()
    if path.exists():  # a run from before stage files were ordered left a policy without its stage files
        shutil.rmtree(path)
    os.replace(tmp, path)
    faults.after_write(path)


def save_policy(trainer: PreferenceTrainer, tokenizer, path: Path, accelerator: Accelerator,
                card: str | None = None) -> None:
    """The trained policy (LoRA: its adapter, see save_iterate) and its tokenizer, renamed into `path` last:
    its arrival marks training done.

    card: a model card, written into the directory as README.md before the rename."""
    accelerator.wait_for_everyone()
    policy = trainer.saved_policy()  # collective under FSDP2 / ZeRO-3: the full state dict is gathered
    if accelerator.is_main_process:
        save_iterate(trainer, tokenizer, path, policy, card)  # LoRA: the adapter
    accelerator.wait_for_everyone()
