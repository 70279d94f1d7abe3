"""Search / QA over a local document index: BM25 (``bm25s``) over passages of a corpus.

A corpus is a JSONL file (one document per line, ``text`` and optional ``title``/``id``), a plain
text file (documents separated by blank lines), a list of such paths or records, or
``"gensim_wiki"`` (the Wikipedia sample that ships with gensim, :mod:`mmllm.data.corpora`).
Documents are cut into passages of about ``passage_words`` words (so a hit is a readable
paragraph, not a whole article), indexed once, and can be saved and loaded
(:meth:`BM25Index.save` / :meth:`BM25Index.load`). The ``search`` tool returns the top-k
passages with their titles and scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np

from mmllm.tools.registry import Tool, ToolError

GENSIM_WIKI = "gensim_wiki"
_PASSAGES = "passages.jsonl"


@dataclass(frozen=True)
class Passage:
    """One indexed passage (``doc_id`` and ``title`` from its document)."""

    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


def split_passages(text: str, *, words: int = 120) -> list[str]:
    """Cuts ``text`` into passages of about ``words`` words along paragraph boundaries.

    Paragraphs are packed greedily; a paragraph longer than ``words`` is cut into word windows.
    """
    out, cur = [], []
    for para in (p.split() for p in re.split(r"\n\s*\n|\n", text)):
        while len(para) > words:  # an over-long paragraph: its own windows
            if cur:
                out.append(" ".join(cur))
                cur = []
            out.append(" ".join(para[:words]))
            para = para[words:]
        if cur and len(cur) + len(para) > words:
            out.append(" ".join(cur))
            cur = []
        cur += para
    if cur:
        out.append(" ".join(cur))
    return out


def read_documents(source: str | Path | Sequence, *, text_key: str = "text", title_key: str = "title",
                   id_key: str = "id") -> Iterable[dict]:
    """Yields ``{"id", "title", "text"}`` from a corpus (see the module docstring).

    Raises:
        ValueError: a JSONL line without ``text_key`` (naming file and line).
    """
    if isinstance(source, (str, Path)) and str(source) == GENSIM_WIKI:
        from mmllm.data.corpora import wikipedia_articles
        yield from wikipedia_articles()
        return
    if isinstance(source, Sequence) and not isinstance(source, (str, Path)):
        for i, item in enumerate(source):
            if isinstance(item, Mapping):
                yield {"id": str(item.get(id_key, i)), "title": item.get(title_key, ""), "text": item[text_key]}
            else:
                yield from read_documents(item, text_key=text_key, title_key=title_key, id_key=id_key)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_key not in row:
                        raise ValueError(f"{path}:{n}: no {text_key!r} field")
                    yield {"id": str(row.get(id_key, f"{path.stem}:{n}")), "title": row.get(title_key, ""),
                           "text": row[text_key]}
        return
    for n, doc in enumerate(re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))):
        if doc.strip():
            yield {"id": f"{path.stem}:{n}", "title": "", "text": doc.strip()}


class BM25Index:
    """A BM25 index over passages.

    Args:
        passages: the passages, in index order.
        k1, b: BM25 parameters (Lucene variant, ``bm25s`` defaults).
        stopwords: ``"en"`` or a list (removed from documents and queries alike).
    """

    def __init__(self, passages: Sequence[Passage], *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str | list[str] = "en", _retriever: bm25s.BM25 | None = None) -> None:
        if not passages:
            raise ValueError("cannot index an empty corpus")
        self.passages, self.stopwords = list(passages), stopwords
        if _retriever is None:
            _retriever = bm25s.BM25(k1=k1, b=b)
            tokens = bm25s.tokenize([self._indexed_text(p) for p in self.passages], stopwords=stopwords,
                                    show_progress=False)
            _retriever.index(tokens, show_progress=False)
        self.retriever = _retriever

    @staticmethod
    def _indexed_text(p: Passage) -> str:
        return f"{p.title}\n{p.text}" if p.title else p.text

    @classmethod
    def from_corpus(cls, source: str | Path | Sequence, *, passage_words: int = 120,
                    max_documents: int | None = None, **kwargs) -> BM25Index:
        """Reads documents (:func:`read_documents`), splits them into passages and indexes them."""
        passages = []
        for i, doc in enumerate(read_documents(source)):
            if max_documents is not None and i >= max_documents:
                break
            passages += [Passage(doc["id"], doc["title"], t) for t in split_passages(doc["text"], words=passage_words)]
        return cls(passages, **kwargs)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The top-``k`` passages for ``query`` with positive score, best first."""
        terms = bm25s.tokenize([query], stopwords=self.stopwords, return_ids=False, show_progress=False)[0]
        vocab = self.retriever.vocab_dict
        terms = [t for t in terms if t in vocab]  # unseen words cannot score
        if not terms:
            return []
        k = min(k, len(self.passages))
        ids, scores = self.retriever.retrieve([terms], k=k, show_progress=False, n_threads=1)
        return [Hit(self.passages[int(i)], float(s)) for i, s in zip(np.ravel(ids), np.ravel(scores)) if s > 0]

    def save(self, directory: str | Path) -> Path:
        """Writes the index and its passages under ``directory``."""
        out = Path(directory)
        self.retriever.save(str(out), show_progress=False)
        with open(out / _PASSAGES, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"doc_id": p.doc_id, "title": p.title, "text": p.text}, ensure_ascii=False)
                         + "\n" for p in self.passages)
        (out / "mmllm_index.json").write_text(json.dumps({"stopwords": self.stopwords}))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        d = Path(directory)
        if not (d / _PASSAGES).is_file():
            raise FileNotFoundError(f"no BM25 index in {d} (missing {_PASSAGES}); build one with BM25Index.save")
        with open(d / _PASSAGES, encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f if line.strip()]
        meta = json.loads((d / "mmllm_index.json").read_text())
        return cls(passages, stopwords=meta["stopwords"], _retriever=bm25s.BM25.load(str(d), show_progress=False))


def format_hits(hits: Sequence[Hit]) -> str:
    """Numbered passages, ``[n] title (score): text``; the model reads this."""
    if not hits:
        return "no results"
    return "\n\n".join(f"[{n}] {h.passage.title or h.passage.doc_id} (score {h.score:.2f}): {h.passage.text}"
                       for n, h in enumerate(hits, 1))


def search_tool(index: BM25Index, *, default_k: int = 3, max_k: int = 10) -> Tool:
    """The ``search`` tool: ``{"query": ..., "k": ...}`` -> the top-k passages of ``index``."""

    def run(query: str, k: int = default_k) -> str:
        if not query.strip():
            raise ToolError("query is empty")
        return format_hits(index.search(query, k=k))

    return Tool(name="search", description="Search a local document collection (BM25); returns the "
                                           "most relevant passages.",
                parameters={"type": "object", "additionalProperties": False, "required": ["query"],
                            "properties": {"query": {"type": "string", "maxLength": 1000},
                                           "k": {"type": "integer", "minimum": 1, "maximum": max_k}}},
                fn=run)
