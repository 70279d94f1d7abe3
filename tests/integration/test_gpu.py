"""CUDA paths (marker gpu: skipped where CUDA is absent, run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from mmllm.models import DecoderLM

pytestmark = pytest.mark.gpu


def test_bf16_sdpa_matches_fp32_eager_on_cuda(tiny_lm_kwargs):
    ref = DecoderLM(**tiny_lm_kwargs, attn_backend="eager").cuda().eval()
    fast = DecoderLM(**tiny_lm_kwargs, attn_backend="sdpa").cuda().eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randint(0, 96, (4, 64), device="cuda")
    doc_ids = torch.arange(64, device="cuda").div(20, rounding_mode="floor").expand(4, 64)
    with torch.no_grad():
        want = ref(x, doc_ids=doc_ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x, doc_ids=doc_ids).logits.float()
    assert (got - want).abs().max().item() < 5e-2


def test_flash_attn_backend_matches_sdpa_with_packed_documents(tiny_lm_kwargs):
    pytest.importorskip("flash_attn", reason="flash-attn not installed on this GPU machine")
    sdpa = DecoderLM(**tiny_lm_kwargs).cuda().to(torch.bfloat16).eval()
    flash = DecoderLM(**tiny_lm_kwargs, attn_backend="flash_attn").cuda().to(torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 96, (2, 48), device="cuda")
    doc_ids = (torch.arange(48, device="cuda") >= 30).long().expand(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(flash(x, doc_ids=doc_ids).logits, sdpa(x, doc_ids=doc_ids).logits,
                                   atol=3e-2, rtol=0)


def test_bf16_mixed_training_reduces_loss_on_cuda(tiny_lm_kwargs):
    from mmllm.losses import causal_lm_loss

    model = DecoderLM(**tiny_lm_kwargs).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 96, (8, 33), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(model(x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
