"""The vLLM backend on a real (CPU) engine: weight pushes checked, stale weights caught, responses matched.

Run with `pytest -m vllm` in an environment with vllm (CI: .venv-vllm, see scripts/setup.sh). One
float32 engine serves the whole module (engine start is 10-40 s on 2 cores), on the built-in task's
pi_0, whose 16-dim heads the engine serves zero-padded to 32 (HeadPadding): every check below
therefore also checks that the padding is exact.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from selfalign.generation import GenerationConfig, stop_token_ids
from selfalign.generation.hf import HFGenerator

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup(builtin_task):
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.generation import load_generation_config
    from selfalign.generation.vllm import VLLMBackend

    tok = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    stops = stop_token_ids(tok, load_generation_config(builtin_task.policy_dir))
    backend = VLLMBackend(builtin_task.policy_dir, tok, stops, GenerationConfig(backend="vllm"), seed=0,
                          max_model_len=64)
    pi0 = AutoModelForCausalLM.from_pretrained(builtin_task.policy_dir, dtype=torch.float32)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"sort : {a} {b} {c} {d}"}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False))
               for a, b, c, d in [(3, 1, 2, 9), (7, 5, 12, 0), (4, 15, 8, 6), (11, 2, 13, 10), (1, 0, 14, 5)]]
    yield backend, pi0, tok, stops, prompts
    backend.close()
    # Single-process engine: nothing of it may outlive close() (no orphans even if a run is killed).
    assert psutil.Process(os.getpid()).children(recursive=True) == []


def perturbed(model, seed: int, scale: float = 0.05):
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_push_matches_the_trained_model_and_hf_greedy(setup):
    """After a push of new weights the engine's per-token log-probs equal the model's within 1e-3 nats
    (float32), and its greedy responses equal transformers' greedy responses on the same weights."""
    backend, pi0, tok, stops, prompts = setup
    model = perturbed(pi0, seed=1)
    gen = backend.generator(model)
    assert backend.last_check is not None and backend.last_check < 1e-3
    config = GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=12)
    assert gen.generate(prompts, config) == HFGenerator(model, tok.pad_token_id, stops).generate(prompts, config)
    assert backend.llm.collective_rpc("repack_cpu_gemm") == [1]  # the LM head's handle is re-packed


def test_stale_weights_fail_the_check(setup):
    """The check catches an engine left on old weights: after a training step it was not told about
    (the push skipped) the difference is far over tolerance, and a generator for the new weights is
    refused until they are pushed."""
    backend, pi0, tok, stops, prompts = setup
    backend.generator(pi0)
    model = perturbed(pi0, seed=2)
    with pytest.raises(RuntimeError, match="did not take"):
        backend.check(model)
    assert backend.logprob_difference(model, prompts[:2]) > 100 * backend.tolerance
    backend.push(model)  # the real push repairs it
    assert backend.last_check < 1e-3


def test_lora_policy_is_pushed_merged(setup):
    """A LoRA policy's adapters reach the engine merged into the base weights; pushing only the base
    weights (what a push that ignored the adapters would send) fails the check."""
    from selfalign.train import LoraSettings, apply_lora

    backend, pi0, tok, stops, prompts = setup
    lora = apply_lora(copy.deepcopy(pi0), LoraSettings(enabled=True, r=4, alpha=16))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    backend.push(pi0)  # base weights only
    with pytest.raises(RuntimeError, match="did not take"):
        backend.check(lora)
    backend.generator(lora)
    assert backend.last_check < 1e-3


def test_every_response_belongs_to_its_prompt(setup):
    """K samples per prompt, in prompt order: batched greedy equals one prompt at a time, and a reversed
    prompt list gives the reversed responses; sampling is reproducible from the seed; responses end at
    the first stop id; top_k=1 sampling is greedy."""
    backend, pi0, tok, stops, prompts = setup
    gen = backend.generator(perturbed(pi0, seed=4, scale=0.02))
    greedy = GenerationConfig(num_samples=2, temperature=0.0, max_new_tokens=12)
    batched = gen.generate(prompts, greedy)
    assert batched == [gen.generate([p], greedy)[0] for p in prompts]
    assert gen.generate(prompts[::-1], greedy) == batched[::-1]
    assert len({tuple(r[0]) for r in batched}) > 1 and all(r[0] == r[1] for r in batched)

    sample = GenerationConfig(num_samples=3, temperature=1.0, max_new_tokens=12)
    out = gen.generate(prompts, sample, seed=7)
    assert len(out) == len(prompts) and all(len(rs) == 3 for rs in out)
    assert out == gen.generate(prompts, sample, seed=7) and out != gen.generate(prompts, sample, seed=8)
    assert all(t not in stops for rs in out for r in rs for t in r[:-1])
    top1 = GenerationConfig(num_samples=1, temperature=1.5, top_k=1, max_new_tokens=12)
    assert [r[:1] for r in batched] == gen.generate(prompts, top1, seed=9)

    backend.generator(pi0)
    with pytest.raises(RuntimeError, match="replaced by a later push"):
        gen.generate(prompts, greedy)


def test_online_loop_with_the_vllm_backend(setup, tmp_path):
    """The online loop generates with the engine (one per run, weights pushed each round) end to end."""
    from selfalign.config import load_config
    from selfalign.loop import RunConfig, run
    from tests.test_loop import SMALL

    backend = setup[0]
    pushes = backend.pushes
    cfg = load_config(RunConfig, None, [*SMALL, "iterations=1", "generate_every=2", "method=iterative_dpo", "generation.backend=vllm",
                                        f"output_dir={tmp_path / 'run'}"])
    history = run(cfg, progress=False, backend=backend)
    assert history[0]["labels"] == 72 and history[0]["time/generation"] > 0
    # pi_0's evaluation (one push: its greedy answers are the baseline's, cached in the run), two rounds (one
    # push each), the iteration's evaluation (the policy; the baseline's answers come from the cache).
    assert backend.pushes - pushes == 4
    assert backend.last_check < 1e-3


def test_evaluating_a_lora_iterate_starts_its_engine_on_pi0(builtin_task, tmp_path):
    """A LoRA run's iterates are adapter directories, which no engine can load: evaluation (its own backend,
    as `selfalign eval` has) starts the engine on pi_0 and pushes the merged iterate into it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.config import load_config
    from selfalign.data import load_prompts
    from selfalign.evaluate import evaluate_policy
    from selfalign.judges.function import FunctionJudge
    from selfalign.loop import RunConfig

    base = AutoModelForCausalLM.from_pretrained(builtin_task.policy_dir)
    adapter = tmp_path / "iter_000" / "policy"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    tok.save_pretrained(adapter)
    cfg = load_config(RunConfig, None, ["generation.backend=vllm", "generation.max_new_tokens=8", "eval.samples=1"])
    prompts = load_prompts(str(builtin_task.eval_prompts), "prompt", tok, 512)[:4]
    m = evaluate_policy(adapter, builtin_task.policy_dir, prompts, tok, FunctionJudge(builtin_task.reward_fn), cfg)
    # LoRA's B starts at zero: the iterate is pi_0, so greedy answers tie with the baseline's everywhere.
    assert m["tie_rate"] == 1.0 and m["kl_to_pi0"] < 1e-3
