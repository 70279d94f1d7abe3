"""An API catalog in Gorilla's schema (APIBench) and a BM25 retriever over it.

Each API is one JSON line with the fields of Gorilla's API documents::

    {"domain", "framework", "functionality", "api_name", "api_call", "api_arguments",
     "environment_requirements", "example_code", "performance", "description"}

``api_call`` is the reference call (Python source, e.g.
``torchvision.models.resnet18(weights='IMAGENET1K_V1')``) that evaluation matches by AST.
The kit ships a small real catalog (``mmllm/tools/data/api_catalog.jsonl``: 39 torchvision,
Hugging Face ``pipeline`` and timm models; accuracies are torchvision's published weight
metadata and the papers'/model cards' numbers, None where none is published).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mmllm.tools.search import BM25Index, Passage

FIELDS = ("domain", "framework", "functionality", "api_name", "api_call", "api_arguments",
          "environment_requirements", "example_code", "performance", "description")
DEFAULT_CATALOG = Path(__file__).parent / "data" / "api_catalog.jsonl"


class CatalogError(ValueError):
    """A catalog line that is not a valid API document (the message names file:line)."""


@dataclass(frozen=True)
class APIDoc:
    """One API document (Gorilla's fields); ``api_call`` parses to a single Python call."""

    domain: str
    framework: str
    functionality: str
    api_name: str
    api_call: str
    api_arguments: object
    environment_requirements: object
    example_code: str
    performance: object
    description: str

    def __post_init__(self) -> None:
        for key in ("domain", "framework", "api_name", "api_call"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise CatalogError(f"{key} must be a non-empty string")
        try:
            node = ast.parse(self.api_call.strip(), mode="eval").body
        except SyntaxError as exc:
            raise CatalogError(f"api_call does not parse: {self.api_call!r} ({exc.msg})") from None
        if not isinstance(node, ast.Call):
            raise CatalogError(f"api_call must be one call, got {self.api_call!r}")

    @classmethod
    def from_dict(cls, row: dict) -> APIDoc:
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise CatalogError(f"missing fields {missing}")
        return cls(**{f: row[f] for f in FIELDS})

    def to_dict(self) -> dict:
        return asdict(self)

    def doc_text(self) -> str:
        """The document as the JSON the model reads (retrieval-aware prompts)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def search_text(self) -> str:
        """The text BM25 indexes: what the API does and what it is called."""
        return " ".join(str(x) for x in (self.domain, self.functionality, self.api_name, self.description,
                                         self.framework) if x)


def load_catalog(path: str | Path | None = None) -> list[APIDoc]:
    """Reads a catalog JSONL (default: the shipped one).

    Raises:
        CatalogError: a malformed line, or two entries with the same ``api_call``.
    """
    path = Path(path) if path is not None else DEFAULT_CATALOG
    docs, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = APIDoc.from_dict(json.loads(line))
            except (json.JSONDecodeError, CatalogError, TypeError) as exc:
                raise CatalogError(f"{path}:{n}: {exc}") from None
            if doc.api_call in seen:
                raise CatalogError(f"{path}:{n}: api_call {doc.api_call!r} repeats line {seen[doc.api_call]}")
            seen[doc.api_call] = n
            docs.append(doc)
    if not docs:
        raise CatalogError(f"{path}: empty catalog")
    return docs


def write_catalog(docs: Iterable[APIDoc], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d.doc_text() + "\n" for d in docs), encoding="utf-8")
    return path


class APIRetriever:
    """BM25 over a catalog's documents (Gorilla's BM25 retriever).

    Args:
        catalog: the API documents.
    """

    def __init__(self, catalog: Sequence[APIDoc]) -> None:
        self.catalog = list(catalog)
        self.index = BM25Index([Passage(str(i), d.api_name, d.search_text()) for i, d in enumerate(self.catalog)])

    def retrieve(self, query: str, k: int = 1) -> list[APIDoc]:
        """The ``k`` best documents for ``query`` (fewer when few words match)."""
        return [self.catalog[int(h.passage.doc_id)] for h in self.index.search(query, k=k)]
