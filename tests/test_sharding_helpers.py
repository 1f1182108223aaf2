"""In-process pieces of selfalign.distributed: the meta skeleton and replica, lockstep batch counts,
and the log-prob head's fallback for a weight that is sharded when it is read."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from selfalign.distributed import Sharding, lockstep_batches, meta_copy
from selfalign.logprobs import collate, sequence_logprobs, token_logprobs
from tests.conftest import VOCAB, make_model


def test_meta_copy_holds_no_weights_and_a_loaded_replica_equals_the_model():
    model = make_model(0, arch="llama")
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    # Rotary frequencies are a non-persistent buffer: not in a state dict, so copied for real.
    assert all(not b.is_meta for n, b in skeleton.named_buffers() if n not in skeleton.state_dict())
    replica = meta_copy(model)
    replica.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    replica.tie_weights()
    batch = collate([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(replica, batch), sequence_logprobs(model, batch))
    assert next(model.parameters()).data_ptr() != next(replica.parameters()).data_ptr()


def test_lockstep_batches_follow_the_busiest_process_only_when_forwards_are_collective():
    # 9 rows over 2 processes: rank 0 holds 5 (3 batches of 2), rank 1 holds 4 (2 batches).
    assert [lockstep_batches(9, 2, rank, 2, collective=False) for rank in (0, 1)] == [3, 2]
    assert [lockstep_batches(9, 2, rank, 2, collective=True) for rank in (0, 1)] == [3, 3]
    # 1 row over 4 processes: three have nothing, yet join the one collective forward.
    assert [lockstep_batches(1, 8, rank, 4, collective=True) for rank in range(4)] == [1, 1, 1, 1]
    assert [lockstep_batches(1, 8, rank, 4, collective=False) for rank in range(4)] == [1, 0, 0, 0]
    assert Sharding(Accelerator(cpu=True)).lockstep_batches(10, 4) == 3  # one process, unsharded


def test_a_head_weight_that_is_sharded_when_read_goes_through_the_module():
    """A ZeRO-3 partition is marked by ds_id: the custom path would read an empty tensor, so the head is
    called as a module (its hook would gather the weight); the values are the custom path's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    hidden = torch.randn(7, 16)
    targets = torch.randint(0, VOCAB, (7,))
    fast = token_logprobs(hidden, head, targets, chunk_size=3)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    head.weight.ds_id = 0
    slow = token_logprobs(hidden, head, targets, chunk_size=3)
    assert len(calls) == 3  # one module call per chunk of 3 tokens
    torch.testing.assert_close(slow, fast)


def test_models_load_whole_while_a_zero3_config_is_active():
    """Under a ZeRO-3 accelerate config transformers partitions what from_pretrained builds (an H200 smoke
    run died generating from such a model); selfalign's loader switches that off for its loads and back after."""
    from transformers.integrations import deepspeed as hf_ds
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from selfalign.models import whole_weights

    class Zero3Config:  # what accelerate registers (an HfDeepSpeedConfig; building one needs deepspeed installed)
        def is_zero3(self) -> bool:
            return True

    config = Zero3Config()
    hf_ds.set_hf_deepspeed_config(config)
    try:
        assert is_deepspeed_zero3_enabled()
        with whole_weights():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
