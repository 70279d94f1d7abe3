"""Preference data: every row format on the sample files in tests/unit/data/preference, malformed
rows with file:line, PMP score rules, the chat rendering + end token, batches of K responses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmllm.data.conversations import BadRowError
from mmllm.data.preference import PreferenceDataModule
from mmllm.data.preference_formats import (
    anthropic_se_score,
    parse_row,
    read_preference_rows,
    split_hh,
    synthetic_preferences,
)

DATA = Path(__file__).parent / "data" / "preference"


def rows(name, fmt="auto", **options):
    out = []
    for where, row in read_preference_rows(str(DATA / name)):
        try:
            out.append((where, parse_row(row, fmt, **options)))
        except BadRowError as e:
            out.append((where, e))
    return out


def test_pairs_and_malformed_rows_name_file_and_line():
    got = rows("pairs.jsonl")
    assert [type(r).__name__ for _, r in got] == ["Ranked", "Ranked", "BadRowError", "BadRowError", "Ranked"]
    assert got[2][0].endswith("pairs.jsonl:3") and "bad JSON" in str(got[2][1])
    assert got[3][0].endswith("pairs.jsonl:4") and "rejected" in str(got[3][1])
    first, second = got[0][1], got[1][1]
    assert first.prompt == [{"role": "user", "content": "What is the capital of France?"}]
    assert first.responses == ["Paris.", "Berlin."] and first.ranks == [0, 1]
    assert second.prompt[0]["role"] == "system" and second.responses == ["4", "5"]


def test_hh_transcripts_split_into_shared_prompt_and_final_responses():
    got = rows("hh.jsonl")
    multi = got[1][1]
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert multi.prompt[1]["content"] == "Hello! How can I help?"
    assert multi.responses == ["Honey never spoils.", "Go away."]
    assert isinstance(got[2][1], BadRowError) and "share" in str(got[2][1])
    with pytest.raises(BadRowError, match="Assistant"):
        split_hh("\n\nHuman: only a question")


def test_ranked_lists_ranks_ranking_scores_and_order():
    got = [r for _, r in rows("ranked.jsonl")]
    assert got[0].ranks == [0, 1, 2, 3]
    assert got[1].ranks == [1, 0, 2]  # ranking [1, 0, 2]: response 1 is best
    assert got[2].ranks == [0, 0, 1]  # equal scores tie
    assert got[3].ranks == [0, 1, 2]  # no ranks: best first


def test_pmp_stackexchange_and_reddit_scores():
    # Anthropic's rule: round(log2(1 + votes)) (+1 accepted), -1 for negative votes:
    # 15 accepted -> 4 + 1 = 5; 3 -> 2; 2 -> round(1.585) = 2; -2 -> -1.
    assert [anthropic_se_score(15, True), anthropic_se_score(3), anthropic_se_score(2),
            anthropic_se_score(-2)] == [5, 2, 2, -1]
    se = rows("stackexchange.jsonl")
    assert se[0][1].ranks == [0, 1, 1, 2]  # scores 5, 2, 2, -1: the two 2s tie
    assert isinstance(se[1][1], BadRowError)  # 1 vote each: no preference
    raw = rows("stackexchange.jsonl", score_rule="raw")
    assert raw[0][1].ranks == [0, 1, 2, 3]
    capped = rows("stackexchange.jsonl", max_responses=2)
    assert capped[0][1].responses == ["Use lst[::-1] or lst.reverse().", "Sort it."]  # best and worst
    rd = rows("reddit.json")
    assert rd[0][0].endswith("reddit.json:item 0")
    assert rd[0][1].prompt[0]["content"].startswith("What is the best way to learn to cook?\n\nI burn")
    assert rd[0][1].ranks == [0, 1, 2] and isinstance(rd[1][1], BadRowError)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    sources = [{"name": n.split(".")[0], "path": str(DATA / n)} for n in
               ("pairs.jsonl", "hh.jsonl", "ranked.jsonl", "stackexchange.jsonl", "reddit.json")]
    dm = PreferenceDataModule(sources=sources, vocab_size=320, seq_len=96, batch_size=3, labels=True,
                              cache_dir=str(tmp_path_factory.mktemp("pref")), on_bad_row="skip",
                              val_fraction=0.3)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_counts_skipped_rows_and_splits_by_prompt(datamodule):
    s = datamodule.summary()
    assert sum(sum(v.values()) for v in s["skipped"].values()) == 2 + 1 + 1 + 1  # pairs, hh, se, reddit
    assert s["train_prompts"] + s["val_prompts"] == 3 + 2 + 4 + 1 + 1
    assert s["val_prompts"] > 0 and s["responses_per_prompt"] == {2: 5, 3: 4, 4: 2}
    prompts = {json.dumps(ex.prompt): datamodule.is_val(ex) for r in datamodule.examples.values() for ex in r}
    assert len(prompts) == 11  # the split is a function of the prompt


def test_error_policy_names_the_row(tmp_path):
    dm = PreferenceDataModule(sources=[{"name": "p", "path": str(DATA / "pairs.jsonl")}],
                              cache_dir=str(tmp_path), vocab_size=320)
    with pytest.raises(BadRowError, match=r"pairs.jsonl:3: bad JSON"):
        dm.read_sources()


def test_batches_hold_each_prompts_responses_with_end_token_and_labels(datamodule):
    tok = datamodule.tokenizer
    batch = next(iter(datamodule.train_dataloader()))
    N = batch["input_ids"].shape[0]
    assert batch["group"].unique().numel() == 3 and batch["rank"].shape == (N,)
    last = batch["input_ids"][torch.arange(N), batch["lengths"] - 1]
    assert (last == tok.eos_token_id).all()  # the reward head reads the end-of-context token
    assert (batch["attention_mask"].sum(-1) == batch["lengths"]).all()
    # Labels: exactly the final response's tokens and its <|im_end|> (ChatML), never the prompt.
    for n in range(N):
        lab = batch["labels"][n]
        target = tok.decode(lab[lab != -100])
        text = tok.decode(batch["input_ids"][n, :batch["lengths"][n]])
        response = text.rsplit("<|im_start|>assistant\n", 1)[1]
        assert target == response.removesuffix("\n</s>").removesuffix("</s>")
        assert target.endswith("<|im_end|>")


def test_truncation_keeps_the_end(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}) + "\n"
                    + json.dumps({"prompt": "short", "chosen": "a", "rejected": "b"}) + "\n")
    for overlong, kept in (("truncate", 2), ("drop", 1)):
        dm = PreferenceDataModule(sources=[{"name": "l", "path": str(path)}], seq_len=32, vocab_size=300,
                                  cache_dir=str(tmp_path / overlong), overlong=overlong, val_fraction=0.0)
        dm.setup()
        assert dm.summary()["train_prompts"] == kept
        assert dm.summary()["encoding"] == {f"overlong_{overlong}": 1}
        assert all(len(ids) <= 32 and ids[-1] == dm.tokenizer.eos_token_id
                   for enc, _ in dm._train for ids, _ in enc)


def test_synthetic_set_ranks_by_the_learnable_property(tmp_path):
    path = synthetic_preferences(tmp_path / "s.jsonl", num_prompts=20, k=3, seed=1)
    for _, row in read_preference_rows(str(path)):
        ex = parse_row(row)
        counts = [r.split().count("kind") for r in ex.responses]
        assert sorted(counts) == [0, 1, 2]
        assert [2 - c for c in counts] == ex.ranks
    pairs = synthetic_preferences(tmp_path / "p.jsonl", num_prompts=5, k=2)
    row = json.loads(pairs.read_text().splitlines()[0])
    assert row["chosen"].split().count("kind") == 1 and row["rejected"].split().count("kind") == 0
