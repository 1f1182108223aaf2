"""The chunked log-prob path equals the naive full-logits computation, without its memory."""

from __future__ import annotations

import pytest
import torch

from selfalign.logprobs import collate, sequence_logprobs, token_logprobs
from tests.conftest import VOCAB, make_model

PROMPTS = [[6, 7, 8], [9, 10], [11, 12, 13, 14, 15], [16]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26], [27], [28, 29, 30]]


def naive_logprobs(model, prompts, responses) -> torch.Tensor:
    """One unpadded sequence at a time, full float32 log-softmax over the vocabulary."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        per_token = logp.gather(1, ids[0, 1:, None]).squeeze(1)
        out.append(per_token[len(p) - 1 :].sum())
    return torch.stack(out)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_equals_naive_values_and_gradients(side, arch):
    model = make_model(arch=arch)
    batch = collate(PROMPTS, RESPONSES, pad_token_id=0, padding_side=side)
    fast = sequence_logprobs(model, batch, chunk_size=3)
    slow = naive_logprobs(model, PROMPTS, RESPONSES)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct upstream grads per sequence
    params = [p for p in model.parameters()]
    g_fast = torch.autograd.grad((fast * weights).sum(), params, allow_unused=True)
    g_slow = torch.autograd.grad((slow * weights).sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_chunk_size_does_not_change_result():
    model = make_model()
    batch = collate(PROMPTS, RESPONSES, pad_token_id=0)
    results = [sequence_logprobs(model, batch, chunk_size=c) for c in (1, 2, 5, 4096)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


def test_prompt_and_padding_are_masked():
    model = make_model()
    # Summed log-probs are negative and depend on the response length, not on the padding.
    short = collate(PROMPTS[:1], RESPONSES[:1], pad_token_id=0)
    padded = collate(PROMPTS[:1] + [[1] * 12], RESPONSES[:1] + [[2] * 12], pad_token_id=0)
    torch.testing.assert_close(sequence_logprobs(model, short), sequence_logprobs(model, padded)[:1])


def test_never_keeps_full_vocabulary_logits_for_backward():
    """The naive path saves [tokens, vocab] float32 for backward; the chunked path saves at most
    the hidden states and the weight matrix."""
    model = make_model()
    batch = collate(PROMPTS, RESPONSES, pad_token_id=0)
    n_response = int(batch.response_mask.sum())
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logprobs(model, batch, chunk_size=2)
    # chunk_size=2: nothing with a vocabulary axis larger than [2, vocab] may be kept.
    assert not [s for s in saved if len(s) >= 1 and s[-1] == VOCAB and s.numel() > 2 * VOCAB], saved
    assert n_response > 2  # so a [tokens, vocab] tensor would be caught

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_logprobs(model, PROMPTS, RESPONSES)
    assert any(s[-1] == VOCAB and s.numel() > VOCAB for s in saved), "the hook sees the naive path's logits"


def test_token_logprobs_through_a_non_linear_head_uses_checkpointed_chunks():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 32))
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 32, (10,))
    fast = token_logprobs(hidden, head, targets, chunk_size=3)
    slow = head(hidden).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(torch.autograd.grad(fast.sum(), hidden)[0], torch.autograd.grad(slow.sum(), hidden)[0])


def test_collate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        collate([[1], [2]], [[3]], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        collate([[1]], [[3]], pad_token_id=0, padding_side="middle")


def test_bf16_autocast_backward_matches_naive_autocast():
    """Under autocast the LM head's backward runs in the forward's dtype (bf16), and its
    gradient agrees with autograd through the naive bf16 computation."""
    model = make_model()
    batch = collate(PROMPTS, RESPONSES, pad_token_id=0)
    head = model.get_output_embeddings().weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = sequence_logprobs(model, batch, chunk_size=4)
        (g_fast,) = torch.autograd.grad(fast.sum(), head)
        slow = naive_logprobs(model, PROMPTS, RESPONSES)
        (g_slow,) = torch.autograd.grad(slow.sum(), head)
    torch.testing.assert_close(fast, slow, atol=0.05, rtol=0.01)
    rel = (g_fast - g_slow).norm() / g_slow.norm()
    assert rel < 0.02, rel


def _scaled_family_model(family: str):
    """A tiny random-init model of a family that scales its logits after the LM head (offline)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = {
        "granite": lambda: tf.GraniteConfig(**common, logits_scaling=8.0),
        "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.25),
        "cohere2": lambda: tf.Cohere2Config(**common, logit_scale=0.25),
        "hyperclovax": lambda: tf.HyperCLOVAXConfig(**common, logits_scaling=0.2),
        "minicpm3": lambda: tf.MiniCPM3Config(**{**common, "num_key_value_heads": 4}, dim_model_base=4, q_lora_rank=16, kv_lora_rank=16,
                                              qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8),
        "falcon_h1": lambda: tf.FalconH1Config(**common, lm_head_multiplier=0.2, mamba_d_ssm=32, mamba_n_heads=4,
                                               mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4),
    }[family]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # large logits, so that a missing scaling changes the log-probs a lot
        model.get_output_embeddings().weight.mul_(60.0)
    return model


@pytest.mark.parametrize("family, scale", [("granite", 1 / 8), ("cohere", 0.25), ("cohere2", 0.25),
                                           ("hyperclovax", 0.2), ("minicpm3", 4 / 32), ("falcon_h1", 0.2)])
def test_logit_scaling_matches_the_models_own_logits(family, scale):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale, ...:
    the summed log-probs and their gradients equal those of the model's own forward."""
    from selfalign.logprobs import head_scale

    model = _scaled_family_model(family)
    assert head_scale(model.config) == pytest.approx(scale)
    batch = collate(PROMPTS, RESPONSES, pad_token_id=0)
    fast = sequence_logprobs(model, batch, chunk_size=3)
    slow = naive_logprobs(model, PROMPTS, RESPONSES)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)
    # Without the scaling the answer is far off: the test can tell the two apart.
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=torch.tensor([PROMPTS[1] + RESPONSES[1]])).last_hidden_state[0]
        n = len(PROMPTS[1])
        unscaled = token_logprobs(hidden[n - 1 : -1], model.get_output_embeddings(), torch.tensor(RESPONSES[1])).sum()
    assert (unscaled - slow[1]).abs() > 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(fast.sum(), params, allow_unused=True)
    g_slow = torch.autograd.grad(slow.sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_scaled_head_through_the_checkpointed_path_matches_the_custom_path():
    hidden = torch.randn(7, 8, requires_grad=True)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    targets = torch.randint(0, VOCAB, (7,))
    wrapped = torch.nn.Sequential(head)  # not a bare nn.Linear: the generic path
    a = token_logprobs(hidden, head, targets, chunk_size=3, scale=0.125)
    b = token_logprobs(hidden, wrapped, targets, chunk_size=3, scale=0.125)
    naive = (head(hidden) * 0.125).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(a, naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, naive, atol=1e-5, rtol=0)
    ga, = torch.autograd.grad(a.sum(), hidden)
    gn, = torch.autograd.grad(naive.sum(), hidden)
    torch.testing.assert_close(ga, gn, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda tf: tf.Gemma2Config(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    # A field known to scale logits elsewhere, on a model type that is not known to use it.
    (lambda tf: tf.LlamaConfig(logit_scale=2.0), "llama sets logit_scale=2.0"),
    (lambda tf: tf.Qwen2Config(logits_scaling=8.0), "qwen2 sets logits_scaling=8.0"),
])
def test_unknown_logit_scaling_is_refused_with_a_config_error(make, message):
    import transformers as tf

    from selfalign.config import ConfigError
    from selfalign.logprobs import head_scale

    with pytest.raises(ConfigError, match=message) as err:
        head_scale(make(tf))
    assert "\n" not in str(err.value)


def test_plain_and_known_unused_fields_scale_by_one():
    import transformers as tf

    from selfalign.logprobs import head_scale

    assert head_scale(tf.LlamaConfig()) == 1.0
    assert head_scale(tf.Gemma2Config(final_logit_softcapping=None)) == 1.0
    assert head_scale(tf.MptConfig(logit_scale=2.0)) == 1.0  # MptForCausalLM never reads it


def test_run_with_a_model_of_unknown_logit_scaling_exits_2_before_any_work(tmp_path, capsys):
    from selfalign.cli import main
    from selfalign.tasks.tiny import build_model, build_tokenizer, save_tiny

    tokenizer = build_tokenizer(["a", "b", "c"])
    model = build_model(len(tokenizer), hidden_size=16, num_layers=1)
    model.config.logit_scale = 2.0  # a llama config with a field only other model types use
    save_tiny(tmp_path / "model", model, tokenizer)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a b"}\n')
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["run", "quickstart", f"model={tmp_path / 'model'}", f"prompts={tmp_path / 'prompts.jsonl'}",
                 "judge.function=tests.judge_fns:length", f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model: llama sets logit_scale=2.0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
