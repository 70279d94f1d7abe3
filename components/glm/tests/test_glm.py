"""GLM blank infilling: the corruption by hand, parity with the kit's decoder, bidirectional
context, and the measured result (infilling loss against a causal LM of the same size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.glm.blank_infilling import IGNORE_INDEX, blank_infilling_batch, corrupt, sample_spans
from components.glm.module import GLMModule, glm_forward
from mmllm.losses import causal_lm_loss
from mmllm.models import DecoderLM

MASK, START, END = 256, 257, 258
STEPS = 120


def test_spans_cover_the_ratio_and_never_touch():
    rng = np.random.default_rng(0)
    for n in (5, 20, 64, 300):
        for _ in range(50):
            spans = sample_spans(n, rng, mask_ratio=0.15, poisson_lambda=3.0)
            assert sum(e - s for s, e in spans) == max(1, round(0.15 * n))
            assert spans[0][0] >= 0 and spans[-1][1] <= n
            assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # a gap between spans


def test_corruption_by_hand():
    rng = np.random.default_rng(3)
    ids = list(range(10, 30))
    inp, p1, p2, labels, a = corrupt(ids, rng, mask_id=MASK, start_id=START, end_id=END)
    part_a, part_b = inp[:a], inp[a:]
    assert part_a.count(MASK) == part_b.count(START) >= 1 and END not in inp
    # Putting each span back at its [MASK] gives the original sequence.
    spans, i = {}, 0
    while i < len(part_b):
        assert part_b[i] == START
        j = i + 1
        while j < len(part_b) and part_b[j] != START:
            j += 1
        mask_index = p1[a + i]
        assert all(p == mask_index for p in p1[a + i:a + j]) and part_a[mask_index] == MASK
        assert p2[a + i:a + j] == list(range(1, j - i + 1))
        assert labels[a + i:a + j] == [*part_b[i + 1:j], END]  # predicts the span, then [END]
        spans[mask_index] = part_b[i + 1:j]
        i = j
    rebuilt = [t for k, tok in enumerate(part_a) for t in (spans[k] if tok == MASK else [tok])]
    assert rebuilt == ids
    assert p1[:a] == list(range(a)) and p2[:a] == [0] * a and labels[:a] == [IGNORE_INDEX] * a


def test_attention_mask_is_bidirectional_on_a_and_causal_on_b():
    batch = blank_infilling_batch(torch.arange(10, 50).view(2, 20), np.random.default_rng(1),
                                  mask_id=MASK, start_id=START, end_id=END)
    for b in range(2):
        a = int(batch.part_a_len[b])
        n = int((batch.input_ids[b] != 0).sum())
        m = batch.allowed[b]
        assert m[:a, :a].all() and not m[:a, a:].any()  # Part A: all of A, nothing of B
        assert m[a:n, :a].all() and torch.equal(m[a:n, a:n], torch.ones(n - a, n - a).tril().bool())
        assert (batch.labels[b, :a] == IGNORE_INDEX).all()


def _decoder(vocab: int = 259) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


def test_causal_mask_and_plain_positions_equal_the_decoder():
    dec = _decoder().eval()
    ids = torch.randint(0, 256, (2, 24))
    from components.glm.blank_infilling import InfillBatch

    block = torch.nn.Embedding(8, 64)
    torch.nn.init.zeros_(block.weight)
    plain = InfillBatch(input_ids=ids, position_ids=torch.arange(24).expand(2, 24),
                        block_position_ids=torch.zeros_like(ids), labels=ids,
                        allowed=torch.ones(24, 24).tril().bool().expand(2, 24, 24),
                        part_a_len=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(glm_forward(dec, block, plain), dec(ids).logits, atol=1e-5, rtol=1e-5)


def test_part_b_sees_context_to_the_right_of_its_blank():
    dec = _decoder().eval()
    block = torch.nn.Embedding(8, 64)
    batch = blank_infilling_batch(torch.arange(10, 40)[None], np.random.default_rng(2),
                                  mask_id=MASK, start_id=START, end_id=END)
    a = int(batch.part_a_len[0])
    first_mask = int((batch.input_ids[0, :a] == MASK).nonzero()[0])
    changed = batch.input_ids.clone()
    changed[0, a - 1] = 99 if changed[0, a - 1] != 99 else 98  # the last context token
    assert a - 1 > first_mask
    with torch.no_grad():
        before = glm_forward(dec, block, batch)
        after = glm_forward(dec, block, type(batch)(**{**batch.__dict__, "input_ids": changed}))
    span_rows = (batch.position_ids[0] == first_mask) & (torch.arange(batch.input_ids.shape[1]) >= a)
    assert not torch.allclose(before[0, span_rows], after[0, span_rows])


def _byte_sequences(n: int, T: int) -> torch.Tensor:
    from mmllm.curation.sample_data import wikipedia_articles

    text = " ".join(t for _, blocks in wikipedia_articles() for k, t in blocks if k == "p")
    data = np.frombuffer(text.encode("utf-8", "ignore"), dtype=np.uint8).astype(np.int64)
    starts = np.random.default_rng(0).integers(0, len(data) - T, size=n)
    return torch.from_numpy(np.stack([data[s:s + T] for s in starts]))


def _train(module_or_model, forward_loss, batches, steps: int, lr: float = 3e-3):
    params = [p for p in module_or_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for i in range(steps):
        loss = forward_loss(batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
def test_measured_infilling_loss_of_glm_and_of_a_causal_lm_of_the_same_size():
    """The README's result: loss on the held-out masked spans' tokens after the same steps."""
    torch.manual_seed(0)
    data = _byte_sequences(96, 64)
    train, held_out = data[:80].split(16), data[80:]
    glm = GLMModule(model=_decoder())
    glm.configure_model()
    glm.trainer = None
    infill = blank_infilling_batch(held_out, np.random.default_rng(7), mask_id=MASK, start_id=START,
                                   end_id=END)
    span_labels = infill.labels.clone()  # the span tokens only (not [END])
    span_labels[span_labels == END] = IGNORE_INDEX

    def glm_span_loss() -> float:
        with torch.no_grad():
            return float(causal_lm_loss(glm_forward(glm.model, glm.block_embed, infill), span_labels)[0])

    initial = glm_span_loss()
    _train(glm, lambda b: glm.forward_loss({"input_ids": b})[0], train, steps=STEPS)
    causal = _decoder()
    _train(causal, lambda b: causal_lm_loss(causal(b[:, :-1]).logits, b[:, 1:])[0], train, steps=STEPS)
    glm_loss = glm_span_loss()
    with torch.no_grad():
        # Causal LM: the same tokens of the original text from their left context.
        spans = torch.full_like(held_out, IGNORE_INDEX)
        for b, row in enumerate(infill.input_ids.tolist()):
            a = int(infill.part_a_len[b])
            p1, lab = infill.position_ids[b].tolist(), span_labels[b].tolist()
            # Original index of each span token: mask index in A + its offset, shifted by the
            # (n - 1) tokens each earlier span lost to its single [MASK].
            part_a = row[:a]
            orig_start, k = {}, 0
            for i, tok in enumerate(part_a):
                if tok == MASK:
                    orig_start[i] = k
                    k += sum(1 for j in range(a, len(row)) if p1[j] == i and lab[j] != IGNORE_INDEX)
                else:
                    k += 1
            for j in range(a, len(row)):
                if lab[j] != IGNORE_INDEX:
                    o = orig_start[p1[j]] + infill.block_position_ids[b, j].item() - 1
                    assert held_out[b, o] == lab[j]
                    spans[b, o] = lab[j]
        causal_logits = causal(held_out[:, :-1]).logits
        causal_loss = float(causal_lm_loss(causal_logits, spans[:, 1:])[0])
    print(f"span-token loss after {STEPS} steps: GLM {glm_loss:.3f} nats (from {initial:.3f}), "
          f"causal LM {causal_loss:.3f} nats")
    assert glm_loss < initial - 1.5  # GLM learns to fill blanks (ln 259 = 5.56 at the start)
    assert glm_loss < causal_loss + 1.0  # and is in the causal LM's range on the same tokens


@pytest.mark.slow
def test_mmllm_train_module_glm_composes_with_one_override(tmp_path):
    """`mmllm train module=glm` (the search-path plugin finds components/glm/conf), a checkpoint
    that loads as the kit's plain decoder."""
    import subprocess
    import sys

    from mmllm.checkpoint import load_model

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "mmllm", "train", "module=glm", "debug=tiny",
                          "model.lm.vocab_size=515", "model.lm.dim=32", "model.lm.n_layers=1",
                          "trainer.max_steps=6", f"hydra.run.dir={run}",
                          f"paths.data_dir={tmp_path}/data"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/loss" in metrics
    model, _ = load_model(str(run / "checkpoints" / "last.ckpt"))
    assert isinstance(model, DecoderLM) and model.vocab_size == 515
