"""Tiny offline models and tokenizers survive save_pretrained / from_pretrained unchanged."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.tasks.tiny import build_model, build_tokenizer, save_tiny


def test_tokenizer_and_chat_template_round_trip(tmp_path):
    tok = build_tokenizer(["sort", ":", "1", "2", "3"])
    save_tiny(tmp_path, build_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1), tok)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "sort : 3 1 2"}]
    ids = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert loaded.convert_ids_to_tokens(list(ids)) == ["<|user|>", "sort", ":", "3", "1", "2", "<eos>", "<|assistant|>"]
    assert list(ids) == list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert loaded.decode(loaded("1 2 3", add_special_tokens=False)["input_ids"] + [loaded.eos_token_id],
                         skip_special_tokens=True) == "1 2 3"
    AutoModelForCausalLM.from_pretrained(tmp_path)
