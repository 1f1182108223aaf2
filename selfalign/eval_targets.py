"""What `selfalign eval` evaluates, resolved from what it was given: the policy, pi_0, the baseline, the prompts,
the reward and the pairs (plan_eval), or the policies a benchmark answers with (benchmark_targets).

A run directory evaluates its last policy with the run's own settings; a policy directory inside
a run takes that run's settings and its pi_0; a policy found nowhere in a run needs --baseline.
A baseline or reference whose tokenizer differs from the policy's is refused before any work.
Every refusal is a UsageError naming the argument to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import UsageError, load_config
from .data import PreferenceDataConfig, load_preferences
from .judges import Judge, Prompt
from .models import check_source
from .run_config import RunConfig


def is_policy_dir(path: Path) -> bool:
    """A model directory (config.json) or a LoRA iterate (adapter_config.json)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


@dataclass
class EvalTarget:
    """A policy to evaluate and where it comes from.

    cfg: the run's config (its settings), or the defaults with the overrides; policy: the policy directory;
    run_config: the online run's config.yaml, None outside one; base: the model `selfalign train` trained the
    policy from (its reference), None elsewhere.
    """

    cfg: RunConfig
    policy: Path
    run_config: Path | None
    base: Path | None


def eval_target(target: Path, overrides: list[str]) -> EvalTarget:
    """The policy to evaluate for a run or policy directory, and the settings it is evaluated with.

    A run directory evaluates its last policy; a policy directory inside a run (RUN/iter_NNN/policy of
    an online run, RUN/policy of `selfalign train`) takes the run's settings and records pi_0 as
    the model that run started from. A policy found nowhere in a run records no base.
    """
    import yaml

    if (target / "config.yaml").is_file():
        run_dir = target
        policies = sorted(target.glob("iter_*/policy")) or ([target / "policy"] if (target / "policy").is_dir() else [])
        if not policies:
            raise UsageError(f"{target}: no iteration has finished yet (no iter_*/policy); run it first")
        policy = policies[-1]
    elif is_policy_dir(target):  # a model or a LoRA iterate
        policy = target
        run_dir = next((d for d in (target.parent, target.parent.parent) if (d / "config.yaml").is_file()), None)
    else:
        raise UsageError(f"{target}: neither a policy directory (config.json, or a LoRA adapter's adapter_config.json) "
                         "nor a run directory (config.yaml)")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir is not None else None
    if isinstance(saved, dict) and "method" in saved:  # an online run: its settings, its pi_0
        return EvalTarget(load_config(RunConfig, run_dir / "config.yaml", overrides), policy, run_dir / "config.yaml",
                          None)
    base = None
    if isinstance(saved, dict) and saved.get("model"):  # `selfalign train`: the reference it trained against
        base = Path(saved.get("reference") or saved["model"])
    return EvalTarget(load_config(RunConfig, None, overrides), policy, None, base)


def check_tokenizer(policy: Path, other: Path, flag: str) -> None:
    """Refuse (one line) a baseline or reference whose tokenizer differs from the policy's: it would read the
    policy's token ids as other tokens (or index past its vocabulary) after minutes of generation."""
    from transformers import AutoConfig, AutoTokenizer

    if Path(other) == Path(policy):
        return
    try:
        mine, theirs = AutoTokenizer.from_pretrained(policy).get_vocab(), AutoTokenizer.from_pretrained(other).get_vocab()
    except (OSError, ValueError):  # no tokenizer saved with the model: compare the vocabulary sizes only
        mine = theirs = None
    from .models import whole_model

    sizes = (AutoConfig.from_pretrained(whole_model(policy)).vocab_size,
             AutoConfig.from_pretrained(whole_model(other)).vocab_size)
    if (mine is not None and mine != theirs) or sizes[1] < sizes[0]:
        raise UsageError(f"{flag} {other}: its vocabulary ({sizes[1]} ids) is not the policy's ({sizes[0]} ids); "
                         f"pass {flag} DIR with a model sharing the policy's tokenizer (the model it was trained from)")


def eval_reward_model(reward_model: str | None, reward: str | None, cfg: RunConfig, gold_fn: str) -> tuple[str, str]:
    """(key, path) of the reward model `selfalign eval` scores with, or ("", ""): --reward-model, else (without
    --reward) the run's eval.reward_model, else, where no gold function exists, the run judge's reward model."""
    if reward_model:
        return "--reward-model", reward_model
    if reward:
        return "", ""
    if cfg.eval.reward_model:
        return "eval.reward_model", cfg.eval.reward_model
    if not gold_fn and cfg.judge.kind == "reward_model" and cfg.judge.reward_model:
        return "judge.reward_model", cfg.judge.reward_model
    return "", ""


def eval_pairs(path: str, tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids from a run's pairs.jsonl or a preference JSONL (prompt, chosen, rejected)."""
    from .sources import read_jsonl

    first = next(iter(read_jsonl(path)), (0, {}))[1]
    if "prompt_ids" in first:
        return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for _, r in read_jsonl(path)]
    return [(e.prompt_ids, e.chosen_ids, e.rejected_ids)
            for e in load_preferences(PreferenceDataConfig(path=path, eval_fraction=0.0), tokenizer)]


@dataclass
class EvalPlan:
    """What evaluate_policy is given for `selfalign eval`, and what the record names.

    policy: evaluated; pi0: the reference of the KL and the implicit reward; baseline: the opponent of the win
    rate; prompts_file and prompts: the held-out prompts (their token ids cut at max_prompt_tokens); tokenizer:
    the policy's; gold: the reward, scorer: its name ('pkg.module:fn' or 'reward model DIR'); pairs: (prompt,
    chosen, rejected) ids for the implicit-reward gap, or None; run: the online run the policy belongs to (its
    cached baseline answers are reused where the prompts and settings match), or None.
    """

    cfg: RunConfig
    policy: Path
    pi0: Path
    baseline: Path
    prompts_file: str
    prompts: list[Prompt]
    tokenizer: Any
    gold: Judge
    scorer: str
    pairs: list[tuple[list[int], list[int], list[int]]] | None
    run: Path | None = None


def plan_eval(target: Path, overrides: list[str], *, baseline: str | None = None, reference: str | None = None,
              prompts: str | None = None, reward: str | None = None, reward_model: str | None = None,
              pairs: str | None = None, limit: int = 0, progress: bool = True) -> EvalPlan:
    """Resolve `selfalign eval TARGET`'s arguments (the flags of the same names) to what it evaluates with.

    pi_0 is the model the policy was trained from (the run's, or the reference `selfalign train` used);
    nothing else (least of all the built-in toy model) is a sensible default opponent for a policy of
    unknown origin: without one, --baseline is required. A policy outside a run takes prompts and reward
    from the built-in task only where none are given.
    """
    from .data import load_prompts
    from .judges.function import FunctionJudge
    from .judges.gold import load_reward_model
    from .models import load_tokenizer
    from .run_config import resolve_task

    found = eval_target(target, overrides)
    cfg, policy = found.cfg, found.policy
    task = resolve_task(cfg, progress=progress) if found.run_config is not None else None
    recorded = task.policy if task is not None else found.base
    pi0 = reference or recorded or baseline
    opponent = baseline or recorded or reference
    if pi0 is None:
        raise UsageError(f"{target}: no run records the model this policy was trained from; pass --baseline DIR "
                         "(that model: the opponent of the win rate, and the KL reference unless --reference is given)")
    for flag, given in (("--baseline", baseline), ("--reference", reference)):
        if given:
            check_source(given, flag)  # named: the path alone does not say which flag is wrong
    pi0, opponent = Path(pi0), Path(opponent)
    check_tokenizer(policy, opponent, "--baseline")
    check_tokenizer(policy, pi0, "--reference")
    if task is None and not (prompts and (reward or reward_model)):
        task = resolve_task(cfg, progress=progress)
    prompts_file = prompts or task.eval_prompts
    if not prompts_file:
        raise UsageError("no held-out prompts: pass --prompts FILE.jsonl (or set eval_prompts in the run's config)")
    tokenizer = load_tokenizer(policy)
    split = ("", cfg.subset, cfg.chosen_field) if prompts else cfg.source_split("eval_prompts")[:3]
    rows = load_prompts(prompts_file, cfg.prompt_field, tokenizer, cfg.max_prompt_tokens, *split)[: limit or None]
    rm_key, rm_path = eval_reward_model(reward_model, reward, cfg, task.gold_fn if task is not None else "")
    if rm_path:
        gold = load_reward_model(rm_key, rm_path, cfg.judge)
        scorer = f"reward model {rm_path}"
    else:
        spec = reward or task.gold_fn
        if not spec:
            raise UsageError("no reward to evaluate with: pass --reward pkg.module:fn or --reward-model DIR")
        gold, scorer = FunctionJudge(spec), spec
    return EvalPlan(cfg, policy, pi0, opponent, prompts_file, rows, tokenizer, gold, scorer,
                    eval_pairs(pairs, tokenizer) if pairs else None,
                    found.run_config.parent if found.run_config else None)


def benchmark_targets(target: Path, baseline: str | None, output: str | None) -> list[tuple[str, Path, Path]]:
    """(name, policy, output JSON) to answer the benchmark with: a run's pi_0 (or --baseline) and final iterate,
    saved under RUN/ifeval/; or a policy directory (and --baseline's), each saved beside itself (ifeval_NAME.json)
    unless --output names the policy's file."""
    if (target / "config.yaml").is_file():
        found = eval_target(target, [])
        policy = found.policy
        if baseline:
            first = ("baseline", Path(baseline), target / "ifeval" / "baseline.json")
        else:
            pi0 = target / "pi0" if (target / "pi0" / "config.json").is_file() else found.base
            if pi0 is None:
                from .run_config import resolve_task

                pi0 = Path(resolve_task(found.cfg, progress=False).policy)
            first = ("pi_0", pi0, target / "ifeval" / "pi0.json")
        name = policy.parent.name if policy.name == "policy" else policy.name  # iter_NNN, or `train`'s policy
        return [first, (name, policy, Path(output) if output else target / "ifeval" / f"{name}.json")]
    if not is_policy_dir(target):
        raise UsageError(f"{target}: neither a policy directory (config.json, or a LoRA adapter's adapter_config.json) "
                         "nor a run directory (config.yaml)")
    policies = [("policy", target, Path(output) if output else target.parent / f"ifeval_{target.name}.json")]
    if baseline:
        b = Path(baseline)
        if not is_policy_dir(b):
            raise UsageError(f"--baseline {b}: not a policy directory (no config.json or adapter_config.json)")
        policies.insert(0, ("baseline", b, b.parent / f"ifeval_{b.name}.json"))
    return policies
