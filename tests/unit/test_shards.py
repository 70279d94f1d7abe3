"""Packed token shards: on-disk tokens vs the tokenizer, doc offsets, dtype, skips, sources,
atomic writes, and TokenShards windows against hand-computed values."""

from __future__ import annotations

import gzip
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from mmllm.data import TokenShards, tokenize_to_shards, train_bpe_tokenizer
from mmllm.data import shards as shards_mod

WORDS = ("alpha beta gamma delta river stone garden window morning market tower boat apple "
         "green quiet heavy broken winter yellow seven").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(make_docs(300, seed=1), vocab_size=320, show_progress=False)


def write_jsonl(path: Path, records: list, *, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def expected_tokens(tok, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]


def test_tokens_on_disk_equal_tokenizer_output_plus_eos(tmp_path, tok):
    docs = make_docs(30, seed=2)
    records = [{"text": t, "id": i} for i, t in enumerate(docs)]
    # bad records: empty, whitespace only, null, missing field
    records[3:3] = [{"text": "", "id": -1}, {"text": "  \n ", "id": -2}]
    records += [{"text": None, "id": -3}, {"id": -4}]
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    meta = tokenize_to_shards(src, tmp_path / "out", tok)

    per_doc = expected_tokens(tok, docs)
    flat = np.concatenate(per_doc)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320 and meta["eos_id"] == 1
    assert meta["num_docs"] == 30 and meta["num_tokens"] == flat.size
    assert meta["skipped"] == {"missing": 2, "empty": 2}
    assert meta["shards"] == [{"tokens": "tokens_00000.bin", "docs": "docs_00000.npy",
                               "num_tokens": int(flat.size), "num_docs": 30}]
    on_disk = np.fromfile(tmp_path / "out" / "tokens_00000.bin", dtype=np.uint16)
    np.testing.assert_array_equal(on_disk, flat)
    offsets = np.load(tmp_path / "out" / "docs_00000.npy")
    assert offsets.dtype == np.int64
    np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(d) for d in per_doc[:-1]]))
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["docs_00000.npy", "meta.json", "tokens_00000.bin"]  # no leftovers (.tmp, caches)


def test_shards_hold_whole_documents(tmp_path, tok):
    docs = make_docs(40, seed=3)
    meta = tokenize_to_shards(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs]),
                              tmp_path / "out", tok, shard_size_tokens=100)
    per_doc = expected_tokens(tok, docs)
    # hand-computed split: a shard closes after the document that brings it to >= 100 tokens
    want, cur = [], []
    for d in per_doc:
        cur.append(d)
        if sum(map(len, cur)) >= 100:
            want.append(cur)
            cur = []
    want += [cur] if cur else []
    assert [s["num_docs"] for s in meta["shards"]] == [len(w) for w in want]
    for k, docs_k in enumerate(want):
        on_disk = np.fromfile(tmp_path / "out" / f"tokens_{k:05d}.bin", dtype=np.uint16)
        np.testing.assert_array_equal(on_disk, np.concatenate(docs_k))
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"docs_{k:05d}.npy"),
                                      np.cumsum([0] + [len(d) for d in docs_k[:-1]]))
    shards = TokenShards(tmp_path / "out")
    assert shards.num_tokens == sum(map(len, per_doc)) and shards.num_docs == 40
    assert shards.num_samples(9) == sum(sum(map(len, w)) // 10 for w in want)


def test_token_shards_windows_and_doc_ids(tmp_path, tok):
    docs = make_docs(25, seed=4)
    tokenize_to_shards(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs]),
                       tmp_path / "out", tok, shard_size_tokens=150)
    shards = TokenShards(tmp_path / "out")
    seq_len = 12
    i = 0
    for k, info in enumerate(shards.meta["shards"]):
        tokens = np.fromfile(tmp_path / "out" / info["tokens"], dtype=np.uint16).astype(np.int64)
        starts = set(np.load(tmp_path / "out" / info["docs"]).tolist())
        for w in range(info["num_tokens"] // (seq_len + 1)):  # windows never cross shard files
            window = tokens[w * 13:(w + 1) * 13]
            s = shards.sample(i, seq_len)
            assert all(v.dtype == np.int64 and v.shape == (seq_len,) for v in s.values())
            np.testing.assert_array_equal(s["input_ids"], window[:-1])
            np.testing.assert_array_equal(s["labels"], window[1:])
            # doc id: +1 at every document start after the window's first token
            want = np.cumsum([0] + [int(w * 13 + p in starts) for p in range(1, seq_len)])
            np.testing.assert_array_equal(s["doc_ids"], want)
            i += 1
    assert i == shards.num_samples(seq_len)
    with pytest.raises(IndexError):
        shards.sample(i, seq_len)
    # an eos ends its own document: the token after it starts the next doc id
    s = next(s for s in (shards.sample(j, seq_len) for j in range(i)) if s["doc_ids"][-1] > 0)
    eos_pos = int(np.flatnonzero(s["input_ids"] == tok.eos_token_id)[0])
    assert s["doc_ids"][eos_pos] == 0 and s["doc_ids"][eos_pos + 1] == 1
    # workers get a cheap pickle that reopens the memmaps
    blob = pickle.dumps(shards)
    assert len(blob) < 1000
    np.testing.assert_array_equal(pickle.loads(blob).sample(3, seq_len)["input_ids"],
                                  shards.sample(3, seq_len)["input_ids"])


def test_dtype_follows_vocab_size(tmp_path, tok):
    docs = make_docs(5, seed=5)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    assert shards_mod._choose_dtype(65536, None) == np.uint16  # ids 0..65535 fit
    assert shards_mod._choose_dtype(65537, None) == np.uint32
    with pytest.raises(ValueError, match="cannot hold"):
        tokenize_to_shards(src, tmp_path / "u8", tok, dtype="uint8")
    meta = tokenize_to_shards(src, tmp_path / "u32", tok, dtype="uint32")
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "u32" / "tokens_00000.bin").stat().st_size == 4 * meta["num_tokens"]

    wide = train_bpe_tokenizer(make_docs(50, seed=6), vocab_size=300, show_progress=False)
    wide.add_tokens([f"<x{i}>" for i in range(65600)])  # ids past 65535
    meta = tokenize_to_shards(write_jsonl(tmp_path / "w.jsonl", [{"text": "alpha <x65599> beta"}]),
                              tmp_path / "wide", wide)
    assert meta["dtype"] == "uint32"
    on_disk = np.fromfile(tmp_path / "wide" / "tokens_00000.bin", dtype=np.uint32)
    assert wide.convert_tokens_to_ids("<x65599>") in on_disk.tolist() and on_disk.max() > 65535


def test_sources_jsonl_gz_parquet_glob_list_and_save_to_disk(tmp_path, tok):
    import datasets

    docs = make_docs(12, seed=7)
    want = np.concatenate(expected_tokens(tok, docs))
    write_jsonl(tmp_path / "a.jsonl.gz", [{"text": t} for t in docs[:6]], gz=True)
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in docs[6:]], gz=True)
    ds = datasets.Dataset.from_dict({"text": docs})
    ds.to_parquet(str(tmp_path / "all.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    both = datasets.DatasetDict({"train": ds.select(range(2)), "validation": ds})
    both.save_to_disk(str(tmp_path / "dd"))
    sources = {"glob": str(tmp_path / "*.jsonl.gz"),
               "list": [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"],
               "parquet": tmp_path / "all.parquet", "saved": tmp_path / "saved"}
    for name, source in sources.items():
        meta = tokenize_to_shards(source, tmp_path / name, tok)
        got = np.fromfile(tmp_path / name / "tokens_00000.bin", dtype=np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=name)
    meta = tokenize_to_shards(tmp_path / "dd", tmp_path / "dd_out", tok, split="validation")
    assert meta["num_docs"] == 12
    with pytest.raises(ValueError, match="split 'test'"):
        tokenize_to_shards(tmp_path / "dd", tmp_path / "dd_bad", tok, split="test")


def test_num_proc_gives_identical_shards(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(60, seed=8)])
    a = tokenize_to_shards(src, tmp_path / "p1", tok, batch_size=8)
    b = tokenize_to_shards(src, tmp_path / "p2", tok, batch_size=8, num_proc=2)
    assert a["num_tokens"] == b["num_tokens"]
    one, two = (tmp_path / p / "tokens_00000.bin" for p in ("p1", "p2"))
    assert one.read_bytes() == two.read_bytes()


def test_clear_errors(tmp_path, tok, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenize_to_shards(tmp_path / "missing.jsonl", tmp_path / "o1", tok)
    with pytest.raises(FileNotFoundError):
        tokenize_to_shards(str(tmp_path / "*.jsonl"), tmp_path / "o2", tok)  # glob matches nothing
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported"):
        tokenize_to_shards(tmp_path / "notes.txt", tmp_path / "o3", tok)
    src = write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match="column 'text'"):
        tokenize_to_shards(src, tmp_path / "o4", tok)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        tokenize_to_shards("some-org/some-corpus", tmp_path / "o5", tok)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards(tmp_path / "o4")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TokenShards(tmp_path / "never")
    # an existing finished directory is not silently replaced
    src = write_jsonl(tmp_path / "ok.jsonl", [{"text": "alpha beta"}])
    tokenize_to_shards(src, tmp_path / "o6", tok)
    with pytest.raises(FileExistsError):
        tokenize_to_shards(src, tmp_path / "o6", tok)
    assert tokenize_to_shards(src, tmp_path / "o6", tok, overwrite=True)["num_docs"] == 1
    # a token file that disagrees with meta.json is refused
    with open(tmp_path / "o6" / "tokens_00000.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="meta.json says"):
        TokenShards(tmp_path / "o6")


def test_crash_leaves_no_finished_looking_directory(tmp_path, tok, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in make_docs(40, seed=9)])
    out = tmp_path / "out"
    finish = shards_mod._ShardWriter._finish
    calls = []

    def failing_finish(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")  # the second shard fails half way
        finish(self)

    monkeypatch.setattr(shards_mod._ShardWriter, "_finish", failing_finish)
    with pytest.raises(OSError, match="disk full"):
        tokenize_to_shards(src, out, tok, shard_size_tokens=100)
    names = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in names and not [n for n in names if n.endswith(".tmp")]
    assert "tokens_00001.bin" not in names  # the failed shard never got its final name
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenShards(out)
    monkeypatch.setattr(shards_mod._ShardWriter, "_finish", finish)
    meta = tokenize_to_shards(src, out, tok, shard_size_tokens=100)  # a rerun completes
    assert TokenShards(out).num_tokens == meta["num_tokens"] and len(meta["shards"]) > 2
