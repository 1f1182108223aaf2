"""Tiny causal LMs and word-level tokenizers built offline, saved the Hugging Face way.

Nothing here downloads anything: the tokenizer is built with the `tokenizers` library from
a given word list and the model from a random-init config. Both are saved with
save_pretrained, so whatever loads them afterwards takes the ordinary from_pretrained path
that real hub models take.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]

# Renders [{"role": ..., "content": ...}, ...] as "<|user|> text <eos> <|assistant|> text <eos>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over SPECIAL_TOKENS + words, with a chat template."""
    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS, *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    vocab_size: int,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    tie_word_embeddings: bool = False,
) -> PreTrainedModel:
    """A random-init causal LM (Llama- or Qwen2-shaped), float32, deterministic for a seed.

    Llama is the default for models saved beside a tokenizer of ours: transformers 5's
    AutoTokenizer rebuilds a 'qwen2' model's tokenizer as Qwen2Tokenizer (byte-level BPE),
    silently dropping our word-level one, while for 'llama' it honours tokenizer_config.json.
    """
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=max_positions,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "qwen2":
        config = Qwen2Config(**kwargs)
    elif arch == "llama":
        config = LlamaConfig(**kwargs)
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny(directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    """save_pretrained both into `directory` (loadable with AutoModelForCausalLM / AutoTokenizer)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
