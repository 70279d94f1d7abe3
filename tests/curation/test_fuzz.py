"""Fuzzing the reader: flipped and truncated bytes of good WARC (gzip and plain), JSONL (plain
and gzip) and Parquet inputs never crash it, and every record is accounted for.

For every mutated file:

* reading never raises, and each batch's statistics add up (records in = kept + dropped, every
  drop with a known reason, the kept rows are the batch's data);
* reading in slices of 2 records gives exactly the records of reading the file in one go (the
  planner's resume points stay valid on corrupt input);
* WARC: a kept page is byte-for-byte an original page (gzip CRCs, WARC digests);
* JSONL: records in = the non-blank lines of the mutated file (or the gzip stream was cut and
  a ``read_error`` says so); Parquet: records in = the footer's row count, or the file is
  counted unreadable with its error.

50 examples per format (``max_examples=50``), a few seconds each.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from mmllm.curation.base import STATS_KEY, merge_stats_lists
from mmllm.curation.readers import CurationReaderStage

READ_REASONS = {"unverified_stream", "digest_mismatch", "non_html", "empty", "too_large", "undecodable", "http_status", "truncated",
                "corrupt_record", "incomplete_record", "not_http", "invalid_json",
                "missing_text_field", "non_string_text", "corrupt_row_group", "read_error"}
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog near the river bank."
         for i in range(8)]


BODIES = [f"<html><p>{TEXTS[0]}</p></html>", f"<html><p>{TEXTS[1]} café</p></html>",
          "<html>gone</html>", "\x89PNG....", f"<html><p>{TEXTS[2]}</p></html>",
          f"<html><p>{TEXTS[3]}</p></html>"]


def _warc(gz: bool) -> bytes:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    # Fixed record ids and dates: the base file, and so every derandomized example, is the same
    # bytes in every run (warcio would draw fresh uuids and the current time).
    def fixed(i: int) -> dict:
        return {"WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>",
                "WARC-Date": "2026-01-01T00:00:00Z"}

    info = w.create_warcinfo_record("f.warc", {"software": "fuzz"})
    info.rec_headers.replace_header("WARC-Record-ID", fixed(99)["WARC-Record-ID"])
    info.rec_headers.replace_header("WARC-Date", fixed(99)["WARC-Date"])
    w.write_record(info)
    headers = [("200 OK", "text/html; charset=utf-8"), ("200 OK", "text/html"),
               ("404 Not Found", "text/html"), ("200 OK", "image/png"),
               ("200 OK", "text/html; charset=iso-8859-1"), ("200 OK", "text/html")]
    for i, ((status, ctype), body) in enumerate(zip(headers, BODIES)):
        http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
        payload = body.encode("latin-1" if "8859" in ctype else "utf-8", "replace")
        w.write_record(w.create_warc_record(f"https://f.example/{i}", "response",
                                            payload=io.BytesIO(payload), http_headers=http,
                                            warc_headers_dict=fixed(i)))
    return buf.getvalue()


def _jsonl() -> bytes:
    return "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)).encode()


def _parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": TEXTS * 2, "id": list(range(16))}), buf, row_group_size=4,
                   write_page_checksum=True)
    return buf.getvalue()


GOOD = {"warc.gz": _warc(True), "warc": _warc(False), "jsonl": _jsonl(),
        "jsonl.gz": gzip.compress(_jsonl(), mtime=0), "parquet": _parquet()}


@st.composite
def mutations(draw, kind: str) -> bytes:
    """The good file with up to 6 bytes XOR-flipped and maybe cut short."""
    data = bytearray(GOOD[kind])
    for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(data) - 1),
                                             st.integers(1, 255)), max_size=6)):
        data[pos] ^= mask
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data if cut is None else data[:cut])


def _read(data: bytes, kind: str, per_batch: int) -> tuple[list, dict]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, f"f.{kind}")
        path.write_bytes(data)
        batches = CurationReaderStage(records_per_batch=per_batch).read_file(str(path))
    for b in batches:
        [rec] = b._metadata[STATS_KEY]
        assert rec["docs_in"] == rec["docs_out"] + sum(d["docs"] for d in rec["dropped"].values())
        assert len(b.data) == rec["docs_out"]
        assert set(rec["dropped"]) <= READ_REASONS, rec["dropped"]
    [rec] = merge_stats_lists([b._metadata[STATS_KEY] for b in batches])
    return batches, rec


def _kept(batches, col: str) -> list:
    return [v for b in batches for v in b.data[col].tolist()]


def _check(data: bytes, kind: str) -> dict:
    """The shared properties; returns the merged reader statistics of the one-go read."""
    small, rec_small = _read(data, kind, 2)
    whole, rec = _read(data, kind, 10_000)
    col = "html" if kind.startswith("warc") else "text"
    assert _kept(small, col) == _kept(whole, col)
    if kind == "warc":
        # Known limit (uncompressed WARC), left open: after a damaged record header the whole-file
        # read can swallow the next record into the corrupt one, while a slice that starts at that
        # record reads and counts it (e.g. as a 404), or the other way round: the record counts
        # differ by a record or two. The kept documents are the same (asserted above).
        assert abs(rec_small["docs_in"] - rec["docs_in"]) <= 2
    else:
        assert rec_small["dropped"] == rec["dropped"] and rec_small["docs_in"] == rec["docs_in"]
    assert all(isinstance(v, str) and v.strip() for v in _kept(whole, col))
    files = rec["extra"]["files"]
    if "unreadable" in files:
        assert rec["issues"] and rec["issues"][0]["reason"] == "unreadable_file"
    return rec


@FUZZ
@given(mutations("warc.gz"))
def test_fuzz_gzip_warc(data):
    _check(data, "warc.gz")
    # Every record is its own gzip member with a CRC, so a kept page is an original page.
    batches, _ = _read(data, "warc.gz", 10_000)
    assert set(_kept(batches, "html")) <= set(BODIES)


@FUZZ
@given(mutations("warc"))
def test_fuzz_plain_warc(data):
    _check(data, "warc")
    # No CRC here, but warcio's WARC-Payload-Digest is checked: a kept page is an original page.
    batches, _ = _read(data, "warc", 10_000)
    assert set(_kept(batches, "html")) <= set(BODIES)


@FUZZ
@given(mutations("jsonl"))
def test_fuzz_jsonl(data):
    rec = _check(data, "jsonl")
    lines = [ln for i, ln in enumerate(data.split(b"\n"))
             if (ln[3:] if i == 0 and ln.startswith(b"\xef\xbb\xbf") else ln).strip()]
    assert rec["docs_in"] == (len(lines) if data else 0)


@FUZZ
@given(mutations("jsonl.gz"))
def test_fuzz_gzip_jsonl(data):
    rec = _check(data, "jsonl.gz")
    files = rec["extra"]["files"]
    assert files.get("cut_short", 0) == rec["dropped"].get("read_error", {}).get("docs", 0)
    # Only a stream that passed gzip's CRC is kept, so what survives is what was written.
    batches, _ = _read(data, "jsonl.gz", 10_000)
    assert not (files.get("cut_short") and _kept(batches, "text"))
    if rec["docs_out"]:
        texts = [json.loads(x)["text"] for x in gzip.decompress(GOOD["jsonl.gz"]).split(b"\n")]
        assert set(_kept(batches, "text")) <= set(texts)


@FUZZ
@given(mutations("parquet"))
def test_fuzz_parquet(data):
    rec = _check(data, "parquet")
    files = rec["extra"]["files"]
    if "read" in files:
        footer_rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        assert rec["docs_in"] == footer_rows
    else:
        assert set(files) <= {"empty", "unreadable"} and rec["docs_in"] == 0


def test_damaged_headers_whose_offsets_point_backwards_end(tmp_path):
    """Regression (found by the fuzzer in CI): a mutated gzip WARC whose damaged record made
    warcio report an offset before the resume point, so the reader resynchronised at the same
    place forever. The reader must end and account for every record."""
    data = (Path(__file__).parent / "fixtures" / "backwards_offsets.warc.gz").read_bytes()
    for per_batch in (2, 10_000):  # _read checks that each batch accounts for every record
        _, rec = _read(data, "warc.gz", per_batch)
        assert rec["docs_in"] >= 6 and rec["dropped"].get("corrupt_record")
    # (How many corrupt_record drops the damaged region counts still depends on the slicing
    # here: 2 sliced vs 3 whole.)
