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
