"""Fused linear + cross-entropy: the chunked fallback equals the plain loss with -100 masks
(values and gradients, any chunk size, empty masks), the module's fused_loss option picks the
right path and trains identically, and (GPU) liger-kernel's kernel agrees with the plain loss."""

from __future__ import annotations

import pytest
import torch

from mmllm.losses import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy_loss
from mmllm.models import DecoderLM
from mmllm.modules import CausalLMModule


def _problem(B=3, T=7, C=16, V=50, masked=0.3, bias=False, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.3).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < masked] = IGNORE_INDEX
    return hidden, weight, b, labels.to(device)


def _plain(hidden, weight, bias, labels, reduction="mean"):
    return causal_lm_loss(torch.nn.functional.linear(hidden, weight, bias), labels,
                          reduction=reduction)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_matches_plain_loss_and_grads(chunk, bias):
    hidden, weight, b, labels = _problem(bias=bias)
    ref, n_ref = _plain(hidden, weight, b, labels)
    got, n = linear_cross_entropy_loss(hidden, weight, labels, bias=b, impl="chunked",
                                       chunk_size=chunk)
    assert n == n_ref and 0 < n < labels.numel()  # some positions are masked
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for g, r in zip(_grads(got, hidden, weight, b), _grads(ref, hidden, weight, b), strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_sum_reduction_and_fully_masked_batch():
    hidden, weight, _, labels = _problem()
    ref, _ = _plain(hidden, weight, None, labels, reduction="sum")
    got, _ = linear_cross_entropy_loss(hidden, weight, labels, impl="chunked", reduction="sum",
                                       chunk_size=4)
    torch.testing.assert_close(got, ref)
    none = torch.full_like(labels, IGNORE_INDEX)
    loss, n = linear_cross_entropy_loss(hidden, weight, none, impl="chunked")
    assert n == 0 and loss.item() == 0.0  # 0, not NaN, like causal_lm_loss
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy_loss(hidden, weight, labels, impl="triton")


def _module(tiny_lm_kwargs, fused):
    torch.manual_seed(0)
    return CausalLMModule(model=DecoderLM(**tiny_lm_kwargs), fused_loss=fused)


def test_module_option_selects_the_path_on_cpu(tiny_lm_kwargs):
    assert _module(tiny_lm_kwargs, "auto").fused_loss_impl() is None  # no CUDA: plain loss
    assert _module(tiny_lm_kwargs, False).fused_loss_impl() is None
    assert _module(tiny_lm_kwargs, True).fused_loss_impl() == "chunked"
    with pytest.raises(ValueError, match="fused_loss must be"):
        _module(tiny_lm_kwargs, "yes")


def test_module_fused_loss_equals_plain_loss_and_gradients(tiny_lm_kwargs):
    batch = {"input_ids": torch.randint(0, 96, (2, 12)), "labels": torch.randint(0, 96, (2, 12))}
    batch["labels"][0, :5] = IGNORE_INDEX  # a masked prompt
    results = []
    for fused in (False, True):
        module = _module(tiny_lm_kwargs, fused)
        loss, lm_loss, n = module.forward_loss(batch)
        loss.backward()
        results.append((lm_loss.detach(), n, {k: p.grad for k, p in module.named_parameters()}))
    (ref, n_ref, g_ref), (got, n, g) = results
    assert n == n_ref == 19
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_kernel_matches_plain_loss_on_cuda(dtype):
    pytest.importorskip("liger_kernel")
    hidden, weight, _, labels = _problem(B=4, T=64, C=128, V=1000, device="cuda", dtype=dtype)
    ref, n_ref = _plain(hidden, weight, None, labels)
    got, n = linear_cross_entropy_loss(hidden, weight, labels, impl="liger")
    assert n == n_ref
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    for g, r in zip(_grads(got, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_module_auto_uses_liger_on_cuda_under_bf16_autocast(tiny_lm_kwargs):
    pytest.importorskip("liger_kernel")
    batch = {"input_ids": torch.randint(0, 96, (2, 32), device="cuda"),
             "labels": torch.randint(0, 96, (2, 32), device="cuda")}
    batch["labels"][:, :8] = IGNORE_INDEX
    losses = {}
    for fused in ("auto", False):
        module = _module(tiny_lm_kwargs, fused).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[fused] = module.forward_loss(batch)[1].item()
        if fused == "auto":
            assert module.fused_loss_impl() == "liger"
    assert losses["auto"] == pytest.approx(losses[False], abs=2e-2)
