"""Generation: each response belongs to its own prompt, K samples per prompt, EOS and padding handled."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from selfalign.config import ConfigError, load_config
from selfalign.generation import GenerationConfig
from selfalign.generation.hf import HFGenerator
from tests.conftest import make_model

EOS, PAD = 3, 0
PROMPTS = [[6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [16, 17], [18, 19, 20, 21, 22, 23, 24, 25], [26, 27, 28]]


def test_batched_greedy_equals_one_prompt_at_a_time():
    """Left padding, in-place repetition and slicing keep every response with its prompt: the
    batched greedy response for prompt i equals the response generated for prompt i alone
    (distinct prompts give distinct responses, so any mix-up would show)."""
    gen = HFGenerator(make_model(), PAD, EOS)
    config = GenerationConfig(num_samples=2, temperature=0.0, max_new_tokens=8, batch_size=4)
    batched = gen.generate(PROMPTS, config)
    alone = [gen.generate([p], config)[0] for p in PROMPTS]
    assert batched == alone
    assert len({tuple(r[0]) for r in batched}) > 1  # the check above can tell prompts apart
    assert all(r[0] == r[1] for r in batched)  # greedy: the K copies agree


def test_samples_per_prompt_and_eos_trimming():
    gen = HFGenerator(make_model(), PAD, EOS)
    config = GenerationConfig(num_samples=3, temperature=1.0, max_new_tokens=6, batch_size=2)
    out = gen.generate(PROMPTS, config, seed=1)
    assert len(out) == len(PROMPTS) and all(len(r) == 3 for r in out)
    for responses in out:
        for r in responses:
            assert 1 <= len(r) <= 6
            assert EOS not in r[:-1] and PAD not in r
    assert out == gen.generate(PROMPTS, config, seed=1)  # seeded
    assert out != gen.generate(PROMPTS, config, seed=2)


def test_sampled_batches_keep_prompt_order():
    """A 1-sample generation over prompts in reverse order yields the reversed list of
    responses under greedy decoding (order is preserved through batching)."""
    gen = HFGenerator(make_model(seed=3), PAD, EOS)
    config = GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=5, batch_size=3)
    assert gen.generate(PROMPTS[::-1], config) == gen.generate(PROMPTS, config)[::-1]


def test_samples_are_keyed_per_prompt_not_per_batch():
    """A prompt's samples depend on (seed, its key) only: alone, in another batch or batch size, or among other
    prompts they are the same; another key or seed gives others. This is what makes 1 and N processes agree."""
    gen = HFGenerator(make_model(seed=5), PAD, EOS)
    config = GenerationConfig(num_samples=3, temperature=1.0, max_new_tokens=8, batch_size=4)
    whole = gen.generate(PROMPTS, config, seed=7)
    odd = gen.generate(PROMPTS[1::2], dataclasses.replace(config, batch_size=2), seed=7, keys=[1, 3, 5])
    assert odd == whole[1::2]
    assert gen.generate([PROMPTS[4]], config, seed=7, keys=[4]) == [whole[4]]
    assert gen.generate([PROMPTS[4]], config, seed=7, keys=[0]) != [whole[4]]
    assert gen.generate(PROMPTS, config, seed=8) != whole
    assert all(len({tuple(r) for r in rs}) > 1 for rs in whole[:3])  # the K samples of a prompt differ
    with pytest.raises(ValueError, match="2 keys for 6 prompts"):
        gen.generate(PROMPTS, config, keys=[0, 1])


def test_splitmix64_matches_its_reference_sequence():
    """The keyed uniforms are SplitMix64 (Steele, Lea and Flood 2014): seeded with 1234567, its first outputs are
    the published 6457827717110365317, 3203168211198807973, 9817491932198370423."""
    import torch

    from selfalign.generation.sampling import shift_right, uniforms

    keys = torch.tensor([1234567], dtype=torch.int64)
    for step, expected in enumerate([6457827717110365317, 3203168211198807973, 9817491932198370423]):
        u = uniforms(keys, step).item()
        assert u == ((expected >> 11) + 0.5) / 2**53
    assert shift_right(torch.tensor([-1]), 60).item() == 15  # a logical shift: no sign bits shifted in


def test_keyed_sampler_draws_from_the_warped_distribution():
    """Over 20,000 keyed rows the drawn tokens' frequencies are the softmax of logits / T, within sampling error
    (3 standard errors, fixed keys); top-k and top-p leave only the tokens they keep."""
    import torch

    from selfalign.generation.sampling import KeyedSampler, row_keys

    n = 20000
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, float("-inf")])
    empty = torch.zeros(n, 0, dtype=torch.long)

    def frequencies(temperature, top_k=None, top_p=None):
        sampler = KeyedSampler(row_keys(11, list(range(n)), 1), 0, temperature, top_k, top_p)
        scores = sampler(empty, logits.expand(n, 5).clone())
        assert (torch.isfinite(scores).sum(1) == 1).all()  # greedy decoding takes the one drawn token
        return torch.bincount(scores.argmax(1), minlength=5).double() / n

    for temperature in (1.0, 0.5):
        p = torch.softmax(logits.double() / temperature, 0)
        assert (frequencies(temperature) - p).abs().max() < 3 * (0.25 / n) ** 0.5
    top2 = frequencies(1.0, top_k=2)  # tokens 3 and 0: e^2 / (e^2 + e)
    assert top2[[1, 2, 4]].sum() == 0 and abs(top2[3] - 1 / (1 + math.exp(-1))) < 0.011
    # top_p 0.6 keeps the smallest set whose mass reaches 0.6: token 3 (0.64) alone.
    assert frequencies(1.0, top_p=0.6)[3] == 1.0


def test_generation_config_validation():
    with pytest.raises(ConfigError, match="generation.top_p: must be in"):
        load_config(GenerationConfig, None, ["top_p=0"])
    with pytest.raises(ValueError, match="at least one token"):
        HFGenerator(make_model(), PAD, EOS).generate([[]], GenerationConfig())


# ---------------------------------------------------------------------------------- stop ids
IM_END, EXTRA_STOP = 5, 40  # the ChatML turn end below; an id a model's generation_config may list


def chatml_tokenizer():
    """A ChatML-style tokenizer whose EOS (<|endoftext|>, 3) is not its turn end (<|im_end|>, 5),
    like Qwen2-base, Phi 3 or Llama 3 base tokenizers with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words += [f"w{i}" for i in range(64 - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return fast


def test_stop_token_ids_collect_eos_generation_config_and_turn_end():
    from transformers import GenerationConfig as HFGenerationConfig

    from selfalign.tasks.tiny import build_tokenizer
    from selfalign.tokens import stop_token_ids, turn_end_id

    tok = chatml_tokenizer()
    assert turn_end_id(tok) == IM_END
    assert stop_token_ids(tok) == [EOS, IM_END]
    assert stop_token_ids(tok, HFGenerationConfig(eos_token_id=[EOS, EXTRA_STOP])) == [EOS, IM_END, EXTRA_STOP]
    assert stop_token_ids(tok, HFGenerationConfig(eos_token_id=EXTRA_STOP)) == [EOS, IM_END, EXTRA_STOP]
    # The built-in task's template closes a turn with <eos> itself: one stop id.
    assert stop_token_ids(build_tokenizer(["a", "b"])) == [EOS]


def test_loop_generation_stops_at_every_stop_id():
    """The loop's generation ends a response at the turn end (<|im_end|>) and at every id of the model's
    generation_config.eos_token_id, not only at the tokenizer's EOS. Before the fix it passed only
    tokenizer.eos_token_id to generate(), and sampled responses ran on past <|im_end|> (checked below
    with exactly that call, so the test can tell the two apart)."""
    from accelerate import Accelerator

    from selfalign.loop import generate_sharded

    tok = chatml_tokenizer()
    model = make_model(seed=5, arch="llama")
    model.generation_config.eos_token_id = [EOS, EXTRA_STOP]
    config = GenerationConfig(num_samples=4, temperature=1.0, max_new_tokens=24, batch_size=8)
    stops = {EOS, IM_END, EXTRA_STOP}
    old = HFGenerator(model, PAD, tok.eos_token_id).generate(PROMPTS, config, seed=3)
    assert any(t in stops - {EOS} for rs in old for r in rs for t in r[:-1])  # the old call ran past them

    run = SimpleNamespace(accelerator=Accelerator(cpu=True), tokenizer=tok, show=False, backend=None)
    out = generate_sharded(run, model, PROMPTS, config, 3)
    ended = [r[-1] for rs in out for r in rs if r[-1] in stops]
    assert all(t not in stops for rs in out for r in rs for t in r[:-1])
    assert IM_END in ended and EXTRA_STOP in ended  # both new stop ids did end responses


def test_top_k_is_explicit():
    """top_k=1 sampling keeps only the most likely token: it equals greedy decoding at any temperature.
    The default (50) is what generate() applied implicitly before the option existed."""
    gen = HFGenerator(make_model(seed=2), PAD, EOS)
    greedy = gen.generate(PROMPTS, GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=8))
    top1 = gen.generate(PROMPTS, GenerationConfig(num_samples=1, temperature=1.5, top_k=1, max_new_tokens=8), seed=4)
    assert top1 == greedy
    assert GenerationConfig().top_k == 50
    with pytest.raises(ConfigError, match="generation.top_k: must be >= 0"):
        load_config(GenerationConfig, None, ["top_k=-1"])


def test_preference_responses_end_with_the_turn_end(tmp_path):
    """A preference file's responses end with what the policy emits to stop: the chat template's turn
    end after a conversational prompt (not the tokenizer's EOS), EOS after a plain-text prompt."""
    import json

    from selfalign.data import PreferenceDataConfig, load_preferences

    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "w1 w2"}], "chosen": "w3", "rejected": "w4 w5"},
            {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat, text = load_preferences(PreferenceDataConfig(path=str(path)), chatml_tokenizer())
    assert chat.chosen_ids[-1] == IM_END and chat.rejected_ids[-1] == IM_END
    assert text.chosen_ids[-1] == EOS and text.rejected_ids[-1] == EOS


def test_vllm_backend_without_vllm_is_a_one_line_error(builtin_task, tmp_path, capsys, monkeypatch):
    """generation.backend=vllm where vllm is not installed: exit status 2, one line saying what to install."""
    import selfalign.generation.vllm as vllm_backend
    from selfalign.cli import main

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    code = main(["run", "quickstart", "generation.backend=vllm", "iterations=1", f"output_dir={tmp_path / 'run'}",
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "generation.backend: 'vllm' needs the vllm package" in err and "generation.backend=hf" in err
