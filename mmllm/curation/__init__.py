"""Web-data curation: NeMo Curator stages and the kit's own, on Ray or in-process.

``run_curation(inputs, output_dir, ...)`` runs the whole thing (see :mod:`mmllm.curation.pipeline`);
every stage is also usable alone on a NeMo Curator ``DocumentBatch`` and records why it dropped
each document.
"""

from mmllm.curation.base import CurationStage, DocumentFilterStage, FilterChainStage
from mmllm.curation.dedup_exact import ExactDedup, ExactHashStage
from mmllm.curation.dedup_minhash import MinHashDedup, MinHasher, MinHashStage, lsh_clusters
from mmllm.curation.dedup_substring import SubstringDedup
from mmllm.curation.dedup_url import SeenUrlStore, UrlDedup, normalize_url
from mmllm.curation.executors import LocalExecutor, ray_session
from mmllm.curation.extract import TextExtractionStage
from mmllm.curation.filters import (
    GopherQualityStage,
    GopherRepetitionStage,
    GopherSymbolToWordFilter,
    GopherTopNGramFilter,
)
from mmllm.curation.langid import LanguageIdStage, default_langid_model_path
from mmllm.curation.line_filters import C4FilterStage, RefinedWebLineFilterStage
from mmllm.curation.pipeline import CurationResult, load_config, resolve_inputs, run_curation
from mmllm.curation.readers import CurationReaderStage
from mmllm.curation.sample_data import build_demo_warc, demo_overrides, write_warc
from mmllm.curation.url_filter import DomainBlocklist, UrlFilterStage, UrlScorer
from mmllm.curation.warc import decode_payload, iter_warc

__all__ = [
    "C4FilterStage", "CurationReaderStage", "CurationResult", "CurationStage",
    "DocumentFilterStage", "DomainBlocklist", "ExactDedup", "ExactHashStage", "FilterChainStage",
    "GopherQualityStage", "GopherRepetitionStage", "GopherSymbolToWordFilter",
    "GopherTopNGramFilter", "LanguageIdStage", "LocalExecutor", "MinHashDedup", "MinHashStage",
    "MinHasher", "RefinedWebLineFilterStage", "SeenUrlStore", "SubstringDedup",
    "TextExtractionStage", "UrlDedup", "UrlFilterStage", "UrlScorer", "build_demo_warc",
    "decode_payload", "default_langid_model_path", "demo_overrides", "iter_warc", "load_config",
    "lsh_clusters", "normalize_url", "ray_session", "resolve_inputs", "run_curation", "write_warc",
]
