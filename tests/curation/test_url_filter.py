"""URL filtering: UT1 blocklist with fast lookup, weighted-word URL score, curated sources."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nemo_curator.tasks import DocumentBatch

from mmllm.curation.base import STATS_KEY
from mmllm.curation.url_filter import DomainBlocklist, UrlFilterStage, UrlScorer, url_host


def test_ut1_blocklist_categories_and_subdomains(blocklist_dir):
    bl = DomainBlocklist.from_paths([str(blocklist_dir)])
    assert len(bl) == 3
    assert bl.contains("blocked-site.example")
    assert bl.contains("videos.cdn.blocked-site.example")  # any parent domain matches
    assert not bl.contains("notblocked-site.example")  # only whole labels
    assert not bl.contains("example")
    only_gambling = DomainBlocklist.from_paths([str(blocklist_dir)], categories=["gambling"])
    assert only_gambling.contains(url_host("https://www.bets.example/x"))
    assert not only_gambling.contains("blocked-site.example")
    with pytest.raises(FileNotFoundError):
        DomainBlocklist.from_paths([str(blocklist_dir / "nope")])


def test_blocklist_scales_to_a_million_domains():
    # Memory is the property asserted here (8 bytes a domain); its speed is a benchmark's business.
    domains = [f"site{i}.example{i % 97}.com" for i in range(1_000_000)]
    bl = DomainBlocklist.from_domains(domains)
    assert bl.hashes.nbytes == 8 * len(domains)  # 8 bytes per domain
    hosts = [f"a.site{i}.example{i % 97}.com" for i in range(0, 20_000, 2)]
    hosts += [f"site{i}.other.com" for i in range(10_000)]
    hit = bl.match(hosts)
    assert hit[:10_000].all() and not hit[10_000:].any()


def test_url_score_hand_computed():
    s = UrlScorer({"casino": 1, "bonus": 0.5, "slots": 1, "sex": 1, "porn": 3})
    # casino x2 (substring words match inside tokens) + bonus 0.5 + slots 1
    assert s.score("https://free-casino-bonus.example/casino-slots/win") == 3.5
    assert s.score("https://essex.example/sussex-news") == 0.0  # short words: whole tokens only
    assert s.score("https://a.example/sex/") == 1.0
    assert s.score("https://freeporn.example") == 3.0


def test_word_list_file(tmp_path):
    (tmp_path / "w.txt").write_text("# word weight\ncasino 2.5\nbingo\n")
    assert UrlScorer.read_word_list(str(tmp_path / "w.txt")) == {"casino": 2.5, "bingo": 1.0}


def test_stage_reasons(blocklist_dir):
    urls = ["https://good.example/a", "https://free-casino-bonus.example/casino-slots/x",
            "https://videos.blocked-site.example/v", "https://en.wikipedia.org/wiki/X",
            "https://arxiv.org/abs/1", None, "https://Bets.Example:443/page"]
    df = pd.DataFrame({"url": urls, "text": ["t"] * len(urls)})
    stage = UrlFilterStage(blocklist_paths=[str(blocklist_dir)])
    out = stage.process(DocumentBatch(dataset_name="t", data=df, _metadata={}))
    assert out.data["url"].iloc[0] == "https://good.example/a"
    assert len(out.data) == 2 and pd.isna(out.data["url"].iloc[1])  # no URL: kept
    rec = out._metadata[STATS_KEY][0]
    assert {k: v["docs"] for k, v in rec["dropped"].items()} == {
        "url_score": 1, "blocklisted_domain": 2, "curated_source": 2}
    assert rec["examples"]["url_score"][0]["url"] == urls[1]


def test_stage_rejects_bad_threshold():
    with pytest.raises(ValueError, match="url_score_threshold"):
        UrlFilterStage(url_score_threshold=0)


def test_hash_array_is_sorted_unique():
    bl = DomainBlocklist.from_domains(["b.com", "a.com", "a.com", "WWW.C.COM", "# comment", ""])
    assert len(bl) == 3 and np.all(np.diff(bl.hashes.astype(np.float64)) > 0)
    assert bl.contains("c.com")
