"""Dedup: MinHash recall/precision on planted near-duplicates (both signature backends), exact,
substring (window hashing, checked against a suffix array) and URL dedup across dumps."""

from __future__ import annotations

import random

import numpy as np
import pytest
from curation_testdata import TEXTS, near_duplicate

from mmllm.curation.dedup_common import keep_first, mix64
from mmllm.curation.dedup_exact import ExactDedup
from mmllm.curation.dedup_minhash import MinHashDedup, MinHasher, lsh_clusters, normalized_words
from mmllm.curation.dedup_substring import SubstringDedup, duplicated_tokens, tokenize
from mmllm.curation.dedup_url import SeenUrlStore, UrlDedup, normalize_url
from mmllm.curation.sample_data import wikipedia_articles


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    return ["\n\n".join(t for _, t in blocks) for _, blocks in wikipedia_articles()]


@pytest.mark.parametrize("backend", ["rensa", "numpy"])
def test_minhash_recall_and_precision_on_planted_near_duplicates(wiki_texts, backend):
    rng = random.Random(0)
    originals, n_planted = wiki_texts, 48
    n = len(originals)
    planted = [near_duplicate(originals[i], rng, rng.uniform(0.0, 0.04)) for i in range(n_planted)]
    result = MinHashDedup(signature_backend=backend).deduplicate_texts(originals + planted)
    removed = {i for i, r in enumerate(result.reasons) if r}
    # True Jaccard of each planted pair on the same word 5-gram shingles.
    h = MinHasher()
    jac = []
    for i in range(n_planted):
        a, b = (set(h.shingle_hashes(t).tolist()) for t in (originals[i], planted[i]))
        jac.append(len(a & b) / len(a | b))
    near = {n + i for i in range(n_planted) if jac[i] >= 0.8}
    assert len(near) >= 20
    recall = len(removed & near) / len(near)
    precision = len(removed & set(range(n, n + n_planted))) / max(1, len(removed))
    assert recall >= 0.95, recall
    assert precision == 1.0, precision
    # Each caught copy points at its original, which is kept.
    assert all(result.duplicate_of[i] == i - n for i in removed)
    assert not any(result.reasons[:n])


def test_minhash_char_ngrams_also_work(wiki_texts):
    rng = random.Random(1)
    docs = wiki_texts[:30] + [near_duplicate(wiki_texts[i], rng, 0.005) for i in range(10)]
    result = MinHashDedup(char_ngrams=True, ngram_size=24).deduplicate_texts(docs)
    assert {i for i, r in enumerate(result.reasons) if r} == set(range(30, 40))


@pytest.mark.parametrize("backend", ["rensa", "numpy"])
def test_signature_agreement_estimates_jaccard(wiki_texts, backend):
    h = MinHasher(num_perm=256, backend=backend)
    rng = random.Random(2)
    errors = []
    for i in range(20):
        a, b = wiki_texts[i], near_duplicate(wiki_texts[i], rng, 0.1)
        sa, sb = set(h.shingle_hashes(a).tolist()), set(h.shingle_hashes(b).tolist())
        true = len(sa & sb) / len(sa | sb)
        sig = h.signatures([a, b])
        errors.append(abs((sig[0] == sig[1]).mean() - true))
    assert np.mean(errors) < 0.04, np.mean(errors)
    # Deterministic across instances (workers) with the same seed; empty text -> max values.
    again = MinHasher(num_perm=256, backend=backend)
    assert (h.signatures(["x y z", "a b"]) == again.signatures(["x y z", "a b"])).all()
    assert (h.signatures(["a", ""])[1] == np.iinfo(np.uint32).max).all()
    assert (h.signatures(["a", ""])[0] != np.iinfo(np.uint32).max).all()


def test_fast_word_split_equals_regex_normalisation(wiki_texts):
    tricky = ["", "a", "Hello, World!", "x\x1cy z\u00a0w \u2014 \u201cquoted\u201d",
              "d\u00e9j\u00e0-vu", "\u0130stanbul", "_under_score__ x", "\u2026",
              "tab\tand\nnew-line", "\ud800 lone"]
    for text in wiki_texts[:30] + tricky:
        words = [w.decode("utf-8", "surrogatepass") for w in normalized_words(text)]
        assert words == MinHasher.normalize(text).split(), text[:60]


def test_rensa_batch_shingles_equal_per_document_rolling(wiki_texts):
    from rensa import RMinHash

    h = MinHasher(backend="rensa")
    docs = wiki_texts[:5] + ["", "one two", "a b c d e f g"]
    flat, offsets = h._word_shingles_flat(docs)
    for i, text in enumerate(docs):
        tok = np.array(RMinHash.hash_token_sets([normalized_words(text)])[0], dtype=np.uint64)
        n = min(h.ngram_size, tok.size)
        acc = np.zeros(max(tok.size - n + 1, 0) if tok.size else 0, dtype=np.uint64)
        for k in range(n):
            acc += tok[k:k + acc.size] * h._coef[k]
        assert (flat[offsets[i]:offsets[i + 1]] == mix64(acc)).all(), i


def test_lsh_clusters_and_keep_first():
    sig = np.array([[1, 2, 3, 4], [9, 9, 9, 9], [1, 2, 3, 5], [1, 2, 7, 7]], dtype=np.uint32)
    labels, pairs = lsh_clusters(sig, bands=2, rows=2)
    assert labels[0] == labels[2] == labels[3] != labels[1] and pairs == 2
    # With verification, doc 3 agrees with doc 0 on only half of the values.
    labels, _ = lsh_clusters(sig, bands=2, rows=2, jaccard_threshold=0.75)
    assert labels[0] == labels[2] and labels[3] != labels[0]
    dup, rep = keep_first(np.array([5, 3, 5, 5, 3]))
    assert dup.tolist() == [False, False, True, True, True] and rep.tolist() == [0, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="exceeds"):
        lsh_clusters(sig, bands=3, rows=2)


def test_exact_dedup_normalises_whitespace():
    texts = ["a  b\nc", "a b c", "a b c d", " a b c "]
    r = ExactDedup().deduplicate_texts(texts)
    assert r.reasons == [None, "exact_duplicate", None, "exact_duplicate"]
    assert r.cluster_sizes == {3: 1} and r.duplicate_of == {1: 0, 3: 0}
    assert ExactDedup(normalize=False).deduplicate_texts(texts).reasons == [None] * 4


def test_window_dedup_marks_only_later_copies():
    a = np.arange(100, dtype=np.uint64)
    b = np.concatenate([np.arange(500, 520), a[10:70], np.arange(600, 610)]).astype(np.uint64)
    c = np.concatenate([a[:49], np.arange(700, 720)]).astype(np.uint64)  # only 49 shared tokens
    marks = duplicated_tokens([a, b, c], 50)
    assert not marks[0].any()  # first occurrence kept
    assert marks[1].sum() == 60 and marks[1][20:80].all()
    assert not marks[2].any()  # shorter than 50 tokens
    # A span repeated inside one document: the second copy is removed.
    d = np.concatenate([a[:55], np.arange(800, 805), a[:55]]).astype(np.uint64)
    [m] = duplicated_tokens([d], 50)
    assert m.sum() == 55 and m[60:].all()


def suffix_array_reference(token_docs, min_tokens):
    """Lee et al.'s formulation: one suffix array (pydivsufsort) over all documents joined with
    unique separators; suffixes sharing >= min_tokens tokens form a group whose earliest member
    is kept and whose others start a duplicated window."""
    from pydivsufsort import divsufsort, kasai

    lens = np.array([t.size for t in token_docs])
    uniq, inv = np.unique(np.concatenate(token_docs), return_inverse=True)
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    seq = np.empty(int(lens.sum() + lens.size), dtype=np.int64)
    is_tok = np.ones(seq.size, dtype=bool)
    is_tok[starts + lens] = False
    seq[is_tok], seq[~is_tok] = inv, uniq.size + np.arange(lens.size)
    sa = divsufsort(seq).astype(np.int64)
    lcp = kasai(seq, sa).astype(np.int64)
    linked = lcp[:-1] >= min_tokens
    group = np.concatenate([[0], np.cumsum(~linked)])
    first = np.flatnonzero(np.concatenate([[True], ~linked]))
    earliest = np.minimum.reduceat(sa, first)[group]
    covered = np.zeros(seq.size, dtype=bool)
    for p in sa[(np.bincount(group)[group] >= 2) & (sa != earliest)]:
        covered[p:p + min_tokens] = True
    return [covered[s:s + n] for s, n in zip(starts, lens)]


def test_window_dedup_matches_suffix_array_reference():
    rng = np.random.default_rng(0)
    # A small vocabulary makes chance repeats of short spans common; planted copies of 20-90
    # tokens (some overlapping, some inside one document) make long ones.
    docs = [rng.integers(0, 6, size=int(rng.integers(0, 300))).astype(np.uint64) for _ in range(40)]
    for _ in range(30):
        src, dst = rng.integers(0, 40, size=2)
        if docs[src].size > 95:
            s, n = int(rng.integers(0, docs[src].size - 90)), int(rng.integers(20, 90))
            at = int(rng.integers(0, docs[dst].size + 1))
            docs[dst] = np.concatenate([docs[dst][:at], docs[src][s:s + n], docs[dst][at:]])
    for width in (8, 25, 50):
        ours, ref = duplicated_tokens(docs, width), suffix_array_reference(docs, width)
        assert sum(int(r.sum()) for r in ref) > 0
        assert all((o == r).all() for o, r in zip(ours, ref)), width


def test_substring_dedup_cuts_passage_from_later_documents():
    passage = TEXTS["library"]  # ~140 tokens
    docs = [TEXTS["bread"] + "\n\n" + passage, TEXTS["coffee"] + "\n\n" + passage + "\n\nThe end.",
            TEXTS["birds"]]
    r = SubstringDedup().deduplicate_texts(docs)
    assert list(r.edits) == [1]
    # Both copies follow a sentence-final "." token, so the duplicated span starts there.
    assert r.edits[1] == TEXTS["coffee"][:-1] + "\n\nThe end."
    assert r.reasons == [None, None, None]
    short = SubstringDedup(min_words_after=200).deduplicate_texts(docs)
    assert short.reasons[1] == "substring_dedup_too_short"
    assert len(tokenize(passage)[0]) > 100


class TextsView:
    """The corpus view SubstringDedup.run reads: ``_chars`` and texts by position."""

    def __init__(self, docs):
        self.docs = docs

    def column(self, name):
        return [len(t) for t in self.docs]

    def texts(self, idx):
        return [self.docs[i] for i in idx]


def test_substring_dedup_partitioned_and_grouped_equals_in_memory(wiki_texts, tmp_path):
    docs = list(wiki_texts[:12])
    head = lambda t, n: t[:n].rsplit(" ", 1)[0]  # whole words only
    docs[7] = docs[7] + "\n\n" + head(docs[2], 2000)
    docs[11] = head(docs[5], 1500) + "\n\n" + docs[11]
    tail = docs[7][-1500:].split(" ", 1)[1]
    docs[9] = docs[9] + "\n\n" + tail + "\n\n" + head(docs[9], 800)  # a copy of a copy, and itself
    single = SubstringDedup().run(TextsView(docs), {"work_dir": str(tmp_path)})
    assert set(single.edits) == {7, 9, 11}
    # Many text groups, many partitions, and partitions split again on the find pass.
    small = SubstringDedup(max_chars_per_shard=15_000, max_windows_per_partition=500)
    assert small.run(TextsView(docs), {"work_dir": str(tmp_path)}).edits == single.edits
    assert list(tmp_path.iterdir()) == []  # scratch files are removed
    # Exactly the planted copies go; unique text is untouched (up to whitespace).
    for i, new in single.edits.items():
        assert new.split() == wiki_texts[i].split(), i
    tokens = [tokenize(t)[0] for t in docs]
    marks = duplicated_tokens(tokens, 50)
    assert sum(int(m.sum()) for m in marks) > 0 and not any(m.any() for m in marks[:7])


def test_url_normalisation():
    assert normalize_url("HTTPS://Example.COM:443/a/b/#frag") == "https://example.com/a/b"
    assert normalize_url("http://example.com:8080/") == "http://example.com:8080"
    assert normalize_url("https://x.org/p?q=1") == "https://x.org/p?q=1"


def test_url_dedup_across_dumps(tmp_path):
    store_path = tmp_path / "seen.sqlite"
    step = UrlDedup()
    dump_a = ["https://a.example/1", "https://a.example/2", "https://a.example/1/", None]
    store = SeenUrlStore(store_path)
    r = step.find_duplicates(dump_a, store, "CC-2024-10")
    assert r.reasons == [None, None, "duplicate_url", None] and r.duplicate_of == {2: 0}
    dump_b = ["https://a.example/2", "https://b.example/3"]
    r = step.find_duplicates(dump_b, store, "CC-2024-18")
    assert r.reasons == ["url_seen_in_earlier_dump", None]
    store.close()
    # Persistent on disk; rerunning an earlier dump does not count its own URLs against it.
    store = SeenUrlStore(store_path)
    assert len(store) == 3
    assert step.find_duplicates(dump_a, store, "CC-2024-10").reasons == \
        [None, None, "duplicate_url", None]
    store.close()
