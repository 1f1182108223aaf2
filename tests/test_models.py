"""selfalign.models: GGUF files load (and save as plain safetensors), bad sources are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfalign.models import ModelLoadError, load_causal_lm, load_tokenizer, materialize

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (bash scripts/setup.sh test)")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _permute(w, n_head: int):
    # llama.cpp's convert_hf_to_gguf stores q/k rows interleaved for its rotary layout; transformers undoes it.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A 2-layer Llama with a byte-level vocabulary, written with gguf.GGUFWriter; returns the source HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "he", *SPECIALS]
    merges = ["Ġ t", "h e"]
    heads, kv_heads, hidden = 4, 2, 32
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=len(tokens) - 3, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    w.add_token_merges(merges)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    w.add_pad_token_id(config.pad_token_id)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_loads_with_the_same_logits_and_saves_as_safetensors(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    path, source = tiny_gguf
    model = load_causal_lm(path)
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer("the tea", add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] >= 2
    torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == source.config.eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                    add_generation_prompt=True, tokenize=False)
    # An ordinary safetensors directory that plain from_pretrained loads, with the same weights.
    saved = materialize(path, tmp_path / "pi0")
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer_config.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(saved)
    torch.testing.assert_close(again(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)
    assert materialize(saved, tmp_path / "unused") == saved  # a directory is used as it is


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "no" / "such" / "model", "no such file or directory"),
    (lambda d: d / "missing.gguf", "no such file or directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no config.json"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "not a .gguf model"),
    (lambda d: (d / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage") and d / "bad.gguf",
     "not a GGUF model transformers can read"),
])
def test_bad_sources_are_one_line_errors(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_causal_lm(source)
    assert "\n" not in str(info.value) and str(source) in str(info.value)


def test_directory_holding_a_gguf_names_the_file(tmp_path, tiny_gguf):
    (tmp_path / "m.gguf").write_bytes(tiny_gguf[0].read_bytes())
    with pytest.raises(ModelLoadError, match=r"holds m\.gguf"):
        load_tokenizer(tmp_path)


def test_cli_reports_a_misspelt_model_path_in_one_line(tmp_path):
    """`selfalign run` with a model path that does not exist: exit status 2, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "selfalign", "run", "quickstart", f"model={tmp_path}/polcy.gguf",
                           f"prompts={tmp_path}/p.jsonl", "judge.function=selfalign.tasks.constraints:reward",
                           f"output_dir={tmp_path}/run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "polcy.gguf: no such file or directory" in lines[0], proc.stderr


def test_online_run_from_a_gguf_pi0_saves_plain_iterates(tiny_gguf, tmp_path):
    """The loop accepts a .gguf pi_0: it is converted once to RUN/pi0 and the iterate is a safetensors directory."""
    from transformers import AutoModelForCausalLM

    from selfalign.config import load_config
    from selfalign.data import write_jsonl
    from selfalign.loop import RunConfig, run

    prompts = [{"prompt": [{"role": "user", "content": f"Describe tea number {i}. Answer in fewer than 20 words."}]}
               for i in range(4)]
    write_jsonl(tmp_path / "p.jsonl", prompts)
    cfg = load_config(RunConfig, None, [
        "method=iterative_dpo", f"model={tiny_gguf[0]}", f"prompts={tmp_path}/p.jsonl", f"eval_prompts={tmp_path}/p.jsonl",
        "judge.function=tests.test_models:length_reward", "iterations=1", "prompts_per_iteration=4",
        "generation.num_samples=4", "generation.max_new_tokens=8", "train.batch_size=2", "train.micro_batch_size=2",
        "eval.prompts=2", "eval.samples=1", f"output_dir={tmp_path}/run"])
    history = run(cfg, progress=False)
    assert len(history) == 1 and (tmp_path / "run" / "pi0" / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "iter_000" / "policy")


def length_reward(prompts: list, responses: list[str]) -> list[float]:
    """A reward with many levels, so K = 4 random responses rarely tie."""
    return [float(len(r)) for r in responses]
