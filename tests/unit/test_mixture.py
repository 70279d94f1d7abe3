"""Mixture: exact counts from weights/epochs, the largest-deficit order against hand-computed and
exact-fraction references, epochs, determinism, and random access equal to a full pass."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mmllm.data import Mixture, MixtureSource, plan_counts


def reference_order(counts: list[int]) -> list[int]:
    """Megatron's rule with exact fractions: argmax_s n_s (i+1)/N - c_s, first index on ties."""
    total = sum(counts)
    chosen = [0] * len(counts)
    out = []
    for i in range(total):
        deficit = [Fraction(n * (i + 1), total) - c for n, c in zip(counts, chosen)]
        best = deficit.index(max(deficit))
        chosen[best] += 1
        out.append(best)
    return out


def weighted(*weights: float) -> list[dict]:
    return [{"name": f"s{k}", "path": f"/data/s{k}", "weight": w} for k, w in enumerate(weights)]


def test_plan_counts_hand_computed():
    def counts(sources, sizes, n):
        return plan_counts([MixtureSource.from_config(s) for s in sources], sizes, n).tolist()

    assert counts(weighted(0.5, 0.3, 0.2), [100] * 3, 10) == [5, 3, 2]
    assert counts(weighted(2, 1, 1), [100] * 3, 10) == [5, 3, 2]  # 5, 2.5, 2.5: first tie wins
    assert counts(weighted(1, 1, 1), [100] * 3, 10) == [4, 3, 3]  # largest remainder sums to N
    assert counts(weighted(0.7, 0.0, 0.3), [100] * 3, 7) == [5, 0, 2]  # 4.9 -> 5, 2.1 -> 2
    # LLaMA style: epochs for one source, the rest of N shared by weight
    mixed = [{"name": "books", "epochs": 2.5}, {"name": "web", "weight": 3},
             {"name": "code", "weight": 1}]
    assert counts(mixed, [10, 1000, 1000], 45) == [25, 15, 5]
    epochs = [{"name": "a", "epochs": 1.5}, {"name": "b", "epochs": 0.25}]
    assert counts(epochs, [7, 10], None) == [11, 3]  # 10.5 -> 11 (half up), 2.5 -> 3


@pytest.mark.parametrize("sources, n, match", [
    ([{"name": "a", "weight": 1, "epochs": 1}], 10, "exactly one"),
    ([{"name": "a"}], 10, "exactly one"),
    (weighted(-1, 2), 10, ">= 0"),
    (weighted(float("nan"), 2), 10, "finite"),
    (weighted(0, 0), 10, "add up to 0"),
    (weighted(1, 2), None, "num_samples is required"),
    ([{"name": "a", "epochs": 2}, {"name": "b", "weight": 1}], 5, "less than"),
    ([{"name": "a", "epochs": 1}], 3, "must be None or 10"),
])
def test_plan_counts_rejects_nonsense(sources, n, match):
    with pytest.raises(ValueError, match=match):
        Mixture(sources, [10] * len(sources), num_samples=n)


def test_mixture_rejects_bad_sources():
    with pytest.raises(ValueError, match="unique"):
        Mixture([{"name": "a", "weight": 1}, {"name": "a", "weight": 1}], [5, 5], num_samples=4)
    with pytest.raises(ValueError, match="no samples"):
        Mixture(weighted(1, 1), [5, 0], num_samples=4)
    with pytest.raises(ValueError, match="one non-negative size"):
        Mixture(weighted(1, 1), [5], num_samples=4)
    with pytest.raises(ValueError, match="keys"):
        MixtureSource.from_config({"name": "a", "weigth": 1})


def test_largest_deficit_order_hand_computed():
    # n=(3,2): deficits i=0 (.6,.4)->0; i=1 (.2,.8)->1; i=2 (.8,.2)->0; i=3 (.4,.6)->1; i=4 (1,0)->0
    assert Mixture(weighted(3, 2), [10, 10], num_samples=5).get(0, 5)[0].tolist() == [0, 1, 0, 1, 0]
    # n=(1,1): a tie at i=0 goes to the first source
    assert Mixture(weighted(1, 1), [10, 10], num_samples=2).get(0, 2)[0].tolist() == [0, 1]
    # n=(1,1,2): i=0 (.25,.25,.5)->2; i=1 (.5,.5,0)->0; i=2 (-.25,.75,.5)->1; i=3 -> 2
    assert Mixture(weighted(1, 1, 2), [9] * 3, num_samples=4).get(0, 4)[0].tolist() == [2, 0, 1, 2]


@pytest.mark.parametrize("counts", [[37, 11, 52], [5, 1, 1, 1, 9, 2, 30], [1000, 1], [6, 4, 2]])
def test_order_matches_exact_reference_and_counts(counts):
    sources = weighted(*counts)
    mix = Mixture(sources, [50] * len(counts), num_samples=sum(counts), chunk_size=16)
    src, _ = mix.get(0, len(mix))
    assert src.tolist() == reference_order(counts)
    assert np.bincount(src, minlength=len(counts)).tolist() == counts  # exact counts
    # every prefix stays within one sample of the target proportion
    chosen = np.cumsum(np.eye(len(counts), dtype=np.int64)[src], axis=0)
    target = np.outer(np.arange(1, len(src) + 1), counts) / sum(counts)
    assert np.abs(chosen - target).max() < 1


def test_periodic_sequence_equals_direct_computation():
    # gcd 100: the id sequence is computed for a period of 10 and repeated
    mix = Mixture(weighted(0.5, 0.3, 0.2), [1000] * 3, num_samples=1000)
    assert mix.period == 10
    src, idx = mix.get(0, 1000)
    assert src.tolist() == reference_order([500, 300, 200])
    for s, n in enumerate([500, 300, 200]):  # each source: distinct samples (less than an epoch)
        assert len(set(idx[src == s].tolist())) == n


def test_epochs_are_honoured():
    sources = [{"name": "books", "path": "b", "epochs": 2},
               {"name": "wiki", "path": "w", "epochs": 0.5}]
    mix = Mixture(sources, [10, 8], seed=3)
    assert len(mix) == 24
    src, idx = mix.get(0, 24)
    books, wiki = idx[src == 0], idx[src == 1]
    assert sorted(books[:10].tolist()) == list(range(10))  # epoch 0 is a full permutation
    assert sorted(books[10:].tolist()) == list(range(10))  # and so is epoch 1
    assert books[:10].tolist() != books[10:].tolist()  # with another order
    assert len(wiki) == 4 and len(set(wiki.tolist())) == 4  # a half epoch: 4 distinct of 8
    summary = mix.summary()["sources"]
    assert summary["books"]["epochs"] == 2.0 and summary["wiki"]["epochs"] == 0.5
    assert summary["books"]["proportion"] == 20 / 24 and summary["wiki"]["num_samples"] == 4


def test_weighted_source_smaller_than_its_share_repeats_in_epochs():
    mix = Mixture(weighted(0.5, 0.5), [3, 100], num_samples=20)
    src, idx = mix.get(0, 20)
    small = idx[src == 0].tolist()
    assert len(small) == 10
    assert sorted(small.count(j) for j in range(3)) == [3, 3, 4]
    assert sorted(small[:3]) == sorted(small[3:6]) == [0, 1, 2]  # whole epochs first
    assert mix.summary()["sources"]["s0"]["epochs"] == pytest.approx(10 / 3)


def test_deterministic_and_seeded():
    sources = weighted(0.6, 0.4)
    a = Mixture(sources, [500, 300], num_samples=400, seed=7).get(0, 400)
    b = Mixture(sources, [500, 300], num_samples=400, seed=7).get(0, 400)
    c = Mixture(sources, [500, 300], num_samples=400, seed=8).get(0, 400)
    d = Mixture(sources, [500, 300], num_samples=400, seed=7).for_cycle(1).get(0, 400)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], c[0])  # the source order does not depend on the seed
    assert (a[1] != c[1]).mean() > 0.9 and (a[1] != d[1]).mean() > 0.9  # the samples do


def test_random_access_and_resume_equal_a_full_pass():
    sources = weighted(0.45, 0.35, 0.2)
    full = Mixture(sources, [97, 61, 13], num_samples=1001, seed=11, chunk_size=64)
    src, idx = full.get(0, 1001)
    for start in (0, 1, 63, 64, 500, 999):
        fresh = Mixture(sources, [97, 61, 13], num_samples=1001, seed=11, chunk_size=64)
        s, i = fresh.get(start, 1001)  # jumps to `start` without reading the prefix
        np.testing.assert_array_equal(s, src[start:])
        np.testing.assert_array_equal(i, idx[start:])
    backwards = Mixture(sources, [97, 61, 13], num_samples=1001, seed=11, chunk_size=64)
    got = [backwards[p] for p in range(1000, -1, -97)]
    assert got == [(int(src[p]), int(idx[p])) for p in range(1000, -1, -97)]
    with pytest.raises(IndexError):
        full.get(1000, 1002)


def test_summary_table_reports_actual_mixture():
    mix = Mixture(weighted(0.8, 0.2), [1000, 50], num_samples=500)
    rows = mix.summary()["sources"]
    assert rows["s0"] == {"path": "/data/s0", "size": 1000, "num_samples": 400, "proportion": 0.8,
                          "epochs": 0.4, "requested_weight": 0.8, "requested_epochs": None}
    assert rows["s1"]["epochs"] == 2.0
    table = mix.summary_table()
    assert "s0" in table and "80.00%" in table and "2.000" in table
