"""The reader never loses data silently and holds one batch of records at a time.

* bad JSONL lines are counted with their line numbers and the rest of the file is kept;
* empty, unreadable and cut-short files are counted, never fatal to a multi-file run;
* declared charsets are honoured and undeclared Latin-1 / cp1252 / Shift-JIS pages are not
  garbled (real text encoded to real bytes, compared after extraction);
* slices of ``records_per_batch`` records reproduce the whole-file read exactly, and reading a
  slice materialises at most that many records (counted, and measured with tracemalloc).
"""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curation_testdata import TEXTS, page
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from mmllm.curation import readers
from mmllm.curation.base import STATS_KEY, merge_stats_lists
from mmllm.curation.extract import TextExtractionStage
from mmllm.curation.input_split import plan_file
from mmllm.curation.pipeline import run_curation
from mmllm.curation.readers import CurationReaderStage, MissingTextColumnError
from mmllm.curation.sample_data import write_warc


def read_stats(batches) -> dict:
    [rec] = merge_stats_lists([b._metadata[STATS_KEY] for b in batches])
    return rec


def kept(batches) -> pd.DataFrame:
    return pd.concat([b.data for b in batches], ignore_index=True)


def warc_bytes(bodies: list[bytes], *, gz: bool = True, content_type: str = "text/html") -> bytes:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for i, body in enumerate(bodies):
        http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"https://site.example/{i}", "response",
                                            payload=io.BytesIO(body), http_headers=http))
    return buf.getvalue()


# --------------------------------------------------------------------------- JSONL / Parquet


JSONL_LINES = [json.dumps({"text": "first document", "id": 1}), "{not json",
               json.dumps({"text": "second document", "id": 3}), "[1, 2]", "",
               json.dumps({"text": 5, "id": 6}), json.dumps({"id": 7}),
               json.dumps({"text": "third document", "id": 8})]


@pytest.mark.parametrize("per_batch", [2, 1000])  # many slices / one slice
def test_invalid_jsonl_lines_counted_with_line_numbers(tmp_path, per_batch):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(JSONL_LINES))  # no newline after the last line
    batches = CurationReaderStage(records_per_batch=per_batch).read_file(str(path))
    assert kept(batches)["id"].tolist() == [1, 3, 8]
    rec = read_stats(batches)
    # 7 records (the blank line 5 holds none): 3 kept, 4 dropped, each with a reason.
    assert (rec["docs_in"], rec["docs_out"]) == (7, 3)
    assert {r: d["docs"] for r, d in rec["dropped"].items()} == {
        "invalid_json": 2, "non_string_text": 1, "missing_text_field": 1}
    assert [(i["where"], i["reason"]) for i in rec["issues"]] == [
        ("line 2", "invalid_json"), ("line 4", "invalid_json"), ("line 7", "missing_text_field")]
    assert all(i["file"] == str(path) for i in rec["issues"])
    assert max(b._metadata[STATS_KEY][0]["docs_in"] for b in batches) <= per_batch


def test_utf8_bom_and_crlf_jsonl(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "caf\xc3\xa9"}\r\n{"text": "two"}\r\n')
    assert kept(CurationReaderStage().read_file(str(path)))["text"].tolist() == ["café", "two"]


def test_cut_short_gzip_jsonl_is_counted_and_unverified_lines_dropped(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " + "word " * 50}) for i in range(400)]
    data = gzip.compress("\n".join(lines).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    batches = CurationReaderStage(records_per_batch=64).read_file(str(path))
    rec = read_stats(batches)
    # The lines before the cut were decompressed, but no CRC vouches for them: all dropped,
    # each counted, plus one record for the unreadable rest.
    n = rec["dropped"]["unverified_stream"]["docs"]
    assert 0 < n < 400 and rec["docs_out"] == 0 and len(kept(batches)) == 0
    assert rec["dropped"]["read_error"]["docs"] == 1 and rec["docs_in"] == n + 1
    assert rec["extra"]["files"] == {"read": 1, "cut_short": 1}
    [issue] = rec["issues"]
    assert (issue["reason"], issue["where"]) == ("read_error", f"line {n + 1}")
    assert "EOFError" in issue["error"]


def test_corrupt_parquet_row_group_drops_exactly_its_rows(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"text": [f"row {i} " + "x" * 2000 for i in range(30)]})
    pq.write_table(table, path, row_group_size=10, compression="none")
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = meta.data_page_offset
    data[start + 10:start + 200] = b"\xff" * 190  # garble the second row group's page
    path.write_bytes(bytes(data))
    batches = CurationReaderStage(records_per_batch=10).read_file(str(path))
    rec = read_stats(batches)
    assert rec["docs_in"] == 30
    assert rec["docs_out"] + rec["dropped"].get("corrupt_row_group", {}).get("docs", 0) == 30
    assert rec["dropped"]["corrupt_row_group"]["docs"] == 10
    assert kept(batches)["text"].str.split().str[1].astype(int).tolist() == [
        *range(10), *range(20, 30)]


def test_empty_files_are_counted(tmp_path):
    for name in ("e.jsonl", "e.parquet", "e.warc.gz"):
        (tmp_path / name).write_bytes(b"")
        [batch] = CurationReaderStage().read_file(str(tmp_path / name))
        rec = batch._metadata[STATS_KEY][0]
        assert len(batch.data) == 0 and rec["extra"]["files"] == {"empty": 1}


def _good_docs(n: int) -> list[str]:
    return [json.dumps({"text": TEXTS[k], "url": f"https://docs.example/{k}"})
            for k in list(TEXTS)[:n]]


def test_multi_file_run_survives_empty_unreadable_and_bad_lines(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = _good_docs(4)
    (inputs / "a.jsonl").write_text("\n".join([docs[0], "{oops", docs[1]]) + "\n")
    (inputs / "b.jsonl").write_text("")
    (inputs / "c.jsonl").write_text("\n".join(docs[2:]) + "\n")
    (inputs / "d.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    result = run_curation(str(inputs), tmp_path / "out", executor="local",
                          overrides=["dedup.minhash=null", "dedup.substring=null"])
    report = result.report
    assert report["input_files"] == {"inputs": 4, "read": 2, "empty": 1, "unreadable": 1,
                                     "cut_short": 0}
    assert report["drop_reasons"]["read"]["invalid_json"]["docs"] == 1
    [read_row] = [f for f in report["funnel"] if f["stage"] == "read"]
    assert (read_row["docs_in"], read_row["docs_removed"]) == (5, 1)
    issues = report["issues"]["read"]["listed"]
    assert {(i["file"].rsplit("/", 1)[-1], i["where"], i["reason"]) for i in issues} == {
        ("a.jsonl", "line 2", "invalid_json"), ("d.parquet", "file", "unreadable_file")}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "a.jsonl | line 2 | invalid_json" in md and "1 empty, 1 unreadable" in md
    assert result.num_documents == 4


def test_wrong_text_field_everywhere_is_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "some text"}\n')
    with pytest.raises(MissingTextColumnError, match="stages.read.text_field"):
        run_curation(str(tmp_path / "a.jsonl"), tmp_path / "out", executor="local",
                     overrides=["dedup.minhash=null", "dedup.substring=null"])
    assert not (tmp_path / "out" / "_work" / "stage1").exists()  # a fixed rerun reads again


# --------------------------------------------------------------------------- charsets


REAL_TEXT = {
    "latin-1": ("La boulangère a préparé une crème brûlée pour la fête du village. Les élèves "
                "ont goûté à tout, même aux îles flottantes, et le maître était très content."),
    "cp1252": ("“Smart quotes” and an em dash — the café’s menu lists the price in € and a "
               "trademark™ sign… every morning."),
    "shift_jis": ("東京の図書館は百年以上前に開館しました。最初は数百冊の本しかありませんでしたが、"
                  "今では地域の歴史を学ぶ人々に利用されています。"),
    "utf-8": "Ünïcödé: 東京, Привет, 🍞 and ça va — all in one page.",
}


def _page(text: str, meta: str | None) -> str:
    """A real-looking page (navigation, banner, footer) whose article is ``text``."""
    head = f'<meta charset="{meta}">' if meta else ""
    return page("Notes", [text]).replace('<meta charset="utf-8">', head)


@pytest.mark.parametrize("encoding", list(REAL_TEXT))
@pytest.mark.parametrize("declared", ["none", "http", "meta", "utf8-server-default"])
def test_charset_round_trip_through_extraction(tmp_path, encoding, declared):
    text = REAL_TEXT[encoding]
    body = _page(text, encoding if declared == "meta" else None)
    content_type = {"http": f"text/html; charset={encoding}",
                    "utf8-server-default": "text/html; charset=ISO-8859-1"}.get(declared,
                                                                                 "text/html")
    raw = body.encode("utf-8" if declared == "utf8-server-default" else encoding)
    if declared == "utf8-server-default" and raw.isascii():
        pytest.skip("ASCII needs no charset")
    path = write_warc(tmp_path / "c.warc.gz", [{"url": "https://c.example/", "body": raw,
                                                "content_type": content_type}])
    batches = CurationReaderStage().read_file(str(path))
    [html] = kept(batches)["html"].tolist()
    assert html == body
    [extracted] = TextExtractionStage(remove_urls=False).process(batches[0]).data["text"]
    # On a one-paragraph page trafilatura may keep the navigation, repeat the paragraph or glue
    # the title to it; the article must come out as the original text, character for character.
    assert text in [p.removeprefix("Notes").strip() for p in extracted.split("\n")]
    assert "\ufffd" not in extracted


# --------------------------------------------------------------------------- streaming


def _bodies(n: int) -> list[bytes]:
    keys = list(TEXTS)
    return [_page(f"Page {i}. " + TEXTS[keys[i % len(keys)]], None).encode() for i in range(n)]


def _inputs(tmp_path, n: int, row_group: int = 25) -> dict[str, str]:
    bodies = _bodies(n)
    (tmp_path / "s.warc.gz").write_bytes(warc_bytes(bodies))
    (tmp_path / "s.warc").write_bytes(warc_bytes(bodies, gz=False))
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": b.decode()}) for b in bodies))
    pq.write_table(pa.table({"text": [b.decode() for b in bodies]}), tmp_path / "s.parquet",
                   row_group_size=row_group)
    return {k: str(tmp_path / f"s.{k}") for k in ("warc.gz", "warc", "jsonl", "parquet")}


@pytest.mark.parametrize("kind", ["warc.gz", "warc", "jsonl", "parquet"])
def test_slices_reproduce_the_whole_file(tmp_path, kind):
    path = _inputs(tmp_path, 120)[kind]
    sliced = CurationReaderStage(records_per_batch=25).read_file(path)
    whole = CurationReaderStage(records_per_batch=10_000).read_file(path)
    assert len(plan_file(path, readers.input_format(path), 25)) == 5
    assert [b._metadata["chunk"] for b in sliced] == list(range(5))
    assert {b._metadata["num_chunks"] for b in sliced} == {5}
    col = "text" if kind in ("jsonl", "parquet") else "html"
    assert kept(sliced)[col].tolist() == kept(whole)[col].tolist()
    assert len(kept(sliced)) == 120
    assert [b._metadata[STATS_KEY][0]["docs_in"] for b in sliced] == [25] * 4 + [20]


@pytest.mark.parametrize("kind", ["warc.gz", "jsonl", "parquet"])
def test_a_slice_holds_at_most_one_batch_of_records(tmp_path, monkeypatch, kind):
    path = _inputs(tmp_path, 400, row_group=20)[kind]
    pulled: list[int] = []
    real_warc = readers.iter_warc

    def counting_warc(*a, **kw):  # records pulled from warcio per slice read
        pulled.append(0)
        for r in real_warc(*a, **kw):
            pulled[-1] += 1
            yield r

    monkeypatch.setattr(readers, "iter_warc", counting_warc)
    stage = CurationReaderStage(records_per_batch=20)
    slices = plan_file(path, readers.input_format(path), 20)
    assert len(slices) == 20

    def peak(reader, s) -> int:
        tracemalloc.start()
        batches = reader.read_slice(s)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert sum(len(b.data) for b in batches) == (s["records"] or s["rows"] or 400)
        return top

    one = max(peak(stage, s) for s in slices[:3])
    if kind == "warc.gz":
        assert pulled == [20, 20, 20]  # warcio is never asked for a record beyond the slice
    whole_size = sum(len(b) for b in _bodies(400))
    [everything] = plan_file(path, readers.input_format(path), 10_000)
    whole = peak(CurationReaderStage(records_per_batch=10_000), everything)
    # The whole file at once holds more than all 400 records' text; one slice of 20 records
    # (plus the fixed cost of a reader: buffers, a DataFrame) a small fraction of that.
    print(f"{kind}: one slice peak {one} B, whole file peak {whole} B, text {whole_size} B")
    assert whole > whole_size and one < whole / 4, (one, whole_size, whole)
