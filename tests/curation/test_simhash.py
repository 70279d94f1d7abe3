"""SimHash dedup: hand-computed fingerprints, table lookup vs brute force, planted
near-duplicates (recall and precision), and the step inside the config."""

from __future__ import annotations

import random
from itertools import combinations

import numpy as np
import pytest
from curation_testdata import near_duplicate

from mmllm.curation.dedup_minhash import MinHasher
from mmllm.curation.dedup_simhash import (
    SimHashDedup,
    SimHasher,
    feature_bits,
    hamming,
    simhash_clusters,
    simhash_from_features,
)
from mmllm.curation.sample_data import wikipedia_articles


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    return ["\n\n".join(t for _, t in blocks) for _, blocks in wikipedia_articles()]


def test_hand_computed_simhash():
    h = np.array([0b1100, 0b1010, 0b0001], dtype=np.uint64)
    # Equal weights. bit0: -1-1+1 < 0; bit1: -1+1-1 < 0; bit2: +1-1-1 < 0; bit3: +1+1-1 > 0;
    # bits 4..63: -3.
    assert simhash_from_features(h, np.ones(3)) == 0b1000
    # The third feature outweighs the others: bit0: -1-1+3 > 0, bit3: +1+1-3 < 0.
    assert simhash_from_features(h, np.array([1.0, 1.0, 3.0])) == 0b0001
    # Bit 63 (most significant) is reached; a tie (vote 0) leaves a bit clear.
    top = np.array([1 << 63, (1 << 63) | 1], dtype=np.uint64)
    assert simhash_from_features(top, np.ones(2)) == 1 << 63
    assert feature_bits(np.array([1 << 63 | 5], dtype=np.uint64))[0].nonzero()[0].tolist() == \
        [0, 2, 63]
    assert simhash_from_features(np.empty(0, np.uint64), np.empty(0)) == 0


def test_document_fingerprint_is_the_weighted_vote_of_its_words():
    text = "the cat sat on the mat, the end"
    words = MinHasher.normalize(text).split()
    shingle = MinHasher(num_perm=1, ngram_size=1, backend="numpy")
    votes = [0.0] * 64
    for word in set(words):  # by hand: each distinct word votes 1 + log(count) on every bit
        [hw] = shingle.shingle_hashes(word).tolist()
        w = 1 + np.log(words.count(word))
        for b in range(64):
            votes[b] += w if hw >> b & 1 else -w
    expected = sum(1 << b for b in range(64) if votes[b] > 0)
    [fp] = SimHasher().fingerprints([text]).tolist()
    assert fp == expected
    # Features and batch fingerprints agree with the one-document function.
    hashes, weights = SimHasher().features(text)
    assert sorted(weights.tolist()) == [1.0] * 5 + [1 + np.log(3)]  # "the" three times
    assert simhash_from_features(hashes, weights) == fp
    assert SimHasher(weighting="binary").fingerprints([text])[0] == \
        simhash_from_features(hashes, np.ones(hashes.size))


def brute_force_components(fp: np.ndarray, k: int) -> list[int]:
    """Union-find over every pair within ``k`` bits: a root per fingerprint."""
    parent = list(range(fp.size))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in combinations(range(fp.size), 2):
        if hamming(fp[i:i + 1], fp[j:j + 1])[0] <= k:
            parent[find(i)] = find(j)
    return [find(i) for i in range(fp.size)]


def test_table_lookup_finds_exactly_the_pairs_within_k_bits():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=60, dtype=np.int64).view(np.uint64) * np.uint64(2)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, size=d, replace=False)))
             for d in rng.integers(0, 9, size=60)]
    fp = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64), base[:3]])
    for k, m in ((3, 6), (6, 10), (2, 3)):
        labels, _ = simhash_clusters(fp, max_distance=k, blocks=m)
        # Brute force: connected components of all pairs within k bits.
        roots = brute_force_components(fp, k)
        same = labels[:, None] == labels[None, :]
        assert (same == (np.array(roots)[:, None] == np.array(roots)[None, :])).all(), (k, m)
    with pytest.raises(ValueError, match="max_distance"):
        simhash_clusters(fp, max_distance=6, blocks=6)


def test_simhash_recall_and_precision_on_planted_near_duplicates(wiki_texts):
    rng = random.Random(0)
    originals, n_planted = wiki_texts, 60
    n = len(originals)
    planted = [near_duplicate(originals[i % n], rng, rng.uniform(0.0, 0.02))
               for i in range(n_planted)]
    result = SimHashDedup().deduplicate_texts(originals + planted)
    removed = {i for i, r in enumerate(result.reasons) if r}
    recall = len(removed) / n_planted if removed <= set(range(n, n + n_planted)) else 0.0
    assert not any(result.reasons[:n])  # precision 1.0: no original is removed
    assert recall >= 0.95, recall
    assert all(result.duplicate_of[i] == (i - n) % n for i in removed)
    # Distinct articles are far apart, so a much tighter k still keeps every original.
    assert not any(SimHashDedup(max_distance=3, blocks=6).deduplicate_texts(originals).reasons)


def test_signature_stage_and_global_step_agree(wiki_texts):
    import pandas as pd
    from nemo_curator.tasks import DocumentBatch

    docs = wiki_texts[:10] + [wiki_texts[3] + " Subscribe!"]
    step = SimHashDedup()
    batch = DocumentBatch(dataset_name="t", data=pd.DataFrame({"text": docs}), _metadata={})
    column = step.signature_stage().process(batch).data["_simhash"].tolist()

    class View:
        def column(self, name):
            assert name == "_simhash"
            return column

    result = step.run(View(), {})
    assert result.reasons == [None] * 10 + ["near_duplicate"] and result.duplicate_of == {10: 3}
    assert result.cluster_sizes == {2: 1}
    assert step.deduplicate_texts(docs).reasons == result.reasons
    with pytest.raises(ValueError, match="weighting"):
        SimHasher(weighting="idf")


def test_curation_run_with_simhash_removes_the_planted_copy(tmp_path, warc_path, blocklist_dir):
    import pandas as pd
    from curation_testdata import MAX_PAYLOAD

    from mmllm.curation.pipeline import run_curation

    result = run_curation(str(warc_path), tmp_path / "out", executor="local", overrides=[
        f"stages.read.max_payload_bytes={MAX_PAYLOAD}",
        f"stages.url_filter.blocklist_paths=[{blocklist_dir}]", "curation/fuzzy=simhash"])
    report = result.report
    assert "minhash_dedup" not in [f["stage"] for f in report["funnel"]]
    assert report["drop_reasons"]["simhash_dedup"]["near_duplicate"]["docs"] == 1
    assert report["dedup_clusters"]["simhash_dedup"] == {"2": 1}
    [ex] = report["examples"]["simhash_dedup"]["near_duplicate"]
    assert ex["url"] == "https://mirror.example/bread-copy"
    urls = [u for s in result.shards for u in pd.read_json(s, lines=True)["url"]]
    assert "https://mirror.example/bread-copy" not in urls
    assert "https://www.homebaking.example/bread" in urls
