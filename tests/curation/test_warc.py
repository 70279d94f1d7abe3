"""WARC/WET reading, charset detection and the reader stage (no Ray)."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from curation_testdata import CORRUPT_INDEX, MAX_PAYLOAD
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from mmllm.curation.base import STATS_KEY
from mmllm.curation.readers import CurationReaderStage, input_format
from mmllm.curation.warc import decode_payload, iter_warc


def _expected_read_reasons(pages):
    return [p["expect"][1] if p["expect"] and p["expect"][0] == "read" else None for p in pages]


def test_iter_warc_reasons_and_recovery_after_corrupt_member(warc_path, pages):
    recs = list(iter_warc(str(warc_path), max_payload_bytes=MAX_PAYLOAD))
    assert [r["drop"] for r in recs] == _expected_read_reasons(pages)
    # The corrupt record has no URL (its headers are unreadable); the ones after it are intact.
    assert recs[CORRUPT_INDEX]["url"] is None
    assert [r["url"] for r in recs[CORRUPT_INDEX + 1:]] == [p["url"] for p in pages[CORRUPT_INDEX + 1:]]
    good = recs[0]
    assert good["charset"] == "utf-8" and "Baking bread at home" in good["html"]


def test_truncated_file_end_is_counted_not_fatal(warc_path, tmp_path):
    data = warc_path.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    for lost in (100, 700):  # the last record loses part of its payload / its HTTP headers
        cut.write_bytes(data[: len(data) - lost])
        recs = list(iter_warc(str(cut), max_payload_bytes=MAX_PAYLOAD))
        assert len(recs) == 25
        assert recs[-1]["drop"] == "incomplete_record"
        assert recs[-2]["drop"] == "truncated"  # the record before is untouched


def test_plain_uncompressed_warc_resyncs(tmp_path):
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=False)
    for i in range(3):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"https://a.example/{i}", "response",
                                            payload=io.BytesIO(b"<html><p>hi</p></html>"),
                                            http_headers=http))
    raw = buf.getvalue().replace(b"Content-Length: ", b"Content-Length: x", 1)  # break record 0
    (tmp_path / "p.warc").write_bytes(raw)
    recs = list(iter_warc(str(tmp_path / "p.warc")))
    # Record 0 loses its length: it is cut short, its leftover body is garbage, then we resync.
    assert [r["drop"] for r in recs] == ["incomplete_record", "corrupt_record", None, None]
    assert [r["url"] for r in recs[2:]] == ["https://a.example/1", "https://a.example/2"]


def test_wet_conversion_records_are_text(tmp_path):
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    w.write_record(w.create_warc_record("https://a.example/x", "conversion",
                                        payload=io.BytesIO("Plain text café\n".encode()),
                                        warc_content_type="text/plain"))
    (tmp_path / "x.warc.wet.gz").write_bytes(buf.getvalue())
    [rec] = iter_warc(str(tmp_path / "x.warc.wet.gz"))
    assert rec["drop"] is None and rec["text"] == "Plain text café\n" and rec["html"] is None


def test_decode_payload_prefers_declared_then_meta_then_detection():
    ru = "<html><body><p>Привет, как дела? Это страница на русском языке.</p></body></html>"
    assert decode_payload(ru.encode("cp1251"), "windows-1251") == (ru, "cp1251")
    fr = '<html><head><meta charset="iso-8859-1"></head><body>Crème brûlée déjà vu</body></html>'
    assert decode_payload(fr.encode("latin-1"), None) == (fr, "cp1252")  # WHATWG: latin-1 = cp1252
    assert decode_payload("plain ü".encode(), None) == ("plain ü", "utf-8")
    assert decode_payload(bytes((i * 37 + 11) % 256 for i in range(3000)), None) is None
    # An unknown declared charset falls back instead of failing.
    assert decode_payload(b"<p>ok</p>", "no-such-charset") == ("<p>ok</p>", "utf-8")


def test_reader_stage_chunks_and_stats(warc_path, pages):
    stage = CurationReaderStage(max_payload_bytes=MAX_PAYLOAD, records_per_batch=5)
    batches = stage.read_file(str(warc_path))
    usable = sum(1 for p in pages if not (p["expect"] and p["expect"][0] == "read"))
    # 25 records in slices of 5 records: one batch per slice, every record counted once.
    assert [b._metadata["chunk"] for b in batches] == list(range(5))
    assert {b._metadata["num_chunks"] for b in batches} == {5}
    assert sum(len(b.data) for b in batches) == usable == 18
    recs = [b._metadata[STATS_KEY][0] for b in batches]
    assert [r["docs_in"] for r in recs] == [5] * 5
    assert sum(r["docs_out"] for r in recs) == 18
    assert sum(r["dropped"].get("too_large", {}).get("docs", 0) for r in recs) == 1
    examples = [e for r in recs for e in r["examples"].get("non_html", [])]
    assert examples[0]["text"].startswith("<image/png")
    assert recs[0]["extra"]["files"] == {"read": 1}
    assert all(r["extra"] == {} for r in recs[1:])  # the file is counted once
    assert "html" in batches[0].data and batches[0].data["text"].isna().all()
    # The slices resume exactly where the previous one stopped: same records, same order.
    whole = CurationReaderStage(max_payload_bytes=MAX_PAYLOAD, records_per_batch=1000)
    [one] = whole.read_file(str(warc_path))
    assert pd.concat([b.data for b in batches])["url"].tolist() == one.data["url"].tolist()


def test_reader_jsonl_and_parquet(tmp_path):
    rows = [{"content": "first doc", "link": "https://a.example", "id": 1},
            {"content": "  ", "link": None, "id": 2}, {"content": None, "link": None, "id": 3}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    stage = CurationReaderStage(text_field="content", url_field="link")
    for name in ("a.jsonl", "b.parquet"):
        [batch] = stage.read_file(str(tmp_path / name))
        assert batch.data["text"].tolist() == ["first doc"]
        assert batch.data["url"].tolist() == ["https://a.example"]
        assert batch.data["id"].tolist() == [1]  # other fields travel as metadata
        assert batch._metadata[STATS_KEY][0]["dropped"]["empty"]["docs"] == 2
    # A wrong text field drops every record with a reason (the pipeline then says what to set).
    for name in ("a.jsonl", "b.parquet"):
        [batch] = CurationReaderStage().read_file(str(tmp_path / name))
        rec = batch._metadata[STATS_KEY][0]
        assert len(batch.data) == 0 and rec["dropped"]["missing_text_field"]["docs"] == 3


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    [batch] = CurationReaderStage().read_file(str(tmp_path / "bad.parquet"))
    assert len(batch.data) == 0
    rec = batch._metadata[STATS_KEY][0]
    assert rec["extra"] == {"file_formats": {"unreadable": 1}, "files": {"unreadable": 1}}
    [issue] = rec["issues"]
    assert issue["reason"] == "unreadable_file" and issue["file"].endswith("bad.parquet")


def test_input_format():
    assert input_format("s3://b/x.warc.wet.gz") == "warc"
    assert input_format("x.JSONL.gz") == "jsonl"
    with pytest.raises(ValueError, match="Cannot tell the format"):
        input_format("x.csv")


def test_flipped_payload_byte_is_caught_by_digest_or_crc(tmp_path):
    bodies = [b"<html><p>the first page</p></html>", b"<html><p>the second page</p></html>"]
    for gz in (False, True):
        buf = io.BytesIO()
        w = WARCWriter(buf, gzip=gz)
        for i, body in enumerate(bodies):
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")],
                                    protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(f"https://a.example/{i}", "response",
                                                payload=io.BytesIO(body), http_headers=http))
        data = bytearray(buf.getvalue())
        if gz:  # a bit of the first member's CRC32 trailer
            data[data.find(b"\x1f\x8b\x08", 3) - 6] ^= 1
        else:  # a bit of the first page
            data[data.find(b"first page")] ^= 1
        path = tmp_path / f"f.warc{'.gz' if gz else ''}"
        path.write_bytes(bytes(data))
        recs = list(iter_warc(str(path)))
        # One item per record: the damaged one is dropped (never kept garbled), the next intact.
        assert [r["drop"] for r in recs] == ["corrupt_record" if gz else "digest_mismatch", None]
        assert recs[0]["html"] is None
        if not gz:  # (a small gzip member fails its CRC before warcio parses its headers)
            assert recs[0]["url"] == "https://a.example/0"
        assert recs[1]["html"] == bodies[1].decode()


def test_bad_crc_of_a_big_member_loses_no_later_record(tmp_path):
    # warcio swallows a decompression error in the middle of a member and reports an early end;
    # the reader must count that record and still find the next one.
    words = [f"w{(i * 7919) % 100003}" for i in range(40_000)]  # > warcio's 16 kB read blocks
    bodies = [f"<html><p>{' '.join(words)}</p></html>".encode(), b"<html><p>small</p></html>"]
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i, body in enumerate(bodies):
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"https://a.example/{i}", "response",
                                            payload=io.BytesIO(body), http_headers=http))
    data = bytearray(buf.getvalue())
    data[data.find(b"\x1f\x8b\x08", 3) - 6] ^= 1  # the first member's CRC32
    (tmp_path / "big.warc.gz").write_bytes(bytes(data))
    recs = list(iter_warc(str(tmp_path / "big.warc.gz")))
    assert [(r["drop"], r["url"]) for r in recs] == [("corrupt_record", "https://a.example/0"),
                                                  (None, "https://a.example/1")]
