"""The decode loop's progress bar: the rows' token budget, spent as they sample or end early."""

from __future__ import annotations

import pytest
import torch

from mmllm.generation import DecodeProgress, DecodeSession, decode, generate_ids
from mmllm.models import DecoderLM


@pytest.fixture
def model(tiny_lm_kwargs):
    torch.manual_seed(3)
    return DecoderLM(**tiny_lm_kwargs).eval()


def test_budget_is_spent_by_sampling_and_by_rows_that_end_early(model):
    session = DecodeSession(model, max_rows=3, max_len=40)
    rows = session.add_rows([[5, 6, 7], [8, 9], [10]], max_new_tokens=10)
    bar = DecodeProgress(session, rows, progress="test")
    assert bar.total == 30 and bar.spent == 0
    session.step()
    assert bar.spent == 3
    session.finish(rows[1])  # ends after 1 of its 10 tokens: the other 9 count as spent
    bar.update()
    assert bar.spent == 3 + 9 and bar.bar.n == 12
    assert "rows done 1/3" in str(bar.bar)
    session.step()  # the two running rows
    assert bar.spent == 14
    while session.step():
        bar.update()
    bar.close()
    assert bar.spent == bar.total == 30


def test_uncapped_rows_count_the_room_left_in_the_cache(model):
    session = DecodeSession(model, max_rows=2, max_len=20)
    rows = session.add_rows([[5, 6, 7, 8], [9]])
    assert DecodeProgress(session, rows, progress=True).total == (20 - 4) + (20 - 1)


def test_a_row_added_later_counts_only_its_own_tokens(model):
    session = DecodeSession(model, max_rows=2, max_len=40)
    session.add_rows([[5, 6]], max_new_tokens=20)
    for _ in range(3):
        session.step()
    (b,) = session.add_rows([[7, 8]], max_new_tokens=4)
    bar = DecodeProgress(session, [b])
    session.step()
    assert bar.spent == 1 and bar.total == 4
    assert bar.bar is None  # disabled: no tqdm object at all
    session.remove_rows([b])  # a removed row has ended
    assert bar.spent == 4


def test_generate_ids_is_the_same_with_a_bar_and_draws_it(model, capsys):
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12]]
    eos = 17
    plain = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=eos)
    shown = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=eos, progress="my batch")
    assert shown == plain
    err = capsys.readouterr().err
    assert "my batch" in err and "tok" in err
    quiet = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=eos)
    assert quiet == plain and "my batch" not in capsys.readouterr().err


def test_decode_with_on_step_and_a_stop_function(model):
    torch.manual_seed(0)
    prompts = [[5, 6, 7], [8, 9]]
    stop_after = {0: 2, 1: 5}
    got = generate_ids(model, prompts, max_new_tokens=9,
                       stop_fn=lambda i, toks: len(toks) >= stop_after[i], progress=True)
    assert [len(g) for g in got] == [2, 5]
    session = DecodeSession(model, max_rows=2, max_len=30)
    rows = session.add_rows(prompts, max_new_tokens=6)
    steps = []
    decode(session, rows, progress="steps", on_step=lambda new: steps.append(sorted(new)))
    assert steps == [sorted(rows)] * 6

