"""Held-out evaluation of a policy against pi_0 under a gold reward.

Metrics (per policy directory):
    gold/greedy, gold/sampled      mean gold reward of greedy and of sampled responses
    gold/high_reward_fraction      fraction of sampled responses with gold reward >= HIGH_REWARD
    win_rate, tie_rate             greedy response vs pi_0's greedy response on the same prompt,
                                   judged by the gold reward; ties counted apart
    kl_to_pi0                      KL(pi || pi_0) estimated from samples of pi: mean of
                                   log pi(y|x) - log pi_0(y|x)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .data import pad_token_id, prompt_ids, write_atomic
from .generation import GenerationConfig
from .generation.hf import HFGenerator
from .judges import Prompt
from .logprobs import collate, sequence_logprobs

HIGH_REWARD = 0.999


def _generate(model, ids, tokenizer, num_samples: int, temperature: float, max_new_tokens: int, seed: int):
    gen = HFGenerator(model, pad_token_id(tokenizer), tokenizer.eos_token_id)
    cfg = GenerationConfig(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                           batch_size=64)
    return gen.generate(ids, cfg, seed=seed)


@torch.no_grad()
def _logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad: int) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), 64):
        batch = collate(prompts[s : s + 64], responses[s : s + 64], pad)
        out.append(sequence_logprobs(model, batch.to(next(model.parameters()).device)).cpu())
    return torch.cat(out)


def baseline_greedy(pi0_path: Path, prompts: list[Prompt], tokenizer, max_new_tokens: int, cache: Path | None) -> list[str]:
    """pi_0's greedy responses on the eval prompts (cached in the run directory)."""
    from transformers import AutoModelForCausalLM

    path = cache / "baseline_greedy.json" if cache is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    model = AutoModelForCausalLM.from_pretrained(pi0_path, dtype=torch.float32)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    texts = [tokenizer.decode(r[0], skip_special_tokens=True)
             for r in _generate(model, ids, tokenizer, 1, 0.0, max_new_tokens, seed=0)]
    if path is not None:
        write_atomic(path, json.dumps(texts))
    return texts


def evaluate_policy(policy_path: Path, pi0_path: Path, prompts: list[Prompt], tokenizer, gold, cfg,
                    cache: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of the policy at policy_path (see the module docstring); `gold` is a Judge."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    pi0 = AutoModelForCausalLM.from_pretrained(pi0_path, dtype=torch.float32)
    pad = pad_token_id(tokenizer)
    max_new = cfg.generation.max_new_tokens
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    greedy_ids = [r[0] for r in _generate(policy, ids, tokenizer, 1, 0.0, max_new, seed=0)]
    k = cfg.eval.samples
    sampled_ids = _generate(policy, ids, tokenizer, k, cfg.generation.temperature or 1.0, max_new, seed=cfg.seed + 1)
    decode = lambda r: tokenizer.decode(r, skip_special_tokens=True)  # noqa: E731
    greedy = [decode(r) for r in greedy_ids]
    sampled = [[decode(r) for r in rs] for rs in sampled_ids]
    base = baseline_greedy(pi0_path, prompts, tokenizer, max_new, cache)

    g_greedy = [row[0] for row in gold.score(prompts, [[r] for r in greedy])]
    g_base = [row[0] for row in gold.score(prompts, [[r] for r in base])]
    g_sampled = [v for row in gold.score(prompts, sampled) for v in row]
    wins = sum(a > b for a, b in zip(g_greedy, g_base))
    ties = sum(a == b for a, b in zip(g_greedy, g_base))

    flat_p = [ids[i] for i in range(len(ids)) for _ in range(k)]
    flat_r = [r for rs in sampled_ids for r in rs]
    kl = (_logprobs(policy, flat_p, flat_r, pad) - _logprobs(pi0, flat_p, flat_r, pad)).mean().item()
    n = len(prompts)
    return {
        "gold/greedy": sum(g_greedy) / n,
        "gold/sampled": sum(g_sampled) / len(g_sampled),
        "gold/high_reward_fraction": sum(v >= HIGH_REWARD for v in g_sampled) / len(g_sampled),
        "win_rate": wins / n,
        "tie_rate": ties / n,
        "kl_to_pi0": kl,
    }
