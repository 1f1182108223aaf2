"""Held-out evaluation of a policy: reward, win rate against a baseline, KL to a reference.

Metrics (per policy directory):
    gold/greedy, gold/sampled      mean reward of greedy and of sampled responses (the gold reward,
                                   or a judge: whatever `gold` scores with)
    gold/high_reward_fraction      fraction of sampled responses with reward >= high_reward
    win_rate, tie_rate             greedy response vs the baseline policy's greedy response on the
                                   same prompt (pi_0 by default), judged by the same reward; ties apart
    kl_to_pi0                      KL(pi || pi_ref) estimated from samples of pi: mean of
                                   log pi(y|x) - log pi_ref(y|x) (pi_ref = pi_0 by default)
    implicit/gap, implicit/accuracy  (given pairs) SELM's analysis: mean implicit reward
                                   beta * log(pi/pi_ref) of chosen minus that of rejected responses,
                                   and the share of pairs where it is positive
The per-response rewards come back too (`rewards`), for histograms.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .data import pad_token_id, prompt_ids, write_atomic
from .generation import Backend, GenerationConfig, Generator, build_backend, load_generation_config
from .judges import Prompt
from .logprobs import collate, sequence_logprobs

HIGH_REWARD = 0.999


def _generate(gen: Generator, ids, base: GenerationConfig, num_samples: int, temperature: float, seed: int,
              progress: bool = False):
    cfg = dataclasses.replace(base, num_samples=num_samples, temperature=temperature, batch_size=64)
    return gen.generate(ids, cfg, seed=seed, progress=progress)


@torch.no_grad()
def _logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad: int) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), 64):
        batch = collate(prompts[s : s + 64], responses[s : s + 64], pad)
        out.append(sequence_logprobs(model, batch.to(next(model.parameters()).device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def baseline_greedy(baseline_path: Path, prompts: list[Prompt], tokenizer, max_new_tokens: int,
                    cache: Path | None, backend: Backend | None = None) -> list[str]:
    """The baseline policy's greedy responses on the eval prompts (cached in the run directory)."""
    path = cache / "baseline_greedy.json" if cache is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and saved.get("policy") == str(baseline_path) and len(saved["texts"]) == len(prompts):
            return saved["texts"]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    own = backend is None
    if own:
        backend = build_backend(GenerationConfig(), tokenizer, baseline_path, load_generation_config(baseline_path))
    gen = backend.generator(_load(baseline_path))
    texts = [tokenizer.decode(r[0], skip_special_tokens=True)
             for r in _generate(gen, ids, GenerationConfig(max_new_tokens=max_new_tokens), 1, 0.0, seed=0)]
    if own:
        backend.close()
    if path is not None:
        write_atomic(path, json.dumps({"policy": str(baseline_path), "texts": texts}))
    return texts


def implicit_reward_gap(policy, reference, pairs: list[tuple[list[int], list[int], list[int]]], beta: float,
                        pad: int) -> dict[str, float]:
    """Mean of beta*log(pi/pi_ref)(chosen) - beta*log(pi/pi_ref)(rejected) over (prompt, chosen, rejected) ids."""
    if not pairs:
        return {}
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    ratio = _logprobs(policy, prompts, responses, pad) - _logprobs(reference, prompts, responses, pad)
    n = len(pairs)
    gap = beta * (ratio[:n] - ratio[n:])
    return {"implicit/gap": gap.mean().item(), "implicit/accuracy": (gap > 0).float().mean().item()}


def evaluate_policy(policy_path: Path, pi0_path: Path, prompts: list[Prompt], tokenizer, gold, cfg,
                    cache: Path | None = None, progress: bool = False, baseline_path: Path | None = None,
                    pairs: list[tuple[list[int], list[int], list[int]]] | None = None,
                    high_reward: float = HIGH_REWARD, keep_rewards: bool = False,
                    backend: Backend | None = None) -> dict[str, Any]:
    """Metrics of the policy at policy_path (see the module docstring); `gold` is a Judge.

    pi0_path is the reference of the KL and of the implicit reward; baseline_path (default
    pi0_path) is the opponent of the win rate. cfg supplies generation (max_new_tokens,
    temperature, top_p, top_k, backend), eval.samples, seed and train.beta. backend: the run's
    generation backend; without one, cfg.generation.backend's is started here and closed after.
    """
    own = backend is None
    if own:
        backend = build_backend(cfg.generation, tokenizer, policy_path, load_generation_config(policy_path),
                                seed=cfg.seed)
    policy, pi0 = _load(policy_path), _load(pi0_path)
    pad = pad_token_id(tokenizer)
    max_new = cfg.generation.max_new_tokens
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    gen = backend.generator(policy)
    greedy_ids = [r[0] for r in _generate(gen, ids, cfg.generation, 1, 0.0, seed=0, progress=progress)]
    k = cfg.eval.samples
    sampled_ids = _generate(gen, ids, cfg.generation, k, cfg.generation.temperature or 1.0, seed=cfg.seed + 1,
                            progress=progress)
    decode = lambda r: tokenizer.decode(r, skip_special_tokens=True)  # noqa: E731
    greedy = [decode(r) for r in greedy_ids]
    sampled = [[decode(r) for r in rs] for rs in sampled_ids]
    base = baseline_greedy(baseline_path or pi0_path, prompts, tokenizer, max_new, cache, backend)
    if own:
        backend.close()

    g_greedy = [row[0] for row in gold.score(prompts, [[r] for r in greedy])]
    g_base = [row[0] for row in gold.score(prompts, [[r] for r in base])]
    g_sampled = [v for row in gold.score(prompts, sampled) for v in row]
    wins = sum(a > b for a, b in zip(g_greedy, g_base))
    ties = sum(a == b for a, b in zip(g_greedy, g_base))

    flat_p = [ids[i] for i in range(len(ids)) for _ in range(k)]
    flat_r = [r for rs in sampled_ids for r in rs]
    kl = (_logprobs(policy, flat_p, flat_r, pad) - _logprobs(pi0, flat_p, flat_r, pad)).mean().item()
    n = len(prompts)
    metrics: dict[str, Any] = {
        "gold/greedy": sum(g_greedy) / n,
        "gold/sampled": sum(g_sampled) / len(g_sampled),
        "gold/high_reward_fraction": sum(v >= high_reward for v in g_sampled) / len(g_sampled),
        "win_rate": wins / n,
        "tie_rate": ties / n,
        "kl_to_pi0": kl,
    }
    metrics.update(implicit_reward_gap(policy, pi0, pairs or [], cfg.train.beta, pad))
    if keep_rewards:
        metrics["rewards"] = {"greedy": g_greedy, "sampled": g_sampled}
    return metrics
