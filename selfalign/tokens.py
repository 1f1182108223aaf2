"""The special token ids selfalign reads off a tokenizer: padding, the chat template's turn end, and every id
that ends a response.

Generation stops at these ids, pairs end their responses with them, and truncation is judged against
them, so each is found in one place.
"""

from __future__ import annotations

# Turn-end and end-of-text tokens of common chat models (ChatML/Qwen/SmolLM, Llama 3, Phi 3, Gemma).
# One counts as a stop only where the tokenizer has it as a special token.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
                   "<|endoftext|>")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id for tokenizers that define no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a two-message conversation: Llama 3 gives <|eot_id|>, Qwen/SmolLM2
    <|im_end|>, Phi 3 <|end|>, Gemma <end_of_turn>, even where the tokenizer's EOS differs.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKERXQZ"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that rejects this conversation shape: no turn end to learn from it
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    for i in after:
        if i in special:
            return i
        if tokenizer.decode([i]).strip():
            return None  # text before any special token: the template closes turns with plain text
    return None


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, the model's generation_config.eos_token_id
    (an int or a list), the chat template's turn end, and known turn-end tokens the tokenizer has as
    special tokens. Sorted, without repeats."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    end = turn_end_id(tokenizer)
    if end is not None:
        ids.add(end)
    special = _special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in TURN_END_TOKENS if t in vocab and vocab[t] in special)
    return sorted(int(i) for i in ids)


def response_end_id(tokenizer, chat: bool) -> int | None:
    """The id a response ends with: the chat template's turn end after a conversational prompt
    (chat=True; Llama 3's <|eot_id|>, Phi 3's <|end|>, ...), the tokenizer's EOS after a text prompt
    or where the template has none. It is what the policy emits to stop there, so pairs teach it to stop."""
    end = turn_end_id(tokenizer) if chat else None
    return end if end is not None else tokenizer.eos_token_id
