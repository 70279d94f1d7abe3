"""CausalLMModule's loss normalisation: per supervised token over every micro-batch of an optimizer
step (gradient accumulation), and packed batches' doc_ids / position_ids reaching the model."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmllm.data.packing import collate_packed
from mmllm.losses import IGNORE_INDEX, causal_lm_loss
from mmllm.models import DecoderLM
from mmllm.modules import CausalLMModule

MODEL = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=32,
             max_seq_len=32, tie_embeddings=True)
SUPERVISED = (2, 9, 25, 5)  # supervised tokens of the 4 micro-batches (of 2 x 16 each): unequal


def _micro_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in SUPERVISED:
        ids = torch.randint(1, 64, (2, 16), generator=g)
        labels = torch.full((2, 16), IGNORE_INDEX)
        labels.view(-1)[torch.randperm(32, generator=g)[:n]] = torch.randint(1, 64, (n,), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class GradCapture(L.Callback):
    """The gradients the optimizer would step with (after accumulation and normalisation)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                           if p.grad is not None})


@pytest.fixture(scope="module")
def init_state():
    torch.manual_seed(0)
    return DecoderLM(**MODEL).state_dict()


def _model(state) -> DecoderLM:
    model = DecoderLM(**MODEL)
    model.load_state_dict(state)
    return model


def _fit_grads(state, batches, *, accumulate: int, **module_kw) -> dict[str, torch.Tensor]:
    module = CausalLMModule(model=_model(state), optimizer=partial(torch.optim.SGD, lr=0.0),
                            fused_loss=False, **module_kw)
    cap = GradCapture()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[cap])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert len(cap.grads) == 1
    return cap.grads[0]


def _reference_grads(state, batch) -> dict[str, torch.Tensor]:
    """Gradients of sum(token losses) / N on one batch, by hand."""
    model = _model(state)
    loss, n = causal_lm_loss(model(batch["input_ids"]).logits, batch["labels"])
    assert int(n) == sum(SUPERVISED)
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulated_micro_batches_match_one_big_batch(init_state):
    batches = _micro_batches()
    ref = _reference_grads(init_state, _cat(batches))
    accumulated = _fit_grads(init_state, batches, accumulate=4)
    assert _max_diff(accumulated, ref) < 1e-5
    one_batch = _fit_grads(init_state, [_cat(batches)], accumulate=1)
    assert _max_diff(one_batch, ref) < 1e-5
    # The per-micro-batch mean weighs the 2 tokens of the first batch like the 25 of the third:
    # visibly different gradients (what this normalisation fixes).
    per_batch = _fit_grads(init_state, batches, accumulate=4, loss_normalization="micro_batch")
    assert _max_diff(per_batch, ref) > 1e-3


def test_equal_counts_give_the_per_batch_mean(init_state):
    """Pretraining (every position supervised): both normalisations agree."""
    batches = _micro_batches()
    for b in batches:
        b["labels"] = torch.roll(b["input_ids"], -1, dims=1)
    step = _fit_grads(init_state, batches, accumulate=4)
    per_batch = _fit_grads(init_state, batches, accumulate=4, loss_normalization="micro_batch")
    assert _max_diff(step, per_batch) < 1e-6


def test_token_normalized_loss_value_is_the_micro_batch_mean(init_state):
    """What Lightning and callbacks see as the loss stays the per-token mean of the micro-batch."""
    module = CausalLMModule(model=_model(init_state), fused_loss=False)
    batch = _micro_batches()[1]
    _, lm_mean, n = module.forward_loss(batch)
    mean, n2 = causal_lm_loss(module.model(batch["input_ids"]).logits, batch["labels"])
    module._step_tokens = torch.zeros((), dtype=torch.float64)
    module._step_loss_sum = torch.zeros((), dtype=torch.float64)
    module._grad_divisor = 32.0
    loss, logged = module._token_normalized(lm_mean, lm_mean, n)
    torch.testing.assert_close(loss, mean)
    torch.testing.assert_close(logged, mean)
    assert int(n) == int(n2) == SUPERVISED[1] and float(module._step_tokens) == SUPERVISED[1]


def test_packed_batches_pass_doc_ids_and_position_ids(init_state):
    """Two examples packed into one row compute the losses of the two run separately."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 64, (7,), generator=g), torch.randint(1, 64, (5,), generator=g)
    la, lb = torch.roll(a, -1), torch.roll(b, -1)
    la[-1] = lb[-1] = IGNORE_INDEX
    packed = collate_packed([[(a.numpy(), la.numpy()), (b.numpy(), lb.numpy())]], pad_id=0)
    module = CausalLMModule(model=_model(init_state), fused_loss=False)
    seen = {}
    forward = module.model.forward

    def spy(input_ids, **kw):
        seen.update(kw)
        return forward(input_ids, **kw)

    module.model.forward = spy
    _, mean, n = module.forward_loss(packed)
    total = mean * n
    assert torch.equal(seen["position_ids"], packed["position_ids"])
    assert torch.equal(seen["doc_ids"], packed["doc_ids"])
    sep = sum(causal_lm_loss(forward(x[None]).logits, y[None], reduction="sum")[0]
              for x, y in ((a, la), (b, lb)))
    assert int(n) == 10
    torch.testing.assert_close(total, sep, atol=1e-5, rtol=1e-5)
    # Without the packing metadata the second example would attend to the first: a different loss.
    plain = causal_lm_loss(forward(packed["input_ids"]).logits, packed["labels"], reduction="sum")[0]
    assert abs(float(plain.detach() - sep.detach())) > 1e-3


def test_bad_normalization_is_rejected(init_state):
    with pytest.raises(ValueError, match="loss_normalization"):
        CausalLMModule(model=_model(init_state), loss_normalization="tokens")


def test_moe_aux_loss_is_token_weighted(init_state):
    """The aux term joins the backward loss weighted by the micro-batch's tokens (no crash, finite)."""
    torch.manual_seed(0)
    moe = dict(MODEL, n_experts=2, moe_top_k=1)
    state = DecoderLM(**moe).state_dict()

    def build():
        m = DecoderLM(**moe)
        m.load_state_dict(state)
        return m

    module = CausalLMModule(model=build(), optimizer=partial(torch.optim.SGD, lr=0.0), fused_loss=False)
    cap = GradCapture()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[cap])
    trainer.fit(module, DataLoader(_micro_batches()[:2], batch_size=None))
    router = [g for n, g in cap.grads[0].items() if "router" in n]
    assert router and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in router)


class _RankBatches(L.LightningDataModule):
    """Rank r reads micro-batches r, r + 2, ... of ``_micro_batches`` (unequal supervised counts)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.batches[rank::world], batch_size=None)


class _SaveGrads(GradCapture):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if trainer.is_global_zero:
            torch.save(self.grads[-1], self.path)


@pytest.mark.distributed
def test_two_data_parallel_ranks_normalise_by_their_total_count(init_state, tmp_path):
    """DDP, 2 gloo processes x 2 accumulated micro-batches: the gradients of the 4 together."""
    batches = _micro_batches()
    ref = _reference_grads(init_state, _cat(batches))
    module = CausalLMModule(model=_model(init_state), optimizer=partial(torch.optim.SGD, lr=0.0),
                            fused_loss=False)
    out = tmp_path / "grads.pt"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1,
                        accumulate_grad_batches=2, use_distributed_sampler=False, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[_SaveGrads(out)])
    trainer.fit(module, datamodule=_RankBatches(batches))
    assert _max_diff(torch.load(out), ref) < 1e-5
