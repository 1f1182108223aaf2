"""Held-out evaluation of a policy: reward, win rate against a baseline, KL to a reference.

Metrics (per policy directory):
    gold/greedy, gold/sampled      mean reward of greedy and of sampled responses (the gold reward,
                                   or a judge: whatever `gold` scores with)
    gold/high_reward_fraction      fraction of sampled responses with reward >= high_reward
    win_rate, tie_rate             greedy response vs the baseline policy's greedy response on the
                                   same prompt (pi_0 by default), judged by the same reward; ties apart
    kl_to_pi0, kl_k1_to_pi0        KL(pi || pi_ref) estimated from samples y ~ pi with Schulman's k3:
                                   mean of exp(r) - 1 - r, r = log pi_ref(y|x) - log pi(y|x)
                                   (pi_ref = pi_0 by default). Unbiased like the plain mean of -r
                                   (k1), but never negative per sample: k1 on a few samples can
                                   come out below 0, which a KL cannot be. k1 is reported beside it:
                                   k3's exp(r) explodes on a far-moved policy's rare samples (past
                                   r ~ 709 it overflows: kl_to_pi0 is then left out and kl_k3_overflow
                                   counts those samples; no inf is written or printed). The
                                   samples are drawn at temperature 1 (extra ones when generation
                                   samples at another temperature): y must come from pi.
    eval/truncated_share           share of sampled responses that hit max_new_tokens without an end token
    implicit/gap, implicit/accuracy  (given pairs) SELM's analysis: mean implicit reward
                                   beta * log(pi/pi_ref) of chosen minus that of rejected responses,
                                   and the share of pairs where it is positive
The per-response rewards come back too (`rewards`), for histograms; with `responses_path` the
held-out texts, their rewards and truncation flags are saved there, one JSON line per prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from .data import prompt_ids, write_atomic, write_jsonl
from .generation import Backend, GenerationConfig, Generator, build_backend, load_generation_config
from .judges import Prompt
from .logprobs import collate, sequence_logprobs
from .logs import progress_bar
from .losses import preference_logits
from .tokens import pad_token_id, stop_token_ids
from .truncation import is_truncated

HIGH_REWARD = 0.999


def _generate(gen: Generator, ids, base: GenerationConfig, num_samples: int, temperature: float, seed: int,
              progress: bool = False):
    cfg = dataclasses.replace(base, num_samples=num_samples, temperature=temperature, batch_size=64)
    return gen.generate(ids, cfg, seed=seed, progress=progress)


@torch.no_grad()
def _logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad: int, progress: bool = False,
              desc: str = "log-probs") -> torch.Tensor:
    out = []
    for s in progress_bar(range(0, len(prompts), 64), desc=desc, disable=not progress, leave=False):
        batch = collate(prompts[s : s + 64], responses[s : s + 64], pad)
        out.append(sequence_logprobs(model, batch.to(next(model.parameters()).device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _load(path: Path):
    from .models import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_causal_lm(path).to(device)


def kl_k3(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample k3 estimate of KL(pi || pi_ref) from y ~ pi: exp(r) - 1 - r with r = logp_ref - logp_policy.

    Its mean is unbiased for the KL, like that of k1 = -r, and every term is >= 0 (e^r >= 1 + r),
    so the estimate is never negative. Computed in float64: r is a whole sequence's log ratio.
    """
    r = logp_ref.double() - logp_policy.double()
    return torch.expm1(r) - r


def kl_metrics(k3: torch.Tensor, k1: torch.Tensor) -> dict[str, float | int]:
    """kl_to_pi0 (k3) and kl_k1_to_pi0 as metrics. A sample whose log ratio passes ~709 overflows k3's exp() to
    inf (a far-moved policy's rare sample); its mean is then no number to print or plot, so kl_to_pi0 is left
    out and kl_k3_overflow counts those samples; k1 stays."""
    out: dict[str, float | int] = {"kl_k1_to_pi0": k1.mean().item()}
    mean = k3.mean().item()
    if math.isfinite(mean):
        out["kl_to_pi0"] = mean
    else:
        out["kl_k3_overflow"] = int((~torch.isfinite(k3)).sum())
    return out


def baseline_greedy(baseline_path: Path, prompts: list[Prompt], tokenizer, max_new_tokens: int,
                    cache: Path | None, backend: Backend | None = None, model=None, progress: bool = False,
                    trust_unkeyed: bool = True) -> list[str]:
    """The baseline policy's greedy responses on the eval prompts (cached in the run directory).

    `model` is the baseline already loaded (pi_0 when it is the baseline), else it is loaded here. The cache
    is keyed by the baseline, the prompts and max_new_tokens (baseline_key). A cache from before the key
    (the run's own prompts) is read only with trust_unkeyed: `selfalign eval` may ask other prompts.
    """
    path = cache / "baseline_greedy.json" if cache is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and saved.get("policy") == str(baseline_path) and len(saved["texts"]) == len(prompts):
            key = saved.get("key")
            if key == baseline_key(baseline_path, prompts, max_new_tokens) or (key is None and trust_unkeyed):
                return saved["texts"]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    own = backend is None
    if own:
        backend = build_backend(GenerationConfig(), tokenizer, baseline_path, load_generation_config(baseline_path))
    gen = backend.generator(model if model is not None else _load(baseline_path))
    texts = [tokenizer.decode(r[0], skip_special_tokens=True)
             for r in _generate(gen, ids, GenerationConfig(max_new_tokens=max_new_tokens), 1, 0.0, seed=0,
                                progress=progress)]
    if own:
        backend.close()
    save_baseline_greedy(cache, baseline_path, prompts, max_new_tokens, texts)
    return texts


def baseline_key(baseline_path: Path, prompts: list[Prompt], max_new_tokens: int) -> str:
    """What a cached baseline answer set was generated from: the baseline, every prompt, max_new_tokens."""
    blob = json.dumps([str(baseline_path), prompts, max_new_tokens])
    return hashlib.sha256(blob.encode()).hexdigest()


def save_baseline_greedy(cache: Path | None, baseline_path: Path, prompts: list[Prompt], max_new_tokens: int,
                         texts: list[str]) -> None:
    """The baseline's greedy answers to `prompts` into cache/baseline_greedy.json, with the key baseline_greedy
    reads them back by."""
    if cache is not None:
        key = baseline_key(baseline_path, prompts, max_new_tokens)
        write_atomic(cache / "baseline_greedy.json", json.dumps({"policy": str(baseline_path), "key": key,
                                                                 "texts": texts}))


def implicit_reward_gap(policy, reference, pairs: list[tuple[list[int], list[int], list[int]]], beta: float,
                        pad: int, progress: bool = False) -> dict[str, float]:
    """Mean of beta*log(pi/pi_ref)(chosen) - beta*log(pi/pi_ref)(rejected) over (prompt, chosen, rejected) ids."""
    if not pairs:
        return {}
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    policy_lp = _logprobs(policy, prompts, responses, pad, progress, "implicit reward: policy")
    ref_lp = _logprobs(reference, prompts, responses, pad, progress, "implicit reward: reference")
    n = len(pairs)
    gap = preference_logits(policy_lp[:n], policy_lp[n:], ref_lp[:n], ref_lp[n:], beta)
    return {"implicit/gap": gap.mean().item(), "implicit/accuracy": (gap > 0).float().mean().item()}


def evaluate_policy(policy_path: Path, pi0_path: Path, prompts: list[Prompt], tokenizer, gold, cfg,
                    cache: Path | None = None, progress: bool = False, baseline_path: Path | None = None,
                    pairs: list[tuple[list[int], list[int], list[int]]] | None = None,
                    high_reward: float = HIGH_REWARD, keep_rewards: bool = False,
                    responses_path: Path | None = None, backend: Backend | None = None,
                    trust_unkeyed: bool = True) -> dict[str, Any]:
    """Metrics of the policy at policy_path (see the module docstring); `gold` is a Judge.

    pi0_path is the reference of the KL and of the implicit reward; baseline_path (default
    pi0_path) is the opponent of the win rate. cfg supplies generation (max_new_tokens,
    temperature, top_p, top_k, backend), eval.samples, seed and train.beta. backend: the run's
    generation backend; without one, cfg.generation.backend's is started here and closed after.
    At most two models are held at once: a baseline other than pi_0 answers (and is released)
    before pi_0 and the policy load. responses_path, if given, receives one JSON line per prompt:
    the greedy, baseline and sampled texts with their rewards and truncation flags. cache: where the
    baseline's greedy answers are kept (baseline_greedy; trust_unkeyed as there).
    """
    stages = progress_bar(total=6, desc="eval", disable=not progress, leave=False)

    def stage(name: str) -> None:
        stages.set_postfix_str(name)
        stages.update(1)

    own = backend is None
    if own:
        # Built on pi_0, a full model (a LoRA iterate is only an adapter); each generator gets its model's weights.
        backend = build_backend(cfg.generation, tokenizer, pi0_path, load_generation_config(pi0_path), seed=cfg.seed)
    baseline_path = baseline_path or pi0_path
    # pi_0 evaluated against itself (iteration -1): its greedy answers are the baseline's and its KL is 0,
    # so neither is computed twice.
    pi0 = _load(pi0_path) if Path(baseline_path) == Path(pi0_path) else None
    own_baseline = pi0 is not None and Path(policy_path).resolve() == Path(pi0_path).resolve()
    pad = pad_token_id(tokenizer)
    max_new = cfg.generation.max_new_tokens
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    base = None if own_baseline else baseline_greedy(baseline_path, prompts, tokenizer, max_new, cache, backend,
                                                     model=pi0, progress=progress, trust_unkeyed=trust_unkeyed)
    stage("baseline answered")
    pi0 = pi0 if pi0 is not None else _load(pi0_path)
    policy = pi0 if own_baseline else _load(policy_path)
    gen = backend.generator(policy)
    greedy_ids = [r[0] for r in _generate(gen, ids, cfg.generation, 1, 0.0, seed=0, progress=progress)]
    if base is None:
        base = [tokenizer.decode(r, skip_special_tokens=True) for r in greedy_ids]
        save_baseline_greedy(cache, baseline_path, prompts, max_new, base)
    stage("greedy answered")
    k = cfg.eval.samples
    sampled_ids = _generate(gen, ids, cfg.generation, k, cfg.generation.temperature or 1.0, seed=cfg.seed + 1,
                            progress=progress)
    stage("sampled")
    # KL(pi || pi_0) needs y ~ pi itself: samples at another temperature are drawn from a different
    # distribution and bias both estimates (k1 even came out negative at T = 0.8), so they are drawn afresh at
    # T = 1. (generation.top_k, 50 by default, still trims the tail a little.)
    kl_ids = sampled_ids
    if not own_baseline and cfg.generation.temperature not in (0, 1.0):
        kl_ids = _generate(gen, ids, cfg.generation, k, 1.0, seed=cfg.seed + 2, progress=progress)
    decode = lambda r: tokenizer.decode(r, skip_special_tokens=True)  # noqa: E731
    greedy = [decode(r) for r in greedy_ids]
    sampled = [[decode(r) for r in rs] for rs in sampled_ids]
    if own:
        backend.close()

    g_greedy = [row[0] for row in gold.score(prompts, [[r] for r in greedy])]
    g_base = [row[0] for row in gold.score(prompts, [[r] for r in base])]
    g_sampled_rows = gold.score(prompts, sampled)
    g_sampled = [v for row in g_sampled_rows for v in row]
    stage("scored")
    wins = sum(a > b for a, b in zip(g_greedy, g_base))
    ties = sum(a == b for a, b in zip(g_greedy, g_base))

    flat_p = [ids[i] for i in range(len(ids)) for _ in range(k)]
    flat_r = [r for rs in kl_ids for r in rs]
    if policy is pi0:
        kl = kl1 = torch.zeros(len(flat_r), dtype=torch.float64)
    else:
        lp_policy = _logprobs(policy, flat_p, flat_r, pad, progress, "KL: policy log-probs")
        lp_pi0 = _logprobs(pi0, flat_p, flat_r, pad, progress, "KL: pi_0 log-probs")
        kl, kl1 = kl_k3(lp_policy, lp_pi0), lp_policy.double() - lp_pi0.double()
    stage("KL")
    end_ids = set(stop_token_ids(tokenizer, getattr(policy, "generation_config", None)))
    trunc = [[is_truncated(r, max_new, end_ids) for r in rs] for rs in sampled_ids]
    n = len(prompts)
    metrics: dict[str, Any] = {
        "gold/greedy": sum(g_greedy) / n,
        "gold/sampled": sum(g_sampled) / len(g_sampled),
        "gold/high_reward_fraction": sum(v >= high_reward for v in g_sampled) / len(g_sampled),
        "win_rate": wins / n,
        "tie_rate": ties / n,
        # k1 (the plain log-ratio mean) beside k3: k3's exp() explodes on a far-moved policy's few extreme samples.
        **kl_metrics(kl, kl1),
        "eval/truncated_share": sum(map(sum, trunc)) / len(flat_r),
    }
    metrics.update(implicit_reward_gap(policy, pi0, pairs or [], cfg.train.beta, pad, progress))
    stage("implicit reward")
    stages.close()
    if responses_path is not None:
        write_jsonl(responses_path, [
            {"prompt": prompts[i], "greedy": greedy[i], "greedy_reward": g_greedy[i],
             "greedy_truncated": is_truncated(greedy_ids[i], max_new, end_ids),
             "baseline": base[i], "baseline_reward": g_base[i],
             "sampled": sampled[i], "sampled_rewards": g_sampled_rows[i], "sampled_truncated": trunc[i],
             "sampled_kl": kl[i * k : (i + 1) * k].tolist()}
            for i in range(n)])
    if keep_rewards:
        metrics["rewards"] = {"greedy": g_greedy, "sampled": g_sampled}
    del policy, pi0  # both go now (reference counting frees them) before the loop trains the next policy
    return metrics
