"""BM25 search over a local index: hand-computed scores, corpora formats, save/load, the tool."""

import json
import math

import pytest

from mmllm.tools import BM25Index, ToolRegistry, search_tool
from mmllm.tools.search import Passage, read_documents, split_passages

DOCS = [
    {"id": "a", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower is in Paris."},
    {"id": "b", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"id": "c", "title": "Volcanoes", "text": "A volcano erupts lava. Lava cools into basalt rock."},
]


def lucene_bm25(query_terms, docs_terms, k1=1.5, b=0.75):
    """BM25 as Lucene >= 8 scores it (and bm25s's default): Lucene idf, no (k1 + 1) numerator."""
    n, avgdl = len(docs_terms), sum(map(len, docs_terms)) / len(docs_terms)
    scores = []
    for d in docs_terms:
        s = 0.0
        for t in query_terms:
            df = sum(t in x for x in docs_terms)
            tf = d.count(t)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def test_scores_match_the_bm25_formula():
    passages = [Passage(d["id"], "", d["text"]) for d in DOCS]
    index = BM25Index(passages, stopwords=[])
    import re
    terms = [re.findall(r"\b\w\w+\b", d["text"].lower()) for d in DOCS]
    want = lucene_bm25(["capital", "lava"], terms)
    got = {h.passage.doc_id: h.score for h in index.search("capital lava", k=3)}
    for doc, w in zip("abc", want):
        assert got[doc] == pytest.approx(w, rel=1e-5)


def test_ranking_titles_unknown_and_stopword_queries():
    index = BM25Index.from_corpus(DOCS)
    hits = index.search("What is the capital of Germany?", k=2)
    assert hits[0].passage.title == "Berlin" and hits[0].score > hits[1].score
    assert index.search("eiffel tower")[0].passage.doc_id == "a"
    assert index.search("zebra xylophone") == []  # words the index never saw
    assert index.search("the of is") == []  # stopwords only


def test_corpus_formats_and_passage_split(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    txt = tmp_path / "c.txt"
    txt.write_text("First document about owls.\n\nSecond document about basalt.\n")
    docs = list(read_documents([jsonl, txt]))
    assert [d["id"] for d in docs] == ["a", "b", "c", "c:0", "c:1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no 'text'"):
        list(read_documents(bad))
    parts = split_passages("one two three\nfour five\n" + " ".join(["w"] * 7), words=5)
    assert parts == ["one two three four five", "w w w w w", "w w"]


def test_save_load_and_tool(tmp_path):
    index = BM25Index.from_corpus(DOCS)
    loaded = BM25Index.load(index.save(tmp_path / "idx"))
    assert [h.passage for h in loaded.search("basalt rock")] == [h.passage for h in index.search("basalt rock")]
    reg = ToolRegistry(tools=[search_tool(loaded)])
    out = reg.call("search", {"query": "volcano lava", "k": 1})
    assert out.ok and out.content.startswith("[1] Volcanoes (score ")
    assert reg.call("search", {"query": "zebra"}).content == "no results"
    assert not reg.call("search", {"query": "x", "k": 99}).ok  # above max_k
    with pytest.raises(FileNotFoundError, match="no BM25 index"):
        BM25Index.load(tmp_path / "missing")


@pytest.mark.slow
def test_gensim_wikipedia_index():
    index = BM25Index.from_corpus("gensim_wiki", max_documents=30)
    hits = index.search("Atlas Shrugged novel author", k=3)
    assert hits and hits[0].passage.title in {"Ayn Rand", "List of Atlas Shrugged characters"}
