"""TextCorpusDataModule: raw text in, packed pretraining batches out, with everything cached.

``prepare_data`` (rank 0) trains or loads a tokenizer and tokenises the train/val texts into
packed shards under ``cache_dir``; a second run reuses them. Batches come from
:class:`~mmllm.data.pretrain.PretrainDataModule` (resumable mid-epoch, per-document masks).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmllm.data.pretrain import PretrainDataModule

GENSIM_WIKI = "gensim_wiki"


class TextCorpusDataModule(PretrainDataModule):
    """Pretraining on a text corpus given as JSONL/Parquet files (field ``text``).

    Args:
        train_texts: JSONL/Parquet path, glob or list, or "gensim_wiki" (the Wikipedia sample
            shipped in gensim; its every 10th article is the validation split).
        val_texts: held-out texts (required unless ``train_texts`` is "gensim_wiki").
        cache_dir: where the tokenizer and shards are written and reused.
        tokenizer: a tokenizer to load (path, HF dir, or "smollm2"); None trains a byte-level
            BPE of ``vocab_size`` tokens on the training texts.
        vocab_size: size of the trained tokenizer (the model's vocab_size follows it in conf).
        seq_len, batch_size, num_samples, val_samples, num_workers, seed: see PretrainDataModule.
        num_proc: tokenisation processes.
    """

    def __init__(self, *, train_texts: str | list[str], val_texts: str | list[str] | None = None,
                 cache_dir: str, tokenizer: str | None = None, vocab_size: int = 4096,
                 seq_len: int, batch_size: int, num_samples: int | None = None,
                 val_samples: int | None = None, num_workers: int = 0, seed: int = 1234,
                 num_proc: int = 1) -> None:
        if val_texts is None and train_texts != GENSIM_WIKI:
            from mmllm.errors import ConfigError  # a ValueError

            raise ConfigError("val_texts is required (held-out text for val/ppl)",
                              fix="set data.val_texts=<held-out JSONL/Parquet with a text field>")
        self.cache_dir = Path(cache_dir)
        shards = self.cache_dir / "shards"
        super().__init__(sources=[{"name": "train", "path": str(shards / "train"), "epochs": 1.0}],
                         val_sources=[{"name": "val", "path": str(shards / "val"), "epochs": 1.0}],
                         seq_len=seq_len, batch_size=batch_size, num_samples=num_samples,
                         val_samples=val_samples, num_workers=num_workers, seed=seed)
        self.train_texts, self.val_texts = train_texts, val_texts
        self.tokenizer_spec, self.vocab_size, self.num_proc = tokenizer, vocab_size, num_proc
        self.tokenizer_dir = str(self.cache_dir / "tokenizer")
        self._tokenizer = None

    # ------------------------------------------------------------------------------ preparing
    def _text_files(self) -> tuple[str | list[str], str | list[str]]:
        if self.train_texts == GENSIM_WIKI:
            from mmllm.data.corpora import wikipedia_jsonl_splits

            train, val = wikipedia_jsonl_splits(self.cache_dir / "text")
            return str(train), str(val)
        for key, files in (("train_texts", self.train_texts), ("val_texts", self.val_texts)):
            _check_local_files(key, files)
        return self.train_texts, self.val_texts

    def _check_cache(self) -> None:
        """Refuses a cache made from other texts or another tokenizer (it would silently mismatch)."""
        key = {"train_texts": self.train_texts, "val_texts": self.val_texts,
               "tokenizer": self.tokenizer_spec, "vocab_size": self.vocab_size}
        stamp = self.cache_dir / "corpus.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text())
            if old != json.loads(json.dumps(key)):
                raise ValueError(f"{self.cache_dir} was prepared for {old}, not {key}: "
                                 "use another data.cache_dir or delete it")
        else:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(key, indent=2))

    def _prepare_tokenizer(self, train_files) -> None:
        if (Path(self.tokenizer_dir) / "tokenizer_config.json").is_file():
            return
        if self.tokenizer_spec:
            from mmllm.checkpoint import load_tokenizer_from

            tok = load_tokenizer_from(self.tokenizer_spec)
        else:
            import datasets

            from mmllm.data.tokenizer import train_bpe_tokenizer

            files = [train_files] if isinstance(train_files, str) else list(train_files)
            ds = datasets.load_dataset("json" if str(files[0]).endswith((".jsonl", ".json", ".gz"))
                                       else "parquet", data_files=files, split="train")
            tok = train_bpe_tokenizer((t for t in ds["text"] if t), vocab_size=self.vocab_size)
        tok.save_pretrained(self.tokenizer_dir)

    def prepare_data(self) -> None:
        from mmllm.data.shards import tokenize_to_shards

        self._check_cache()
        train, val = self._text_files()
        self._prepare_tokenizer(train)
        for split, files in (("train", train), ("val", val)):
            out = self.cache_dir / "shards" / split
            if not (out / "meta.json").is_file():
                tokenize_to_shards(files, str(out), self.tokenizer, num_proc=self.num_proc)

    @property
    def tokenizer(self):
        """The corpus tokenizer (available after ``prepare_data``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer


def _check_local_files(key: str, files: str | list[str]) -> None:
    """A missing local file (not a glob or a URL) is named with its config key before tokenising."""
    for f in [files] if isinstance(files, str) else list(files):
        if "://" not in str(f) and not any(c in str(f) for c in "*?[") and not Path(f).exists():
            from mmllm.errors import MissingFileError

            raise MissingFileError(f"data.{key}={f}: no such file (relative to {Path.cwd()})",
                                   fix="pass JSONL/Parquet files with a text field (a path, glob or list)")
