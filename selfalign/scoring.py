"""Scores of preference pairs under the models, outside training: reference log-probs and the policy's preference h.

Both are forward passes without gradient over (prompt, response) rows, built on
logprobs.sequence_logprobs. They return their values; the caller decides where they go
(the trainer keeps reference log-probs on its examples for the update and its checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from .logprobs import collate, sequence_logprobs
from .records import PreferenceExample
from .train_config import TrainConfig


@dataclass(frozen=True)
class ReferenceLogps:
    """Reference log-probs of one example's chosen, rejected and y_ref (None when y_ref is not scored)."""

    chosen: float
    rejected: float
    ref_sample: float | None = None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then back to whatever mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class PairScorer:
    """The two models of an update and how to run them: policy, and reference (None: the peft policy's adapter off).

    config supplies ref_batch_size, logprob_chunk_size and beta.
    """

    policy: nn.Module
    reference: nn.Module | None
    pad_token_id: int
    config: TrainConfig
    accelerator: Accelerator

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @torch.no_grad()
    def _reference_rows(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        batch = collate(prompts, responses, self.pad_token_id).to(self.accelerator.device)
        with self.accelerator.autocast(), self.reference_model() as model:
            return sequence_logprobs(model, batch, self.config.logprob_chunk_size)

    def reference_logps(self, examples: Sequence[PreferenceExample], with_ref_sample: bool,
                        progress: bool = False) -> list[ReferenceLogps]:
        """Reference log-probs of every example's chosen, rejected and (with_ref_sample, where present) y_ref.

        Every sequence is a row of its own; rows are sorted by length so batches carry little
        padding, sharded across processes, and gathered.
        """
        rows = []  # (example index, slot, prompt, response); slot 0 chosen, 1 rejected, 2 y_ref
        for i, ex in enumerate(examples):
            rows += [(i, 0, ex.prompt_ids, ex.chosen_ids), (i, 1, ex.prompt_ids, ex.rejected_ids)]
            if ex.ref_sample_ids is not None and with_ref_sample:
                rows.append((i, 2, ex.prompt_ids, ex.ref_sample_ids))
        if not rows:
            return []
        acc = self.accelerator
        rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))
        mine = rows[acc.process_index :: acc.num_processes]
        size = 2 * self.config.ref_batch_size
        results: list[tuple[int, int, float]] = []
        bar = tqdm(total=len(mine), desc="reference log-probs", disable=not (progress and acc.is_main_process),
                   leave=False)
        with eval_mode(self.policy):
            for s in range(0, len(mine), size):
                chunk = mine[s : s + size]
                lp = self._reference_rows([r[2] for r in chunk], [r[3] for r in chunk]).float().cpu().tolist()
                results += [(r[0], r[1], v) for r, v in zip(chunk, lp)]
                bar.update(len(chunk))
        bar.close()
        if acc.num_processes > 1:
            results = gather_object(results)
        values: list[list[float | None]] = [[None, None, None] for _ in examples]
        for i, slot, value in results:
            values[i][slot] = value
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
                    lp = sequence_logprobs(self.policy, batch, self.config.logprob_chunk_size).float().cpu()
                n = len(chunk)
                # losses.preference_logits' formula, with beta applied in double after .item() as SAIL-PP's
                # labels always were (the same draws as before this moved here).
                h += [self.config.beta * ((lp[i] - r.chosen) - (lp[n + i] - r.rejected)).item()
                      for i, r in enumerate(chunk_ref)]
        return h
