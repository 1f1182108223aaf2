"""Scores of preference pairs under the models, outside training: reference log-probs and the policy's preference h.

Both are forward passes without gradient over (prompt, response) rows, built on
logprobs.sequence_logprobs. They return their values; the caller decides where they go
(the trainer hands reference log-probs to the update and its checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from .distributed import Sharding
from .logprobs import SequenceBatch, collate, sequence_logprobs
from .logs import progress_bar
from .records import PreferenceExample, ReferenceLogps
from .train_config import TrainConfig


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then back to whatever mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str, offloaded: bool) -> Iterator[None]:
    """An offloaded model (train.offload_reference, kept in CPU memory) on `device` for the block."""
    if not offloaded:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


@dataclass
class PairScorer:
    """The two models of an update and how to run them: policy, and reference (None: the peft policy's adapter off).

    config supplies ref_batch_size, logprob_chunk_size and beta. Under FSDP2 / ZeRO-3 the
    trainer sets `sharding` and the prepared (sharded) models: forwards then go through them,
    whose hooks gather the weights, and every process runs the same number of them.
    """

    policy: nn.Module
    reference: nn.Module | None
    pad_token_id: int
    config: TrainConfig
    accelerator: Accelerator
    sharding: Sharding | None = None
    prepared_policy: nn.Module | None = None
    prepared_reference: nn.Module | None = None

    def _logps(self, prepared: nn.Module | None, model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
        if prepared is not None:
            return prepared(batch.input_ids, batch.attention_mask, batch.response_mask)
        return sequence_logprobs(model, batch, self.config.logprob_chunk_size)

    @torch.no_grad()
    def policy_logps(self, batch: SequenceBatch) -> torch.Tensor:
        """Summed response log-probs [B] of the current policy (no gradient, eval mode)."""
        with eval_mode(self.policy), self.accelerator.autocast():
            return self._logps(self.prepared_policy, self.policy, batch.to(self.accelerator.device))

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            with on_device(self.reference, self.accelerator.device, self.config.offload_reference):
                yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @torch.no_grad()
    def _reference_rows(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        batch = collate(prompts, responses, self.pad_token_id).to(self.accelerator.device)
        with self.accelerator.autocast(), self.reference_model() as model:
            prepared = self.prepared_reference if self.reference is not None else self.prepared_policy
            return self._logps(prepared, model, batch)

    def reference_logps(self, examples: Sequence[PreferenceExample], with_ref_sample: bool,
                        progress: bool = False) -> list[ReferenceLogps]:
        """Reference log-probs of every example's chosen, rejected and (with_ref_sample, where present) y_ref.

        Every sequence is a row of its own; rows are sorted by length so batches carry little
        padding, sharded across processes, and gathered.
        """
        rows = []  # (example index, slot, prompt, response); slot 0 chosen, 1 rejected, 2 y_ref
        for i, ex in enumerate(examples):
            rows += [(i, 0, ex.prompt_ids, ex.chosen_ids), (i, 1, ex.prompt_ids, ex.rejected_ids)]
            if with_ref_sample and ex.ref_sample_slot == 2:  # y_ref in the pair is not scored twice
                rows.append((i, 2, ex.prompt_ids, ex.ref_sample_ids))
        if not rows:
            return []
        acc = self.accelerator
        rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))
        mine = rows[acc.process_index :: acc.num_processes]
        size = 2 * self.config.ref_batch_size
        results: list[tuple[int, int, float]] = []
        bar = progress_bar(total=len(mine), desc="reference log-probs", disable=not (progress and acc.is_main_process),
                   leave=False)
        batches = self.sharding.lockstep_batches(len(rows), size) if self.sharding else -(-len(mine) // size)
        with eval_mode(self.policy):
            for b in range(batches):
                chunk = mine[b * size : (b + 1) * size]
                run = chunk or rows[:1]  # sharded weights: a process with no rows left still joins the forward
                lp = self._reference_rows([r[2] for r in run], [r[3] for r in run]).float().cpu().tolist()
                results += [(r[0], r[1], v) for r, v in zip(chunk, lp)]
                bar.update(len(chunk))
        bar.close()
        if acc.num_processes > 1:
            results = gather_object(results)
        values: list[list[float | None]] = [[None, None, None] for _ in examples]
        for i, slot, value in results:
            values[i][slot] = value
        for ex, v in zip(examples, values):
            if with_ref_sample and ex.ref_sample_slot in (0, 1):
                v[2] = v[ex.ref_sample_slot]
        return [ReferenceLogps(*v) for v in values]

    @torch.no_grad()
    def policy_preference(self, examples: Sequence[PreferenceExample], ref: Sequence[ReferenceLogps]) -> list[float]:
        """h of each example under the current policy: its implicit preference of chosen over rejected.

        SAIL-PP labels its two policy samples with Bernoulli(sigmoid(h)); `ref` holds the
        examples' reference log-probs (reference_logps()).
        """
        h: list[float] = []
        size = self.config.ref_batch_size
        with eval_mode(self.policy):
            for s in range(0, len(examples), size):
                chunk, chunk_ref = examples[s : s + size], ref[s : s + size]
                batch = collate([ex.prompt_ids for ex in chunk] * 2, [ex.chosen_ids for ex in chunk] +
                                [ex.rejected_ids for ex in chunk], self.pad_token_id).to(self.accelerator.device)
                with self.accelerator.autocast():
                    lp = self._logps(self.prepared_policy, self.policy, batch).float().cpu()
                n = len(chunk)
                # losses.preference_logits' formula, with beta applied in double after .item() as SAIL-PP's
                # labels always were (the same draws as before this moved here).
                h += [self.config.beta * ((lp[i] - r.chosen) - (lp[n + i] - r.rejected)).item()
                      for i, r in enumerate(chunk_ref)]
        return h
