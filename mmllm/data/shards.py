"""Packed token shards: tokenise a corpus once, then read fixed-length windows by memmap.

On-disk format of a shard directory (every file is written to ``NAME.tmp`` and renamed, and
``meta.json`` is written last, so a directory without ``meta.json`` is unfinished)::

    tokens_00000.bin   raw token ids, np.uint16 (vocab <= 65536) or np.uint32, documents back to
                       back, each followed by eos; readable with np.memmap(dtype, mode="r")
    docs_00000.npy     int64 start offset of every document inside tokens_00000.bin
    meta.json          dtype, vocab_size, eos_id, num_tokens, num_docs, shards, tokenizer, source

A shard holds whole documents: it is closed once it reaches ``shard_size_tokens``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

META = "meta.json"
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OK, _MISSING, _EMPTY = 0, 1, 2


# ------------------------------------------------------------------------------------ writing
def tokenize_to_shards(source: str | os.PathLike | Sequence[str | os.PathLike],
                       output_dir: str | os.PathLike, tokenizer, *, text_field: str = "text",
                       split: str | None = None, num_proc: int = 1,
                       shard_size_tokens: int = 2**28, add_eos: bool = True, add_bos: bool = False,
                       dtype: str | np.dtype | None = None, overwrite: bool = False,
                       batch_size: int = 1000) -> dict:
    """Tokenises a corpus into packed token shards.

    Args:
        source: a JSONL / JSONL.gz / Parquet file, a glob or list of them, a directory of such
            files, a ``datasets.save_to_disk`` directory, or a hub dataset name (online only).
        output_dir: the shard directory (created).
        tokenizer: a transformers tokenizer, or a path for :func:`mmllm.data.load_tokenizer`.
        text_field: the column holding the text.
        split: split of a ``DatasetDict`` or hub dataset (default "train").
        num_proc: processes for ``datasets.map``.
        shard_size_tokens: a shard is closed once it holds at least this many tokens.
        add_eos: append eos after every document (the document separator in packed windows).
        add_bos: prepend bos to every document (LLaMA style).
        dtype: token dtype; default uint16 when every id fits (vocab <= 65536), else uint32.
        overwrite: replace an existing finished shard directory.
        batch_size: documents per ``map`` batch.

    The tokenised documents pass through an arrow file (4 bytes a token) under
    ``output_dir/.work``, removed at the end.

    Returns:
        The meta dict also written to ``output_dir/meta.json``. Documents whose text is missing
        (absent, null or not a string) or empty (whitespace only) are skipped and counted in
        ``meta["skipped"]``.

    Raises:
        FileNotFoundError: the source does not exist.
        FileExistsError: ``output_dir`` already holds shards and ``overwrite`` is False.
        ValueError: unknown file format, missing ``text_field``, or ids that do not fit ``dtype``.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from mmllm.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    out = Path(output_dir)
    vocab_size = len(tokenizer)
    np_dtype = _choose_dtype(vocab_size, dtype)
    eos_id, bos_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    if (add_eos and eos_id is None) or (add_bos and bos_id is None):
        raise ValueError("the tokenizer has no eos/bos token to add")
    _prepare_output(out, overwrite)
    work = out / ".work"  # datasets' arrow caches; removed when done
    try:
        ds = load_text_dataset(source, split=split, cache_dir=work / "hf")
        if text_field not in ds.column_names:
            raise ValueError(f"column {text_field!r} not in {ds.column_names} of {source}")
        tokenized = _tokenize(ds, tokenizer, text_field, add_bos=add_bos, add_eos=add_eos,
                              num_proc=num_proc, batch_size=batch_size, work=work)
        writer = _ShardWriter(out, np_dtype, shard_size_tokens)
        try:
            skipped = _write(tokenized, writer, batch_size, vocab_size)
        except BaseException:
            writer.abort()
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "format": "mmllm.token_shards", "version": 1, "dtype": np_dtype.name,
        "vocab_size": vocab_size, "eos_id": eos_id, "bos_id": bos_id,
        "add_eos": add_eos, "add_bos": add_bos,
        "num_tokens": sum(s["num_tokens"] for s in writer.shards),
        "num_docs": sum(s["num_docs"] for s in writer.shards),
        "skipped": skipped, "shards": writer.shards,
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "source": [str(s) for s in source] if _is_list(source) else str(source),
        "text_field": text_field, "split": split,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _atomic_write_bytes(out / META, json.dumps(meta, indent=2).encode())
    return meta


def load_text_dataset(source, *, split: str | None = None,
                      cache_dir: str | os.PathLike | None = None):
    """Opens ``source`` (see :func:`tokenize_to_shards`) as a ``datasets.Dataset``."""
    import datasets

    if _is_list(source):
        files = [f for s in source for f in _expand(str(s))]
    else:
        p = Path(source).expanduser()
        if p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json")):
            return _pick_split(datasets.load_from_disk(str(p)), split, source)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if _file_format(f.name) is not None)
            if not files:
                raise ValueError(f"{p} holds no .jsonl/.jsonl.gz/.parquet files and is not a "
                                 "datasets.save_to_disk directory")
        elif (p.exists() or glob.has_magic(str(source)) or _file_format(str(source))
              or not _HUB_NAME.match(str(source))):
            files = _expand(str(source))
        else:
            if _offline("HF_DATASETS_OFFLINE") or _offline("HF_HUB_OFFLINE"):
                raise FileNotFoundError(f"{source!r}: no such local path, and the hub is offline")
            return datasets.load_dataset(str(source), split=split or "train")
    formats = {_file_format(f) for f in files}
    if None in formats or len(formats) != 1:
        raise ValueError(f"unsupported or mixed file formats in {files}: expected all of "
                         f"{_JSON_SUFFIXES} or all .parquet")
    try:
        return datasets.load_dataset(formats.pop(), data_files=files, split="train",
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as e:
        raise ValueError(f"could not read {files}: {e.__cause__ or e}") from e


def _offline(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("0", "", "false", "False")


def _expand(pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
    missing = [f for f in files if not Path(f).expanduser().is_file()]
    if not files or missing:
        raise FileNotFoundError(f"no such file: {missing[0] if missing else pattern}")
    return [str(Path(f).expanduser()) for f in files]


def _file_format(name: str) -> str | None:
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    return "parquet" if name.endswith(".parquet") else None


def _pick_split(ds, split: str | None, source):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise ValueError(f"split {split!r} not in {list(ds)} of {source}")
        return ds[split]
    return ds


def _is_list(source) -> bool:
    return isinstance(source, (list, tuple))


def _choose_dtype(vocab_size: int, dtype) -> np.dtype:
    if dtype is None:
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dt = np.dtype(dtype)
    if dt.kind not in "ui" or vocab_size - 1 > np.iinfo(dt).max:
        raise ValueError(f"dtype {dt} cannot hold token ids up to {vocab_size - 1}")
    return dt


def _prepare_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds token shards (pass overwrite=True)")
        (out / META).unlink()  # first, so the directory never looks finished while rewritten
    for f in out.iterdir():
        if re.fullmatch(r"(tokens_\d+\.bin|docs_\d+\.npy)(\.tmp)?", f.name):
            f.unlink()


class _Tokenize:
    """The ``datasets.map`` function: token ids per document plus a skip flag (picklable)."""

    def __init__(self, tokenizer, text_field: str, prefix: list[int], suffix: list[int]):
        self.tokenizer, self.text_field = tokenizer, text_field
        self.prefix, self.suffix = prefix, suffix

    def __call__(self, batch: dict) -> dict:
        texts = batch[self.text_field]
        status = [_MISSING if not isinstance(t, str) else _EMPTY if not t.strip() else _OK
                  for t in texts]
        ok = [t for t, s in zip(texts, status) if s == _OK]
        encoded = iter(self.tokenizer(ok, add_special_tokens=False)["input_ids"] if ok else [])
        ids = [self.prefix + next(encoded) + self.suffix if s == _OK else [] for s in status]
        return {"input_ids": ids, "status": status}


def _tokenize(ds, tokenizer, text_field: str, *, add_bos: bool, add_eos: bool, num_proc: int,
              batch_size: int, work: Path):
    import datasets

    fn = _Tokenize(tokenizer, text_field, [tokenizer.bos_token_id] if add_bos else [],
                   [tokenizer.eos_token_id] if add_eos else [])
    # uint32 storage keeps the intermediate arrow file at 4 bytes a token (int64 by default).
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint32")),
                                  "status": datasets.Value("int8")})
    work.mkdir(parents=True, exist_ok=True)
    return ds.map(fn, batched=True, batch_size=batch_size,
                  num_proc=num_proc if num_proc > 1 else None,
                  remove_columns=ds.column_names, features=features, desc="tokenizing",
                  cache_file_name=str(work / "tokenized.arrow"), load_from_cache_file=False)


def _write(tokenized, writer: _ShardWriter, batch_size: int, vocab_size: int) -> dict:
    """Streams the tokenised documents into shards; returns the skip counts."""
    skipped = {"missing": 0, "empty": 0}
    table = tokenized.with_format("arrow")
    with tqdm(total=len(tokenized), desc="writing shards", unit="doc") as bar:
        for batch in table.iter(batch_size=batch_size):
            status = batch["status"].to_numpy()
            skipped["missing"] += int((status == _MISSING).sum())
            skipped["empty"] += int((status == _EMPTY).sum())
            ids = batch["input_ids"].combine_chunks()  # (D,) list array
            lengths = ids.value_lengths().to_numpy(zero_copy_only=False)[status == _OK]
            flat = ids.flatten().to_numpy(zero_copy_only=False)
            if flat.size and int(flat.max()) >= vocab_size:
                raise ValueError(f"token id {int(flat.max())} >= vocab size {vocab_size}")
            writer.add(flat, lengths)
            bar.update(len(status))
    writer.close()
    return skipped


class _ShardWriter:
    """Appends documents to ``tokens_K.bin.tmp``; renames it (and its docs file) when full."""

    def __init__(self, out: Path, dtype: np.dtype, shard_size_tokens: int):
        if shard_size_tokens < 1:
            raise ValueError(f"shard_size_tokens must be positive, got {shard_size_tokens}")
        self.out, self.dtype, self.size = out, dtype, shard_size_tokens
        self.shards: list[dict] = []
        self._file = None
        self._starts: list[np.ndarray] = []
        self._n = 0

    def _tmp(self, name: str) -> Path:
        return self.out / f"{name}.tmp"

    def _name(self, kind: str) -> str:
        k = len(self.shards)
        return f"tokens_{k:05d}.bin" if kind == "tokens" else f"docs_{k:05d}.npy"

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as concatenated ids (N,) and their lengths (D,)."""
        ends = np.cumsum(lengths)
        begin = 0  # first document not yet written
        while begin < len(lengths):
            base = ends[begin - 1] if begin else 0
            # the shard is closed after the first document that brings it to `size` tokens
            room = self.size - self._n
            stop = int(np.searchsorted(ends - base, room, side="left")) + 1
            stop = min(stop, len(lengths))
            self._append(flat[base:ends[stop - 1]], lengths[begin:stop])
            begin = stop
            if self._n >= self.size:
                self._finish()

    def _append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self._tmp(self._name("tokens")), "wb")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._starts.append(self._n + offsets)
        tokens.astype(self.dtype, copy=False).tofile(self._file)
        self._n += int(lengths.sum())

    def _finish(self) -> None:
        tokens, docs = self._name("tokens"), self._name("docs")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        starts = np.concatenate(self._starts)
        with open(self._tmp(docs), "wb") as f:
            np.save(f, starts)
        os.replace(self._tmp(docs), self.out / docs)
        os.replace(self._tmp(tokens), self.out / tokens)
        self.shards.append({"tokens": tokens, "docs": docs, "num_tokens": self._n,
                            "num_docs": int(starts.size)})
        self._starts, self._n = [], 0

    def close(self) -> None:
        if self._file is not None and self._n:
            self._finish()

    def abort(self) -> None:
        """Removes the unfinished shard's temporary files (finished shards stay, unlisted)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for f in self.out.glob("*.tmp"):
            f.unlink()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ reading
class TokenShards:
    """Read-only view of a shard directory written by :func:`tokenize_to_shards`.

    Samples are non-overlapping windows of ``seq_len + 1`` tokens laid end to end from the start
    of each shard file; windows never cross shard files (a shard's last ``n % (seq_len + 1)``
    tokens are not used at that ``seq_len``). Windows do cross documents: ``doc_ids`` tells
    where documents start inside a window.

    Args:
        path: the shard directory.

    Raises:
        FileNotFoundError: no such directory, or no ``meta.json`` (not a finished shard dir).
        ValueError: a token file whose size disagrees with ``meta.json``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / META).is_file():
            what = (f"no {META} (unfinished or not a shard directory)" if self.path.is_dir()
                    else "no such directory")
            raise FileNotFoundError(f"token shards {self.path}: {what}")
        self.meta = json.loads((self.path / META).read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self._sizes = np.array([s["num_tokens"] for s in self.meta["shards"]], dtype=np.int64)
        for s in self.meta["shards"]:
            actual = (self.path / s["tokens"]).stat().st_size
            if actual != s["num_tokens"] * self.dtype.itemsize:
                raise ValueError(f"{self.path / s['tokens']}: {actual} bytes, meta.json says "
                                 f"{s['num_tokens']} tokens of {self.dtype}")
        self._tokens: list[np.memmap | None] = [None] * len(self._sizes)
        self._docs: list[np.ndarray | None] = [None] * len(self._sizes)
        self._windows: dict[int, np.ndarray] = {}

    # memmaps would pickle as full copies: DataLoader workers reopen the files instead.
    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_docs(self) -> int:
        return int(self.meta["num_docs"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    def tokens(self, shard: int) -> np.ndarray:
        """Token ids of one shard file, (N,) memmap of ``self.dtype``."""
        if self._tokens[shard] is None:
            path = self.path / self.meta["shards"][shard]["tokens"]
            self._tokens[shard] = np.memmap(path, dtype=self.dtype, mode="r",
                                            shape=(int(self._sizes[shard]),))
        return self._tokens[shard]

    def doc_starts(self, shard: int) -> np.ndarray:
        """Start offsets of the documents of one shard file, (D,) int64."""
        if self._docs[shard] is None:
            path = self.path / self.meta["shards"][shard]["docs"]
            self._docs[shard] = np.load(path, mmap_mode="r")
        return self._docs[shard]

    def _cum_windows(self, seq_len: int) -> np.ndarray:
        """(S+1,) cumulative number of windows before each shard."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if seq_len not in self._windows:
            per = self._sizes // (seq_len + 1)
            self._windows[seq_len] = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        return self._windows[seq_len]

    def num_samples(self, seq_len: int) -> int:
        """Number of windows of ``seq_len + 1`` tokens (see the class docstring)."""
        return int(self._cum_windows(seq_len)[-1])

    def sample(self, i: int, seq_len: int) -> dict[str, np.ndarray]:
        """Window ``i`` as int64 arrays of shape (seq_len,).

        Returns:
            ``input_ids`` = window[:-1], ``labels`` = window[1:], ``doc_ids`` = document index of
            each input token counted from the window's first document (0, 0, 1, 1, 1, 2, ...);
            an eos belongs to the document it ends.
        """
        cum = self._cum_windows(seq_len)
        if not 0 <= i < cum[-1]:
            raise IndexError(f"sample {i} out of range [0, {int(cum[-1])}) for seq_len={seq_len}")
        shard = int(np.searchsorted(cum, i, side="right")) - 1
        start = int(i - cum[shard]) * (seq_len + 1)
        window = np.asarray(self.tokens(shard)[start:start + seq_len + 1], dtype=np.int64)
        positions = np.arange(start, start + seq_len)
        doc = np.searchsorted(self.doc_starts(shard), positions, side="right") - 1
        return {"input_ids": window[:-1], "labels": window[1:],
                "doc_ids": (doc - doc[0]).astype(np.int64)}
