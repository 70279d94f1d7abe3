"""Robust WARC / WET iteration: HTTP responses with HTML only, charset detection, size cap.

Web archives are messy: records are truncated by the crawler, gzip members get corrupted, pages
are binary or undecodable, giant or empty. :func:`iter_warc` never raises on a bad record: it
yields a record with a ``drop`` reason instead and re-synchronises on the next record boundary
(the next gzip member for ``.warc.gz``, the next ``WARC/1.`` line for plain WARC), so one bad
record never stops a run.
"""

from __future__ import annotations

import codecs
import re
import zlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, BinaryIO

from fsspec.core import url_to_fs
from resiliparse.parse.encoding import detect_encoding
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

HTML_MIMES = frozenset({"text/html", "application/xhtml+xml"})
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.IGNORECASE)
_HTML_SNIFF = re.compile(rb"^\s*(<!doctype\s+html|<html|<head|<body)", re.IGNORECASE)
_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_MAGIC = b"WARC/1."
_SCAN_CHUNK = 1 << 20
_TRAILER_SLACK = 4  # bytes of padding tolerated after the last record
# Decoded text with more control characters than this is binary that happened to decode.
_MAX_CONTROL_FRACTION = 0.02
# WHATWG Encoding Standard: the codec a browser uses for a label it treats as a superset.
_WHATWG_SUPERSET = {"iso8859-1": "cp1252", "ascii": "cp1252", "iso8859-9": "cp1254",
                    "iso8859-11": "cp874", "tis-620": "cp874", "shift_jis": "cp932",
                    "gb2312": "gbk", "euc_kr": "cp949"}
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_DETECT_BYTES = 64 * 1024
_MAX_REPLACED_PER = 1000  # lenient UTF-8: at most one invalid sequence per 1000 characters
_RECOVERABLE = (ArchiveLoadFailed, zlib.error, EOFError, OSError, ValueError, IndexError,
                KeyError, AttributeError, UnicodeDecodeError, TypeError)


def _valid_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().strip("\"'")).name
    except (LookupError, ValueError):
        return None


@lru_cache(maxsize=64)
def _single_byte(codec: str) -> bool:
    """Whether every byte is one character in ``codec`` (Latin-1, cp1252, KOI8-R, ...)."""
    return codec != "utf-8" and len(bytes(range(256)).decode(codec, "replace")) == 256


def _looks_binary(text: str) -> bool:
    if not text:
        return False
    sample = text[:20000]
    ctrl = sum(1 for c in sample if (ord(c) < 32 and c not in "\t\n\r\f") or c == "\ufffd")
    return ctrl / len(sample) > _MAX_CONTROL_FRACTION


def _strict(payload: bytes, codec: str) -> tuple[str, str] | None:
    """``(text, codec used)`` with the codec browsers use for a label (its WHATWG superset
    first), else ``None``."""
    for enc in dict.fromkeys((_WHATWG_SUPERSET.get(codec, codec), codec)):
        try:
            return payload.decode(enc), enc
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def _candidates(payload: bytes, declared: str | None) -> list[str]:
    """Codecs to try in order: BOM, HTTP ``Content-Type``, ``<meta charset>``, UTF-8, detection."""
    bom = next((enc for mark, enc in _BOMS if payload.startswith(mark)), None)
    meta = _META_CHARSET.search(payload[:4096])
    labels = [_valid_codec(declared), _valid_codec(meta.group(1).decode("ascii", "ignore"))
              if meta else None]
    # A declared single-byte charset on bytes that are valid, non-ASCII UTF-8 is a server default
    # (Apache's ISO-8859-1): real Latin-1 text is practically never valid UTF-8 as well.
    if any(c and _single_byte(c) for c in labels) and not payload.isascii():
        try:
            payload.decode("utf-8")
            labels.insert(0, "utf-8")
        except UnicodeDecodeError:
            pass
    detected = _valid_codec(detect_encoding(payload[:_DETECT_BYTES]))
    return [c for c in dict.fromkeys([bom, *labels, "utf-8", detected]) if c]


def decode_payload(payload: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """Decode an HTML payload: BOM, declared charset, ``<meta charset>``, UTF-8, then detection.

    Labels are honoured when they decode the bytes, with the codec browsers use for them
    (WHATWG: ``iso-8859-1`` means ``windows-1252``, ``shift_jis`` means ``windows-31j``, ...).
    Undeclared pages are detected with Resiliparse (uchardet, WHATWG encodings only). A page that
    no codec decodes cleanly is kept as UTF-8 only when a handful of bytes are invalid.

    Args:
        payload: Raw HTTP body.
        declared: Charset from the HTTP ``Content-Type`` header, if any.

    Returns:
        ``(text, codec)``, or ``None`` when no encoding yields text (binary / garbage bytes).
    """
    for codec in _candidates(payload, declared):
        decoded = _strict(payload, codec)
        if decoded is not None:
            text, used = decoded
            text = text.removeprefix("\ufeff")  # a BOM is not content
            return None if _looks_binary(text) else (text, used)
    text = payload.decode("utf-8", "replace")
    if text.count("\ufffd") <= max(1, len(text) // _MAX_REPLACED_PER):
        return None if _looks_binary(text) else (text, "utf-8")
    return None


def _content_type(rec: Any) -> tuple[str, str | None]:
    raw = (rec.http_headers.get_header("Content-Type") or "") if rec.http_headers else ""
    mime, _, params = raw.partition(";")
    charset = None
    for p in params.split(";"):
        key, _, value = p.strip().partition("=")
        if key.lower() == "charset":
            charset = value.strip()
    return mime.strip().lower(), charset


def _base(rec: Any, path: str, offset: int) -> dict[str, Any]:
    hdr = rec.rec_headers
    return {"url": hdr.get_header("WARC-Target-URI"), "record_id": hdr.get_header("WARC-Record-ID"),
            "date": hdr.get_header("WARC-Date"), "source_file": path, "html": None, "text": None,
            "content_type": None, "charset": None, "raw_len": 0, "drop": None, "offset": offset}


def _incomplete(rec: Any) -> bool:
    """True when the file ended before the record's declared length (after a full read)."""
    return getattr(rec.raw_stream, "limit", 0) > 0


def _response(rec: Any, out: dict[str, Any], max_payload_bytes: int, drop_truncated: bool,
              decode: bool = True) -> None:
    """Fill ``out`` from an HTTP response record, setting ``drop`` when it is unusable."""
    if rec.http_headers is None:
        rec.raw_stream.read()
        # A response without HTTP headers is either a non-HTTP capture or a record cut short.
        out["drop"] = "incomplete_record" if not rec.length or _incomplete(rec) else "not_http"
        return
    status = rec.http_headers.get_statuscode()
    mime, charset = _content_type(rec)
    out["content_type"] = mime or None
    if status != "200":
        out["drop"] = "http_status"
    elif drop_truncated and rec.rec_headers.get_header("WARC-Truncated"):
        out["drop"] = "truncated"
    elif mime and mime not in HTML_MIMES:
        out["drop"] = "non_html"
    if out["drop"]:
        return
    payload = _read_payload(rec, out, max_payload_bytes)
    if payload is None:
        return
    if not mime and not _HTML_SNIFF.match(payload[:1024]):
        out["drop"] = "non_html"
        return
    if not decode:
        return
    decoded = decode_payload(payload, charset)
    if decoded is None:
        out["drop"] = "undecodable"
    else:
        out["html"], out["charset"] = decoded


def _read_payload(rec: Any, out: dict[str, Any], max_payload_bytes: int) -> bytes | None:
    """A record's payload, or None with ``out["drop"]`` saying why it is unusable."""
    payload = rec.content_stream().read(max_payload_bytes + 1)
    out["raw_len"] = len(payload)
    if len(payload) > max_payload_bytes:
        out["drop"] = "too_large"
    elif _incomplete(rec):
        out["drop"] = "incomplete_record"
    elif not payload.strip():
        out["drop"] = "empty"
    else:
        return payload
    return None


def _conversion(rec: Any, out: dict[str, Any], max_payload_bytes: int, decode: bool = True) -> None:
    """WET ``conversion`` records already hold plain text."""
    out["content_type"] = "text/plain"
    payload = _read_payload(rec, out, max_payload_bytes)
    if payload is not None and decode:
        decoded = decode_payload(payload, "utf-8")
        out["drop"] = "undecodable" if decoded is None else None
        out["text"] = decoded[0] if decoded else None


def _next_boundary(fh: BinaryIO, start: int, gz: bool) -> int | None:
    """Offset of the next gzip member / WARC header at or after ``start`` (``None`` at EOF)."""
    magic = _GZIP_MAGIC if gz else _WARC_MAGIC
    pos = start
    while True:
        fh.seek(pos)
        chunk = fh.read(_SCAN_CHUNK + len(magic))
        if not chunk:
            return None
        i = chunk.find(magic)
        if i >= 0:
            return pos + i
        if len(chunk) <= len(magic):
            return None
        pos += _SCAN_CHUNK


def iter_warc(path: str, *, max_payload_bytes: int = 2_000_000, drop_truncated: bool = True,
              storage_options: dict | None = None, start: int = 0, decode: bool = True,
              ) -> Iterator[dict[str, Any]]:
    """Yield one dict per response / conversion record of a (gzipped) WARC or WET file.

    Request, metadata and warcinfo records are skipped silently (they are not documents). The
    records are read one at a time: only the one being yielded is in memory.

    Args:
        path: Local or fsspec path.
        max_payload_bytes: Larger payloads are dropped as ``too_large`` without being read.
        drop_truncated: Drop records the crawler marked ``WARC-Truncated``.
        storage_options: fsspec options.
        start: Byte offset to start at: ``0`` or the ``offset`` of a record yielded before
            (iterating from there yields exactly the records that followed it).
        decode: Decode payloads (``False`` only walks the records, e.g. to plan splits).

    Yields:
        ``{"url", "record_id", "date", "source_file", "html", "text", "content_type", "charset",
        "raw_len", "drop", "offset"}``; ``drop`` is ``None`` for usable records, else the reason;
        ``offset`` is where the record starts in the (compressed) file.
    """
    fs, fs_path = url_to_fs(path, **(storage_options or {}))
    with fs.open(fs_path, "rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC[:2]
        cursor, after_damage = (_skip_separator(fh, start) if start else 0), False
        while cursor is not None:
            at = cursor
            cursor = yield from _iter_from(fh, cursor, gz, path, max_payload_bytes, drop_truncated,
                                           decode, after_damage)
            after_damage = True  # _iter_from only returns a cursor to resynchronise
            if cursor is not None and cursor <= at:
                # Damaged headers can make warcio's offsets point backwards: never resume at or
                # before where this attempt began (that loops forever), always strictly after.
                cursor = _next_boundary(fh, at + 1, gz)


def _skip_separator(fh: BinaryIO, pos: int) -> int:
    """Step over the blank lines that end an uncompressed record (warcio's offsets exclude them)."""
    fh.seek(pos)
    head = fh.read(8)
    return pos + len(head) - len(head.lstrip(b"\r\n"))


def _iter_from(fh: BinaryIO, start: int, gz: bool, path: str, max_payload_bytes: int,
               drop_truncated: bool, decode: bool = True, after_damage: bool = False,
               ) -> Iterator[dict[str, Any]]:
    """Iterate from ``start``; on corruption yield a ``corrupt_record`` and return where to resume.

    A damaged region counts once: when ``start`` is a resynchronisation point right after damage
    and nothing readable starts there, no second ``corrupt_record`` is yielded.
    """
    fh.seek(start)
    end, base, out = start, None, None  # end: absolute end of the last record read completely
    try:
        # WARC-Block/Payload-Digest (SHA-1) are checked when decoding: a plain WARC has no CRC.
        it = ArchiveIterator(fh, arc2warc=True, check_digests=decode)
        for rec in it:
            out = None
            if gz and getattr(it.reader, "decompressor", True) is None:
                # warcio reads a member that does not decompress as plain bytes, and random bytes
                # can pass for an ARC header: in a gzipped file that is damage, not a record.
                raise ArchiveLoadFailed("gzip member does not decompress")
            if rec.rec_type in ("response", "conversion"):
                out = _base(rec, path, end)  # this record starts where the last one ended
                if rec.rec_type == "response":
                    _response(rec, out, max_payload_bytes, drop_truncated, decode)
                else:
                    _conversion(rec, out, max_payload_bytes, decode)
            # Offsets are only known once warcio has read the record to its end (for gzip, its
            # member's CRC included); warcio counts them from the file's position when the
            # iterator was made (absolute when seekable).
            offset = it.get_record_offset()
            base = (start if offset < start else 0) if base is None else base
            rec_start, end = end, base + offset + it.get_record_length()
            if _incomplete(rec):
                # The stream broke inside this record (the file ends, or warcio swallowed a
                # decompression error and reports an early end): its end is not where the next
                # record starts. Count it and resynchronise after its start.
                resume = _next_boundary(fh, rec_start + 1, gz)
                if out is not None:
                    yield {**out, "html": None, "text": None,
                           "drop": "incomplete_record" if resume is None else "corrupt_record"}
                return resume
            if out is not None:  # yielded only now: a record whose checksum fails is not kept
                _check_digest(rec, out)
                yield out
                out = None
    except _RECOVERABLE as err:  # one bad record must not stop the file
        error = f"{type(err).__name__}: {err}"
        if out is not None:  # its headers were fine, its body is not
            yield {**out, "html": None, "text": None, "drop": "corrupt_record",
                   "error": error[:200]}
        elif not (after_damage and end == start):
            yield _broken(path, "corrupt_record", error, end)
        # (else: a resync right after damage found no record yet, it is the same damage)
        # The failing record starts at `end`; resume at the next boundary strictly after it.
        return _next_boundary(fh, end + 1, gz)
    # warcio ends quietly on a record cut off by the end of the file: count it.
    if fh.seek(0, 2) - end > _TRAILER_SLACK:
        yield _broken(path, "incomplete_record", "file ends inside a record", end)
    return None


def _check_digest(rec: Any, out: dict[str, Any]) -> None:
    """Drop a usable record whose WARC digest does not match its bytes (bit rot, bad copy)."""
    checker = getattr(rec, "digest_checker", None)
    if out["drop"] is None and checker is not None and checker.passed is False:
        out.update(html=None, text=None, drop="digest_mismatch",
                   error="; ".join(map(str, checker.problems))[:200])


def _broken(path: str, reason: str, error: str, offset: int) -> dict[str, Any]:
    return {"url": None, "record_id": None, "date": None, "source_file": path, "html": None,
            "text": None, "content_type": None, "charset": None, "raw_len": 0, "drop": reason,
            "error": error[:200], "offset": offset}
