"""What scores a run's held-out answers: a gold function, a reward model, or the judge's own reward model.

A run once skipped evaluation without a word when its judge was a reward model and no reward
function was named, and printed a table of empty columns. Now the judge's reward model (without
the annotator noise) is the evaluation reward in that case, and a run whose judge gives no
reward to evaluate with (a pairwise ranker, an LLM) but has held-out prompts stops with a
one-line error that names the keys to set.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError
from ..models import check_source, loading, resolve_dtype
from . import Judge
from .function import FunctionJudge


def load_reward_model(key: str, path: str, judge: Any = None) -> Judge:
    """A RewardModelJudge, or a one-line ConfigError naming `key` for a path or name that cannot be loaded.

    judge: a JudgeConfig whose dtype, batch_size and offload it loads with (an 8B reward model in fp32
    would take 32 GB); None: fp32, batch 16, on the device throughout."""
    from .reward_model import RewardModelJudge

    check_source(path, key)
    settings = {} if judge is None else dict(dtype=resolve_dtype(judge.dtype), batch_size=judge.batch_size,
                                             offload=judge.offload)
    with loading(key, path):
        return RewardModelJudge(path, **settings)


def eval_reward(cfg: Any, gold_fn: str, judge: Judge, has_eval_prompts: bool) -> Judge | None:
    """The evaluation reward of a run config: eval.reward_model, else the gold function (eval.reward, the
    built-in task's, or the judge function), else the judge's reward model, else None.

    None with held-out prompts to evaluate is a ConfigError (nothing would score them)."""
    if cfg.eval.reward_model:
        return load_reward_model("eval.reward_model", cfg.eval.reward_model, cfg.judge)
    if gold_fn:
        return FunctionJudge(gold_fn)
    inner = getattr(judge, "inner", judge)  # NoisyJudge wraps the reward model: evaluate without the noise
    if cfg.judge.kind == "reward_model":
        return inner
    if has_eval_prompts:
        raise ConfigError(f"eval: judge.kind={cfg.judge.kind} gives no reward to score the held-out prompts "
                          f"({cfg.eval_prompts}) with; set eval.reward=pkg.module:fn or eval.reward_model=PATH, "
                          "or eval.prompts=0 to train without evaluation")
    return None
