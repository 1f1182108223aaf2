"""Batched, KV-cached generation with transformers' generate().

Prompts are left-padded (so every row's next token sits at the same position) and each is
repeated num_samples times in place, so rows [i*K, (i+1)*K) belong to prompt i. Responses
are cut after the first stop id (every id of stop_token_ids, passed to generate() as its
eos_token_id list) and stripped of padding. The bookkeeping that ties a response
to its prompt is index arithmetic on one tensor, never a second list that could be
shuffled separately: a silent prompt/completion mismatch trains on meaningless data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..logprobs import collate
from ..logs import progress_bar
from .config import GenerationConfig


class HFBackend:
    """transformers generate() on the model itself: nothing to start, nothing to sync."""

    def __init__(self, pad_token_id: int, stop_ids: list[int]) -> None:
        self.pad_token_id = pad_token_id
        self.stop_ids = stop_ids

    def generator(self, model: nn.Module) -> HFGenerator:
        return HFGenerator(model, self.pad_token_id, self.stop_ids)

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


class HFGenerator:
    """Generates with a transformers causal LM (or a peft model wrapping one)."""

    keyed = True  # a prompt's samples depend only on (seed, its key), never on its batch (sampling.KeyedSampler)

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_id: int | list[int] | None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id] if eos_token_id is not None else []
        self.eos_ids = set(eos)

    def _trim(self, ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: i + 1]
        return [t for t in ids if t != self.pad_token_id] if self.pad_token_id not in self.eos_ids else ids

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], config: GenerationConfig, seed: int = 0, progress: bool = False,
        keys: list[int] | None = None,
    ) -> list[list[list[int]]]:
        # Imported here: transformers' generation module costs about 1.3 s, which every importer of the loop
        # would otherwise pay; a model to generate with has loaded transformers already.
        from transformers import LogitsProcessorList

        from .sampling import KeyedSampler, row_keys

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        k = config.num_samples
        out: list[list[list[int]]] = []
        sample = config.temperature > 0
        keys = list(range(len(prompts))) if keys is None else keys
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        for s in progress_bar(range(0, len(prompts), config.batch_size), desc="generate", disable=not progress, leave=False):
            chunk = prompts[s : s + config.batch_size]
            batch = collate(chunk, [[] for _ in chunk], self.pad_token_id, padding_side="left")
            ids = batch.input_ids.repeat_interleave(k, dim=0).to(device)
            mask = batch.attention_mask.repeat_interleave(k, dim=0).to(device)
            # Sampling is keyed per row (seed, prompt key, sample index): a prompt's samples do not depend on
            # its batch, so 1 and N processes give the same ones. Greedy decoding then takes the drawn token.
            sampler = [KeyedSampler(row_keys(seed, keys[s : s + config.batch_size], k), ids.shape[1],
                                    config.temperature, config.top_k, config.top_p)] if sample else []
            # Every option explicit: generate() would otherwise fill unset ones from the model's
            # generation_config (do_sample and top_k=50 by default).
            kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList(sampler))
            generated = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                pad_token_id=self.pad_token_id, eos_token_id=sorted(self.eos_ids) or None, **kwargs,
            )
            new = generated[:, ids.shape[1] :].tolist()
            for i in range(len(chunk)):
                out.append([self._trim(new[i * k + j]) for j in range(k)])
        self.model.train(was_training)
        return out
