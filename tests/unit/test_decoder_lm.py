"""DecoderLM against transformers' Llama, hand-computed values and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmllm.models import DecoderLM
from mmllm.models.hf import load_hf_state_dict
from mmllm.nn import MoE, alibi_slopes


def _hf_pair(n_kv_heads: int, tie: bool = False):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie)
    hf = LlamaForCausalLM(cfg).eval()
    ours = DecoderLM(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                     hidden_dim=96, max_seq_len=64, tie_embeddings=tie).eval()
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_match_transformers_llama(n_kv_heads, backend):
    hf, ours = _hf_pair(n_kv_heads)
    for layer in ours.layers:
        layer.attn.backend = backend
    x = torch.randint(0, 96, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_tied_embeddings_match_transformers():
    hf, ours = _hf_pair(2, tie=True)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs).eval()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_kv_cache(2, 16)
        parts = [model(x[:, :5], kv_cache=cache).logits]
        for t in range(5, 12):
            parts.append(model(x[:, t:t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 12


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_documents_equal_separate_runs(tiny_lm_kwargs, position, backend):
    model = DecoderLM(**tiny_lm_kwargs, position=position, attn_backend=backend).eval()
    a, b = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 5))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids).logits
        torch.testing.assert_close(out[:, :7], model(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], model(b).logits, atol=1e-5, rtol=0)
        # Without the document mask the second document sees the first: results differ.
        assert not torch.allclose(model(packed).logits[:, 7:], model(b).logits, atol=1e-3)


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    for heads in (4, 6, 12):
        mask = torch.ones(1, 3)
        bloom = build_alibi_tensor(mask, heads, torch.float32).view(heads, 3)[:, 1]  # slope * 1
        torch.testing.assert_close(alibi_slopes(heads), bloom)


def test_alibi_sdpa_equals_eager(tiny_lm_kwargs):
    torch.manual_seed(1)
    m1 = DecoderLM(**tiny_lm_kwargs, position="alibi").eval()
    m2 = DecoderLM(**tiny_lm_kwargs, position="alibi", attn_backend="eager").eval()
    m2.load_state_dict(m1.state_dict())
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m1(x).logits, m2(x).logits, atol=1e-5, rtol=0)


def test_variants_build_and_count_parameters():
    kw = dict(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=40, max_seq_len=32)
    gelu = DecoderLM(**kw, mlp="gelu", norm="layernorm", position="learned", bias=True)
    # embed + pos + 3 * (2 LN (w+b) + qkvo (w+b) + up/down (w+b)) + final LN + head
    per_layer = 2 * 32 + 4 * (16 * 16 + 16) + (16 * 40 + 40) + (40 * 16 + 16)
    assert gelu.num_params() == 50 * 16 + 32 * 16 + 3 * per_layer + 32 + 50 * 16
    assert torch.isfinite(gelu(torch.randint(0, 50, (1, 8))).logits).all()
    with pytest.raises(ValueError, match="n_heads"):
        DecoderLM(**{**kw, "n_heads": 4}, n_kv_heads=3)
    with pytest.raises(ValueError, match="position"):
        DecoderLM(**kw, position="sinusoid")


def test_depth_scaled_init():
    model = DecoderLM(vocab_size=64, dim=256, n_layers=8, n_heads=4, hidden_dim=512)
    out_std = model.layers[0].attn.o_proj.weight.std().item()
    in_std = model.layers[0].attn.q_proj.weight.std().item()
    assert in_std == pytest.approx(0.02, rel=0.05)
    assert out_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_moe_aux_loss_and_mixing():
    moe = MoE(dim=8, hidden_dim=16, n_experts=4, top_k=2)
    torch.nn.init.zeros_(moe.router.weight)  # a uniform router: the Switch aux loss is exactly 1
    x = torch.randn(2, 5, 8)
    _, aux = moe(x)
    assert aux.item() == pytest.approx(1.0)
    torch.nn.init.normal_(moe.router.weight)
    out, _ = moe(x)
    tok = x[0, 0]
    probs = moe.router(tok).softmax(-1)
    w, idx = probs.topk(2)
    expected = sum(wi / w.sum() * moe.experts.expert_forward(int(i), tok) for wi, i in zip(w, idx))
    torch.testing.assert_close(out[0, 0], expected, atol=1e-5, rtol=0)


def test_moe_model_trains_and_reports_aux(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs, n_experts=4, moe_top_k=2)
    out = model(torch.randint(0, 96, (2, 8)))
    assert out.aux_loss.item() > 0.9  # ~1 per layer near uniform, 2 layers
    out.logits.sum().backward()
    assert model.layers[0].mlp.router.weight.grad is not None


def test_resize_token_embeddings_mean_init(tiny_lm_kwargs):
    model = DecoderLM(**{**tiny_lm_kwargs, "vocab_size": 96}, tie_embeddings=False)
    old_emb, old_head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(100)
    assert model.embed_tokens.weight.shape == (100, 32) and model.lm_head.weight.shape == (100, 32)
    torch.testing.assert_close(model.embed_tokens.weight[:96], old_emb)
    torch.testing.assert_close(model.embed_tokens.weight[96:], old_emb.mean(0).expand(4, -1))
    torch.testing.assert_close(model.lm_head.weight[96:], old_head.mean(0).expand(4, -1))
    assert model(torch.tensor([[99, 3]])).logits.shape == (1, 2, 100)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_resized_model_rebuilds_from_its_recorded_config(tiny_lm_kwargs, tie):
    # What mmllm.checkpoint does: DecoderLM(**model.config) + load_state_dict(strict=True).
    model = DecoderLM(**tiny_lm_kwargs, tie_embeddings=tie).eval()
    model.resize_token_embeddings(103)
    assert model.config["vocab_size"] == 103
    rebuilt = DecoderLM(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.tensor([[102, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, model(x).logits, rtol=0, atol=0)


def test_rope_scaling_linear_interpolates_positions(tiny_lm_kwargs):
    from mmllm.nn import RotaryEmbedding

    plain = RotaryEmbedding(8, base=10000.0)
    linear = RotaryEmbedding(8, base=10000.0, scaling={"type": "linear", "factor": 4.0})
    pos = torch.arange(16)[None]
    torch.testing.assert_close(linear(pos, torch.float32)[0][:, ::4], plain(pos[:, :4], torch.float32)[0])


def test_kv_cache_select_rows_expands_a_shared_prefix(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs).eval()
    prefix, conts = torch.randint(0, 96, (1, 6)), torch.randint(0, 96, (3, 4))
    with torch.no_grad():
        cache = model.new_kv_cache(1, 16)
        model(prefix, kv_cache=cache)
        cache.select_rows(torch.zeros(3, dtype=torch.long))
        got = model(conts, kv_cache=cache).logits
        want = model(torch.cat([prefix.expand(3, -1), conts], 1)).logits[:, 6:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_flash_attn_backend_without_the_package_warns_with_the_fix(monkeypatch):
    import mmllm.nn.attention as attention

    monkeypatch.setattr(attention, "FLASH_ATTN_AVAILABLE", False)
    with pytest.warns(UserWarning, match="pip install flash-attn") as caught:
        attn = attention.Attention(dim=32, n_heads=4, n_kv_heads=2, head_dim=8, backend="flash_attn")
    assert len(caught) == 1 and attn.backend == "flash_attn"  # forward then uses SDPA
