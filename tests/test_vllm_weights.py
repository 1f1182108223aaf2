"""The weight hand-over to a vLLM engine, checked without vLLM: merged LoRA weights and padded heads."""

from __future__ import annotations

import copy

import torch

from selfalign.generation.vllm import HeadPadding, full_state_dict
from selfalign.tasks.tiny import build_model
from selfalign.train import LoraSettings, apply_lora


def test_lora_weights_are_merged_without_touching_the_model():
    """full_state_dict of a LoRA model equals merge_and_unload()'s weights under the base names, and the
    trained model keeps its adapters and its exact base weights."""
    model = apply_lora(build_model(64, hidden_size=32, seed=1), LoraSettings(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapters do something
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dict(full_state_dict(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert got.keys() == merged.keys()
    assert all(torch.allclose(got[k], merged[k], atol=1e-6) for k in merged)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_padded_heads_compute_the_same_function():
    """A Llama with 16-dim heads and the same model with each head zero-padded to 32 dims (HeadPadding,
    config.head_dim=32) give the same logits: rotary pairs keep their frequencies, the softmax scale is
    compensated. Without the q scaling (or with the rotary dims left in place) they differ."""
    model = build_model(64, hidden_size=64, num_heads=4, num_kv_heads=2, seed=2)
    assert model.config.hidden_size // model.config.num_attention_heads == 16
    config = copy.deepcopy(model.config)
    config.head_dim = 32
    padded = type(model)(config).eval()
    pad = HeadPadding(16, 32)
    padded.load_state_dict({k: pad.tensor(k, v) for k, v in model.state_dict().items()})
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(ids).logits, padded(ids).logits
    assert (a - b).abs().max() < 1e-4

    naive = type(model)(config).eval()  # the same zeros, dims in place, no scale: not the same function
    state = {}
    for k, v in model.state_dict().items():
        if ".q_proj." in k or ".k_proj." in k or ".v_proj." in k:
            w = v.reshape(-1, 16, v.shape[-1])
            v = torch.cat([w, torch.zeros_like(w)], 1).reshape(-1, v.shape[-1])
        elif ".o_proj." in k:
            w = v.reshape(v.shape[0], -1, 16)
            v = torch.cat([w, torch.zeros_like(w)], 2).reshape(v.shape[0], -1)
        state[k] = v
    naive.load_state_dict(state)
    with torch.no_grad():
        assert (a - naive(ids).logits).abs().max() > 1e-3
