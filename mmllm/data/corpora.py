"""Real text that ships inside installed packages, usable offline.

``gensim``'s wheel carries a shortened English Wikipedia dump (206 pages: 105 articles of real text,
~3 M characters, the rest redirects); it is the kit's default corpus for tiny CPU runs.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_wikipedia_dump() -> Path:
    """Path of the Wikipedia XML dump inside the installed ``gensim`` package."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("gensim is not installed (pip install gensim): it ships the demo corpus")
    path = Path(spec.origin).parent / GENSIM_WIKI
    if not path.is_file():
        raise FileNotFoundError(f"gensim's Wikipedia sample is missing: {path}")
    return path


def clean_wikitext(text: str) -> str:
    """Plain text from gensim's ``filter_wiki`` output: headings, bold/italic quotes, blank runs."""
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wikipedia_pages(path: str | Path | None = None) -> Iterator[tuple[str, str, str]]:
    """Yields ``(page_id, title, text)`` for the article pages of a MediaWiki XML(.bz2) dump.

    ``text`` is gensim's ``filter_wiki`` output (markup removed, one paragraph a line, headings
    as ``== ... ==``); redirects are skipped. Default dump: gensim's shipped sample.
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(path) if path is not None else gensim_wikipedia_dump()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for title, raw, page_id in extract_pages(f, filter_namespaces=("0",)):
            if not raw.lstrip().upper().startswith("#REDIRECT"):
                yield str(page_id), title, filter_wiki(raw)


def wikipedia_articles(path: str | Path | None = None, *, min_chars: int = 500) -> Iterator[dict]:
    """Yields ``{"id", "title", "text"}`` (plain text) for the articles of a MediaWiki dump.

    Pages shorter than ``min_chars`` after cleaning are skipped.
    """
    for page_id, title, text in wikipedia_pages(path):
        text = clean_wikitext(text)
        if len(text) >= min_chars:
            yield {"id": page_id, "title": title, "text": text}


def write_jsonl(records, path: str | Path) -> int:
    """Writes records as JSON lines atomically (tmp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def wikipedia_jsonl_splits(out_dir: str | Path, *, val_every: int = 10) -> tuple[Path, Path]:
    """Writes ``train.jsonl`` and ``val.jsonl`` (every ``val_every``-th article) from gensim's dump.

    Returns:
        ``(train_path, val_path)``; existing files are reused.
    """
    out = Path(out_dir)
    train, val = out / "train.jsonl", out / "val.jsonl"
    if train.is_file() and val.is_file():
        return train, val
    arts = list(wikipedia_articles())
    write_jsonl((a for i, a in enumerate(arts) if i % val_every != val_every - 1), train)
    write_jsonl((a for i, a in enumerate(arts) if i % val_every == val_every - 1), val)
    return train, val
