"""Scalar/value heads and DecoderWithScalarHead: the last real token under left and right padding
and lengths (a padded sequence scores exactly as unpadded), masked values, logits pass-through,
and parallelize() (activation checkpointing, meta init) reaching the wrapped decoder's blocks."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from mmllm.distributed import parallelize
from mmllm.distributed.tensor_parallel import decoder_of
from mmllm.models import DecoderLM, DecoderWithScalarHead
from mmllm.nn import ScalarHead, ValueHead, last_token_index


def test_last_token_index_left_right_and_lengths():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(attention_mask=right).tolist() == [2, 3, 0]
    assert last_token_index(attention_mask=left).tolist() == [3, 3, 3]
    assert last_token_index(lengths=torch.tensor([3, 4, 1]), seq_len=4).tolist() == [2, 3, 0]
    assert last_token_index(seq_len=5, batch_size=2).tolist() == [4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="lengths must be in"):
        last_token_index(lengths=torch.tensor([0, 2]), seq_len=2)


@pytest.fixture
def reward_model(tiny_lm_kwargs) -> DecoderWithScalarHead:
    decoder = DecoderLM(**tiny_lm_kwargs)
    return DecoderWithScalarHead(decoder=decoder, head=partial(ScalarHead, init_std=0.5)).eval()


def _padded(seqs: list[torch.Tensor], side: str, pad_id: int = 0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def test_padded_sequences_score_as_unpadded(reward_model, tiny_lm_kwargs):
    V = tiny_lm_kwargs["vocab_size"]
    seqs = [torch.randint(1, V, (n,)) for n in (5, 9, 2)]
    with torch.no_grad():
        alone = torch.cat([reward_model(s[None]).scores for s in seqs])  # (3,)
        for side in ("left", "right"):
            ids, mask = _padded(seqs, side)
            got = reward_model(ids, attention_mask=mask).scores
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
        ids, _ = _padded(seqs, "right")
        by_len = reward_model(ids, lengths=torch.tensor([5, 9, 2]),
                              attention_mask=None).scores
        # Without a mask the decoder also attends from padding, but causal attention keeps the
        # last real token blind to the padding after it.
        torch.testing.assert_close(by_len, alone, atol=1e-5, rtol=0)
    assert alone.shape == (3,) and alone.dtype == torch.float32
    assert alone.std() > 0  # the scores depend on the sequence


def test_value_head_per_token_and_masked(tiny_lm_kwargs):
    decoder = DecoderLM(**tiny_lm_kwargs)
    model = DecoderWithScalarHead(decoder=decoder, head=ValueHead(dim=decoder.dim),
                                  return_logits=True).eval()
    seqs = [torch.randint(1, 96, (n,)) for n in (4, 7)]
    ids, mask = _padded(seqs, "left")
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = decoder(ids, attention_mask=mask)
        alone = model(seqs[0][None])
    assert out.scores.shape == (2, 7)
    assert (out.scores[0, :3] == 0).all()  # padding has no value
    torch.testing.assert_close(out.scores[0, 3:], alone.scores[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits)  # the policy's logits are the decoder's
    assert model(ids, attention_mask=mask, return_logits=False).logits is None


def test_unknown_pool_is_rejected():
    with pytest.raises(ValueError, match="pool"):
        ScalarHead(dim=8, pool="mean")


def _grads(model, ids, mask):
    model.zero_grad()
    model(ids, attention_mask=mask).scores.square().sum().backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def test_parallelize_checkpoints_the_wrapped_decoder_blocks(reward_model, tiny_lm_kwargs):
    ids, mask = _padded([torch.randint(1, 96, (n,)) for n in (6, 3)], "right")
    reward_model.train()
    expected = _grads(reward_model, ids, mask)
    wrapped = parallelize(copy.deepcopy(reward_model), None, activation_checkpointing="full")
    assert decoder_of(wrapped) is wrapped.decoder
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.decoder.layers)
    got = _grads(wrapped, ids, mask)
    assert got.keys() == expected.keys() and "head.proj.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_meta_wrapper_is_materialised(tiny_lm_kwargs):
    with torch.device("meta"):
        model = DecoderWithScalarHead(decoder=DecoderLM(**tiny_lm_kwargs),
                                      head=ScalarHead(dim=tiny_lm_kwargs["dim"]))
    from mmllm.distributed import materialize

    materialize(model, "cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert model.head.proj.bias.abs().max() == 0
    assert 0.01 < model.decoder.layers[0].attn.q_proj.weight.std() < 0.03


def test_a_model_without_a_decoder_is_rejected():
    with pytest.raises(ValueError, match="cannot find the blocks"):
        decoder_of(torch.nn.Linear(2, 2))
