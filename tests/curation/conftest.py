"""Curation test fixtures: the authored WARC, a UT1-style blocklist, a private RAY_TMPDIR."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from curation_testdata import CORRUPT_INDEX, authored_pages

from mmllm.curation.sample_data import write_warc


@pytest.fixture(scope="session")
def pages() -> list[dict]:
    return authored_pages()


@pytest.fixture(scope="session")
def warc_path(tmp_path_factory, pages) -> Path:
    """The authored pages as a gzipped WARC with one corrupt gzip member."""
    out = tmp_path_factory.mktemp("warc") / "crawl.warc.gz"
    return write_warc(out, pages, corrupt=[CORRUPT_INDEX])


@pytest.fixture(scope="session")
def blocklist_dir(tmp_path_factory) -> Path:
    """A UT1-style blocklist: <category>/domains files."""
    root = tmp_path_factory.mktemp("ut1")
    for cat, domains in {"adult": ["blocked-site.example", "other-adult.example"],
                         "gambling": ["bets.example"]}.items():
        (root / cat).mkdir()
        (root / cat / "domains").write_text("\n".join(["# UT1 list", *domains, ""]))
    return root


@pytest.fixture(scope="session", autouse=True)
def _ray_session_env():
    """A short, private RAY_TMPDIR for the session; Ray is stopped at the end if still up."""
    tmp = tempfile.mkdtemp(prefix="mmrt-")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    yield tmp
    import shutil
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    shutil.rmtree(tmp, ignore_errors=True)
